"""Training on 2 processes (CPU, gloo): DDP vs FSDP2 vs expert parallelism, the `small` preset.

Each mode trains the same `small` model (preset vocabulary) with the seekling trainer on random tokens, two
ranks of one thread each, for a few steps; one process alone is the reference. Printed per mode:
- tokens/s per process: the median over the timed steps (the first two warm up), global tokens / 2;
- weights + grads + AdamW per rank: 4 x the fp32 bytes of the parameters this rank holds (DDP: all;
  FSDP2: its shard; EP: its experts), exact;
- peak RSS per rank (resource.getrusage) over the training steps (before the final save), which adds the
  full model each rank builds before sharding it, activations, communication buffers and the Python /
  torch runtime;
and the machine load (`uptime`) when the mode ran: these are timings on a shared 2-core machine.

    PYTHONPATH=. python benchmarks/bench_parallel.py [--steps 6] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = {"one process": None, "DDP": ("ddp", 1), "FSDP2": ("fsdp", 1), "DDP + EP 2": ("ddp", 2),
         "FSDP2 + EP 2": ("fsdp", 2)}


def make_data(directory: Path, vocab: int) -> None:
    from seekling.data import write_shards

    rng = np.random.default_rng(0)
    write_shards((rng.integers(2, vocab, 500).tolist() for _ in range(400)), directory, eos_id=1, vocab_size=vocab)


def run(rank: int, world: int, port: int, mode: tuple[str, int] | None, args: argparse.Namespace, work: str) -> None:
    from torch.distributed.tensor import DTensor

    from seekling.data import BatchLoader, PackedDataset
    from seekling.model import Transformer
    from seekling.model.config import preset
    from seekling.train import TrainConfig, lm_loss, train

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo")
    parallel, ep = mode or ("ddp", 1)
    torch.manual_seed(0)
    model = Transformer(preset("small"))
    cfg = TrainConfig(max_steps=args.steps, warmup_steps=2, log_every=1, checkpoint_every=0, parallel=parallel, ep=ep)
    loader = BatchLoader(PackedDataset(Path(work) / "data", args.seq_len), args.batch, rank=rank, world_size=world)
    peak_rss = []

    def loss_with_rss(m, batch):  # the peak so far at each micro-batch: the training's, before the final save
        peak_rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return lm_loss(m, batch)

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the table only
        summary = train(model, loader, cfg, Path(work) / f"out{world}{parallel}{ep}", loss_fn=loss_with_rss)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in model.parameters())
    speeds = [h["tokens_per_s"] for h in summary["history"] if "tokens_per_s" in h][2:]
    result = {"tokens_per_s_per_process": statistics.median(speeds) / world, "state_mb": 4 * local / 2**20,
              "peak_rss_mb": peak_rss[-1], "loss": summary["loss"]}
    with open(Path(work) / f"rank{rank}.json", "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)  # no interpreter teardown with gloo threads alive (see tests/test_trainer.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    from seekling.model.config import preset

    print(f"small preset: {preset('small').num_parameters() / 1e6:.1f}M parameters, batch {args.batch} x "
          f"{args.seq_len} tokens per rank, {args.steps} steps (median of the last {args.steps - 2})")
    print("| mode | tokens/s per process | weights+grads+AdamW per rank (MB) | peak RSS per rank (MB) | load |")
    print("|---|---|---|---|---|")
    for name, mode in MODES.items():
        with tempfile.TemporaryDirectory() as work:
            make_data(Path(work) / "data", preset("small").vocab_size)
            world = 1 if mode is None else 2
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load average:")[-1].strip()
            if world == 1:
                run(0, 1, port, mode, args, work)
            else:
                mp.spawn(run, args=(world, port, mode, args, work), nprocs=world)
            ranks = [json.loads((Path(work) / f"rank{r}.json").read_text()) for r in range(world)]
        cells = [" / ".join(format(r[key], spec) for r in ranks)
                 for key, spec in (("tokens_per_s_per_process", ",.0f"), ("state_mb", ".0f"), ("peak_rss_mb", ".0f"))]
        print(f"| {name} | {' | '.join(cells)} | {load} |", flush=True)


if __name__ == "__main__":
    main()
