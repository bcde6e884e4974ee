"""The report card of a speedrun: report.md with tables and matplotlib plots (in plots/).

Everything is read back from the run directory (results.json and the trainers' JSONL logs), so
`seekling report --run runs/x` can redraw it at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from seekling.atomic import write_text
from seekling.eval import format_table, score_table
from seekling.stats import fmt, interval
from seekling.train.scaffold import state_dir_for

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
        rows = _jsonl(state_dir_for(run / stage) / "metrics.jsonl")
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

    rows = _jsonl(state_dir_for(run / "base") / "metrics.jsonl")
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
    rows = _jsonl(state_dir_for(run / name) / "rl_log.jsonl")
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
    by_cell = {s: v.get("by_cell", {}) for s, v in results.get("intervals", {}).get("stages", {}).items()}
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        levels = sorted(results["stages"][stages[0]]["by_task"][task]["by_level"])
        width = 0.8 / len(stages)
        for i, stage in enumerate(stages):
            by_level = results["stages"][stage]["by_task"].get(task, {}).get("by_level", {})
            vals = [by_level.get(lv, {}).get("pass@1", by_level.get(lv, {}).get("greedy", 0)) for lv in levels]
            cis = [by_cell.get(stage, {}).get(f"{task}/{lv}", {}).get("pass@1") for lv in levels]
            yerr = None
            if all(cis):  # the mean over seeds, with its 95% interval
                vals = [c["mean"] for c in cis]
                yerr = [[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]]
            ax.bar([j + i * width for j in range(len(levels))], vals, width, yerr=yerr, capsize=2, label=stage)
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

    run = Path(run)
    results = json.loads((run / "results.json").read_text())
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    intervals = results.get("intervals") or run_intervals(results)
    made = _plot_accuracy(results, plots, plt) + _plot_training(run, plots, plt)
    made += _plot_rl(run, plots, plt, "rl", "GRPO (R1 recipe)") + _plot_rl(run, plots, plt, "r1_zero", "R1-Zero")
    curves = r1_zero_curves(run, results)
    if curves:
        made += _plot_r1_zero_seeds(curves, plots, plt)

    lines = _header(results) + _accuracy_text(results, intervals)
    if intervals.get("chat"):
        lines.append(_chat_text(results, intervals["chat"]))
    if curves:
        lines.append(_r1_zero_text(curves))
    lines += ["## Plots", ""] + [f"![{m}](plots/{m})" for m in made] + [""]
    path = run / "report.md"
    write_text(path, "\n".join(lines))
    print(f"report: {path}")
    return path


def _header(results: dict[str, Any]) -> list[str]:
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
    lines.append(_steps_line(results))
    lines.append("")
    return lines


def _accuracy_text(results: dict[str, Any], intervals: dict[str, Any]) -> list[str]:
    """The held-out tables: overall, by task and level, the fixed measure and RL's own cells."""
    stages = {s: results["stages"][s] for s in STAGE_ORDER if s in results.get("stages", {})}
    lines: list[str] = []
    by_stage = intervals.get("stages") or None
    if stages:
        n_seeds = intervals.get("seeds", 1)
        lines += ["## Held-out accuracy", "",
                  "Problems from the test split (disjoint from training by construction). "
                  "`greedy`: temperature 0; `pass@1`: mean over k samples at T=0.6, top-p 0.95. "
                  + (f"Each figure: the mean over {n_seeds} seed(s) (SFT, RL and the control replicated from the "
                     "one base) with its 95% interval [low, high] from a two-level bootstrap over seeds and "
                     "problems (seekling/stats.py)." if by_stage else ""), ""]
        summary = "| stage | greedy | pass@1 | maj@k | pass@k |\n|---|---|---|---|---|\n"
        for s, v in stages.items():
            maj = next((k for k in v if k.startswith("maj@")), None)
            pk = next((k for k in v if k.startswith("pass@") and k != "pass@1"), None)
            cells = [_fmt_metric(v, (by_stage or {}).get(s, {}), m) for m in ("greedy", "pass@1", maj, pk)]
            summary += f"| {s} | " + " | ".join(cells) + " |\n"
        lines += [summary, "### pass@1 by task and level", "", format_table(stages, "pass@1", by_stage),
                  "### greedy by task and level", "", format_table(stages, "greedy", by_stage)]
        cells = [tuple(c) for c in results.get("rl", {}).get("cells") or []]
        if intervals.get("fixed"):
            lines.append(_cells_verdict(intervals["fixed"], _cells(intervals["fixed"]), "The fixed measure",
                                        f"the same problems for every stage; RL trained on {_where(cells)}"))
        same = intervals.get("fixed") and sorted(_cells(intervals["fixed"])) == sorted(cells)
        if intervals.get("rl_cells") and not same:
            lines.append(_cells_verdict(intervals["rl_cells"], cells, "RL on its target cells", ""))
        elif "rl" in stages and "sft" in stages and not intervals.get("rl_cells"):
            lines.append(_rl_verdict(results.get("rl_cells_eval") or stages, cells))
    return lines


