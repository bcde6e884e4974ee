"""The one training loop, for pretraining, SFT and distillation (nanoGPT style, top to bottom).

    summary = train(model, BatchLoader(...), TrainConfig(max_steps=2000), "runs/x/base")

`loss_fn(model, batch) -> (loss, metrics)` is the only thing that differs between the three jobs:
the default is the model's own loss (language modelling, SFT labels with -100), distillation
passes a KD loss. The model goes to `out_dir` (Hugging Face layout); everything needed to resume
exactly (weights, optimizer, step, RNG, data cursor) goes to `state_dir/checkpoints/` and the
metrics to `state_dir/metrics.jsonl`, beside it and never inside it. Devices, process groups,
DDP / FSDP2 / expert parallelism, the schedule, checkpoints and signals are the scaffold's
(`seekling/train/scaffold.py`), shared with GRPO. Under torchrun every rank runs this same
function, each on its slice of the data; rank 0 logs and writes the model directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from seekling.train.scaffold import (
    PARALLEL,
    SCHEDULES,
    Checkpointer,
    Dist,
    GracefulStop,
    MetricsLog,
    Parallelized,
    autocast,
    fmt_time,
    lr_at,
    peak_flops,
    precision,
    seed_everything,
    set_lr,
    setup,
)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]

@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps; also the length of the lr schedule
    time_budget_s: float | None = None  # stop after this much training time; the schedule then follows time
    grad_accum: int = 1  # micro-batches per optimizer step (the batch size is the loader's)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup, stable, then linear decay over the last 20%)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for 2-D hidden weights, AdamW for the rest
    eval_every: int = 0  # steps between evals (0: only at the end); needs eval_batches
    eval_batches: int = 8  # batches per eval
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end and on Ctrl-C)
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    compile: bool = False
    peak_flops: float | None = None  # for MFU; None: the GPU's dense bf16 peak, or the CPU's fp32 peak
    parallel: str = "ddp"  # with several ranks: "ddp" (replicas), or "fsdp" (FSDP2: weights, grads, optimizer sharded)
    ep: int = 1  # expert parallelism: routed experts sharded over groups of this many ranks

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', not {self.optimizer!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, not {self.parallel!r}")
        if self.max_steps < 1 or self.grad_accum < 1 or self.ep < 1:
            raise ValueError("max_steps, grad_accum and ep must be >= 1")


# --- optimizers -----------------------------------------------------------------------------------------


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise g (U S V^T -> U V^T) with the quintic iteration of Muon."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024): Nesterov momentum, orthogonalised. The update is scaled by
    0.2·sqrt(max(m, n)) as in Moonlight (Liu et al., 2025), so it takes AdamW's lr and weight decay."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])
                if isinstance(g, DTensor):  # FSDP2 shard: orthogonalise the whole matrix, keep this rank's rows
                    full = newton_schulz(g.full_tensor(), group["ns_steps"])
                    update = distribute_tensor(full, g.device_mesh, g.placements, src_data_rank=None)
                else:
                    update = newton_schulz(g, group["ns_steps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * 0.2 * max(p.shape) ** 0.5)


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only (not norms / biases); with cfg.optimizer == "muon"
    the hidden matrices go to Muon instead (embeddings and output heads stay with AdamW)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_head = lambda n: "embed_tokens" in n or n.endswith("head.weight")
    muon = [p for n, p in params if cfg.optimizer == "muon" and p.ndim == 2 and not is_head(n)]
    muon_ids = {id(p) for p in muon}
    decay = [p for _, p in params if p.ndim >= 2 and id(p) not in muon_ids]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)]
    if muon:
        opts.append(Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return opts


# --- the loop -------------------------------------------------------------------------------------------


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The default loss: the model's own (ce + λ·mtp + balance), with its parts as metrics."""
    out = model(**batch)
    parts = ("ce_loss", "mtp_loss", "balance_loss")
    return out.loss, {k: getattr(out, k).detach() for k in parts if getattr(out, k, None) is not None}


def train(
    model: nn.Module,
    train_batches: Iterable[Batch],
    cfg: TrainConfig,
    out_dir: str | Path,
    state_dir: str | Path | None = None,
    eval_batches: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    resume: bool = False,
) -> dict:
    """Train `model` on `train_batches` (endless, or stops early when exhausted) and return a summary.

    `state_dir` defaults to `<out_dir>/../train_state/<out_dir name>`. With resume=True and a saved
    state there, training continues exactly where it stopped: same weights, optimizer, schedule,
    RNG and data cursor (when the batches have `state_dict()`; otherwise the consumed batches are
    skipped), at the same or another world size. `eval_batches` must be re-iterable (a list); the
    first cfg.eval_batches are used. With several ranks and `cfg.parallel == "fsdp"` or `cfg.ep > 1`
    the module is sharded in place: read the result from `out_dir`.
    """
    out_dir = Path(out_dir)
    state_dir = Path(state_dir) if state_dir is not None else out_dir.parent / "train_state" / out_dir.name
    if state_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"state_dir {state_dir} is inside the model directory {out_dir}: keep it beside it")
    d = setup(cfg.device, cfg.ep)
    try:
        return _train(model, train_batches, cfg, out_dir, state_dir, eval_batches, loss_fn or lm_loss, resume, d)
    finally:
        d.close()


