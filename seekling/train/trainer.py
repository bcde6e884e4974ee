"""The one training loop, for pretraining, SFT and distillation (nanoGPT style, top to bottom).

    summary = train(model, BatchLoader(...), TrainConfig(max_steps=2000), "runs/x/base")

`loss_fn(model, batch) -> (loss, metrics)` is the only thing that differs between the three jobs:
the default is the model's own loss (language modelling, SFT labels with -100), distillation
passes a KD loss. The model goes to `out_dir` (Hugging Face layout); everything needed to resume
exactly (weights, optimizer, step, RNG, data cursor, metrics) goes to `state_dir/state.pt`,
beside it and never inside it. Under torchrun every rank runs this same function: DDP over gloo
(CPU) or nccl (CUDA), each rank on its slice of the data, rank 0 logs and saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from seekling.atomic import torch_save, write_bytes

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
    peak_flops: float | None = None  # for MFU; None: the CPU's fp32 peak (cpu_peak_flops), 312e12 on CUDA (A100 bf16)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule must be 'cosine' or 'wsd', not {self.schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', not {self.optimizer!r}")
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError("max_steps and grad_accum must be >= 1")


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine or warmup-stable-decay (WSD) down to min_lr; progress in [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(progress, 1.0)
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = 0.8
    if progress < decay_start:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * (progress - decay_start) / (1 - decay_start)


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
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = newton_schulz(p.grad.add(buf, alpha=group["momentum"]), group["ns_steps"])
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
    skipped). `eval_batches` must be re-iterable (a list); the first cfg.eval_batches are used.
    """
    out_dir = Path(out_dir)
    state_dir = Path(state_dir) if state_dir is not None else out_dir.parent / "train_state" / out_dir.name
    if state_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"state_dir {state_dir} is inside the model directory {out_dir}: keep it beside it")
    loss_fn = loss_fn or lm_loss

    # distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda and world > 1
                          else "cuda" if use_cuda else cfg.device if cfg.device != "auto" else "cpu")
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    master = rank == 0
    log = print if master else lambda *a, **k: None

    # model, optimizers, and the saved state when resuming
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    raw = model.to(device)
    raw.train()
    opts = make_optimizers(raw, cfg)
    step, tokens_seen, train_time, history = 0, 0, 0.0, []
    state_path = state_dir / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)  # our own file
        raw.load_state_dict(state["model"])
        for opt, opt_state in zip(opts, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        step, tokens_seen, train_time = state["step"], state["tokens"], state["train_time"]
        history = state["history"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if use_cuda and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        if state["data"] is not None and hasattr(train_batches, "load_state_dict"):
            train_batches.load_state_dict(state["data"])
        else:  # a plain iterable: replay it up to where we were
            train_batches = islice(train_batches, step * cfg.grad_accum, None)
        if master:  # the metrics file restarts from the checkpoint (drops lines logged after it)
            text = "".join(json.dumps(h) + "\n" for h in history)
            write_bytes(state_dir / "metrics.jsonl", text.encode())
        log(f"resumed from {state_path} at step {step}")
    elif resume:
        log(f"no saved state at {state_path}: starting from scratch")
    if master:
        state_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and state_path.exists()):
            (state_dir / "metrics.jsonl").unlink(missing_ok=True)

    # DDP: find_unused_parameters because an expert may get no tokens on one rank; the expert-load
    # buffers are per rank (summed across ranks in update_expert_bias), so buffers are not broadcast.
    fwd = DDP(raw, find_unused_parameters=True, broadcast_buffers=False) if world > 1 else raw
    if cfg.compile:
        fwd = torch.compile(fwd)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_cuda else nullcontext

    # MFU: ~6 FLOPs per active (non-embedding) parameter per token, forward + backward
    mcfg = getattr(raw, "config", None)
    if hasattr(mcfg, "num_parameters"):
        mtp_trained = getattr(mcfg, "mtp_loss_weight", 0) > 0
        n_params = mcfg.num_parameters(include_mtp=mtp_trained, active=True) - mcfg.vocab_size * mcfg.hidden_size
    else:
        n_params = sum(p.numel() for n, p in raw.named_parameters() if "embed" not in n)
    peak = cfg.peak_flops or (312e12 if use_cuda else cpu_peak_flops())

    def evaluate() -> float:
        raw.eval()
        losses = []
        with torch.no_grad(), autocast():
            for batch in islice(eval_batches, cfg.eval_batches):
                losses.append(loss_fn(raw, {k: v.to(device) for k, v in batch.items()})[0].float())
        raw.train()
        if not losses:
            raise ValueError("eval_batches is empty (or an exhausted iterator: pass a list)")
        mean = torch.stack(losses).mean()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        add_record({"step": step, "eval_loss": mean.item()})
        log(f"step {step} | eval loss {mean.item():.4f}")
        return mean.item()

    def add_record(record: dict) -> None:
        history.append(record)
        if master:  # appended as we go, so a crashed run still leaves its curve behind
            with open(state_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save() -> None:
        if not master:
            return
        raw.save_pretrained(out_dir)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if use_cuda else None}
        state = {"step": step, "tokens": tokens_seen, "train_time": train_time, "history": history,
                 "model": raw.state_dict(), "optimizers": [o.state_dict() for o in opts], "rng": rng,
                 "data": train_batches.state_dict() if hasattr(train_batches, "state_dict") else None,
                 "config": dataclasses.asdict(cfg)}
        torch_save(state_path, state)

    # Ctrl-C (or SIGTERM from a launcher / scheduler): finish the current step, save, stop. A second
    # Ctrl-C aborts at once, unless it comes within a second (torchrun forwards the terminal's signal).
    interrupted_at: float | None = None

    def on_signal(signum, frame) -> None:
        nonlocal interrupted_at
        if interrupted_at is not None:
            if time.monotonic() - interrupted_at > 1.0:
                raise KeyboardInterrupt
            return
        interrupted_at = time.monotonic()
        log("\nstop requested: finishing this step, then saving and stopping (Ctrl-C again to abort)")

    in_main = threading.current_thread() is threading.main_thread()
    prev_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}

    batches = iter(train_batches)
    stop_reason, last_loss, last_eval = "max_steps", float("nan"), None
    window_tokens, window_time = 0, 0.0  # for tokens/s since the last log line
    start_step, start_time = step, train_time  # for the ETA: this session's pace
    log(f"training {n_params / 1e6:.2f}M active params on {device} x{world}, steps {step}->{cfg.max_steps}")
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            progress = step / cfg.max_steps
            if cfg.time_budget_s:
                progress = max(progress, train_time / cfg.time_budget_s)
            lr = lr_at(cfg, step, progress)
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] = lr

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
                sync = nullcontext() if world == 1 or i == cfg.grad_accum - 1 else fwd.no_sync()
                with sync:
                    with autocast():
                        loss, metrics = loss_fn(fwd, batch)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
                for k, v in metrics.items():
                    v = torch.as_tensor(v, dtype=torch.float32, device=device).detach()
                    metric_sums[k] = metric_sums.get(k, 0.0) + v

            grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if hasattr(raw, "update_expert_bias"):
                raw.update_expert_bias()  # all-reduces the expert loads itself under torch.distributed
            step += 1
            step_tokens *= world
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            train_time += dt
            window_tokens += step_tokens
            window_time += dt

            # stop together: ranks see Ctrl-C and the clock at slightly different times
            out_of_time = bool(cfg.time_budget_s and train_time >= cfg.time_budget_s)
            stop = torch.tensor(float(interrupted_at is not None or out_of_time))
            if world > 1:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)

            checkpoint_due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
            # log (and check the loss) at least before every save
            if step % cfg.log_every == 0 or step in (start_step + 1, cfg.max_steps) or stop or checkpoint_due:
                names = sorted(metric_sums)
                vals = torch.stack([loss_sum] + [metric_sums[k].to(device) for k in names]) / cfg.grad_accum
                if world > 1:
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
                    f"mfu {100 * record['mfu']:.1f}% | eta {_fmt_time(max(remaining, 0))}", flush=True)
                window_tokens, window_time = 0, 0.0
                add_record(record)

            if eval_batches is not None and cfg.eval_every and step % cfg.eval_every == 0:
                last_eval = evaluate()
            if stop:
                stop_reason = "interrupted" if interrupted_at is not None else "time_budget"
                break
            if checkpoint_due:
                save()

        if eval_batches is not None and (not cfg.eval_every or step % cfg.eval_every):
            last_eval = evaluate()
        save()
        if world > 1:  # the others wait for rank 0's save: a rank tearing gloo down mid-save aborted (CI)
            dist.barrier()
        log(f"{stop_reason} at step {step}: saved the model to {out_dir}, the training state to {state_dir}")
    finally:
        for sig, handler in prev_handlers.items():
            signal.signal(sig, handler)
        if own_group:
            dist.destroy_process_group()
    return {"step": step, "tokens": tokens_seen, "loss": last_loss, "eval_loss": last_eval,
            "train_time_s": train_time, "tokens_per_s": tokens_seen / max(train_time, 1e-9),
            "stopped": stop_reason, "history": history}


def cpu_peak_flops() -> float:
    """This CPU's fp32 peak FLOP/s for the threads torch uses: the MFU denominator. From /proc/cpuinfo
    (clock x FMA width: AVX-512 64, AVX2+FMA 32, else 16 FLOP per cycle per core) where Linux has it;
    a measured matmul rather would read low on a shared machine and put MFU over 100%. Elsewhere, the
    best of a few timed matmuls."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
        flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split(":")[1].split())
        per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
        return torch.get_num_threads() * mhz * 1e6 * per_cycle
    except (OSError, ValueError, IndexError, StopIteration):
        best = 0.0
        for n in (384, 512, 1024):
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b  # warm-up
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        return best


def _fmt_time(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# --- command-line flags shared by the training commands ------------------------------------------------
def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the flags `add_train_flags` adds (pretrain, sft, distill logits)."""
    return TrainConfig(max_steps=args.steps, time_budget_s=args.time, lr=args.lr, min_lr=args.lr / 10,
                       warmup_steps=args.warmup, schedule=args.schedule, optimizer=args.optimizer,
                       grad_accum=args.grad_accum, checkpoint_every=args.checkpoint_every, compile=args.compile,
                       eval_every=0, seed=args.seed)


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
