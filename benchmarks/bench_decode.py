"""Decode speed and KV-cache size: seekling's engine vs transformers' DeepseekV3ForCausalLM.generate.

Same weights, side by side in one run on the CPU: the seekling checkpoint is loaded by both (it is
a Hugging Face checkpoint). Greedy decoding of random prompts, every sequence generating exactly
--new tokens, at each of --batches concurrent sequences: the engine as a user gets it (`Engine()`: the C++
step, k decode steps per call) and, at batch 1, the Python step it falls back to (`native=False`). Also:
KV-cache bytes per token (the latent c_KV + k_pe vs transformers' expanded per-head K/V, measured from its cache
object), and MTP speculative decoding's acceptance rate and speed-up over the plain engine at --spec-batches
(meaningful only on a trained checkpoint: with random weights the MTP module drafts at chance). When the
checkpoint has a tokenizer, speculative decoding is measured on in-distribution prompts first (held-out problems of
seekling.tasks rendered with the chat template, as `seekling eval` does; up to --new tokens, stopping
at eos), then on the random prompts.

    python benchmarks/bench_decode.py                       # random weights, preset tiny
    python benchmarks/bench_decode.py --model runs/x/rl      # batches 1, 8, 32, 64; MTP at 1 and 8
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import seekling
from seekling.engine import Engine, SamplingParams
from seekling.model import Transformer


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        lines = out.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


class Median:
    """The median of N timings on two clocks: wall time, and this process's CPU time. The dev machine is
    shared (other jobs keep both cores busy), so a run is often preempted: CPU time leaves that out and is
    the steadier figure for single-threaded contenders; wall time is what a user waits."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.cpus: list[float] = []

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    def time(self, fn, *args, **kw):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        self.walls.append(time.perf_counter() - w)
        self.cpus.append(time.process_time() - c)
        return out


def rates(n: int, *runs: Median) -> str:
    return " / ".join(f"{n / r.cpu:7.1f} ({n / r.wall:7.1f} wall)" for r in runs)


def hf_generate(hf, prompts: torch.Tensor, new: int) -> tuple[torch.Tensor, object]:
    # No eos for transformers (the engine's ignore_eos): every sequence runs `new` tokens, and eos can still be
    # chosen (min_new_tokens would forbid it, and the greedy sequences of a trained model would differ).
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, do_sample=False,
                      return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, prompts.shape[1]:], out.past_key_values


def engine_generate(engine: Engine, prompts: torch.Tensor | list, new: int,
                    ignore_eos: bool = True) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=ignore_eos)
    prompts = prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts
    return [o.token_ids for o in engine.generate(prompts, params)]