def _cells(ci: dict[str, Any]) -> list[tuple[str, int]]:
    return [(c.split("/")[0], int(c.split("/")[1])) for c in ci["by_cell"]]


def _where(cells: list[tuple[str, int]]) -> str:
    return ", ".join(f"{t} {lv}" for t, lv in cells)


def _chat_text(results: dict[str, Any], chat: dict[str, Any]) -> str:
    """Does the model know what it is: the chat eval's pass rate per stage, per kind, and a few of RL's replies."""
    from seekling.tasks.chat import KINDS

    evals = results.get("chat", {})
    n = evals.get("rl", {}).get("n", 0)
    text = (f"## Does it know what it is?\n\n{n} held-out conversations (phrasings SFT never saw), greedy. A reply "
            "passes when it finished, is words (no `\\boxed{}`, more letters than digits), names the model "
            "(\"seekling\") when asked who it is or what it can do, and declines a request outside its domain "
            f"in words. Means over {chat['rl']['seeds']} seed(s) with 95% intervals; by kind: seed 0.\n\n")
    text += "| stage | pass | " + " | ".join(KINDS) + " |\n|---|---|" + "---|" * len(KINDS) + "\n"
    for stage, ci in chat.items():
        kinds = evals.get(stage, {}).get("by_kind", {})
        text += f"| {stage} | {fmt(ci)} | " + " | ".join(f"{100 * kinds.get(k, 0):.0f}%" for k in KINDS) + " |\n"
    examples = evals.get("rl", {}).get("examples", [])
    if examples:
        text += "\nRL's replies (seed 0):\n\n| kind | prompt | reply | pass |\n|---|---|---|---|\n"
        clean = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        text += "".join(f"| {e['kind']} | {clean(e['prompt'])} | {clean(e['reply'])} | "
                        f"{'yes' if e['pass'] else 'no'} |\n" for e in examples)
    return text


