"""`seekling distill logits`: knowledge distillation from a local teacher's logits.

    seekling distill logits --teacher runs/big/sft --student runs/small/base --out runs/small/kd \
        --tasks arithmetic --levels 1 2 --kind forward --on-policy-frac 0.5 --time 300

The student learns the teacher's whole next-token distribution on the assistant tokens, not only
the sampled token (Hinton et al., 2015). Three divergences (`kd_loss`, per token, summed over the
vocabulary, averaged over the masked tokens, × T² so that gradients keep their scale across
temperatures):

- forward  KL(p_T || p_S): mode-covering, the classic KD loss;
- reverse  KL(p_S || p_T): mode-seeking (MiniLLM, Gu et al., 2024);
- mix      the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024) with β = `mix`:
           JSD_β = β·KL(p_T || M) + (1-β)·KL(p_S || M), M = β·p_T + (1-β)·p_S.
           β = 0.5 is the plain JS divergence; it behaves like β·forward KL as β -> 0 and like
           (1-β)·reverse KL as β -> 1.

The sequences the divergence is measured on come from one of two places, mixed per batch:
- fixed data: the teacher's own samples on task prompts (generated once with the engine and
  kept in the training state folder, so a resumed run sees the same data), the solver traces of
  the tasks, or trace files from `seekling distill collect` (`--traces`);
- on-policy (GKD): with probability λ = `--on-policy-frac` a batch is sampled from the current
  student with the engine, and the teacher scores it. The engine runs on the live student
  module, so each batch reflects the latest optimizer step.

The trainer (`seekling.train.trainer.train`, a job on the scaffold's one Loop) runs it through its `loss_fn` hook, so
checkpoints, resume, progress, Ctrl-C and scaling out (torchrun with `--parallel ddp|fsdp`, `--ep N`)
work as for SFT; the teacher is a whole copy on every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekling.atomic import write_bytes
from seekling.data import IGNORE_INDEX, BatchLoader, SFTDataset
from seekling.train.scaffold import inference_view, state_dir_for
from seekling.train.trainer import add_train_flags, train_config

KINDS = ("forward", "reverse", "mix")
Batch = dict[str, torch.Tensor]


# --- the divergences ----------------------------------------------------------------------------------


def check_kd_args(kind: str, temperature: float, mix: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "mix" and not 0 < mix < 1:
        raise ValueError(f"mix (GKD's β) must be in (0, 1), got {mix}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            kind: str = "forward", temperature: float = 1.0, mix: float = 0.5) -> torch.Tensor:
    """Mean over the masked positions of the per-token divergence between teacher and student
    next-token distributions (logits [..., V], mask [...] bool, aligned with the logits), × T²."""
    check_kd_args(kind, temperature, mix)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: do the models share a vocabulary?")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward":
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse":
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        # log M = logsumexp(log β + log p_T, log(1-β) + log p_S), in log space for stability
        log_m = torch.logsumexp(torch.stack([log_t + math.log(mix), log_s + math.log(1 - mix)]), dim=0)
        per_token = (mix * (log_t.exp() * (log_t - log_m)).sum(-1)
                     + (1 - mix) * (log_s.exp() * (log_s - log_m)).sum(-1))
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the logits' positions {tuple(per_token.shape)}")
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0) * temperature**2


def make_kd_loss(teacher: nn.Module, kind: str = "forward", temperature: float = 1.0, mix: float = 0.5,
                 ce_weight: float = 0.0):
    """loss_fn(student, batch) -> (loss, metrics) for the trainer: the KD divergence on the positions
    that predict a label (the assistant tokens; labels are -100 elsewhere), plus ce_weight × the
    student's cross-entropy on those labels, plus the student's own auxiliary terms (MTP, balance)."""
    teacher.eval().requires_grad_(False)
    check_kd_args(kind, temperature, mix)  # fail before training starts, not at the first batch

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            t_logits = teacher(input_ids).logits[:, :-1]
        out = model(input_ids, labels=labels)
        s_logits = out.logits[:, :-1]
        mask = labels[:, 1:] != IGNORE_INDEX  # logits at t predict token t+1
        kd = kd_loss(s_logits, t_logits, mask, kind, temperature, mix)
        aux = out.loss - out.ce_loss  # MTP + balance terms the model adds to its own loss
        loss = kd + ce_weight * out.ce_loss + aux
        with torch.no_grad():
            agree = ((s_logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum() / mask.sum().clamp_min(1)
        return loss, {"kd": kd.detach(), "ce_loss": out.ce_loss.detach(), "top1_agree": agree}

    return loss_fn


def check_compatible(teacher: nn.Module, student: nn.Module, teacher_tok: Any = None, student_tok: Any = None) -> None:
    """Logit distillation compares distributions token id by token id: the two models need the same
    vocabulary size, and their tokenizers (when given) the same token -> id map."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise ValueError(f"teacher vocab_size {vt} != student vocab_size {vs}: logit distillation needs a "
                         "shared tokenizer (distil from traces with `seekling sft --traces` instead)")
    if teacher_tok is None or student_tok is None:
        return
    t_vocab = teacher_tok.tokenizer.get_vocab(with_added_tokens=True)
    s_vocab = student_tok.tokenizer.get_vocab(with_added_tokens=True)
    if t_vocab != s_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:3]
        raise ValueError(f"the teacher's and the student's tokenizers map tokens to different ids (e.g. {diff}); "
                         "logit distillation needs the same tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            raise ValueError(f"teacher {name} {getattr(teacher_tok, name)} != student {getattr(student_tok, name)}")


# --- data ---------------------------------------------------------------------------------------------


def teacher_samples(teacher: nn.Module, tok: Any, problems: list[Any], out: str | Path, n: int = 1,
                    temperature: float = 1.0, max_tokens: int = 256, seed: int = 0) -> list[dict]:
    """Sample `n` answers of the teacher to each problem with the engine and write them to `out` as
    trace records (`seekling distill collect`'s format, with the verifier's score), so `load_traces`
    reads them back. An existing file is reused: a resumed run trains on the same samples."""
    from seekling.engine import Engine, SamplingParams
    from seekling.tasks import TASKS
    from seekling.train.collect import read_records

    out = Path(out)
    if out.exists():
        return read_records(out)
    engine = Engine(teacher, tok, max_num_seqs=64)
    prompts = [[{"role": "user", "content": p.question}] for p in problems]
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(problems))]
    records = []
    for i, (p, msgs, res) in enumerate(zip(problems, prompts, engine.generate(prompts, params), strict=True)):
        for j, o in enumerate(res.outputs):
            completion = f"{o.reasoning}</think>{o.text}" if o.reasoning else o.text
            records.append({"id": f"{i}#{j}", "messages": msgs, "reasoning_content": o.reasoning, "content": o.text,
                            "finish_reason": o.finish_reason, "task": p.task, "difficulty": p.difficulty,
                            "answer": p.answer, "score": float(TASKS[p.task].score(p, completion))})
    write_bytes(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    return records


class OnPolicyBatches:
    """Endless batches for the trainer: with probability `frac` a batch of the current student's own
    samples on `prompts` (GKD's on-policy data), else the next batch of `fixed` (a BatchLoader).
    Deterministic in `seed`, with state_dict() / load_state_dict() so a resumed run continues the stream.
    Under torchrun every rank flips the same coin (so all sample together: a sharded student's weights
    are gathered for the engine then) and draws its own prompts (`rank`, default torchrun's RANK)."""

    def __init__(self, student: nn.Module, tok: Any, prompts: list[list[dict]], fixed: BatchLoader | None,
                 frac: float, batch_size: int, max_tokens: int = 256, temperature: float = 1.0, seed: int = 0,
                 rank: int | None = None):
        if not 0 <= frac <= 1:
            raise ValueError(f"the on-policy fraction must be in [0, 1], got {frac}")
        if fixed is None and frac < 1:
            raise ValueError("without fixed data every batch must be on-policy (frac = 1)")
        if frac > 0 and not prompts:
            raise ValueError("on-policy batches need prompts")
        self.student, self.tok, self.prompts, self.fixed, self.frac = student, tok, prompts, fixed, frac
        self.batch_size, self.max_tokens, self.temperature, self.seed = batch_size, max_tokens, temperature, seed
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        # the engine is built on first use, on what inference_view gives: the student, or its unsharded copy
        self.engine: Any = None
        self.engine_module: nn.Module | None = None
        self.index = 0  # batches handed out so far: with the seed, it fixes the next coin flip and prompts
        self.on_policy = 0

    def state_dict(self) -> dict:
        return {"index": self.index, "on_policy": self.on_policy, "seed": self.seed,
                "fixed": self.fixed.state_dict() if self.fixed is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state has seed {state['seed']}, this run {self.seed}")
        self.index, self.on_policy = state["index"], state["on_policy"]
        if self.fixed is not None:
            self.fixed.load_state_dict(state["fixed"])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rng = random.Random(self.seed * 1_000_003 + self.index)
        self.index += 1
        if rng.random() >= self.frac:
            return next(self.fixed)
        self.on_policy += 1
        if self.rank:  # other prompts and sampling seeds than rank 0's
            rng = random.Random(f"{self.seed}/{self.index}/{self.rank}")
        return self.sample(rng)

    def sample(self, rng: random.Random) -> Batch:
        """A batch of the student's completions: labels on the completion tokens only."""
        from seekling.engine import Engine, SamplingParams

        view = inference_view(self.student)
        if self.engine is None or self.engine_module is not view:
            self.engine, self.engine_module = Engine(view, self.tok, max_num_seqs=self.batch_size), view

        chosen = [self.prompts[rng.randrange(len(self.prompts))] for _ in range(self.batch_size)]
        prompt_ids = [self.tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in chosen]
        params = [SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens, seed=rng.randrange(2**31))
                  for _ in chosen]
        outs = self.engine.generate(prompt_ids, params)
        rows = [(p, o.token_ids) for p, o in zip(prompt_ids, outs, strict=True)]
        width = max(len(p) + len(c) for p, c in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (p, c) in enumerate(rows):
            ids = torch.tensor(p + c, dtype=torch.long)
            input_ids[r, :len(ids)] = ids
            labels[r, len(p):len(ids)] = ids[len(p):]
        return {"input_ids": input_ids, "labels": labels}


# --- the command --------------------------------------------------------------------------------------


def add_logits_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher model directory (with its tokenizer)")
    parser.add_argument("--student", required=True, help="student model directory to start from")
    parser.add_argument("--kind", choices=KINDS, default="forward",
                        help="forward KL(p_T||p_S), reverse KL(p_S||p_T), or mix: GKD's generalised JSD with β=--mix")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KD loss")
    parser.add_argument("--mix", type=float, default=0.5, help="β of the generalised JSD (--kind mix)")
    parser.add_argument("--ce-weight", type=float, default=0.0, help="weight of the student's CE on the labels")
    parser.add_argument("--on-policy-frac", type=float, default=0.0,
                        help="λ: share of batches sampled from the current student (GKD); 1 = fully on-policy")
    parser.add_argument("--traces", nargs="*", default=None,
                        help="fixed data: trace JSONL files from `seekling distill collect` (instead of --tasks)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task families for prompts (default: all)")
    parser.add_argument("--levels", nargs="*", type=int, default=[1, 2], help="task levels")
    parser.add_argument("--count", type=int, default=200, help="training problems per task and level")
    parser.add_argument("--data", choices=("teacher", "solver"), default="teacher",
                        help="fixed data with --tasks: the teacher's samples, or the tasks' solver traces")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="teacher samples per problem")
    parser.add_argument("--only-correct", action="store_true",
                        help="keep only fixed samples the verifier accepts (rejection sampling)")
    parser.add_argument("--sample-temperature", type=float, default=1.0,
                        help="temperature for teacher samples and on-policy student samples")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    add_train_flags(parser, lr=1e-3)


def run_logits(args: argparse.Namespace) -> dict:
    from seekling.model.load import load_pretrained
    from seekling.tasks import TASKS, sample_problems
    from seekling.tokenizer import load_tokenizer
    from seekling.train.collect import load_traces
    from seekling.train.trainer import train

    teacher, student = load_pretrained(args.teacher), load_pretrained(args.student)
    tok = load_tokenizer(args.student)
    check_compatible(teacher, student, load_tokenizer(args.teacher), tok)
    out = Path(args.out)
    state_dir = state_dir_for(out)
    state_dir.mkdir(parents=True, exist_ok=True)

    # fixed data and the prompts for on-policy samples
    if args.traces:
        conversations = [m for path in args.traces for m in load_traces(path, only_correct=args.only_correct)]
        prompts = [c[:-1] for c in conversations]
    else:
        tasks = args.tasks or sorted(TASKS)
        problems = [p for t in tasks for lv in args.levels if lv in TASKS[t].levels
                    for p in sample_problems(t, args.count, "train", lv, seed=args.seed)]
        if not problems:
            raise SystemExit(f"no problems for tasks {tasks} at levels {args.levels}")
        prompts = [[{"role": "user", "content": p.question}] for p in problems]
        conversations = []
        if args.data == "solver":
            conversations = [p.messages(with_trace=True) for p in problems]
        elif args.on_policy_frac < 1:
            records = teacher_samples(teacher, tok, problems, state_dir / "teacher_samples.jsonl",
                                      n=args.samples_per_prompt, temperature=args.sample_temperature,
                                      max_tokens=args.max_new_tokens, seed=args.seed)
            correct = sum(r["score"] >= 1 for r in records) / max(len(records), 1)
            print(f"teacher samples: {len(records)}, {100 * correct:.0f}% verified correct")
            conversations = load_traces(state_dir / "teacher_samples.jsonl", only_correct=args.only_correct)
    fixed = None
    if args.on_policy_frac < 1:
        if not conversations:
            raise SystemExit("no fixed KD data (are the traces empty, or all rejected?)")
        data = SFTDataset([tok.encode_sft(m) for m in conversations], args.seq_len, pad_id=tok.pad_token_id,
                          truncate=True)
        fixed = BatchLoader(data, args.batch_size, seed=args.seed)
        print(f"KD on {len(data)} fixed sequences, on-policy share {args.on_policy_frac}")
    batches = OnPolicyBatches(student, tok, prompts, fixed, args.on_policy_frac, args.batch_size,
                              max_tokens=args.max_new_tokens, temperature=args.sample_temperature, seed=args.seed)
    loss_fn = make_kd_loss(teacher, args.kind, args.temperature, args.mix, args.ce_weight)
    summary = train(student, batches, train_config(args), out, state_dir, loss_fn=loss_fn, resume=args.resume)
    tok.save_pretrained(out)
    return {k: v for k, v in summary.items() if k != "history"}
