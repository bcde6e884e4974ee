"""DeepSeek-R1's Table 6 at tiny scale on a CPU: is it better to distil a small model from a strong
reasoner, or to train the small model by RL alone?

    python scripts/table6.py --out runs/table6                       # trains its own teacher
    python scripts/table6.py --out runs/table6 --teacher runs/speedrun/sft

1. teacher: the `tiny` preset by the R1 recipe (pretrain + SFT, via the speedrun's stages), or --teacher
2. student base: a smaller model (hidden 96, 2 layers) pretrained on the same corpus and tokenizer
3. (a) distilled: the teacher samples answers to training problems with the engine; only the answers
       the verifier accepts are kept (rejection sampling); the student base is fine-tuned on them (SFT).
       --kd adds a row for logit distillation (forward KL) on the same verified traces.
   (b) RL only: GRPO (`train_rl`, R1 recipe) from the same student base, for the same training time.
4. held-out pass@1 of every model (`seekling.eval.evaluate`), printed as a table and written to
   <out>/table6.json. Every stage is skipped when its output exists, so a re-run resumes.

`--seeds N` replicates step 3 (the students' RL, SFT and KD runs, from the one student base and the one
harvest) on N seeds: seed 0 in <out>, seed s in <out>/seed<s>. The replicates train the step counts seed 0's
time budget gave (`--rl-steps` / `--student-steps` fix them for seed 0 too), so they differ by the seed
alone; the table gives means with 95% intervals over seeds and problems (seekling.stats), and each
distilled student's paired difference to the RL student.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from seekling.atomic import write_text
from seekling.data import BatchLoader, PackedDataset, SFTDataset, write_shards
from seekling.engine import Engine
from seekling.eval import eval_problems, evaluate, score_table
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.model.load import load_pretrained
from seekling.speedrun import Speedrun, pretrain_documents
from seekling.stats import fmt, interval
from seekling.tasks import TASKS, sample_problems
from seekling.tokenizer import load_tokenizer
from seekling.train.collect import load_traces
from seekling.train.distill import check_compatible, make_kd_loss, teacher_samples
from seekling.train.grpo import RLConfig, train_rl
from seekling.train.scaffold import state_dir_for
from seekling.train.trainer import TrainConfig, train

STUDENT = dict(hidden_size=96, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def make_teacher(out: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(teacher dir, pretraining shards dir). Trained here with the speedrun's stages unless given."""
    if args.teacher:
        teacher, data = Path(args.teacher), out / "data" / "pretrain"
        if not (data / "index.json").exists():  # the student pretrains on the corpus, in the teacher's tokens
            tok = load_tokenizer(teacher)
            write_shards((tok.encode(d) for d in pretrain_documents(args.corpus_per_task)), data,
                         eos_id=tok.eos_token_id, vocab_size=tok.vocab_size)
        return teacher, data
    run = Speedrun(out / "teacher", "default", corpus_per_task=args.corpus_per_task,
                   pretrain_s=args.teacher_pretrain_s, sft_s=args.teacher_sft_s)
    run.stage("tokenizer", run.make_tokenizer)
    run.stage("pretrain", run.pretrain)
    run.stage("sft", run.sft)
    return out / "teacher" / "sft", out / "teacher" / "data" / "pretrain"


def pretrain_student(teacher: Path, data: Path, dst: Path, args: argparse.Namespace) -> None:
    tok = load_tokenizer(teacher)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **STUDENT))
    print(f"student: {model.num_parameters() / 1e6:.2f}M parameters")
    loader = BatchLoader(PackedDataset(data, 256), 16, seed=0)
    steps = args.student_pretrain_steps
    cfg = TrainConfig(max_steps=steps or 100_000, time_budget_s=None if steps else args.student_pretrain_s, lr=3e-3,
                      min_lr=3e-4, warmup_steps=30, schedule="wsd", checkpoint_every=200, log_every=25)
    train(model, loader, cfg, dst, resume=True)
    tok.save_pretrained(dst)


def harvest(teacher: Path, path: Path, args: argparse.Namespace) -> dict:
    """Teacher answers (engine, T=0.6) to training problems; returns how many the verifier accepted."""
    problems = [p for t in sorted(TASKS) for lv in args.levels
                for p in sample_problems(t, args.problems_per_level, "train", lv, seed=7)]
    t0 = time.time()
    records = teacher_samples(load_pretrained(teacher), load_tokenizer(teacher), problems, path,
                              n=args.samples, temperature=0.6, max_tokens=args.max_new_tokens)
    correct = sum(r["score"] >= 1 for r in records)
    return {"samples": len(records), "verified": correct, "time_s": round(time.time() - t0, 1)}


