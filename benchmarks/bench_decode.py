"""Decode speed and KV-cache size: seekling's engine vs transformers' DeepseekV3ForCausalLM.generate.

Same weights, side by side in one run on the CPU: the seekling checkpoint is loaded by both (it is
a Hugging Face checkpoint). Greedy decoding of random prompts, every sequence generating exactly
--new tokens; batch 1 and --batch concurrent sequences. Also: KV-cache bytes per token (the latent
c_KV + k_pe vs transformers' expanded per-head K/V, measured from its cache object), and MTP
speculative decoding's acceptance rate and speed-up (meaningful only on a trained checkpoint: with
random weights the MTP module drafts at chance).

    python benchmarks/bench_decode.py                       # runs/*/rl or sft if present, else random tiny
    python benchmarks/bench_decode.py --model runs/x/sft --batch 32 --new 64
"""

from __future__ import annotations

import argparse
import glob
import platform
import subprocess
import tempfile
import time
from datetime import datetime, timezone

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


def hf_generate(hf, prompts: torch.Tensor, new: int) -> tuple[float, torch.Tensor, object]:
    t = time.perf_counter()
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    return time.perf_counter() - t, out.sequences[:, prompts.shape[1]:], out.past_key_values


def engine_generate(engine: Engine, prompts: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(prompts.tolist(), params)
    return time.perf_counter() - t, [o.token_ids for o in outs]


def cache_bytes(past) -> int:
    """Bytes of every tensor held by a transformers cache object."""
    total = 0
    for layer in getattr(past, "layers", []):
        for name in ("keys", "values"):
            x = getattr(layer, name, None)
            if isinstance(x, torch.Tensor):
                total += x.numel() * x.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="checkpoint dir (default: newest runs/*/rl or sft, else random weights)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine is shared)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings, alternating the contenders")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # it lists the MTP weights it does not use

    path = args.model
    if path is None:
        found = sorted(glob.glob("runs/*/rl/config.json") + glob.glob("runs/*/sft/config.json"))
        path = found[-1].rsplit("/", 1)[0] if found else None
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        torch.manual_seed(0)
        Transformer(seekling.preset("tiny")).save_pretrained(tmp.name)
        path, weights = tmp.name, "random weights (preset tiny; no trained checkpoint found under runs/)"
    else:
        weights = f"trained checkpoint {path}"
    model = seekling.load_pretrained(path).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    print(f"# bench_decode  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  cpu: {cpu_model()}  "
          f"threads: {args.threads}  torch {torch.__version__}")
    print(f"# model: {weights}; {model.num_parameters(include_mtp=False) / 1e6:.2f}M params, "
          f"{cfg.num_hidden_layers} layers, kv_lora_rank {cfg.kv_lora_rank}, vocab {cfg.vocab_size}")
    print(f"# greedy, prompt {args.prompt} tokens, {args.new} new tokens per sequence, best of {args.repeat}")

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, cfg.vocab_size, (args.batch, args.prompt), generator=g)
    engine = Engine(model, max_num_seqs=args.batch)
    spec = Engine(model, max_num_seqs=args.batch, speculative=cfg.num_nextn_predict_layers > 0) \
        if cfg.num_nextn_predict_layers > 0 else None
    with torch.inference_mode():
        engine_generate(engine, prompts[:2, :8], 4)  # warm-up
        hf_generate(hf, prompts[:2, :8], 4)
        for bs in (1, args.batch):
            p = prompts[:bs]
            t_hf = t_se = float("inf")
            for _ in range(args.repeat):  # interleaved, so both see the same machine load
                t, hf_tokens, past = hf_generate(hf, p, args.new)
                t_hf = min(t_hf, t)
                t, se_tokens = engine_generate(engine, p, args.new)
                t_se = min(t_se, t)
            n = bs * args.new
            same = sum(a == b for a, b in zip(hf_tokens.tolist(), se_tokens, strict=True))
            print(f"batch {bs:3d}: transformers {n / t_hf:8.1f} tok/s | seekling {n / t_se:8.1f} tok/s | "
                  f"speed-up x{t_hf / t_se:.2f} | identical greedy sequences {same}/{bs}")
            if spec is not None:
                before = spec.stats()
                t_sp = float("inf")
                for _ in range(args.repeat):
                    t, sp_tokens = engine_generate(spec, p, args.new)
                    t_sp = min(t_sp, t)
                st = spec.stats()
                drafted = st["spec_drafted"] - before["spec_drafted"]
                rate = (st["spec_accepted"] - before["spec_accepted"]) / max(drafted, 1)
                same = sum(a == b for a, b in zip(se_tokens, sp_tokens, strict=True))
                print(f"           MTP speculative {n / t_sp:8.1f} tok/s | acceptance {rate:.2f} | "
                      f"speed-up vs plain engine x{t_se / t_sp:.2f} | greedy identical {same}/{bs}")
    hf_per_token = cache_bytes(past) / (args.batch * (args.prompt + args.new - 1))
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