def run_intervals(results: dict[str, Any]) -> dict[str, Any]:
    """Means with 95% intervals over the seeds that finished and the held-out problems (seekling.stats):
    per stage (greedy, pass@1) and per task/level cell; on the RL cells and on the fixed measure per stage, per cell
    and for RL's differences to SFT, the equal-time control and the base (paired by problem and seed); and the
    chat eval's pass rate per stage."""
    seeds = [results] + [results["replicates"][k] for k in sorted(results.get("replicates", {}), key=int)]
    seeds = [s for s in seeds if "rl_cells_eval" in s or "fixed" in s or "sft_control" in s.get("stages", {})]

    def tables(key: str, stage: str, metric: str, cells: set[str] | None = None):
        evals = [s[key][stage] for s in seeds if stage in s.get(key, {})]
        if stage == "base" and key == "stages":
            evals = [results["stages"]["base"]]  # one base for all seeds
        if not evals or any("scores" not in e for e in evals):
            return None
        return score_table(evals, metric, cells)

    out: dict[str, Any] = {"seeds": len(seeds), "stages": {}}
    for stage in ("base", "sft", "sft_control", "rl"):
        if tables("stages", stage, "pass@1") is None:
            continue
        metrics = [m for m in results["stages"][stage]["scores"] if m != "cell"]  # greedy, pass@1, maj@k, pass@k
        entry = out["stages"][stage] = {m: interval(tables("stages", stage, m)) for m in metrics}
        cells = sorted(set(results["stages"][stage]["scores"]["cell"]))
        entry["by_cell"] = {c: {m: interval(tables("stages", stage, m, {c})) for m in ("greedy", "pass@1")}
                            for c in cells}
    out["rl_cells"] = cell_intervals(seeds, "rl_cells_eval")
    out["fixed"] = cell_intervals(seeds, "fixed")
    chat_seeds = [s["chat"] for s in seeds if "chat" in s]
    if chat_seeds:  # the base (no conversations in its training) once; the other stages over the seeds
        per_stage = {stage: [c[stage] for c in (chat_seeds[:1] if stage == "base" else chat_seeds)]
                     for stage in STAGE_ORDER if stage in chat_seeds[0]}
        out["chat"] = {stage: interval(score_table(evals, "pass")) for stage, evals in per_stage.items()}
    return out


