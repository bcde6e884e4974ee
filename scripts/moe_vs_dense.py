"""DeepSeek's efficiency claim on this CPU: does a DeepSeekMoE model give more quality per unit of compute
than a dense one? The speedrun's MoE (`tiny`: 8 routed experts top-2 + 1 shared) against dense models
matched on active FLOPs per token and, separately, on total parameters; each trained for equal wall time
and for equal FLOPs, on the same data and tokenizer, over several seeds.

    python scripts/moe_vs_dense.py --data runs/sr1 --out runs/moe_vs_dense --budget-s 400 --seeds 3 --threads 1
    python scripts/moe_vs_dense.py --profile --threads 1     # where the MoE layer's time goes; shapes' speeds

1. calibration: every model's training step (forward, backward, AdamW; batch 16 x 256) is timed for a few
   steps in process CPU time, beside the load average. CPU time with one thread barely moves when other
   jobs share the machine (wall time does), so the wall budget becomes step counts that do not depend on
   the load: equal wall time: steps = budget_s / cpu_s_per_step(model); equal FLOPs: the MoE's steps x
   its FLOPs per step / the model's FLOPs per step.
2. training: each (model, arm, seed) trains its step count (the pretraining recipe: AdamW, WSD schedule),
   with the seed setting the initialisation and the data order.
3. evaluation: loss on held-out windows of the corpus (cut off before training, never trained on) and greedy
   accuracy on held-out problems of levels 1-2; means with 95% intervals over seeds and windows / problems,
   and each dense model's paired difference to the MoE (seekling.stats).
Every run is skipped when its results exist, so a re-run resumes. Results: <out>/moe_vs_dense.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seekling.atomic import write_text
from seekling.data import BatchLoader, PackedDataset
from seekling.engine import Engine
from seekling.eval import eval_problems, evaluate, score_table
from seekling.model import Transformer
from seekling.model.config import ModelConfig, preset
from seekling.model.load import load_pretrained
from seekling.model.moe import MLP, MoE
from seekling.stats import fmt, interval
from seekling.tasks import TASKS, sample_problems
from seekling.tokenizer import load_tokenizer, render_chat
from seekling.train.trainer import TrainConfig, train

SEQ_LEN, BATCH = 256, 16
VAL_WINDOWS = 96  # held-out windows at the end of the corpus (24k tokens)


# MoE shapes, as overrides of the `tiny` preset; each gets dense partners (see `shapes`).
MOE_SHAPES = {
    "moe": {},  # the speedrun's model: hidden 192, 8 routed experts top-2 + 1 shared, expert width 128
    # the same active and total routed parameters cut coarser (fewer, wider experts) or finer
    "coarse": dict(n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=256, n_shared_experts=0),
    "fine": dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, n_shared_experts=2),
    # wider matrices (hidden 384, experts 256): does the MoE's overhead shrink relative to its matmuls?
    "wide": dict(hidden_size=384, intermediate_size=1024, moe_intermediate_size=256),
}


def ffn_width(total_ffn: float, hidden: int) -> int:
    """The dense FFN width whose 3 h w parameters are `total_ffn` per layer, rounded to a multiple of 8."""
    return round(total_ffn / (3 * hidden) / 8) * 8


def shapes() -> dict[str, dict]:
    """Every model: each MoE shape and its two dense partners, `<shape>-dense_active` and `-dense_total`
    (plain `dense_active` / `dense_total` for the speedrun's MoE). A partner keeps the MoE's attention, width
    and depth and puts a SwiGLU FFN in every layer (first_k_dense_replace = all layers), as wide as the
    MoE's active FFN parameters (hence FLOPs) per token, or its total FFN parameters, averaged over layers."""
    out = {}
    for name, overrides in MOE_SHAPES.items():
        cfg = preset("tiny", **overrides)
        h, L = cfg.hidden_size, cfg.num_hidden_layers
        moe_layers = L - cfg.first_k_dense_replace
        expert = 3 * h * cfg.moe_intermediate_size
        dense_ffn = 3 * h * cfg.intermediate_size
        active = (dense_ffn + moe_layers * expert * (cfg.num_experts_per_tok + cfg.n_shared_experts)) / L
        total = (dense_ffn + moe_layers * expert * (cfg.n_routed_experts + cfg.n_shared_experts)) / L
        prefix = "" if name == "moe" else f"{name}-"
        common = {k: v for k, v in overrides.items() if k == "hidden_size"} | {"first_k_dense_replace": L}
        out[name] = overrides
        out[prefix + "dense_active"] = {**common, "intermediate_size": ffn_width(active, h)}
        out[prefix + "dense_total"] = {**common, "intermediate_size": ffn_width(total, h)}
    return out


PARTNERS = ("dense_active", "dense_total")
ARMS = ("time", "flops")


def family(shape: str, partners: tuple[str, ...] = PARTNERS) -> list[str]:
    """An MoE shape and its dense partners, the MoE first (the reference of the budgets)."""
    prefix = "" if shape == "moe" else f"{shape}-"
    return [shape] + [prefix + p for p in partners]


def model_config(name: str, tok) -> ModelConfig:
    """The shape `name` for the tokenizer `tok` (its vocabulary and bos/eos ids), without an MTP module."""
    return preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  num_nextn_predict_layers=0, **shapes()[name])


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 per active non-embedding parameter (the lm_head counts) plus attention's
    6 (d_qk + d_v) heads T per layer (scores and values, forward and backward; nanochat's estimate)."""
    n = cfg.num_parameters(include_mtp=False, active=True) - cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * SEQ_LEN
    return 6 * n + attn


class Windows:
    """A range of a PackedDataset's windows (training: all but the last VAL_WINDOWS; validation: those)."""

    def __init__(self, data: PackedDataset, start: int, stop: int):
        self.data, self.start, self.stop = data, start, stop
        self.collate = data.collate

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        return self.data[self.start + i]


def step_cost(cfg: ModelConfig, batch: dict, steps: int = 6, warmup: int = 2) -> dict:
    """CPU seconds and wall seconds per training step (forward, backward, AdamW, bias update)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cpu, wall = [], []
    for i in range(warmup + steps):
        c0, w0 = time.process_time(), time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias()
        if i >= warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    cpu.sort()
    wall.sort()
    return {"cpu_s": cpu[len(cpu) // 2], "wall_s": wall[len(wall) // 2], "load": os.getloadavg()[0]}


def calibrate(names: list[str], tok, data: PackedDataset, rounds: int = 2) -> dict:
    """Step costs of every model, interleaved over `rounds` so that a change in load hits all alike; the
    median over rounds is kept."""
    batch = data.collate([data[i] for i in range(BATCH)])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            runs[n].append(step_cost(model_config(n, tok), batch))
    out = {}
    for n, rs in runs.items():
        rs.sort(key=lambda r: r["cpu_s"])
        cfg = model_config(n, tok)
        out[n] = {**rs[len(rs) // 2], "flops_per_step": flops_per_token(cfg) * BATCH * SEQ_LEN,
                  "params": cfg.num_parameters(include_mtp=False),
                  "active_params": cfg.num_parameters(include_mtp=False, active=True)}
        print(f"calibration {n}: {out[n]['cpu_s'] * 1e3:.0f} ms CPU / step ({out[n]['wall_s'] * 1e3:.0f} ms wall, "
              f"load {out[n]['load']:.1f}); {out[n]['params'] / 1e6:.2f}M params, "
              f"{out[n]['active_params'] / 1e6:.2f}M active", flush=True)
    return out


def plan(cal: dict, moe: str, budget_s: float, arms: tuple[str, ...] = ARMS) -> dict[str, int]:
    """Step counts per run: the MoE's (budget_s of CPU time), then '<model>@time' (equal CPU time) and
    '<model>@flops' (the MoE's FLOPs) for each dense partner, for the arms asked for."""
    moe_steps = round(budget_s / cal[moe]["cpu_s"])
    runs = {moe: moe_steps}
    for n in cal:
        if n != moe:
            if "time" in arms:
                runs[f"{n}@time"] = round(budget_s / cal[n]["cpu_s"])
            if "flops" in arms:
                runs[f"{n}@flops"] = round(moe_steps * cal[moe]["flops_per_step"] / cal[n]["flops_per_step"])
    return runs


def val_losses(model: Transformer, val: Windows) -> list[float]:
    """Mean next-token loss of each held-out window."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(val), 16):
            ids = val.collate([val[j] for j in range(i, min(i + 16, len(val)))])["input_ids"]
            logits = model(ids).logits[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            out += loss.view(ids.shape[0], -1).mean(1).tolist()
    return out


def train_run(name: str, steps: int, seed: int, tok, train_set: Windows, val: Windows, out: Path,
              eval_n: int) -> dict:
    cfg = model_config(name, tok)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    tc = TrainConfig(max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=30, schedule="wsd", checkpoint_every=200,
                     log_every=50, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train(model, BatchLoader(train_set, BATCH, seed=seed), tc, out, resume=True)
    if summary["stopped"] == "interrupted":  # the trainer saved its state: a re-run resumes this run
        raise SystemExit("[moe_vs_dense] interrupted; re-run the same command to resume")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tok.save_pretrained(out)
    problems = eval_problems(eval_n, levels=[1, 2])
    acc = evaluate(Engine(out, max_num_seqs=128), problems, k=0, max_tokens=200)
    return {"steps": summary["step"], "tokens": summary["tokens"], "train_wall_s": wall, "train_cpu_s": cpu,
            "load": os.getloadavg()[0], "val_loss": val_losses(model, val), "greedy": acc}


def table(results: dict) -> str:
    """Means over seeds with 95% intervals; each dense run's paired difference to the MoE."""
    runs, seeds = results["runs"], results["seeds"]

    def per_seed(run: str) -> list[dict]:
        return [runs[f"{run}/seed{s}"] for s in range(seeds) if f"{run}/seed{s}" in runs]

    moe = per_seed(results["shape"])
    moe_loss = [r["val_loss"] for r in moe]
    moe_acc = score_table([r["greedy"] for r in moe], "greedy")
    lines = ["| run | arm | params | active | steps | tokens | train CPU s | val loss | Δ loss vs MoE | "
             "greedy L1-2 | Δ acc vs MoE (points) |", "|" + "---|" * 11]
    for run in results["plan"]:
        rs = per_seed(run)
        if not rs:
            continue
        name, _, arm = run.partition("@")
        cal = results["calibration"][name]
        loss = interval([r["val_loss"] for r in rs])
        acc = score_table([r["greedy"] for r in rs], "greedy")
        n = min(len(rs), len(moe))
        d_loss = interval([[x - y for x, y in zip(r["val_loss"], m, strict=True)]
                           for r, m in zip(rs[:n], moe_loss[:n], strict=True)])
        d_acc = interval(acc[:n] - moe_acc[:n])
        cpu_s = sum(r["train_cpu_s"] for r in rs) / len(rs)
        lines.append(f"| {name} | {arm or 'reference'} | {cal['params'] / 1e6:.2f}M | "
                     f"{cal['active_params'] / 1e6:.2f}M | {rs[0]['steps']} | {rs[0]['tokens'] / 1e6:.2f}M | "
                     f"{cpu_s:.0f} "
                     f"| {loss['mean']:.4f} [{loss['lo']:.4f}, {loss['hi']:.4f}] "
                     f"| {d_loss['mean']:+.4f} [{d_loss['lo']:+.4f}, {d_loss['hi']:+.4f}] "
                     f"| {fmt(interval(acc))} | {fmt(d_acc, signed=True)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/speedrun", help="a speedrun directory: its tokenizer/ and data/pretrain/")
    p.add_argument("--out", default="runs/moe_vs_dense")
    p.add_argument("--budget-s", type=float, default=400, help="the wall budget of the MoE run, in CPU seconds")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--shape", default="moe", choices=sorted(MOE_SHAPES), help="the MoE (with its dense partners)")
    p.add_argument("--partners", default=",".join(PARTNERS), help="the dense partners to train, comma-separated")
    p.add_argument("--arms", default=",".join(ARMS), help="equal CPU time and/or equal FLOPs, comma-separated")
    p.add_argument("--eval-n", type=int, default=25, help="held-out problems per task and level (levels 1-2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="only the MoE layer's time split, expert utilisation "
                   "(with --model) and the shapes' step costs")
    p.add_argument("--model", default=None, help="with --profile: a trained MoE whose expert utilisation to show")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "moe_vs_dense.json"
    results = json.loads(path.read_text()) if path.exists() else {"args": vars(args), "runs": {}}
    results["seeds"], results["shape"] = args.seeds, args.shape
    save = lambda: write_text(path, json.dumps(results, indent=2))
    tok = load_tokenizer(Path(args.data) / "tokenizer")
    data = PackedDataset(Path(args.data) / "data" / "pretrain", SEQ_LEN)
    train_set, val = Windows(data, 0, len(data) - VAL_WINDOWS), Windows(data, len(data) - VAL_WINDOWS, len(data))
    if "calibration" not in results:  # once: the step counts must not change on a resume
        results["calibration"] = calibrate(family(args.shape, tuple(args.partners.split(","))), tok, data)
        results["plan"] = plan(results["calibration"], args.shape, args.budget_s, tuple(args.arms.split(",")))
        save()
    print("plan (steps):", results["plan"])
    for seed in range(args.seeds):
        for run, steps in results["plan"].items():
            key = f"{run}/seed{seed}"
            if key in results["runs"]:
                continue
            print(f"\n[moe_vs_dense] === {key}: {steps} steps ===", flush=True)
            results["runs"][key] = train_run(run.partition("@")[0], steps, seed, tok, train_set, val,
                                             out / run.replace("@", "_") / f"seed{seed}", args.eval_n)
            save()
    results["table"] = table(results)
    save()
    print("\n" + results["table"])


# --- --profile: where the MoE layer's time goes, and how fast each shape trains ----------------------------
def cpu_ms(fn, reps: int = 5, rounds: int = 4) -> float:
    """Median over rounds of the mean CPU ms of fn() (forward + backward of a layer part)."""
    fn()
    times = []
    for _ in range(rounds):
        c0 = time.process_time()
        for _ in range(reps):
            fn()
        times.append((time.process_time() - c0) / reps * 1e3)
    return sorted(times)[len(times) // 2]


def layer_split(cfg: ModelConfig, tokens: int) -> dict[str, float]:
    """CPU ms of one MoE layer's forward + backward and of its parts run alone: the router, the shared
    expert on every token, the routed experts on their (pre-gathered) tokens; what is left is dispatch
    (sort, gather, split, weighting, scatter-add, the host sync for the split sizes). Beside it, a dense
    SwiGLU FFN of the same active FLOPs on the same tokens. (torch.profiler's per-op times were tried first
    and disagreed with plain timing by 40%: its per-op overhead falls unevenly on many small ops.)"""
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    x = torch.randn(tokens, cfg.hidden_size, requires_grad=True)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
    order = indices.flatten().argsort(stable=True)
    counts = torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts).tolist()
    chunks = [c.detach().requires_grad_() for c in x.detach().index_select(0, order // cfg.num_experts_per_tok)
              .split(counts)]
    w_chunks = weights.flatten().index_select(0, order).unsqueeze(-1).split(counts)
    dense = MLP(cfg.hidden_size, cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts))
    parts = {
        "MoE layer": lambda: moe(x).sum().backward(),
        "router": lambda: moe.gate(x)[0].sum().backward(),
        "shared expert": lambda: moe.shared_experts(x).sum().backward(),
        "routed experts' matmuls": lambda: sum(e(c, w).sum() for e, c, w in zip(moe.experts, chunks, w_chunks,
                                                                                strict=True)).backward(),
        "dense FFN, same active FLOPs": lambda: dense(x).sum().backward(),
    }
    out = {name: cpu_ms(fn) for name, fn in parts.items()}
    parts_ms = out["router"] + out["shared expert"] + out["routed experts' matmuls"]
    out["dispatch (the rest)"] = out["MoE layer"] - parts_ms
    return out


def expert_counts(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    """Tokens routed to each expert, per MoE layer, for a batch (the layers count their load in train mode;
    no gradient, no bias update)."""
    model.train()
    for m in model.moe_layers():
        m.load.zero_()
    with torch.no_grad():
        model(ids)
    counts = [m.load.clone() for m in model.moe_layers()]
    for m in model.moe_layers():
        m.load.zero_()
    return counts


def routing(model_dir: Path, tok, val: Windows) -> None:
    """Expert utilisation of a trained MoE on held-out text: each layer's load per expert (share of the
    routed slots), max / mean, and how differently the task families route (total variation distance of a
    family's expert shares from the mean)."""
    model = load_pretrained(model_dir)
    ids = val.collate([val[i] for i in range(len(val))])["input_ids"]
    layers = expert_counts(model, ids)
    print(f"routing of {model_dir} on {ids.numel():,} held-out tokens (share of routed slots per expert):")
    layers = [c for c in layers if c.sum() > 0]  # an MTP layer that was never trained routes nothing here
    for i, c in enumerate(layers):
        share = c / c.sum()
        print(f"  MoE layer {i + 1}: " + " ".join(f"{100 * v:.0f}%" for v in share.tolist())
              + f" | max/mean {float(c.max() / c.mean()):.2f}")
    by_task, halves = {}, {}
    for task in sorted(TASKS):
        texts = [render_chat(p.messages(), add_generation_prompt=False)
                 for p in sample_problems(task, 64, "test", None, seed=3)]
        rows = [tok.encode(t)[:SEQ_LEN] for t in texts]
        ids = torch.tensor([r[:min(len(r) for r in rows)] for r in rows])
        by_task[task] = expert_counts(model, ids)
        halves[task] = (expert_counts(model, ids[:32]), expert_counts(model, ids[32:]))
    tv = lambda a, b: float((a / a.sum() - b / b.sum()).abs().sum() / 2)
    for i in range(len(layers)):
        mean = torch.stack([c[i] / c[i].sum() for c in by_task.values()]).mean(0)
        noise = sum(tv(a[i], b[i]) for a, b in halves.values()) / len(halves)
        print(f"  MoE layer {i + 1}, each family's routing vs the mean (total variation distance): "
              + ", ".join(f"{t} {tv(c[i], mean):.2f}" for t, c in by_task.items())
              + f" (two halves of one family: {noise:.2f})")


def profile(args: argparse.Namespace) -> None:
    """The MoE layer's time split against a dense FFN of the same active FLOPs, then the whole model's step
    time of every shape beside its active-matched dense partner (the equal-wall-time handicap), at the
    speedrun's batch and at twice its tokens."""
    print(f"one FFN layer of the speedrun's MoE, {BATCH * SEQ_LEN} tokens, forward + backward, "
          f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f}; CPU ms:")
    for name, ms in layer_split(preset("tiny"), BATCH * SEQ_LEN).items():
        print(f"  {name}: {ms:.1f}")
    tok = load_tokenizer(Path(args.data) / "tokenizer")
    data = PackedDataset(Path(args.data) / "data" / "pretrain", SEQ_LEN)
    if args.model:
        routing(Path(args.model), tok, Windows(data, len(data) - VAL_WINDOWS, len(data)))
    print("whole-model training step, CPU ms (median of 3 interleaved rounds; wall ms, load):")
    for batch_size, names in ((BATCH, list(MOE_SHAPES)), (2 * BATCH, ["moe"])):
        batch = data.collate([data[i] for i in range(batch_size)])
        for shape in names:
            pair = family(shape)[:2]  # the MoE and its active-matched dense partner
            rounds = [[step_cost(model_config(n, tok), batch) for n in pair] for _ in range(3)]
            moe_c, dense_c = (sorted((r[i] for r in rounds), key=lambda c: c["cpu_s"])[1] for i in range(2))
            print(f"  batch {batch_size} x {SEQ_LEN}, {shape}: MoE {moe_c['cpu_s'] * 1e3:.0f} "
                  f"({moe_c['wall_s'] * 1e3:.0f}, {moe_c['load']:.1f}), dense_active {dense_c['cpu_s'] * 1e3:.0f} "
                  f"({dense_c['wall_s'] * 1e3:.0f}, {dense_c['load']:.1f}): MoE / dense "
                  f"{moe_c['cpu_s'] / dense_c['cpu_s']:.2f}", flush=True)

if __name__ == "__main__":
    main()
