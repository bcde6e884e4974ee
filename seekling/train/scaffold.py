"""The training scaffold every job shares: pretraining, SFT and distillation (`trainer.py`) and GRPO
(`grpo.py`). Each loop keeps only what is its own (what a step computes); this file holds the rest:

    d = setup("auto", ep=1)                      device + process group from torchrun's environment, DeviceMesh
    pm = Parallelized(model, d, "fsdp", ep=1)    DDP, or FSDP2 `fully_shard` per block + root; expert parallelism
    with pm.no_sync(last), autocast(d.device):   gradient accumulation; bf16 on GPUs that have it, fp32 on CPU
        loss.backward()
    pm.optimizer_step(opts, max_norm)            expert-gradient sync, clipping, step, zero_grad, MoE bias update
    ckpt = Checkpointer(state_dir, d)            atomic sharded save (DCP) / exact resume: model, optimizer,
    ckpt.save(pm, opts, {...}); ckpt.load(...)   RNG of python/numpy/torch/CUDA per rank, the loop's own state
    pm.save_pretrained(out_dir)                  the Hugging Face directory, from the gathered full state dict
    pm.inference_view()                          an unsharded module for the engine (rollouts, on-policy data)
    with GracefulStop(log) as stop: ...          SIGINT / SIGTERM: finish the step, save, stop
    lr_at(cfg, step, progress), MetricsLog, peak_flops, fmt_time
    Loop(d, state_dir, cfg, steps, ...).run(job) the one training loop: resume and RNG, lr progress, signal and
                                                 time-budget stops, ETA, logging and metrics, periodic eval and save,
                                                 the summary; a job (trainer.LMJob, grpo.GRPOJob) supplies the step

Under torchrun every rank runs the same loop: gloo on CPU, nccl on CUDA. A plain `python` process (no
torchrun) trains alone with no process group and no wrapper, exactly as before the scaffold existed.
Checkpoints are `torch.distributed.checkpoint` folders in `<state_dir>/checkpoints/`: sharded when the
model is, and loadable at any world size (DCP reshards on load).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from seekling.atomic import reporting_full_disk, tensor_bytes, write_bytes, write_text
from seekling.train.expert_parallel import apply_expert_parallel, expert_param_names, gather_experts, run_every_expert

PARALLEL = ("ddp", "fsdp")


# --- device, process group, mesh -----------------------------------------------------------------------
@dataclass
class Dist:
    """Where this process trains. `mesh` is the data-parallel DeviceMesh ("dp", all ranks); with expert
    parallelism `ep_mesh` is ("edp", "ep"): experts are sharded along "ep" and replicated along "edp"."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None = None
    ep_mesh: DeviceMesh | None = None
    own_group: bool = False  # we initialised the process group, so close() destroys it

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def log(self, *args: Any, **kwargs: Any) -> None:
        if self.master:
            print(*args, **kwargs)

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any: ranks see a signal or the clock at slightly different times."""
        if not self.distributed:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (small Python objects: metrics, lists of rewards)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.own_group:
            dist.destroy_process_group()


def setup(device: str = "auto", ep: int = 1) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device ("auto": cuda if available) and,
    under torchrun (even with one process) or several ranks, join the process group (nccl on CUDA, gloo
    on CPU) and build the mesh."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch.cuda.is_available() is False")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu" if device == "auto" else device)
    if ep < 1 or world % ep:
        hint = f": launch with torchrun --nproc_per_node {ep} (or a multiple)" if world == 1 else ""
        raise ValueError(f"--ep {ep} must divide the number of ranks ({world}){hint}")
    d = Dist(rank, world, local_rank, dev)
    if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return d
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        d.own_group = True
    d.mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    if ep > 1:
        d.ep_mesh = init_device_mesh(dev.type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    return d


def precision(device: torch.device) -> str:
    """"bf16" (autocast) on a GPU that has bf16, else "fp32" (bf16 is emulated and ~100x slower on CPU)."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device):
    """The forward's precision context: bf16 autocast where `precision` says bf16 (weights, optimizer state
    and gradient reductions stay fp32), else nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if precision(device) == "bf16" else nullcontext()


# --- the model on the mesh ----------------------------------------------------------------------------
class Parallelized:
    """`model` placed for training: `fwd` is what forward and backward go through (the DDP wrapper, or the
    model itself), `module` the model (sharded in place under fsdp and ep: load the result from the saved
    directory, not from the object).

    - ddp: every rank holds the whole model; gradients are all-reduced on the last micro-batch.
    - fsdp: FSDP2 `fully_shard` on each block, then on the root, over the "dp" mesh: parameters, gradients
      and optimizer state are sharded across all ranks. Every expert runs on every micro-batch (with no
      tokens if none are routed to it), since FSDP2's reduce-scatter needs the same gradients on every rank.
    - ep > 1: the routed experts are sharded along the "ep" mesh dimension (seekling/train/expert_parallel.py);
      DDP / FSDP handle everything else. Expert gradients come back from the ranks whose tokens used them
      through the all-to-all's backward and are averaged along "edp" here.
    """

    def __init__(self, model: nn.Module, d: Dist, parallel: str = "ddp", ep: int = 1):
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, not {parallel!r}")
        self.d, self.parallel, self.cls, self.config = d, parallel, type(model), getattr(model, "config", None)
        self.module = model.to(d.device)
        self.fwd: nn.Module = self.module
        self.expert_params: list[nn.Parameter] = []
        self._view: nn.Module | None = None
        if d.ep_mesh is not None:
            apply_expert_parallel(self.module, d.ep_mesh.get_group("ep"))
            names = expert_param_names(self.module)
            self.expert_params = [p for n, p in self.module.named_parameters() if n in names]
        if d.distributed and parallel == "ddp":
            if names := sorted(expert_param_names(self.module)):  # synced along "edp" by optimizer_step
                DDP._set_params_and_buffers_to_ignore_for_model(self.module, names)
            # find_unused_parameters: an expert may get no tokens on one rank, the MTP module no loss in RL;
            # the expert-load buffers are per rank (summed in update_expert_bias), so no buffer broadcast.
            self.fwd = DDP(self.module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                           process_group=d.mesh.get_group(), find_unused_parameters=True, broadcast_buffers=False)
        elif d.distributed:
            experts = set(self.expert_params)  # sharded by ep already: FSDP leaves them alone
            if not experts:
                run_every_expert(self.module)
            for block in _blocks(self.module):
                fully_shard(block, mesh=d.mesh, ignored_params=experts & set(block.parameters()) or None)
            fully_shard(self.module, mesh=d.mesh, ignored_params=experts or None)
        self.sharded = isinstance(self.module, FSDPModule) or bool(self.expert_params)
        model._parallelized = self  # so inference_view(model) finds it

    def no_sync(self, last: bool):
        """Gradient accumulation: DDP all-reduces on the last micro-batch only. (FSDP2 reduce-scatters
        every micro-batch: gradients stay sharded, which is what FSDP is for.)"""
        return self.fwd.no_sync() if isinstance(self.fwd, DDP) and not last else nullcontext()

    def optimizer_step(self, opts: Iterable[torch.optim.Optimizer], max_norm: float) -> torch.Tensor:
        """Finish the gradients (expert gradients under ep), clip their global norm to max_norm (0: no
        clipping), step every optimizer, zero the gradients and update the MoE routing bias. Returns the
        gradient norm before clipping."""
        max_norm = max_norm or float("inf")
        if self.expert_params:
            norm = self._reduce_and_clip_experts(max_norm)
        else:
            norm = nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if hasattr(self.module, "update_expert_bias"):
            self.module.update_expert_bias()  # all-reduces the expert loads itself: every rank applies the same update
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _reduce_and_clip_experts(self, max_norm: float) -> torch.Tensor:
        """Expert gradients arrive summed over the ep group's losses: sum along "edp" too and divide by the
        world size, the mean DDP / FSDP take of the rest. The norm adds the shards of both kinds."""
        edp = self.d.ep_mesh.get_group("edp")
        for p in self.expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.d.ep_mesh.size(0) > 1:
                dist.all_reduce(p.grad, group=edp)
            p.grad.div_(self.d.world)
        expert_set = set(self.expert_params)
        rest = [p for p in self.module.parameters() if p not in expert_set and p.grad is not None]
        rest_norm = nn.utils.get_total_norm([p.grad for p in rest])
        rest_norm = rest_norm.full_tensor() if isinstance(rest_norm, DTensor) else rest_norm
        expert_sq = nn.utils.get_total_norm([p.grad for p in self.expert_params]) ** 2
        dist.all_reduce(expert_sq, group=self.d.ep_mesh.get_group("ep"))
        total = (rest_norm**2 + expert_sq).sqrt()
        nn.utils.clip_grads_with_norm_(rest, max_norm, total)
        nn.utils.clip_grads_with_norm_(self.expert_params, max_norm, total)
        return total

    def full_state_dict(self, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """The whole model's state dict with its own (Hugging Face) names, gathered from the shards: on
        rank 0 only, on the CPU (other ranks get {}), or with `everywhere` on every rank's device. A
        collective when the model is sharded: every rank must call it."""
        if not self.sharded:
            return self.module.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
        sd = get_model_state_dict(self.module, options=options)
        if self.expert_params:
            sd.update(gather_experts(self.module, self.d.ep_mesh.get_group("ep")))
        if everywhere:
            return sd
        return {k: v.cpu() for k, v in sd.items()} if self.d.master else {}

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Rank 0 writes the Hugging Face model directory (seekling.checkpoint's layout; transformers loads it)."""
        if not self.sharded:
            if self.d.master:
                self.module.save_pretrained(out_dir)
            return
        sd = self.full_state_dict()
        if self.d.master:
            with torch.device("meta"):
                shell = self.cls(self.config)
            shell.load_state_dict(sd, assign=True)  # the gathered tensors themselves, no copy
            shell.save_pretrained(out_dir)

    def inference_view(self) -> nn.Module:
        """An unsharded module with the current weights, for the engine (which reads whole weights). It is
        the model itself unless sharded; then a full copy on this rank's device, refreshed from the shards
        at each call (a collective)."""
        if not self.sharded:
            return self.module
        sd = self.full_state_dict(everywhere=True)
        if self._view is None:
            with torch.random.fork_rng(devices=[self.d.device.index] if self.d.device.type == "cuda" else []):
                self._view = self.cls(self.config).to(self.d.device)  # its random init must not move our RNG
        self._view.load_state_dict(sd)
        return self._view.eval()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: the transformer blocks. The MTP modules stay with the root:
    the model calls their shared_head.norm outside their own forward, where a block's weights are sharded."""
    if hasattr(model, "main_layers"):
        return list(model.main_layers)
    return list(getattr(getattr(model, "model", None), "layers", []))