def fine_tune(base: Path, teacher: Path, traces: Path, dst: Path, budget_s: float, steps: int, seed: int,
              kd: bool) -> dict:
    """SFT on the verified traces, or (kd) forward-KL logit distillation on the same sequences."""
    tok = load_tokenizer(base)
    data = SFTDataset([tok.encode_sft(c) for c in load_traces(traces, only_correct=True)], 512,
                      tok.pad_token_id, truncate=True)
    model = load_pretrained(base)
    loss_fn = None
    if kd:
        t = load_pretrained(teacher)
        check_compatible(t, model, load_tokenizer(teacher), tok)
        loss_fn = make_kd_loss(t, "forward", temperature=1.0, ce_weight=0.5)
    cfg = TrainConfig(max_steps=steps or 100_000, time_budget_s=None if steps else budget_s, lr=1e-3, min_lr=5e-5,
                      warmup_steps=10, checkpoint_every=200, log_every=25, seed=1 + 10 * seed)
    summary = train(model, BatchLoader(data, min(16, len(data)), seed=1 + 10 * seed), cfg, dst, loss_fn=loss_fn,
                    resume=True)
    tok.save_pretrained(dst)
    return {"steps": summary["step"]}


def rl_only(base: Path, dst: Path, budget_s: float, steps: int, seed: int, args: argparse.Namespace) -> dict:
    cfg = RLConfig(recipe="r1", steps=steps or 10_000, prompts_per_step=8, group_size=8,
                   max_new_tokens=args.max_new_tokens, lr=args.rl_lr, time_budget_s=None if steps else budget_s,
                   save_every=10, eval_every=0, seed=seed)
    summary = train_rl(base, dst, state_dir_for(dst), cfg, tasks=sorted(TASKS),
                       difficulties=args.levels)
    load_tokenizer(base).save_pretrained(dst)
    return {"steps": summary["steps"]}


