"""The report card of a speedrun: report.md with tables and matplotlib plots (in plots/).

Everything is read back from the run directory (results.json and the trainers' JSONL logs), so
`seekling report --run runs/x` can redraw it at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seekling.atomic import write_text

STAGE_ORDER = ("base", "sft", "sft_control", "rl")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and not isinstance(r[key], list)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_training(run: Path, plots: Path, plt: Any) -> list[str]:
    made = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, stage in zip(axes, ("base", "sft", "sft_control"), strict=True):
        rows = _jsonl(run / "train_state" / stage / "metrics.jsonl")
        for key, style in (("loss", "-"), ("eval_loss", "o-")):
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, style, label=key, markersize=3)
        ax.set_title({"base": "pretraining", "sft": "SFT", "sft_control": "SFT control"}[stage])
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "loss.png", dpi=110)
    plt.close(fig)
    made.append("loss.png")

    rows = _jsonl(run / "train_state" / "base" / "metrics.jsonl")
    loads = [(r["step"], r["expert_load_max_mean"]) for r in rows if r.get("expert_load_max_mean")]
    if loads:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for layer in range(len(loads[0][1])):
            series = [lo[layer] for _, lo in loads]
            if any(series):  # an MTP layer that is not trained in this stage routes no tokens
                ax.plot([s for s, _ in loads], series, label=f"MoE layer {layer + 1}")
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("max / mean expert load")
        ax.set_title("auxiliary-loss-free load balancing")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots / "expert_load.png", dpi=110)
        plt.close(fig)
        made.append("expert_load.png")
    return made


def _plot_rl(run: Path, plots: Path, plt: Any, name: str, title: str) -> list[str]:
    rows = _jsonl(run / "train_state" / name / "rl_log.jsonl")
    if not rows:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for key, label in (("reward/total_mean", "reward"), ("accuracy", "train accuracy (rollouts)")):
        x, y = _series(rows, key)
        if x:
            axes[0].plot(x, y, label=label)
    x, y = _series(rows, "eval")
    if x:
        axes[0].plot(x, y, "o-", label="validation (greedy, train split)")
    axes[0].set_title(f"{title}: reward and accuracy")
    axes[0].legend()
    for key in ("len_mean", "len_max"):
        x, y = _series(rows, key)
        if x:
            axes[1].plot(x, y, label=key)
    axes[1].set_title("response length (tokens)")
    axes[1].legend()
    for key in ("zero_var_frac", "kl", "clip_frac", "entropy"):
        x, y = _series(rows, key)
        if x:
            axes[2].plot(x, y, label=key)
    axes[2].set_title("GRPO diagnostics")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("RL step")
    fig.tight_layout()
    fig.savefig(plots / f"{name}.png", dpi=110)
    plt.close(fig)
    return [f"{name}.png"]


def _plot_accuracy(results: dict[str, Any], plots: Path, plt: Any) -> list[str]:
    stages = [s for s in STAGE_ORDER if s in results.get("stages", {})]
    if not stages:
        return []
    tasks = sorted(results["stages"][stages[0]]["by_task"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        levels = sorted(results["stages"][stages[0]]["by_task"][task]["by_level"])
        width = 0.8 / len(stages)
        for i, stage in enumerate(stages):
            by_level = results["stages"][stage]["by_task"].get(task, {}).get("by_level", {})
            vals = [by_level.get(lv, {}).get("pass@1", by_level.get(lv, {}).get("greedy", 0)) for lv in levels]
            ax.bar([j + i * width for j in range(len(levels))], vals, width, label=stage)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], [f"level {lv}" for lv in levels])
        ax.set_ylim(0, 1)
        ax.set_title(task)
    axes[0][0].set_ylabel("held-out pass@1")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "accuracy.png", dpi=110)
    plt.close(fig)
    return ["accuracy.png"]


def write_report(run: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seekling.eval import format_table

    run = Path(run)
    results = json.loads((run / "results.json").read_text())
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    made = _plot_accuracy(results, plots, plt) + _plot_training(run, plots, plt)
    made += _plot_rl(run, plots, plt, "rl", "GRPO (R1 recipe)") + _plot_rl(run, plots, plt, "r1_zero", "R1-Zero")

    stages = {s: results["stages"][s] for s in STAGE_ORDER if s in results.get("stages", {})}
    lines = [f"# seekling speedrun report — preset `{results.get('preset')}`", ""]
    wall = results.get("wall_time_s")
    if wall:
        lines.append(f"Wall time: **{wall / 60:.1f} min**. Stage times (s): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in results.get("stage_time_s", {}).items()) + ".")
    pre = results.get("pretrain", {})
    data = results.get("data", {})
    if pre:
        lines.append(f"Model: {pre.get('params', 0) / 1e6:.2f}M parameters; pretraining saw "
                     f"{pre.get('tokens', 0):,} tokens in {pre.get('step', 0)} steps; vocabulary "
                     f"{data.get('vocab_size')} tokens; corpus {data.get('pretrain_tokens', 0):,} tokens.")
    lines.append("")
    if stages:
        lines += ["## Held-out accuracy", "",
                  "Problems from the test split (disjoint from training by construction). "
                  "`greedy`: temperature 0; `pass@1`: mean over k samples at T=0.6, top-p 0.95.", ""]
        summary = "| stage | greedy | pass@1 | maj@k | pass@k |\n|---|---|---|---|---|\n"
        for s, v in stages.items():
            maj = next((v[k] for k in v if k.startswith("maj@")), None)
            pk = next((v[k] for k in v if k.startswith("pass@") and k != "pass@1"), None)
            cells = [v.get("greedy"), v.get("pass@1"), maj, pk]
            summary += f"| {s} | " + " | ".join("" if c is None else f"{100 * c:.1f}%" for c in cells) + " |\n"
        lines += [summary, "### pass@1 by task and level", "", format_table(stages, "pass@1"),
                  "### greedy by task and level", "", format_table(stages, "greedy")]
        cells = [tuple(c) for c in results.get("rl", {}).get("cells") or []]
        if "rl" in stages and "sft" in stages:
            lines.append(_rl_verdict(results.get("rl_cells_eval") or stages, cells))
    lines += ["## Plots", ""] + [f"![{m}](plots/{m})" for m in made] + [""]
    path = run / "report.md"
    write_text(path, "\n".join(lines))
    print(f"report: {path}")
    return path


def rl_target_accuracy(stage_result: dict[str, Any], cells: list[tuple[str, int]],
                       metric: str = "pass@1") -> float | None:
    """`metric` over the RL target cells (all cells when none are given), weighted by problem count."""
    vals, n = 0.0, 0
    for task, tv in stage_result["by_task"].items():
        for lv, v in tv["by_level"].items():
            if not cells or (task, int(lv)) in cells:
                vals += v.get(metric, 0.0) * v["n"]
                n += v["n"]
    return vals / n if n else None


def _rl_verdict(stages: dict[str, Any], cells: list[tuple[str, int]]) -> str:
    """RL's gain over SFT and over the equal-time SFT control, on the RL target cells."""
    parts = {s: rl_target_accuracy(stages[s], cells) for s in ("base", "sft", "sft_control", "rl") if s in stages}
    greedy = {s: rl_target_accuracy(stages[s], cells, "greedy") for s in parts}
    where = ", ".join(f"{t} {lv}" for t, lv in cells)
    n = stages["rl"].get("n", 0)
    text = f"### RL on its target cells ({where}; {n} held-out problems)\n\n"
    text += "| stage | pass@1 on the RL cells | greedy |\n|---|---|---|\n"
    text += "".join(f"| {s} | {100 * v:.1f}% | {100 * greedy[s]:.1f}% |\n" for s, v in parts.items() if v is not None)
    if parts.get("rl") is not None and parts.get("sft") is not None:
        text += f"\nRL − SFT: **{100 * (parts['rl'] - parts['sft']):+.1f} points**"
        if parts.get("sft_control") is not None:
            text += f"; RL − SFT control (same wall time): **{100 * (parts['rl'] - parts['sft_control']):+.1f} points**"
        if parts.get("base") is not None:  # says whether RL added a skill or restored one SFT had cost
            text += f"; RL − base: {100 * (parts['rl'] - parts['base']):+.1f} points"
        text += ".\n"
    return text
