"""How close quantised weights stay to fp32: seekling's int8 / int4 beside llama.cpp's Q8_0 / Q4_K_M of the same
weights, teacher-forced.

For each model, fixed token sequences are run through every variant and the next-token distribution at every
position is compared with the fp32 model's (seekling's own fp32 forward of the checkpoint's weights): top-1
agreement (the argmax is fp32's) and KL(fp32 || variant), the mean over positions. The sequences: for a
speedrun model, held-out task questions in its chat template continued by fp32's own greedy tokens (what the
model writes); for a random model, random tokens. llama.cpp runs on GGUF files from its own converter (F32) and
quantiser (`llama_model_quantize`: Q8_0, Q4_K_M), with an fp32 KV cache and no flash attention, so the weights
are the only difference; its F32 file's row is the check that both sides compute the same model (KL ~1e-6).

    PYTHONPATH=. python benchmarks/bench_quant_quality.py --model runs/smoke/rl \\
        --model /tmp/seekling-bench-llamacpp/moonlight-seed0 --llama-cpp-src .../vendor/llama.cpp

Random models of the real shapes come from `python benchmarks/bench_llamacpp.py --shapes ...` (or
bench_llamacpp.prepare_shape).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_llamacpp  # noqa: E402  (the converter wrapper and the prompts)

import seekling  # noqa: E402
from seekling.model.layers import make_batch  # noqa: E402
from seekling.model.quant import use_kernels  # noqa: E402

BLOCK = 16
LLAMA_FTYPES = {"Q8_0": 7, "Q4_K_M": 15, "Q4_0": 2}  # llama_ftype values (Q4_0: 4.5 bits, pure 4-bit)


def sequences(model_dir: Path, model: Any, n: int, length: int, seed: int) -> list[list[int]]:
    """Speedrun models: chat prompts continued by fp32's greedy tokens; random models: random tokens."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vocab_size", 0) < 20000:  # a trained speedrun model
        prompts = bench_llamacpp.chat_prompts(model_dir, n, seed)
        engine = seekling.Engine(model, max_num_seqs=n)
        params = seekling.SamplingParams(temperature=0.0, max_tokens=max(1, length - min(map(len, prompts))),
                                         ignore_eos=True)
        outs = engine.generate(prompts, params)
        return [(o.prompt_token_ids + o.outputs[0].token_ids)[:length] for o in outs]
    return bench_llamacpp.random_prompts(n, length, config["vocab_size"], seed)


def seekling_logprobs(model: Any, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Log-probabilities at every position of each sequence (one prefill each, through `infer`)."""
    out = []
    dtype = model.model.norm.weight.dtype
    for s in seqs:
        blocks = -(-len(s) // BLOCK)
        batch = make_batch([(s, 0, list(range(blocks)))], BLOCK, torch.device("cpu"))
        batch.cache = torch.zeros(model.num_cache_layers(False), blocks, BLOCK, *model.cache_entry_shape(),
                                  dtype=dtype)
        with torch.inference_mode():
            hidden, _ = model.infer(batch)
            out.append(model.logits(hidden).float().log_softmax(-1))
    return out


def llama_logprobs(gguf: Path, seqs: list[list[int]], threads: int) -> list[torch.Tensor]:
    import llama_cpp as L

    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
    n = max(map(len, seqs))
    p = L.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = n + BLOCK, n, n
    p.n_threads = p.n_threads_batch = threads
    p.type_k = p.type_v = L.GGML_TYPE_F32
    p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, p)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(n, 0, 1)
    out = []
    try:
        for s in seqs:
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            for i, t in enumerate(s):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(s)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = [np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy() for i in
                    range(len(s))]
            out.append(torch.from_numpy(np.stack(rows)).log_softmax(-1))
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return out


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    agree, kl, n = 0, 0.0, 0
    for ref, got in zip(reference, other, strict=True):
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        kl += (ref.exp() * (ref - got)).sum(-1).sum().item()
        n += ref.shape[0]
    return {"top1": agree / n, "kl": kl / n, "positions": n}


def gguf_bits(path: Path) -> tuple[float, dict[str, int]]:
    """Bits per weight of a GGUF file's tensors and how many weights each type holds."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    by_type: dict[str, int] = {}
    total_bytes = 0
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_elements)
        total_bytes += int(t.n_bytes)
    return 8 * total_bytes / sum(by_type.values()), by_type


def evaluate(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    work = args.workdir / model_dir.name
    work.mkdir(parents=True, exist_ok=True)
    cached = work / f"reference-{args.sequences}x{args.tokens}-seed{args.seed}.pt"  # fp32's sequences and logprobs
    if cached.exists():
        seqs, reference = torch.load(cached)
    else:
        fp32 = seekling.load_pretrained(model_dir, dtype="float32")
        fp32.prepare()
        seqs = sequences(model_dir, fp32, args.sequences, args.tokens, args.seed)
        reference = seekling_logprobs(fp32, seqs)
        del fp32
        torch.save((seqs, reference), cached)
    rows: dict[str, Any] = {}
    for kind in args.kinds:
        model = seekling.load_pretrained(model_dir, quantize=kind)
        rows[f"seekling {kind}"] = compare(reference, seekling_logprobs(model, seqs))
        del model
    if args.no_llama:
        return {"model": str(model_dir), "sequences": len(seqs), "tokens": args.tokens,
                "seconds": time.time() - t0, "rows": rows}
    f32 = bench_llamacpp.convert(args.llama_cpp_src, model_dir, work / "F32.gguf", "f32")
    files = {"F32": f32}
    for name, ftype in LLAMA_FTYPES.items():
        files[name] = work / f"{name}.gguf"
        if not files[name].exists():
            import llama_cpp as L

            params = L.llama_model_quantize_default_params()
            params.ftype = ftype
            if L.llama_model_quantize(str(f32).encode(), str(files[name]).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed")
    for name, path in files.items():
        bits, types = gguf_bits(path)
        rows[f"llama.cpp {name}"] = compare(reference, llama_logprobs(path, seqs, args.threads)) | {
            "bits": bits, "types": types}
    return {"model": str(model_dir), "sequences": len(seqs), "tokens": args.tokens, "seconds": time.time() - t0,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True, help="model directory (repeatable)")
    ap.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"), required=False)
    ap.add_argument("--kinds", nargs="+", default=["int8", "int4"])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/seekling-bench-quality"))
    ap.add_argument("--no-llama", action="store_true", help="seekling's rows only (llama.cpp's are kept in --json)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    use_kernels(torch.device("cpu"))
    info = bench_llamacpp.machine()
    print(f"{info['date']}  {info['cpu']}  load average {info['load_average'][0]:.2f}")
    results = []
    for model_dir in args.model:
        r = evaluate(model_dir, args)
        results.append(r)
        print(f"\n{r['model']}: {r['sequences']} sequences x {r['tokens']} tokens, teacher-forced vs seekling fp32")
        print(f"{'variant':20s} {'top-1 agree':>11s} {'KL(fp32||q)':>12s}  bits/weight (llama.cpp: its tensor types)")
        for name, row in r["rows"].items():
            extra = f"{row['bits']:.2f}  {row['types']}" if "bits" in row else ""
            print(f"{name:20s} {row['top1']:11.4f} {row['kl']:12.6f}  {extra}")
    bench_llamacpp.finish(args.json, info, results)


if __name__ == "__main__":
    main()