STUDENTS = {  # name in the table -> run directory (and stage) name
    "student + RL (GRPO)": "student_rl",
    "student distilled (SFT on verified traces)": "student_sft",
    "student distilled (logit KD on the same traces)": "student_kd",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/table6")
    p.add_argument("--teacher", default=None, help="a trained teacher model directory (default: train one)")
    p.add_argument("--teacher-pretrain-s", type=float, default=300)
    p.add_argument("--teacher-sft-s", type=float, default=120)
    p.add_argument("--corpus-per-task", type=int, default=8000)
    p.add_argument("--student-pretrain-s", type=float, default=120)
    p.add_argument("--student-pretrain-steps", type=int, default=0, help="instead of --student-pretrain-s")
    p.add_argument("--budget-s", type=float, default=120, help="training time of each student (distil, RL)")
    p.add_argument("--rl-steps", type=int, default=0, help="RL steps instead of --budget-s (0: the budget decides)")
    p.add_argument("--student-steps", type=int, default=0, help="SFT/KD steps instead of --budget-s")
    p.add_argument("--seeds", type=int, default=1, help="replicates of the students' training (step 3)")
    p.add_argument("--levels", type=int, nargs="*", default=[1, 2], help="task levels for traces, RL and eval")
    p.add_argument("--problems-per-level", type=int, default=100, help="teacher prompts per task and level")
    p.add_argument("--samples", type=int, default=2, help="teacher samples per prompt")
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--kd", action="store_true", help="also a logit-distillation (forward KL) student")
    p.add_argument("--eval-n", type=int, default=20, help="held-out problems per task and level")
    p.add_argument("--eval-k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "table6.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"args": vars(args), "time_s": {}}
    save = lambda: write_text(results_path, json.dumps(results, indent=2))

    def stage(name: str, fn) -> None:
        if name in results["time_s"]:  # (a model dir alone may be a checkpoint of an interrupted stage)
            print(f"[table6] {name}: done already")
            return
        print(f"\n[table6] === {name} ===", flush=True)
        t0 = time.time()
        value = fn()
        if value is not None:
            results.setdefault("summary", {})[name] = value
        results["time_s"][name] = round(time.time() - t0, 1)
        save()

    t0 = time.time()
    teacher, data = make_teacher(out, args)
    base = out / "student_base"
    stage("student_base", lambda: pretrain_student(teacher, data, base, args))
    traces = out / "teacher_traces.jsonl"
    if "harvest" not in results:
        results["harvest"] = harvest(teacher, traces, args)
        print(f"[table6] teacher traces: {results['harvest']}")
    if not results["harvest"]["verified"]:
        raise SystemExit(f"the verifier accepted none of the teacher's {results['harvest']['samples']} answers: "
                         "train the teacher longer (--teacher-pretrain-s / --teacher-sft-s) or pass --teacher")
    problems = eval_problems(args.eval_n, levels=args.levels)
    evals = results.setdefault("eval", {})

    def score(key: str, path: Path) -> None:
        if key not in evals:
            evals[key] = evaluate(Engine(path, max_num_seqs=128), problems, k=args.eval_k,
                                  max_tokens=args.max_new_tokens)
            evals[key]["params"] = load_pretrained(path).num_parameters()
            save()

    score("teacher", teacher)
    score("student base", base)
    students = {k: v for k, v in STUDENTS.items() if args.kd or v != "student_kd"}
    def train_seed(seed: int) -> None:
        """The students of one seed; replicates train the steps seed 0 took (or the fixed --*-steps)."""
        where, tag = (out, "") if seed == 0 else (out / f"seed{seed}", f"seed{seed}/")
        steps = lambda name, fixed: fixed or (results["summary"][name]["steps"] if seed else 0)
        stage(tag + "student_rl", lambda: rl_only(base, where / "student_rl", args.budget_s,
                                                  steps("student_rl", args.rl_steps), seed, args))
        for name in students.values():
            if name != "student_rl":
                stage(tag + name, partial(fine_tune, base, teacher, traces, where / name, args.budget_s,
                                          steps(name, args.student_steps), seed, kd=name == "student_kd"))
        for name in students.values():
            score(tag + name, where / name)

    for seed in range(args.seeds):
        train_seed(seed)
    results["wall_time_s"] = round(results.get("wall_time_s", 0) + time.time() - t0, 1)
    results["intervals"] = table_intervals(evals, students, args.seeds)
    results["table"] = table(evals, results, students, args.seeds, str(teacher))
    save()
    print("\n" + results["table"])
    print(f"wrote {results_path}")


def table_intervals(evals: dict, students: dict[str, str], n_seeds: int) -> dict:
    """Per model: pass@1 and greedy with 95% intervals over seeds and problems; per distilled student, its
    paired difference to the RL student (same problems, same seed)."""
    rows = {"teacher": [evals["teacher"]], "student base": [evals["student base"]]}
    for name in students.values():
        rows[name] = [evals[name if s == 0 else f"seed{s}/{name}"] for s in range(n_seeds)]
    out = {name: {m: interval(score_table(e, m)) for m in ("pass@1", "greedy")} for name, e in rows.items()}
    rl = score_table(rows["student_rl"], "pass@1")
    for name in students.values():
        if name != "student_rl":
            out[name]["minus_rl"] = interval(score_table(rows[name], "pass@1") - rl)
    out["student_rl"]["minus_base"] = interval(rl - score_table(rows["student base"], "pass@1"))
    return out


def table(evals: dict, results: dict, students: dict[str, str], n_seeds: int, teacher: str) -> str:
    """The markdown table: means over seeds with 95% intervals (teacher and student base: one run each)."""
    iv = results["intervals"]
    tasks = sorted(evals["teacher"]["by_task"])
    summary, times = results.get("summary", {}), results["time_s"]
    head = ("| model | params | steps (seed 0) | train s (seed 0) | pass@1 | greedy | vs RL (pass@1, points) | "
            + " | ".join(f"{t} pass@1" for t in tasks) + " |")
    lines = [head, "|" + "---|" * (7 + len(tasks))]
    models = {f"teacher ({teacher})": "teacher", "student base": "student base",
              **{label: name for label, name in students.items()}}
    for label, name in models.items():
        seeds = [evals[name]] if name in ("teacher", "student base") else \
            [evals[name if s == 0 else f"seed{s}/{name}"] for s in range(n_seeds)]
        by_task = [sum(e["by_task"][t]["pass@1"] for e in seeds) / len(seeds) for t in tasks]
        vs = iv[name].get("minus_rl") or iv[name].get("minus_base")
        vs_text = "" if vs is None else fmt(vs, signed=True) + (" (vs base)" if "minus_base" in iv[name] else "")
        lines.append(f"| {label} | {seeds[0]['params'] / 1e6:.2f}M | {summary.get(name, {}).get('steps', '')} | "
                     f"{times.get(name, '')} | {fmt(iv[name]['pass@1'])} | {fmt(iv[name]['greedy'])} | {vs_text} | "
                     + " | ".join(f"{100 * v:.1f}%" for v in by_task) + " |")
    return "\n".join(lines) + f"\n\n{n_seeds} seed(s) for the students; 95% intervals over seeds and problems.\n"


if __name__ == "__main__":
    main()