def task_prompts(n: int) -> list[list[dict[str, str]]]:
    """n held-out problems, tasks and levels interleaved, as chat messages (what eval sends)."""
    from seekling.eval import eval_problems

    problems = eval_problems(-(-n // 12) + 1)  # 12 (task, level) cells
    cells: dict[tuple[str, int], list] = {}
    for p in problems:
        cells.setdefault((p.task, p.difficulty), []).append(p)
    mixed = [p for group in zip(*cells.values(), strict=False) for p in group]
    return [[{"role": "user", "content": p.question}] for p in mixed[:n]]


def speculative_rows(plain: Engine, spec: Engine, label: str, prompts: list, new: int, repeat: int,
                     ignore_eos: bool) -> None:
    """Plain vs MTP speculative greedy decoding of the same prompts (interleaved, median of `repeat`)."""
    t_pl, t_sp = Median(), Median()
    before = spec.stats()
    for _ in range(repeat):
        pl_tokens = t_pl.time(engine_generate, plain, prompts, new, ignore_eos)
        sp_tokens = t_sp.time(engine_generate, spec, prompts, new, ignore_eos)
    st = spec.stats()
    drafted = st["spec_drafted"] - before["spec_drafted"]
    rate = (st["spec_accepted"] - before["spec_accepted"]) / max(drafted, 1)
    n = sum(len(x) for x in pl_tokens)
    same = sum(a == b for a, b in zip(pl_tokens, sp_tokens, strict=True))
    print(f"  MTP, {label:14s} batch {len(prompts):3d}: plain / speculative {rates(n, t_pl, t_sp)} tok/s | "
          f"acceptance {rate:.2f} | speed-up x{t_pl.cpu / t_sp.cpu:.2f} (x{t_pl.wall / t_sp.wall:.2f} wall) | "
          f"greedy identical {same}/{len(prompts)} | {n / len(prompts):.0f} tokens/seq")


def has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer.json").is_file()


def cache_bytes(past) -> int:
    """Bytes of every tensor held by a transformers cache object."""
    total = 0
    for layer in getattr(past, "layers", []):
        for name in ("keys", "values"):
            x = getattr(layer, name, None)
            if isinstance(x, torch.Tensor):
                total += x.numel() * x.element_size()
    return total


def decode_rows(hf, engines: dict[str, Engine], prompts: torch.Tensor, batches: list[int], new: int,
                repeat: int) -> object:
    """transformers vs each engine, greedy, every sequence `new` tokens; the engines' rows only at batch 1 when
    their name says so ("... b1")."""
    for bs in batches:
        p = prompts[:bs]
        runs = {"transformers": Median(), **{name: Median() for name in engines if bs == 1 or "b1" not in name}}
        tokens = {}
        for _ in range(repeat):  # interleaved, so all see the same machine load
            hf_tokens, past = runs["transformers"].time(hf_generate, hf, p, new)
            tokens["transformers"] = hf_tokens.tolist()
            for name in runs:
                if name != "transformers":
                    tokens[name] = runs[name].time(engine_generate, engines[name], p, new)
        n = bs * new
        for name, r in runs.items():
            if name == "transformers":
                continue
            same = sum(a == b for a, b in zip(tokens["transformers"], tokens[name], strict=True))
            base = runs["transformers"]
            print(f"batch {bs:3d}: {name:28s} {rates(n, r)} tok/s | transformers {rates(n, base)} | "
                  f"x{base.cpu / r.cpu:.2f} (x{base.wall / r.wall:.2f} wall) | greedy identical {same}/{bs}")
    return past


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: random weights, preset tiny)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="batch sizes vs transformers")
    ap.add_argument("--spec-batches", type=int, nargs="+", default=[1, 8], help="batch sizes of the MTP rows")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine is shared)")
    ap.add_argument("--repeat", type=int, default=5, help="median of N timings, alternating the contenders")
    ap.add_argument("--compile", action="store_true", help="also time the Python step compiled at batch 1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # it lists the MTP weights it does not use

    path = args.model
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        torch.manual_seed(0)
        Transformer(seekling.preset("tiny")).save_pretrained(tmp.name)
        path, weights = tmp.name, "random weights (preset tiny)"
    else:
        weights = f"trained checkpoint {path}"
    model = seekling.load_pretrained(path).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    cfg = model.config
    batch = max(args.batches + args.spec_batches)
    print(f"# bench_decode  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  cpu: {cpu_model()}  "
          f"threads: {args.threads}  torch {torch.__version__}  load average {os.getloadavg()[0]:.2f}")
    print(f"# model: {weights}; {model.num_parameters(include_mtp=False) / 1e6:.2f}M params, "
          f"{cfg.num_hidden_layers} layers, kv_lora_rank {cfg.kv_lora_rank}, vocab {cfg.vocab_size}")
    print(f"# greedy, prompt {args.prompt} tokens, {args.new} new tokens per sequence, median of {args.repeat}")

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, cfg.vocab_size, (batch, args.prompt), generator=g)
    # The engine as a user gets it (no flags: the C++ step), and the Python step it falls back to.
    # One step per call (the C++ forward, Python between tokens: what constrained, logprobs or penalty rows get).
    engines = {"seekling Engine()": Engine(model, max_num_seqs=batch),
               "seekling one step a call (b1)": Engine(model, max_num_seqs=batch, num_scheduler_steps=1),
               "seekling Python step (b1)": Engine(model, max_num_seqs=batch, native=False)}
    if args.compile:
        engines["seekling Python step compiled (b1)"] = Engine(model, max_num_seqs=batch, compile=True, native=False)
    print(f"# seekling Engine() runs the {'C++' if engines['seekling Engine()'].stats()['native'] else 'Python'} step")
    spec = Engine(model, max_num_seqs=batch, speculative=True) if cfg.num_nextn_predict_layers > 0 else None
    tasks = task_prompts(batch) if has_tokenizer(path) else None
    with torch.inference_mode():
        for e in engines.values():
            engine_generate(e, prompts[:2, :8], 4)  # warm-up (compiles, once)
        hf_generate(hf, prompts[:2, :8], 4)
        print("# tokens/s of CPU time (wall-clock in brackets); speed-ups on CPU time (wall in brackets)")
        past = decode_rows(hf, engines, prompts, args.batches, args.new, args.repeat)
        if spec is not None:
            plain = engines["seekling Engine()"]
            text_engine = text_spec = None
            if tasks is not None:  # the same model with its tokenizer, to render the chat prompts
                text_engine = Engine(model, seekling.load_tokenizer(path), max_num_seqs=batch)
                text_spec = Engine(model, text_engine.tokenizer, max_num_seqs=batch, speculative=True)
            for bs in args.spec_batches:
                if tasks is not None:
                    speculative_rows(text_engine, text_spec, "task prompts", tasks[:bs], args.new, args.repeat,
                                     ignore_eos=False)
                speculative_rows(plain, spec, "random prompts", prompts[:bs].tolist(), args.new, args.repeat,
                                 ignore_eos=True)
    hf_per_token = cache_bytes(past) / (args.batches[-1] * (args.prompt + args.new - 1))
    latent = Engine(model, cache_blocks=1).cache_bytes_per_token  # main layers only
    expanded = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    print(f"KV cache bytes/token: seekling latent {latent} ({cfg.num_hidden_layers} x ({cfg.kv_lora_rank} + "
          f"{cfg.qk_rope_head_dim}) x 4) | transformers' cache (measured) {hf_per_token:.0f} | expanded per-head "
          f"K/V (a standard cache) {expanded}: x{expanded / latent:.1f} the latent")
    # transformers >= 5 also caches the latent, but re-expands every head's K/V from it at every step.
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