def inference_view(model: nn.Module) -> nn.Module:
    """The module to hand to the engine: `model` itself, or while a scaffold run holds it sharded, a full copy
    with its current weights (every rank must call this at the same point then)."""
    pm = getattr(model, "_parallelized", None)
    return pm.inference_view() if pm is not None else model


# --- schedule, precision, speed ------------------------------------------------------------------------
class ScheduleConfig(Protocol):
    lr: float
    min_lr: float
    warmup_steps: int
    schedule: str


SCHEDULES = ("cosine", "wsd")


def lr_at(cfg: ScheduleConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine or warmup-stable-decay (WSD: flat, then linear decay over the last 20%)
    down to min_lr; progress in [0, 1] (steps done over steps, or time used over the time budget)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(progress, 1.0)
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = 0.8
    if progress < decay_start:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * (progress - decay_start) / (1 - decay_start)


def set_lr(opts: Iterable[torch.optim.Optimizer], lr: float) -> None:
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = lr


# Dense bf16 peaks (no sparsity) of the GPUs we know, for MFU; others fall back to the A100's.
GPU_BF16_PEAK = {"H200": 790e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float:
    """The MFU denominator: the GPU's dense bf16 peak, or the CPU's fp32 peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_BF16_PEAK.items() if k in name), 312e12)
    return cpu_peak_flops()


def cpu_peak_flops() -> float:
    """This CPU's fp32 peak FLOP/s for the threads torch uses. From /proc/cpuinfo (clock x FMA width:
    AVX-512 64, AVX2+FMA 32, else 16 FLOP per cycle per core) where Linux has it; a measured matmul
    rather would read low on a shared machine and put MFU over 100%. Elsewhere, the best of a few timed
    matmuls."""
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


def fmt_time(seconds: float) -> str:
    h, rem = divmod(int(max(seconds, 0)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# --- RNG ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA's generators too


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- checkpoints ----------------------------------------------------------------------------------------
FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)  # keyed by parameter name: any sharding loads it


def _blob(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unblob(buf: io.BytesIO) -> Any:
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # our own checkpoint


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    with warnings.catch_warnings():  # DCP warns that a single process without a process group is single-process
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class Checkpointer:
    """Resumable training state in `<state_dir>/checkpoints/step-N/` (a DCP folder: one file per rank plus
    metadata) with `checkpoints/latest` naming the current one. A save writes a new folder and then
    replaces `latest` atomically, so a crash at any point leaves the previous checkpoint current; older
    folders are removed after. Saved: the model and the optimizer state tensors (sharded as in training,
    keyed by parameter name, so they load at another world size or parallelism; the optimizer's
    hyperparameters are the config's), each rank's RNG (python, numpy, torch, CUDA) and the loop's own
    state (step, data cursor, ...) from rank 0."""

    def __init__(self, state_dir: str | Path, d: Dist):
        self.root, self.d = Path(state_dir) / "checkpoints", d

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def save(self, pm: Parallelized, opts: list[torch.optim.Optimizer], state: dict[str, Any]) -> Path:
        step = state.get("step", 0)
        name = None
        if self.d.master:
            name, n = f"step-{step:08d}", 1
            while (self.root / name).exists():  # saved at this step already (the loop's last save): a new folder
                name, n = f"step-{step:08d}.{n}", n + 1
        path = self.root / self.d.broadcast(name)
        optim = get_optimizer_state_dict(pm.module, opts, options=FLAT_OPTIM)
        sd: dict[str, Any] = {"model": get_model_state_dict(pm.module),
                              "optim": {k: v for k, v in optim.items() if k.startswith("state.")},
                              f"rng_{self.d.rank}": _blob(rng_state())}
        if self.d.master:
            sd["state"] = _blob(state)
        try:  # a failed save (a full disk: DiskFull) leaves no partial folder behind, and `latest` as it was
            with _quiet_dcp(), reporting_full_disk(path, tensor_bytes(sd)):
                dcp.save(sd, checkpoint_id=path, no_dist=not self.d.distributed)
            if self.d.master:
                write_text(self.root / "latest", path.name)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if self.d.master:
            for old in self.root.glob("step-*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()  # nobody runs ahead (or tears gloo down) while rank 0 finishes the save
        return path

    def load(self, pm: Parallelized, opts: list[torch.optim.Optimizer], log: Callable[[str], None] = print
             ) -> dict[str, Any]:
        """Restore the model, the optimizers and this rank's RNG in place; return the loop's state. A rank
        the saving run did not have (a bigger world) keeps the RNG it was seeded with."""
        path = self.latest()
        with _quiet_dcp():
            keys = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
        optim = get_optimizer_state_dict(pm.module, opts, options=FLAT_OPTIM)  # zero state for every parameter
        # parameters that had no gradient yet when the run saved have no optimizer state: load only what is there
        # (and the hyperparameters come from this run's config: the schedule sets the lr before each step)
        present = {k: v for k, v in optim.items() if f"optim.{k}" in keys}
        sd: dict[str, Any] = {"model": get_model_state_dict(pm.module), "optim": present, "state": io.BytesIO()}
        rng_key = f"rng_{self.d.rank}"
        if rng_key in keys:
            sd[rng_key] = io.BytesIO()
        with _quiet_dcp():
            dcp.load(sd, checkpoint_id=path, no_dist=not self.d.distributed)
        set_model_state_dict(pm.module, sd["model"])
        optim.update(sd["optim"])
        set_optimizer_state_dict(pm.module, opts, optim, options=FLAT_OPTIM)
        with_state = {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}
        stateless = [p for n, p in pm.module.named_parameters() if n not in with_state]
        for opt in opts:  # ... and those start fresh, as they would have without the interruption
            for p in stateless:
                opt.state.pop(p, None)
        if rng_key in sd:
            set_rng_state(_unblob(sd[rng_key]))
        else:
            log(f"{path} has no RNG state for rank {self.d.rank} (saved by fewer ranks): it keeps its seed")
        return _unblob(sd["state"])


def latest_checkpoint(state_dir: str | Path) -> Path | None:
    """The current checkpoint folder of a run's `state_dir`, or None before its first save."""
    pointer = Path(state_dir) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def saved_state(state_dir: str | Path) -> dict[str, Any] | None:
    """The loop's state of the latest checkpoint in `state_dir` (step, ...) without loading any weights."""
    path = latest_checkpoint(state_dir)
    if path is None:
        return None
    sd = {"state": io.BytesIO()}
    with _quiet_dcp():
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    return _unblob(sd["state"])


# --- metrics, signals -----------------------------------------------------------------------------------
class MetricsLog:
    """The run's records (one JSON object a line), appended by rank 0 as they come, so a crashed run still
    leaves its curve behind. On resume from step s the file keeps the records up to s (those after it are
    about to be redone); a fresh start removes it."""

    def __init__(self, path: Path, master: bool, resume_step: int | None = None):
        self.path, self.master = path, master
        self.records: list[dict] = []
        if resume_step is not None and path.exists():
            lines = path.read_text().splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r.get("step", 0) <= resume_step]
        if master:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.records:
                write_bytes(path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
            else:
                path.unlink(missing_ok=True)

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class GracefulStop:
    """SIGINT (Ctrl-C) or SIGTERM (from a launcher or a job scheduler): the loop finishes its step, saves and
    stops (`requested`). A second Ctrl-C aborts at once, unless it comes within a second (torchrun forwards
    the terminal's signal, so each rank may see it twice). Handlers are installed only on the main thread
    and restored on exit."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log, self.requested_at, self.previous = log, None, {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested_at is not None:
            if time.monotonic() - self.requested_at > 1.0:
                raise KeyboardInterrupt
            return
        self.requested_at = time.monotonic()
        self.log("\nstop requested: finishing this step, then saving and stopping (Ctrl-C again to abort)")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def state_dir_for(out_dir: str | Path) -> Path:
    """Where a run's training state lives: `<out_dir>/../train_state/<out_dir name>`, beside the model directory
    and never inside it (a model directory is a plain Hugging Face checkpoint)."""
    out_dir = Path(out_dir)
    return out_dir.parent / "train_state" / out_dir.name


def check_state_dir(out_dir: str | Path, state_dir: str | Path) -> None:
    if Path(state_dir).resolve().is_relative_to(Path(out_dir).resolve()):
        raise ValueError(f"state_dir {state_dir} is inside the model directory {out_dir}: keep it beside it")


# --- the one training loop ------------------------------------------------------------------------------
CLOCKS = ("train", "session")


class Job(Protocol):
    """What a training job gives the Loop: its model on the mesh and its optimizers, one step, its evaluation and
    its own resumable state. `trainer.LMJob` (pretraining, SFT, distillation) and `grpo.GRPOJob` are the two."""

    pm: Parallelized
    opts: list[torch.optim.Optimizer]
    out_dir: Path
    can_evaluate: bool  # evaluate() exists for this run (held-out batches, an eval function)
    eval_at_start: bool  # evaluate once before the first step (GRPO: the baseline its best checkpoint must beat)

    def begin(self, loop: Loop) -> None: ...  # after the resume, before the first step
    def train_step(self, loop: Loop) -> Any: ...  # one optimizer (or RL) step at loop.lr; None: the data ran out
    def record(self, loop: Loop, out: Any) -> tuple[dict[str, Any], str]: ...  # the step's record and log text
    def evaluate(self, loop: Loop) -> dict[str, float]: ...
    def save_model(self, loop: Loop, final: bool) -> None: ...  # the Hugging Face directory, when the job wants it
    def state_dict(self) -> dict[str, Any]: ...  # saved with each checkpoint (data cursor, best score, ...)
    def load_state_dict(self, state: dict[str, Any], step: int) -> None: ...
    def summary(self, loop: Loop) -> dict[str, Any]: ...


@dataclass
class Loop:
    """The one training loop (torchtitan's Trainer.train): each concern one call, the job supplies the step.

    - resume: the latest checkpoint in `state_dir/checkpoints/` (model, optimizers, every RNG, the job's state);
      a fresh start seeds python / numpy / torch with `seed`;
    - lr progress: `lr_at(schedule, step, progress)`, progress = steps done over `steps`, or time over the
      budget when that is further;
    - stops: `steps`, the data running out, SIGINT / SIGTERM (the step finishes, the state is saved) and the time
      budget, all ranks together. The `clock` says what the budget counts: "train", the steps' own time (the step
      that reaches the budget is the last); "session", everything since the job started, loading, evals and saves
      included (the loop stops when one more step and the final eval would overrun);
    - every `log_every` steps (and the first, the last and before each save) a record in `state_dir/metrics_file`
      and a line with the ETA; evals every `eval_every` steps and at the end; checkpoints every `save_every`.
    """

    d: Dist
    state_dir: Path
    schedule: ScheduleConfig
    steps: int
    seed: int = 0
    time_budget_s: float | None = None
    clock: str = "train"
    resume: bool = True
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    metrics_file: str = "metrics.jsonl"
    config: dict[str, Any] | None = None  # saved with each checkpoint: what the run was asked to do
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, not {self.clock!r}")
        self.state_dir = Path(self.state_dir)
        self.t_start = time.perf_counter()  # the session clock starts when the job is set up (loading counts)
        self.step = self.start_step = self.session_steps = 0
        self.time_at_start = self.train_time = self.session_step_s = self.window_s = 0.0
        self.last_step_s = self.eval_s = 0.0
        self.last_eval_step, self.lr, self.stopped = -1, 0.0, None

    def elapsed(self) -> float:
        """Seconds on the budget's clock, resumed sessions included."""
        if self.clock == "train":
            return self.train_time
        return self.time_at_start + time.perf_counter() - self.t_start

    def progress(self) -> float:
        p = self.step / self.steps
        return max(p, self.elapsed() / self.time_budget_s) if self.time_budget_s else p

    def run(self, job: Job) -> dict[str, Any]:
        self.restore(job)
        job.begin(self)
        if job.can_evaluate and job.eval_at_start and self.step == 0:
            self.evaluate(job)
        with GracefulStop(self.log) as self.signal:
            while self.stopped is None:
                self.stopped = self.one_step(job)
            if job.can_evaluate and self.last_eval_step != self.step and self.stopped != "interrupted":
                self.evaluate(job)
            self.save(job, final=True)
        self.log(f"{self.stopped} at step {self.step} ({fmt_time(self.elapsed())}): model in {job.out_dir}, "
                 f"training state in {self.state_dir}")
        return job.summary(self)

    def restore(self, job: Job) -> None:
        """Seed, then resume from the latest checkpoint when there is one (and `resume`)."""
        seed_everything(self.seed)
        self.ckpt = Checkpointer(self.state_dir, self.d)
        resumed = self.resume and self.ckpt.latest() is not None
        if resumed:
            state = self.ckpt.load(job.pm, job.opts, self.log)
            self.step = self.start_step = state["step"]
            # (train_time / elapsed: the keys of the two loops before there was one)
            self.time_at_start = state.get("time_s", state.get("train_time", state.get("elapsed", 0.0)))
            self.train_time = self.time_at_start
            job.load_state_dict(state, self.step)
            self.log(f"resumed from {self.ckpt.latest()} at step {self.step}")
        elif self.resume:
            self.log(f"no saved state in {self.state_dir}: starting from scratch")
        self.metrics = MetricsLog(self.state_dir / self.metrics_file, self.d.master, self.step if resumed else None)

    def one_step(self, job: Job) -> str | None:
        """One step, then its record, eval and checkpoint when due; the reason to stop, or None to go on."""
        if self.step >= self.steps:
            return "max_steps"
        t0 = time.perf_counter()
        self.lr = lr_at(self.schedule, self.step, self.progress())
        set_lr(job.opts, self.lr)
        out = job.train_step(self)
        if out is None:
            return "data_exhausted"
        self.step += 1
        self.last_step_s = time.perf_counter() - t0
        self.train_time += self.last_step_s
        self.window_s += self.last_step_s
        self.session_steps += 1
        self.session_step_s += self.last_step_s
        stop = self.d.agree(self.signal.requested or self.out_of_time())
        save_due = bool(self.save_every) and self.step % self.save_every == 0
        eval_due = job.can_evaluate and bool(self.eval_every) and self.step % self.eval_every == 0
        evals = self.evaluate(job, record=False) if eval_due else {}
        if self.step % self.log_every == 0 or self.step in (self.start_step + 1, self.steps) or stop or save_due:
            record, text = job.record(self, out)
            self.metrics.append({**record, **evals})
            self.log(f"step {self.step}/{self.steps} | {text} | eta {fmt_time(self.eta())}")
            self.window_s = 0.0
        elif evals:
            self.metrics.append({"step": self.step, **evals})
        if stop:
            return "interrupted" if self.d.agree(self.signal.requested) else "time_budget"
        if save_due:
            self.save(job)
        return None

    def out_of_time(self) -> bool:
        if not self.time_budget_s:
            return False
        if self.clock == "train":
            return self.train_time >= self.time_budget_s
        return self.elapsed() + self.last_step_s + self.eval_s > self.time_budget_s

    def eta(self) -> float:
        """This session's pace over the steps left, and never past the time budget."""
        remaining = (self.steps - self.step) * self.session_step_s / max(self.session_steps, 1)
        return min(remaining, self.time_budget_s - self.elapsed()) if self.time_budget_s else remaining

    def evaluate(self, job: Job, record: bool = True) -> dict[str, float]:
        t = time.perf_counter()
        result = job.evaluate(self)
        self.eval_s, self.last_eval_step = time.perf_counter() - t, self.step
        self.log(f"step {self.step} | " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if record:
            self.metrics.append({"step": self.step, **result})
        return result

    def save(self, job: Job, final: bool = False) -> None:
        job.save_model(self, final)
        self.ckpt.save(job.pm, job.opts, {"step": self.step, "time_s": self.elapsed(), "config": self.config,
                                          **job.state_dict()})
