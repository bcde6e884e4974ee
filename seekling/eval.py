"""Held-out evaluation on the verifiable tasks: greedy, pass@1 (T=0.6 over k samples), maj@k, pass@k,
per task and per difficulty. Accuracies are fractions in [0, 1].

    seekling eval --model runs/speedrun/rl --n 50 --k 4 --out eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

import numpy as np

from seekling.atomic import write_text
from seekling.tasks import TASKS, Problem, extract_answer, sample_problems

GEN_TEMPERATURE, GEN_TOP_P = 0.6, 0.95  # DeepSeek-R1's recommended sampling settings


def eval_problems(n: int, tasks: list[str] | None = None, levels: list[int] | None = None,
                  seed: int = 0) -> list[Problem]:
    """n held-out (test-split) problems per task and level, the same every time for a seed."""
    out = []
    for task in tasks or sorted(TASKS):
        for level in levels or TASKS[task].levels:
            if level in TASKS[task].levels:
                out += sample_problems(task, n, split="test", difficulty=level, seed=seed)
    return out


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys} | {"n": len(rows)}


def evaluate(engine: Any, problems: list[Problem], k: int = 4, max_tokens: int = 256, greedy: bool = True,
             temperature: float = GEN_TEMPERATURE, top_p: float = GEN_TOP_P, seed: int = 0,
             prompt_fn: Any = None) -> dict[str, Any]:
    """Score `problems` with the engine. Returns overall and per-task / per-level accuracies.

    prompt_fn(problem) -> prompt (default: the question as a user chat message)."""
    from seekling.engine import SamplingParams

    t0 = time.time()
    prompt_fn = prompt_fn or (lambda p: [{"role": "user", "content": p.question}])
    prompts = [prompt_fn(p) for p in problems]
    rows: list[dict[str, float]] = [{} for _ in problems]
    lengths: list[int] = []
    if greedy:
        outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        for row, p, o in zip(rows, problems, outs, strict=True):
            row["greedy"] = TASKS[p.task].score(p, _completion(o.outputs[0]))
            lengths.append(len(o.outputs[0].token_ids))
    if k > 0:
        params = [SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed + i)
                  for i in range(len(problems))]
        outs = engine.generate(prompts, params)
        for row, p, o in zip(rows, problems, outs, strict=True):
            completions = [_completion(c) for c in o.outputs]
            scores = [TASKS[p.task].score(p, c) for c in completions]
            row["pass@1"] = sum(scores) / k
            row[f"pass@{k}"] = float(max(scores))
            # maj@k: the most common extracted answer (ties: first seen), scored as that sample was
            answers = [extract_answer(c) for c in completions]
            votes = Counter(a for a in answers if a is not None)
            if votes:
                top = votes.most_common(1)[0][0]
                row[f"maj@{k}"] = scores[answers.index(top)]
            else:
                row[f"maj@{k}"] = 0.0
    result: dict[str, Any] = _summary(rows)
    result["by_task"] = {}
    for task in sorted({p.task for p in problems}):
        idx = [i for i, p in enumerate(problems) if p.task == task]
        entry = _summary([rows[i] for i in idx])
        entry["by_level"] = {
            str(lv): _summary([rows[i] for i in idx if problems[i].difficulty == lv])
            for lv in sorted({problems[i].difficulty for i in idx})}
        result["by_task"][task] = entry
    # per problem, for intervals over problems and seeds (seekling.stats); "cell" is "task/level"
    result["scores"] = {"cell": [f"{p.task}/{p.difficulty}" for p in problems],
                        **{k: [r[k] for r in rows] for k in (rows[0] if rows else {})}}
    if lengths:
        result["mean_greedy_tokens"] = sum(lengths) / len(lengths)
    result["eval_time_s"] = round(time.time() - t0, 1)
    return result


def chat_eval(engine: Any, n: int = 100, seed: int = 0, max_tokens: int = 200) -> dict[str, Any]:
    """The model on held-out conversations (seekling.tasks.chat: phrasings SFT never saw), greedy: the share whose
    reply passes `chat.passes` (words, no \\boxed{}, finished; identity questions answered with the name, requests
    outside its domain declined), overall and per kind, with per-conversation scores (for intervals) and a few
    examples for the report."""
    from seekling.engine import SamplingParams
    from seekling.tasks.chat import KINDS, conversations, passes

    t0 = time.time()
    convs = conversations(n, "test", seed)
    outs = engine.generate([c.prompt() for c in convs], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    scores, examples = [], []
    for c, o in zip(convs, outs, strict=True):
        out = o.outputs[0]
        ok = passes(c.kind, _completion(out), out.finish_reason)
        scores.append(float(ok))
        if len(examples) < 8:
            examples.append({"kind": c.kind, "prompt": c.prompt()[-1]["content"], "reply": out.text.strip(),
                             "pass": ok})
    by_kind = {k: sum(s for c, s in zip(convs, scores, strict=True) if c.kind == k)
               / max(1, sum(c.kind == k for c in convs)) for k in KINDS}
    return {"pass": sum(scores) / len(scores), "n": len(scores), "by_kind": by_kind,
            "scores": {"cell": [f"chat/{c.kind}" for c in convs], "pass": scores}, "examples": examples,
            "eval_time_s": round(time.time() - t0, 1)}


def score_table(results: list[dict[str, Any]], metric: str, cells: set[str] | None = None) -> np.ndarray:
    """[seeds, problems] table of one metric from `evaluate` results on the same problems (one result per
    seed), restricted to the given "task/level" cells (all when None): the input of seekling.stats.interval."""
    rows = []
    for r in results:
        s = r["scores"]
        if s["cell"] != results[0]["scores"]["cell"]:
            raise ValueError("score_table needs every seed evaluated on the same problems")
        rows.append([v for c, v in zip(s["cell"], s[metric], strict=True) if cells is None or c in cells])
    return np.array(rows, dtype=np.float64)


def _completion(output: Any) -> str:
    """The completion as the verifier sees it: the reasoning, then </think>, then the answer."""
    return f"{output.reasoning}</think>{output.text}" if output.reasoning else output.text


def format_table(results: dict[str, dict[str, Any]], metric: str = "greedy",
                 intervals: dict[str, dict[str, Any]] | None = None) -> str:
    """A markdown table: rows = task/level, columns = stages (base, sft, ...). With `intervals` (per stage,
    as speedrun's results["intervals"]["stages"]), each cell is the mean over seeds with its 95% interval."""
    stages = [s for s in results if results[s]]
    header = "| task | level | " + " | ".join(stages) + " |\n|---|---|" + "---|" * len(stages) + "\n"

    def cell(stage: str, task: str | None, lv: str | None) -> str:
        ci = (intervals or {}).get(stage, {})
        ci = ci.get(metric) if task is None else ci.get("by_cell", {}).get(f"{task}/{lv}", {}).get(metric)
        if ci is not None:
            return f"{100 * ci['mean']:.0f}% [{100 * ci['lo']:.0f}, {100 * ci['hi']:.0f}]"
        r = results[stage]
        v = r.get(metric) if task is None else r["by_task"].get(task, {}).get("by_level", {}).get(lv, {}).get(metric)
        return "" if v is None else f"{100 * v:.0f}%"

    lines = []
    tasks = sorted({t for s in stages for t in results[s].get("by_task", {})})
    for task in tasks:
        levels = sorted({lv for s in stages for lv in results[s]["by_task"].get(task, {}).get("by_level", {})})
        for lv in levels:
            lines.append(f"| {task} | {lv} | " + " | ".join(cell(s, task, lv) for s in stages) + " |")
    overall = [cell(s, None, None) for s in stages]
    lines.append("| **all** | | " + " | ".join(f"**{c}**" if c else "" for c in overall) + " |")
    return header + "\n".join(lines) + "\n"


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (with its tokenizer)")
    p.add_argument("--n", type=int, default=50, help="held-out problems per task and level")
    p.add_argument("--k", type=int, default=4, help="samples per problem for pass@1 / maj@k (0: greedy only)")
    p.add_argument("--tasks", nargs="*", default=None, help=f"task families (default: all of {sorted(TASKS)})")
    p.add_argument("--levels", nargs="*", type=int, default=None, help="difficulty levels (default: all)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from seekling.engine import Engine

    engine = Engine(args.model)
    problems = eval_problems(args.n, args.tasks, args.levels, seed=args.seed)
    print(f"evaluating {args.model} on {len(problems)} held-out problems (k={args.k}) ...")
    result = evaluate(engine, problems, k=args.k, max_tokens=args.max_tokens, seed=args.seed)
    text = json.dumps(result, indent=2)
    if args.out:
        write_text(args.out, text)
        print(format_table({"model": result}))
        print(f"wrote {args.out}")
    else:
        print(text)
    return result
