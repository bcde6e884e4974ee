"""Pretraining, SFT and distillation (nanoGPT style, top to bottom): a job on the scaffold's one Loop.

    summary = train(model, BatchLoader(...), TrainConfig(max_steps=2000), "runs/x/base")

`loss_fn(model, batch) -> (loss, metrics)` is the only thing that differs between the three jobs:
the default is the model's own loss (language modelling, SFT labels with -100), distillation
passes a KD loss. The model goes to `out_dir` (Hugging Face layout); everything needed to resume
exactly (weights, optimizer, step, RNG, data cursor) goes to `state_dir/checkpoints/` and the
metrics to `state_dir/metrics.jsonl`, beside it and never inside it. `LMJob` is the step (forward,
backward, optimizer over the micro-batches), its record and its eval; resume, the schedule, stops,
logging, periodic eval and save are the Loop's, devices, process groups, DDP / FSDP2 / expert
parallelism and checkpoints the scaffold's (`seekling/train/scaffold.py`), shared with GRPO. Under
torchrun every rank runs this same job, each on its slice of the data; rank 0 logs and writes the
model directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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
    Dist,
    Loop,
    Parallelized,
    autocast,
    check_state_dir,
    peak_flops,
    precision,
    setup,
    state_dir_for,
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
    state_dir = Path(state_dir) if state_dir is not None else state_dir_for(out_dir)
    check_state_dir(out_dir, state_dir)
    d = setup(cfg.device, cfg.ep)
    try:
        job = LMJob(model, train_batches, cfg, out_dir, eval_batches, loss_fn or lm_loss, d)
        loop = Loop(d, state_dir, cfg, cfg.max_steps, seed=cfg.seed, time_budget_s=cfg.time_budget_s, clock="train",
                    resume=resume, log_every=cfg.log_every, eval_every=cfg.eval_every,
                    save_every=cfg.checkpoint_every, config=dataclasses.asdict(cfg), log=d.log)
        return loop.run(job)
    finally:
        d.close()


class LMJob:
    """Pretraining, SFT and distillation on the Loop: a step is one optimizer step over `grad_accum` micro-batches
    of `loss_fn`; the state is the data cursor and the tokens seen; every checkpoint writes the model too."""

    eval_at_start = False

    def __init__(self, model: nn.Module, batches: Iterable[Batch], cfg: TrainConfig, out_dir: Path,
                 eval_batches: Iterable[Batch] | None, loss_fn: LossFn, d: Dist):
        self.cfg, self.out_dir, self.d, self.device = cfg, out_dir, d, d.device
        self.source, self.eval_batches, self.loss_fn = batches, eval_batches, loss_fn
        self.can_evaluate = eval_batches is not None
        self.pm = Parallelized(model, d, cfg.parallel, cfg.ep)
        self.raw = self.pm.module
        self.raw.train()
        self.opts = make_optimizers(self.raw, cfg)
        self.fwd = torch.compile(self.pm.fwd) if cfg.compile else self.pm.fwd
        self.n_params, self.peak = active_params(self.raw), cfg.peak_flops or peak_flops(d.device)
        self.tokens = self.window_tokens = 0
        self.last_loss, self.last_eval = float("nan"), None

    def state_dict(self) -> dict:
        return {"tokens": self.tokens,
                "data": self.source.state_dict() if hasattr(self.source, "state_dict") else None}

    def load_state_dict(self, state: dict, step: int) -> None:
        self.tokens = state["tokens"]
        if state["data"] is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state["data"])
        else:  # a plain iterable: replay it up to where we were
            self.source = islice(self.source, step * self.cfg.grad_accum, None)

    def begin(self, loop: Loop) -> None:
        self.batches = iter(self.source)
        d, cfg = self.d, self.cfg
        how = f"{cfg.parallel}{f', ep {cfg.ep}' if cfg.ep > 1 else ''} over {dist.get_backend()}" if d.distributed \
            else "one process"
        loop.log(f"training {self.n_params / 1e6:.2f}M active params on {self.device} x{d.world} ({how}, "
                 f"{precision(self.device)}), steps {loop.step}->{loop.steps}")

    def train_step(self, loop: Loop) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor] | None:
        """Forward / backward over the micro-batches (DDP syncs gradients on the last one only), then the
        optimizer step. Returns the summed loss, the summed metrics and the gradient norm, or None at the end."""
        cfg, device = self.cfg, self.device
        try:
            micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        except StopIteration:
            return None
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        step_tokens = 0
        for i, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            step_tokens += batch["input_ids"].numel()
            with self.pm.no_sync(last=i == cfg.grad_accum - 1):
                with autocast(device):
                    loss, parts = self.loss_fn(self.fwd, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for k, v in parts.items():
                v = torch.as_tensor(v, dtype=torch.float32, device=device).detach()
                metric_sums[k] = metric_sums.get(k, 0.0) + v
        grad_norm = self.pm.optimizer_step(self.opts, cfg.grad_clip)
        self.tokens += step_tokens * self.d.world
        self.window_tokens += step_tokens * self.d.world
        return loss_sum, metric_sums, grad_norm

    def record(self, loop: Loop, out: tuple) -> tuple[dict, str]:
        """The step's record (loss and metrics averaged over ranks; tokens/s and MFU since the last record)."""
        loss_sum, metric_sums, grad_norm = out
        names = sorted(metric_sums)
        vals = torch.stack([loss_sum] + [metric_sums[k].to(self.device) for k in names]) / self.cfg.grad_accum
        if self.d.distributed:
            dist.all_reduce(vals, op=dist.ReduceOp.AVG)
        self.last_loss = vals[0].item()
        if not math.isfinite(self.last_loss):  # stop before a diverged run overwrites the last good checkpoint
            raise FloatingPointError(f"loss is {self.last_loss} at step {loop.step}: lower the lr or check the data "
                                     f"(the last good state is in {loop.state_dir})")
        tps = self.window_tokens / max(loop.window_s, 1e-9)
        self.window_tokens = 0
        record = {"step": loop.step, "loss": self.last_loss, "lr": loop.lr, "grad_norm": grad_norm.item(),
                  "tokens": self.tokens, "tokens_per_s": tps, "mfu": 6 * self.n_params * tps / self.peak,
                  "time_s": loop.elapsed(), **{k: v.item() for k, v in zip(names, vals[1:], strict=True)}}
        loads = self.raw.expert_load() if hasattr(self.raw, "expert_load") else []
        if loads:  # per MoE layer: the busiest expert's load over the mean (1.0 = balanced)
            record["expert_load_max_mean"] = [(lo.max() / lo.mean().clamp_min(1e-9)).item() for lo in loads]
        text = f"loss {self.last_loss:.4f} | lr {loop.lr:.2e} | {tps:,.0f} tok/s | mfu {100 * record['mfu']:.1f}%"
        return record, text

    def evaluate(self, loop: Loop) -> dict[str, float]:
        self.raw.eval()
        losses = []
        with torch.no_grad(), autocast(self.device):
            for batch in islice(self.eval_batches, self.cfg.eval_batches):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                losses.append(self.loss_fn(self.fwd, batch)[0].float())
        self.raw.train()
        if not losses:
            raise ValueError("eval_batches is empty (or an exhausted iterator: pass a list)")
        self.last_eval = self.d.sum([torch.stack(losses).mean().item()])[0] / self.d.world
        return {"eval_loss": self.last_eval}

    def save_model(self, loop: Loop, final: bool) -> None:
        self.pm.save_pretrained(self.out_dir)

    def summary(self, loop: Loop) -> dict:
        return {"step": loop.step, "tokens": self.tokens, "loss": self.last_loss, "eval_loss": self.last_eval,
                "train_time_s": loop.train_time, "tokens_per_s": self.tokens / max(loop.train_time, 1e-9),
                "stopped": loop.stopped, "history": loop.metrics.records}


def active_params(model: nn.Module) -> int:
    """For MFU: the active non-embedding parameters (~6 FLOPs each per token, forward + backward)."""
    mcfg = getattr(model, "config", None)
    if hasattr(mcfg, "num_parameters"):
        mtp_trained = getattr(mcfg, "mtp_loss_weight", 0) > 0
        return mcfg.num_parameters(include_mtp=mtp_trained, active=True) - mcfg.vocab_size * mcfg.hidden_size
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


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
