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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from seekling.atomic import write_text
from seekling.config import preset
from seekling.data import BatchLoader, PackedDataset, SFTDataset, write_shards
from seekling.engine import Engine
from seekling.eval import eval_problems, evaluate
from seekling.model import Transformer
from seekling.model.load import load_pretrained
from seekling.speedrun import Speedrun, pretrain_documents
from seekling.tasks import TASKS, sample_problems
from seekling.tokenizer import load_tokenizer
from seekling.train.collect import load_traces
from seekling.train.distill import check_compatible, make_kd_loss, teacher_samples
from seekling.train.grpo import RLConfig, train_rl
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
    cfg = TrainConfig(max_steps=100_000, time_budget_s=args.student_pretrain_s, lr=3e-3, min_lr=3e-4,
                      warmup_steps=30, schedule="wsd", checkpoint_every=200, log_every=25)
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


def fine_tune(base: Path, teacher: Path, traces: Path, dst: Path, budget_s: float, kd: bool) -> None:
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
    cfg = TrainConfig(max_steps=100_000, time_budget_s=budget_s, lr=1e-3, min_lr=5e-5, warmup_steps=10,
                      checkpoint_every=200, log_every=25, seed=1)
    train(model, BatchLoader(data, min(16, len(data)), seed=1), cfg, dst, loss_fn=loss_fn, resume=True)
    tok.save_pretrained(dst)


def rl_only(base: Path, dst: Path, budget_s: float, args: argparse.Namespace) -> None:
    cfg = RLConfig(recipe="r1", steps=10_000, prompts_per_step=8, group_size=8, max_new_tokens=args.max_new_tokens,
                   lr=args.rl_lr, time_budget_s=budget_s, save_every=10, eval_every=0)
    train_rl(base, dst, dst.parent / "train_state" / dst.name, cfg, tasks=sorted(TASKS), difficulties=args.levels)
    load_tokenizer(base).save_pretrained(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/table6")
    p.add_argument("--teacher", default=None, help="a trained teacher model directory (default: train one)")
    p.add_argument("--teacher-pretrain-s", type=float, default=300)
    p.add_argument("--teacher-sft-s", type=float, default=120)
    p.add_argument("--corpus-per-task", type=int, default=8000)
    p.add_argument("--student-pretrain-s", type=float, default=120)
    p.add_argument("--budget-s", type=float, default=120, help="training time of each student (distil, RL)")
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

    def stage(name: str, fn) -> None:
        if name in results["time_s"]:  # (a model dir alone may be a checkpoint of an interrupted stage)
            print(f"[table6] {name}: done already")
            return
        print(f"\n[table6] === {name} ===", flush=True)
        t0 = time.time()
        fn()
        results["time_s"][name] = round(time.time() - t0, 1)
        write_text(results_path, json.dumps(results, indent=2))

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
    models = {f"teacher ({teacher})": teacher, "student base": base,
              "student + RL (GRPO)": out / "student_rl",
              "student distilled (SFT on verified traces)": out / "student_sft"}
    stage("student_rl", lambda: rl_only(base, out / "student_rl", args.budget_s, args))
    stage("student_sft", lambda: fine_tune(base, teacher, traces, out / "student_sft", args.budget_s, kd=False))
    if args.kd:
        models["student distilled (logit KD on the same traces)"] = out / "student_kd"
        stage("student_kd", lambda: fine_tune(base, teacher, traces, out / "student_kd", args.budget_s, kd=True))

    problems = eval_problems(args.eval_n, levels=args.levels)
    evals = results.setdefault("eval", {})
    for name, path in models.items():
        if name not in evals:
            evals[name] = evaluate(Engine(path, max_num_seqs=128), problems, k=args.eval_k,
                                   max_tokens=args.max_new_tokens)
            evals[name]["params"] = load_pretrained(path).num_parameters()
            write_text(results_path, json.dumps(results, indent=2))
    results["wall_time_s"] = round(results.get("wall_time_s", 0) + time.time() - t0, 1)
    results["table"] = table(evals, results["time_s"])
    write_text(results_path, json.dumps(results, indent=2))
    print("\n" + results["table"])
    print(f"wrote {results_path}")


def table(evals: dict, times: dict) -> str:
    tasks = sorted({t for e in evals.values() for t in e["by_task"]})
    stage_of = {"student + RL (GRPO)": "student_rl", "student distilled (SFT on verified traces)": "student_sft",
                "student distilled (logit KD on the same traces)": "student_kd", "student base": "student_base"}
    head = "| model | params | train s | pass@1 | greedy | " + " | ".join(f"{t} pass@1" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (5 + len(tasks))]
    for name, e in evals.items():
        secs = times.get(stage_of.get(name, ""), "")
        cells = [f"{100 * e['by_task'][t]['pass@1']:.1f}%" for t in tasks]
        lines.append(f"| {name} | {e['params'] / 1e6:.2f}M | {secs} | {100 * e['pass@1']:.1f}% | "
                     f"{100 * e['greedy']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
