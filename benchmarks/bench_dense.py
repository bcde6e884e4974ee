"""Batch-1 greedy decode speed: seekling's dense decoder vs transformers' `generate`, same weights.

A random ~120M-parameter Qwen2 (hidden 768, 12 layers, 12 heads / 2 KV heads, intermediate 2048,
vocab 32000) is saved with `save_pretrained` and loaded back by both sides. Each variant decodes
the same prompt greedily; the greedy tokens are compared, the median of a few runs (round robin over
the variants) is kept, and the ratio to transformers in the same dtype is printed (int8 is compared with
transformers fp32). seekling runs through its serving engine (paged per-KV-head cache, continuous
batching, sampler): int8 is `Engine(path, quantize="int8")` (seekling/model/quant.py: int8 weights with
per-row scales, activations quantised per 32 in the kernel), what `seekling serve --quantize int8` runs;
the "xN" rows serve --batch requests at once (total tokens/s). The outside benchmark against llama.cpp is
benchmarks/bench_llamacpp.py.

    PYTHONPATH=. python benchmarks/bench_dense.py [--new-tokens 64] [--repeats 3] [--threads 1] [--batch 8]
    (or pip install -e .)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers

from seekling.engine import Engine, SamplingParams
from seekling.model import CausalLM

CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
              intermediate_size=2048, vocab_size=32000, max_position_embeddings=4096,
              tie_word_embeddings=False)


def engine_greedy(model: CausalLM, prompts: list[list[int]], n: int) -> list[int]:
    """All prompts decode together (one batched step per token); returns the first prompt's tokens."""
    # a fresh engine per run: a reused one would find the prompt in its prefix cache
    blocks = len(prompts) * -(-(len(prompts[0]) + n) // 16)
    engine = Engine(model, max_num_seqs=len(prompts), block_size=16, cache_blocks=blocks)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return engine.generate(prompts, params)[0].token_ids


@torch.inference_mode()
def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=8, help="concurrent requests of the batched engine rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    n = args.new_tokens
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.prompt_tokens))
    others = torch.randint(0, CONFIG["vocab_size"], (args.batch - 1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))  # own generator: the weights stay as before
    batch = [ids[0].tolist()] + others.tolist()
    with tempfile.TemporaryDirectory() as tmp:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG))
        with torch.no_grad():  # wider init than 0.02 so greedy paths depend on the weights
            for p in ref.parameters():
                p.normal_(0, 0.05)
        ref.save_pretrained(tmp)
        params = ref.num_parameters()
        print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
        print(f"Qwen2 {params / 1e6:.0f}M params, prompt {args.prompt_tokens}, {n} new tokens, "
              f"median of {args.repeats}")
        hf = {"float32": ref.eval(),
              "bfloat16": transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()}
        ours = {k: Engine(tmp, **kw).model for k, kw in (("float32", dict(dtype="float32")),
                                                          ("bfloat16", dict(dtype="bfloat16")),
                                                          ("int8", dict(quantize="int8")))}
    runs = {"transformers " + k: (lambda m=m: hf_greedy(m, ids, n)) for k, m in hf.items()}
    runs |= {"engine " + k: (lambda m=m: engine_greedy(m, batch[:1], n)) for k, m in ours.items()}
    runs |= {f"engine {k} x{args.batch}": (lambda m=ours[k]: engine_greedy(m, batch, n)) for k in ("float32", "int8")}
    for fn in runs.values():
        fn()  # warm-up (allocator, kernels)
    # round-robin over the variants and keep each one's median run, so load from other processes on a
    # shared machine is spread over all variants instead of hitting one. CPU time is printed beside wall
    # time: on a busy machine it is the steadier of the two (with 1 thread it is the work done).
    timings: dict[str, tuple[list[float], list[float], list[int]]] = {name: ([], [], []) for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = fn()
            timings[name][0].append(time.perf_counter() - wall)
            timings[name][1].append(time.process_time() - cpu)
            timings[name][2][:] = tokens
    results = {name: (statistics.median(w), statistics.median(c), t) for name, (w, c, t) in timings.items()}
    base = {k: results["transformers " + k][:2] for k in ("float32", "bfloat16")}
    ref_tokens = results["transformers float32"][2]
    print(f"{'variant':24s} {'tokens/s':>9s} {'ratio':>6s} {'CPU tokens/s':>13s} {'ratio':>6s} "
          f"{'same greedy tokens':>19s}   (ratio: vs transformers in the same dtype at batch 1; int8 vs float32;")
    print(f"{'':78s}xN rows: total tokens/s of N requests, tokens of the first)")
    for name, (wall, cpu, tokens) in results.items():
        base_wall, base_cpu = base.get(name.split()[1], base["float32"])
        same = sum(a == b for a, b in zip(tokens, ref_tokens, strict=True))
        count = n * (args.batch if name.endswith(f"x{args.batch}") else 1)
        print(f"{name:24s} {count / wall:9.1f} {base_wall / wall * count / n:5.2f}x {count / cpu:13.1f} "
              f"{base_cpu / cpu * count / n:5.2f}x {same:>14d}/{n}")

if __name__ == "__main__":
    main()
