"""Training-step speed of seekling's DeepSeek-V3 `Transformer` vs transformers' `DeepseekV3ForCausalLM`,
and of one MoE layer vs a FLOP-matched dense SwiGLU layer.

1. Training step (forward + backward + AdamW step, fp32, CPU): both models are built from the same
   config and the same weights (seekling's are saved with `save_pretrained` and loaded by
   transformers); the losses of the first step are checked to agree. MTP is off for the
   like-for-like comparison; seekling with its MTP module (and its extra loss) is timed too.
   transformers runs with its defaults (sdpa attention, `grouped_mm` experts, which on CPU fp32
   falls back to one matmul per expert on stacked weights); both use torch's default AdamW.
2. MoE layer vs a dense SwiGLU of intermediate size moe_intermediate × (top-k + shared), forward +
   backward on the same tokens: the dense layer does the same matmul FLOPs without routing.

Variants are timed round-robin (one step of each, repeated) so the load of other processes on a
shared machine hits them alike; the median step time per variant is reported. The markdown table
is printed and written to benchmarks/results/bench_model.md.

    PYTHONPATH=. python benchmarks/bench_model.py [--preset tiny] [--batch 16] [--seq 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from seekling.model import Transformer
from seekling.model.config import ModelConfig, preset
from seekling.model.moe import MLP, MoE

RESULTS = Path(__file__).parent / "results" / "bench_model.md"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def train_step_fn(model: nn.Module, ids: torch.Tensor, seekling: bool) -> Callable[[], float]:
    """One optimizer step on a fixed batch (labels = inputs; both sides shift internally)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        out = model(ids, labels=ids) if seekling else model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if seekling:
            model.update_expert_bias()
        return out.loss.item()

    return step


def layer_step_fn(layer: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """Forward + backward of one FFN layer on fixed inputs (the input gradient is computed too)."""
    x = x.clone().requires_grad_(True)
    layer.train()

    def step() -> float:
        y = layer(x)
        y.square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        return 0.0

    return step


def time_round_robin(fns: dict[str, Callable[[], float]], warmup: int,
                     steps: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call of each function, calls interleaved across functions.

    CPU time is reported beside wall time because on a loaded machine wall time mostly measures
    how often our threads were descheduled; CPU time (summed over threads) is steadier."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def build_pair(cfg: ModelConfig, tmp: str) -> tuple[Transformer, nn.Module]:
    torch.manual_seed(0)
    ours = Transformer(cfg)
    ours.save_pretrained(tmp)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    tokens = args.batch * args.seq
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    # 1. training step, same weights on both sides
    cfg = preset(args.preset, vocab_size=args.vocab, num_nextn_predict_layers=0)
    cfg_mtp = preset(args.preset, vocab_size=args.vocab, num_nextn_predict_layers=1)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = build_pair(cfg, tmp)
    torch.manual_seed(0)
    ours_mtp = Transformer(cfg_mtp)
    with torch.no_grad():
        loss_ours, loss_ref = ours(ids, labels=ids).loss.item(), ref(input_ids=ids, labels=ids).loss.item()
    if abs(loss_ours - loss_ref) > 1e-4:
        sys.exit(f"same weights but different losses: seekling {loss_ours:.6f} vs transformers {loss_ref:.6f}")
    steps = {"transformers": train_step_fn(ref, ids, seekling=False),
             "seekling": train_step_fn(ours, ids, seekling=True),
             "seekling + MTP": train_step_fn(ours_mtp, ids, seekling=True)}
    train = time_round_robin(steps, args.warmup, args.steps)
    del ours, ref, ours_mtp, steps

    # 2. one MoE layer vs a FLOP-matched dense SwiGLU layer, on the same (normal-ish) hidden states
    torch.manual_seed(0)
    moe = MoE(cfg)
    nn.init.normal_(moe.gate.weight, std=cfg.initializer_range)
    dense_inter = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    dense = MLP(cfg.hidden_size, dense_inter)
    x = F.rms_norm(torch.randn(args.batch, args.seq, cfg.hidden_size), (cfg.hidden_size,))
    layer = time_round_robin({"dense": layer_step_fn(dense, x), "moe": layer_step_fn(moe, x)},
                             args.warmup, args.steps * 4)

    def row(name: str, t: tuple[float, float], base: tuple[float, float], scale: float = 1.0) -> str:
        return (f"| {name} | {t[0] * scale:.3f} | {tokens / t[0]:,.0f} | {base[0] / t[0]:.2f}× | "
                f"{t[1] * scale:.3f} | {base[1] / t[1]:.2f}× |")

    ref_t = train["transformers"]
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    lines = [
        f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "",
        f"Training step (fwd + bwd + AdamW, fp32), preset `{args.preset}` (vocab {args.vocab}, "
        f"{cfg.num_parameters(include_mtp=False) / 1e6:.1f}M params), batch {args.batch} × {args.seq}, "
        f"median of {args.steps} interleaved steps:",
        "",
        "| variant | wall s/step | tokens/s | vs transformers | CPU s/step | vs transformers (CPU) |",
        "|---|---|---|---|---|---|",
        row("transformers DeepseekV3ForCausalLM", ref_t, ref_t),
        row("seekling Transformer (no MTP)", train["seekling"], ref_t),
        row("seekling Transformer + 1 MTP module", train["seekling + MTP"], ref_t),
        "",
        f"One FFN layer, fwd + bwd, {tokens} tokens, median of {args.steps * 4} interleaved steps (ms):",
        "",
        "| layer | wall ms | tokens/s | vs dense | CPU ms | vs dense (CPU) |",
        "|---|---|---|---|---|---|",
        row(f"dense SwiGLU (intermediate {dense_inter})", layer["dense"], layer["dense"], 1e3),
        row(f"MoE ({cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, "
            f"{cfg.moe_intermediate_size} each)", layer["moe"], layer["dense"], 1e3),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