def cell_intervals(seeds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Intervals of one set of cells evaluated for every stage (`key`: "fixed", the fixed measure, or
    "rl_cells_eval", RL's own cells): per stage, per cell, and RL's differences to SFT, the equal-time control and
    the base, paired by problem and seed. {} when no seed has it."""
    seeds = [s for s in seeds if key in s and "scores" in s[key].get("rl", {})]
    if not seeds:
        return {}
    evals = {stage: [s[key][stage] for s in seeds] for stage in ("base", "sft", "sft_control", "rl")}
    evals["base"] = evals["base"][:1]  # the shared base: one row, broadcast against the seeds
    cells = sorted(set(evals["rl"][0]["scores"]["cell"]))
    out: dict[str, Any] = {}
    for metric in ("pass@1", "greedy"):
        t = {stage: score_table(e, metric) for stage, e in evals.items()}
        out[metric] = {stage: interval(v) for stage, v in t.items()}
        out[metric].update({f"rl-{other}": interval(t["rl"] - t[other]) for other in ("sft", "sft_control", "base")})
    out["by_cell"] = {c: {stage: interval(score_table(e, "pass@1", {c})) for stage, e in evals.items()} for c in cells}
    return out


def _fmt_metric(result: dict[str, Any], cis: dict[str, Any], metric: str | None) -> str:
    if metric is None or metric not in result:
        return ""
    if metric in cis:
        return fmt(cis[metric])
    return f"{100 * result[metric]:.1f}%"


def _steps_line(results: dict[str, Any]) -> str:
    """How many steps each post-pretraining stage trained, per seed (replicates copy seed 0's counts)."""
    seeds = {"0": results, **results.get("replicates", {})}
    parts = []
    for key, r in seeds.items():
        steps = [f"{name} {r[name].get('step', r[name].get('steps'))}" for name in ("sft", "rl", "sft_control")
                 if name in r]
        if steps:
            parts.append(f"seed {key}: " + ", ".join(steps))
    return ("Steps: " + "; ".join(parts) + ".") if parts else ""


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
    """RL's gain over SFT and over the equal-time SFT control, on the RL target cells (a run without
    per-problem scores, from before intervals: means only)."""
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


def _cells_verdict(ci: dict[str, Any], cells: list[tuple[str, int]], title: str, note: str) -> str:
    """Cells scored for every stage, with 95% intervals over seeds and problems: per stage, per cell, and RL's
    paired differences to SFT, the equal-time control and the base."""
    p1, gr = ci["pass@1"], ci["greedy"]
    text = (f"### {title}: {_where(cells)} ({p1['rl']['problems']} held-out problems, {p1['rl']['seeds']} seed(s)"
            + (f"; {note}" if note else "") + ")\n\n")
    by_cell = ci["by_cell"]
    text += "| stage | pass@1 | greedy | " + " | ".join(by_cell) + " |\n"
    text += "|---|---|---|" + "---|" * len(by_cell) + "\n"
    for s in ("base", "sft", "sft_control", "rl"):
        text += f"| {s} | {fmt(p1[s])} | {fmt(gr[s])} | " + " | ".join(fmt(by_cell[c][s]) for c in by_cell) + " |\n"
    text += (f"\nRL − SFT: **{fmt(p1['rl-sft'], signed=True)} points**; RL − SFT control (same wall time): "
             f"**{fmt(p1['rl-sft_control'], signed=True)} points**; RL − base: "
             f"**{fmt(p1['rl-base'], signed=True)} points** (pass@1; means over seeds with 95% intervals, paired by "
             "problem and seed).\n")
    return text


# --- R1-Zero curves over seeds --------------------------------------------------------------------------
R1_ZERO_WINDOW = 10  # RL steps per point of the R1-Zero curves


def r1_zero_curves(run: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """Rollout accuracy and response length of the R1-Zero runs, in windows of R1_ZERO_WINDOW steps, as
    means with 95% intervals over seeds and the steps of the window; and the change from the first window to
    the last (does it rise?). None without an R1-Zero run."""
    dirs = [run] + [run / f"seed{k}" for k in sorted(results.get("replicates", {}), key=int)]
    logs = [[r for r in rows if "lr" in r]  # the step records (evals have records of their own)
            for rows in (_jsonl(state_dir_for(d / "r1_zero") / "rl_log.jsonl") for d in dirs)]
    logs = [rows for rows in logs if rows]
    if not logs:
        return None
    n = min(len(rows) for rows in logs) // R1_ZERO_WINDOW * R1_ZERO_WINDOW
    if n < 2 * R1_ZERO_WINDOW:
        return None
    out: dict[str, Any] = {"seeds": len(logs), "steps": n, "window": R1_ZERO_WINDOW}
    for key in ("accuracy", "len_mean"):
        table = np.array([[r.get(key, 0.0) for r in rows[:n]] for rows in logs])  # [seeds, steps]
        windows = table.reshape(len(logs), -1, R1_ZERO_WINDOW)
        out[key] = [interval(windows[:, w]) for w in range(windows.shape[1])]
        out[f"{key}_change"] = interval(windows[:, -1] - windows[:, 0])  # paired by position in the window
    return out


def _plot_r1_zero_seeds(curves: dict[str, Any], plots: Path, plt: Any) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "accuracy", "rollout accuracy"), (axes[1], "len_mean", "response length")):
        x = [(i + 0.5) * curves["window"] for i in range(len(curves[key]))]
        ax.plot(x, [c["mean"] for c in curves[key]], "o-")
        ax.fill_between(x, [c["lo"] for c in curves[key]], [c["hi"] for c in curves[key]], alpha=0.3)
        ax.set_title(f"R1-Zero {title} ({curves['seeds']} seed(s), 95% interval)")
        ax.set_xlabel("RL step")
    fig.tight_layout()
    fig.savefig(plots / "r1_zero_seeds.png", dpi=110)
    plt.close(fig)
    return ["r1_zero_seeds.png"]


def _r1_zero_text(curves: dict[str, Any]) -> str:
    acc, length = curves["accuracy"], curves["len_mean"]
    w = curves["window"]
    return (f"### R1-Zero over {curves['steps']} steps ({curves['seeds']} seed(s))\n\n"
            f"Rollout accuracy, steps 1–{w}: {fmt(acc[0])}; the last {w} steps: {fmt(acc[-1])}; change "
            f"{fmt(curves['accuracy_change'], signed=True)} points. Response length: {length[0]['mean']:.0f} → "
            f"{length[-1]['mean']:.0f} tokens (change {curves['len_mean_change']['mean']:+.1f} "
            f"[{curves['len_mean_change']['lo']:+.1f}, {curves['len_mean_change']['hi']:+.1f}]).\n")