def _train(model: nn.Module, train_batches: Iterable[Batch], cfg: TrainConfig, out_dir: Path, state_dir: Path,
           eval_batches: Iterable[Batch] | None, loss_fn: LossFn, resume: bool, d: Dist) -> dict:
    log, device = d.log, d.device
    seed_everything(cfg.seed)
    pm = Parallelized(model, d, cfg.parallel, cfg.ep)
    raw = pm.module
    raw.train()
    opts = make_optimizers(raw, cfg)
    ckpt = Checkpointer(state_dir, d)
    step, tokens_seen, train_time = 0, 0, 0.0
    resumed = resume and ckpt.latest() is not None
    if resumed:
        state = ckpt.load(pm, opts, log)
        step, tokens_seen, train_time = state["step"], state["tokens"], state["train_time"]
        if state["data"] is not None and hasattr(train_batches, "load_state_dict"):
            train_batches.load_state_dict(state["data"])
        else:  # a plain iterable: replay it up to where we were
            train_batches = islice(train_batches, step * cfg.grad_accum, None)
        log(f"resumed from {ckpt.latest()} at step {step}")
    elif resume:
        log(f"no saved state in {state_dir}: starting from scratch")
    metrics = MetricsLog(state_dir / "metrics.jsonl", d.master, step if resumed else None)
    fwd = torch.compile(pm.fwd) if cfg.compile else pm.fwd

    # MFU: ~6 FLOPs per active (non-embedding) parameter per token, forward + backward
    mcfg = getattr(raw, "config", None)
    if hasattr(mcfg, "num_parameters"):
        mtp_trained = getattr(mcfg, "mtp_loss_weight", 0) > 0
        n_params = mcfg.num_parameters(include_mtp=mtp_trained, active=True) - mcfg.vocab_size * mcfg.hidden_size
    else:
        n_params = sum(p.numel() for n, p in raw.named_parameters() if "embed" not in n)
    peak = cfg.peak_flops or peak_flops(device)

    def evaluate() -> float:
        raw.eval()
        losses = []
        with torch.no_grad(), autocast(device):
            for batch in islice(eval_batches, cfg.eval_batches):
                losses.append(loss_fn(fwd, {k: v.to(device) for k, v in batch.items()})[0].float())
        raw.train()
        if not losses:
            raise ValueError("eval_batches is empty (or an exhausted iterator: pass a list)")
        mean = d.sum([torch.stack(losses).mean().item()])[0] / d.world
        metrics.append({"step": step, "eval_loss": mean})
        log(f"step {step} | eval loss {mean:.4f}")
        return mean

    def save() -> None:
        pm.save_pretrained(out_dir)
        ckpt.save(pm, opts, {"step": step, "tokens": tokens_seen, "train_time": train_time,
                             "data": train_batches.state_dict() if hasattr(train_batches, "state_dict") else None,
                             "config": dataclasses.asdict(cfg)})

    batches = iter(train_batches)
    stop_reason, last_loss, last_eval = "max_steps", float("nan"), None
    window_tokens, window_time = 0, 0.0  # for tokens/s since the last log line
    start_step, start_time = step, train_time  # for the ETA: this session's pace
    how = f"{cfg.parallel}{f', ep {cfg.ep}' if cfg.ep > 1 else ''} over {dist.get_backend()}" if d.distributed \
        else "one process"
    log(f"training {n_params / 1e6:.2f}M active params on {device} x{d.world} ({how}, {precision(device)}), "
        f"steps {step}->{cfg.max_steps}")
    with GracefulStop(log) as stop_signal:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            progress = step / cfg.max_steps
            if cfg.time_budget_s:
                progress = max(progress, train_time / cfg.time_budget_s)
            lr = lr_at(cfg, step, progress)
            set_lr(opts, lr)

            # forward / backward over the micro-batches; DDP syncs gradients on the last one only
            loss_sum = torch.zeros((), device=device)
            metric_sums: dict[str, torch.Tensor] = {}
            step_tokens = 0
            try:
                micro = [next(batches) for _ in range(cfg.grad_accum)]
            except StopIteration:
                stop_reason = "data_exhausted"
                break
            for i, batch in enumerate(micro):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                step_tokens += batch["input_ids"].numel()
                with pm.no_sync(last=i == cfg.grad_accum - 1):
                    with autocast(device):
                        loss, parts = loss_fn(fwd, batch)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
                for k, v in parts.items():
                    v = torch.as_tensor(v, dtype=torch.float32, device=device).detach()
                    metric_sums[k] = metric_sums.get(k, 0.0) + v

            grad_norm = pm.optimizer_step(opts, cfg.grad_clip)
            step += 1
            step_tokens *= d.world
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            train_time += dt
            window_tokens += step_tokens
            window_time += dt

            out_of_time = bool(cfg.time_budget_s and train_time >= cfg.time_budget_s)
            stop = d.agree(stop_signal.requested or out_of_time)

            checkpoint_due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
            # log (and check the loss) at least before every save
            if step % cfg.log_every == 0 or step in (start_step + 1, cfg.max_steps) or stop or checkpoint_due:
                names = sorted(metric_sums)
                vals = torch.stack([loss_sum] + [metric_sums[k].to(device) for k in names]) / cfg.grad_accum
                if d.distributed:
                    dist.all_reduce(vals, op=dist.ReduceOp.AVG)
                last_loss = vals[0].item()
                if not math.isfinite(last_loss):  # stop before a diverged run overwrites the last good checkpoint
                    raise FloatingPointError(f"loss is {last_loss} at step {step}: lower the lr or check the data "
                                             f"(the last good state is in {state_dir})")
                tps = window_tokens / max(window_time, 1e-9)
                record = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm.item(),
                          "tokens": tokens_seen, "tokens_per_s": tps, "mfu": 6 * n_params * tps / peak,
                          "time_s": train_time, **{k: v.item() for k, v in zip(names, vals[1:], strict=True)}}
                loads = raw.expert_load() if hasattr(raw, "expert_load") else []
                if loads:  # per MoE layer: the busiest expert's load over the mean (1.0 = balanced)
                    record["expert_load_max_mean"] = [(lo.max() / lo.mean().clamp_min(1e-9)).item()
                                                      for lo in loads]
                remaining = (cfg.max_steps - step) * (train_time - start_time) / (step - start_step)
                if cfg.time_budget_s:
                    remaining = min(remaining, cfg.time_budget_s - train_time)
                log(f"step {step}/{cfg.max_steps} | loss {last_loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                    f"mfu {100 * record['mfu']:.1f}% | eta {fmt_time(remaining)}", flush=True)
                window_tokens, window_time = 0, 0.0
                metrics.append(record)

            if eval_batches is not None and cfg.eval_every and step % cfg.eval_every == 0:
                last_eval = evaluate()
            if stop:
                stop_reason = "interrupted" if stop_signal.requested else "time_budget"
                break
            if checkpoint_due:
                save()

        if eval_batches is not None and (not cfg.eval_every or step % cfg.eval_every):
            last_eval = evaluate()
        save()
    log(f"{stop_reason} at step {step}: saved the model to {out_dir}, the training state to {state_dir}")
    return {"step": step, "tokens": tokens_seen, "loss": last_loss, "eval_loss": last_eval,
            "train_time_s": train_time, "tokens_per_s": tokens_seen / max(train_time, 1e-9),
            "stopped": stop_reason, "history": metrics.records}


# --- command-line flags shared by the training commands ------------------------------------------------
def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the flags `add_train_flags` adds (pretrain, sft, distill logits)."""
    return TrainConfig(max_steps=args.steps, time_budget_s=args.time, lr=args.lr, min_lr=args.lr / 10,
                       warmup_steps=args.warmup, schedule=args.schedule, optimizer=args.optimizer,
                       grad_accum=args.grad_accum, checkpoint_every=args.checkpoint_every, compile=args.compile,
                       eval_every=0, seed=args.seed, device=args.device, parallel=args.parallel, ep=args.ep,
                       peak_flops=args.peak_flops)


def add_train_flags(p: argparse.ArgumentParser, lr: float) -> None:
    """The training flags shared by `seekling pretrain`, `sft` and `distill logits`."""
    p.add_argument("--out", required=True, help="output model directory (training state goes beside it)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (the schedule's length)")
    p.add_argument("--time", type=float, default=None, help="wall-time budget in seconds (overrides --steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if a saved training state exists")
    add_parallel_flags(p)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the MFU denominator, FLOP/s (default: the GPU's dense bf16 peak, or the CPU's fp32 peak)")


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """--device, --parallel and --ep (pretrain, sft, distill logits; `rl` gets them from RLConfig)."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--parallel", choices=PARALLEL, default="ddp",
                   help="with several ranks (torchrun): ddp replicas, or fsdp (FSDP2 shards parameters, "
                        "gradients and optimizer state)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallelism: shard the routed experts over groups of this many ranks")
