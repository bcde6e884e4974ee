"""RL curves over seeds: accuracy and response length over GRPO steps, with 95% intervals, and whether they rise.

    python scripts/rl_curves.py RUN_STATE_DIR [RUN_STATE_DIR ...] --window 25 --out curves.png

Each argument is one seed's RL state directory (the one holding `rl_log.jsonl`, written by
seekling.train.grpo.train_rl: per step the rollouts' mean accuracy and mean response length), or its
rl_log.jsonl itself. The rollouts of a step answer that step's freshly drawn training prompts, which the policy
has not been trained on yet, so the accuracy curve is an on-line measure of the policy, at sampling temperature.

Steps are grouped in windows of --window steps. Per window: the mean over seeds and steps, with a 95% interval
from seekling.stats' two-level bootstrap (seeds, then steps within a seed). "Does it rise": the last window minus
the first, paired by seed, with its interval; it rises if the interval lies above zero. Prints a markdown table
and, with --out, a plot (matplotlib) of both curves with their interval bands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seekling.stats import interval

METRICS = {"accuracy": "accuracy", "len_mean": "response length (tokens)"}


def read_log(path: Path) -> list[dict]:
    path = path / "rl_log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no rl_log.jsonl at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if "step" in r and "accuracy" in r}  # a resumed run may repeat a step
    return [by_step[s] for s in sorted(by_step)]


def windows(logs: list[list[dict]], metric: str, width: int) -> list[tuple[int, int, np.ndarray]]:
    """(first step, last step, [seeds, steps] table) per window, over the steps every seed reached."""
    steps = min(len(log) for log in logs)
    out = []
    for start in range(0, steps - width + 1, width):
        table = np.array([[row[metric] for row in log[start:start + width]] for log in logs], dtype=np.float64)
        out.append((logs[0][start]["step"], logs[0][start + width - 1]["step"], table))
    return out


def curves(logs: list[list[dict]], width: int) -> dict:
    result = {"seeds": len(logs), "window": width, "metrics": {}}
    for metric in METRICS:
        ws = windows(logs, metric, width)
        if len(ws) < 2:
            raise ValueError(f"need at least 2 windows of {width} steps; the shortest run has "
                             f"{min(len(log) for log in logs)} steps")
        rise = interval(ws[-1][2] - ws[0][2])
        result["metrics"][metric] = {
            "windows": [{"from": a, "to": b, **interval(t)} for a, b, t in ws],
            "last_minus_first": rise, "rises": rise["lo"] > 0, "falls": rise["hi"] < 0}
    return result


def table(result: dict) -> str:
    acc, length = (result["metrics"][m] for m in METRICS)
    lines = [f"| steps | accuracy (rollouts, {result['seeds']} seeds) | response length (tokens) |", "|---|---|---|"]
    for a, n in zip(acc["windows"], length["windows"], strict=True):
        lines.append(f"| {a['from']}–{a['to']} | {100 * a['mean']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}] "
                     f"| {n['mean']:.1f} [{n['lo']:.1f}, {n['hi']:.1f}] |")
    for m, name in METRICS.items():
        r = result["metrics"][m]
        d = r["last_minus_first"]
        scale = 100 if m == "accuracy" else 1
        verdict = "rises" if r["rises"] else "falls" if r["falls"] else "no clear trend"
        lines.append(f"\n{name}, last window − first: {scale * d['mean']:+.1f} [{scale * d['lo']:+.1f}, "
                     f"{scale * d['hi']:+.1f}] ({verdict})")
    return "\n".join(lines)


def plot(result: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (metric, name) in zip(axes, METRICS.items(), strict=True):
        ws = result["metrics"][metric]["windows"]
        x = [(w["from"] + w["to"]) / 2 for w in ws]
        scale = 100 if metric == "accuracy" else 1
        ax.plot(x, [scale * w["mean"] for w in ws], marker="o")
        ax.fill_between(x, [scale * w["lo"] for w in ws], [scale * w["hi"] for w in ws], alpha=0.25)
        ax.set_xlabel("RL step")
        ax.set_ylabel(name + (" (%)" if metric == "accuracy" else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} — mean of {result['seeds']} seeds, 95% intervals")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="one RL state directory (or rl_log.jsonl) per seed")
    p.add_argument("--window", type=int, default=25, help="steps per window")
    p.add_argument("--out", type=Path, help="write the plot here (PNG)")
    p.add_argument("--json", type=Path, help="write the curves and intervals here")
    p.add_argument("--title", default="GRPO")
    args = p.parse_args()
    result = curves([read_log(r) for r in args.runs], args.window)
    print(table(result))
    if args.out:
        plot(result, args.out, args.title)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
