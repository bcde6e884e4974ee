"""GRPO on verifiable rewards (DeepSeekMath / DeepSeek-R1), with the DAPO and Dr. GRPO variants.

One step: sample G completions for each of B prompts with the current policy, score them, normalise the
rewards within each group to get advantages, then take mu optimizer steps on the clipped surrogate

    L = -agg_t[ min(r_t A, clip(r_t, 1 - eps, 1 + eps_high) A) - beta KL_k3(pi || pi_ref) ],
    r_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)

The maths are pure functions (`group_advantages`, `kl_k3`, `policy_loss`) tested on hand-computed cases;
`train_rl` is the loop: rollouts, rewards, updates, logging and a wall-time budget; devices, DDP / FSDP2 /
expert parallelism, the schedule, checkpoints, resume and signals are the training scaffold's
(`seekling/train/scaffold.py`), shared with the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekling.train.rewards import (
    R1_ZERO_TEMPLATE,
    RewardFn,
    accuracy_reward,
    compute_rewards,
    load_prompts_jsonl,
    load_reward_fn,
)
from seekling.train.scaffold import (
    PARALLEL,
    SCHEDULES,
    Dist,
    Loop,
    Parallelized,
    autocast,
    setup,
    state_dir_for,
)

AGGREGATIONS = ("seq-mean", "token-mean", "dr-grpo")


# --- the maths --------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages of rewards [n_groups, G]: (r - mean) / (std + eps), or r - mean with
    Dr. GRPO (`scale_std=False`, which removes the bias toward too-easy/too-hard questions). A group whose
    rewards are all equal gets 0 (no signal). std is the unbiased one, as in DeepSeekMath / TRL."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [n_groups, G] with G >= 2, got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token, sampled from pi: exp(d) - d - 1 with
    d = ref_logp - logp. Unbiased, and >= 0 everywhere (e^d >= 1 + d), 0 where the two agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
                mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                beta: float = 0.0, agg: str = "seq-mean", max_len: int | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a batch of completions, and its statistics.

    logp, old_logp, ref_logp, mask: [B, T] per completion token (mask 1 on tokens that count);
    adv: [B] one advantage per completion. `clip_eps_high` (DAPO clip-higher) defaults to `clip_eps`.
    agg: "seq-mean" (GRPO: mean over each sequence's tokens, then over sequences), "token-mean" (DAPO: mean
    over all tokens of the batch), "dr-grpo" (sum over tokens / max_len, mean over sequences; max_len is a
    constant, by default T).
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; choose from {AGGREGATIONS}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs reference log-probs")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp.dtype)
    a = adv.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + eps_high) * a)
    per_token = -surrogate
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if beta > 0:
        per_token = per_token + beta * kl

    n_tok = mask.sum()
    if agg == "seq-mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif agg == "token-mean":
        loss = (per_token * mask).sum() / n_tok.clamp(min=1)
    else:
        loss = (per_token * mask).sum() / (logp.shape[0] * (max_len or logp.shape[1]))

    with torch.no_grad():
        # Clipped where the min picked the clamped branch with the ratio outside the range: no gradient there.
        clipped = ((ratio > 1 + eps_high) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
        denom = n_tok.clamp(min=1)
        stats = {
            "clip_frac": float((clipped * mask).sum() / denom),
            "ratio_mean": float((ratio * mask).sum() / denom),
            "kl": float((kl * mask).sum() / denom) if kl is not None else 0.0,
        }
    return loss, stats


def completion_logprobs(model: nn.Module, ids: torch.Tensor, start: int, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T - start] of tokens ids[:, start:] under the model (logits / temperature, the
    distribution they were sampled from), and optionally the per-token entropy of that distribution.
    Right padding is harmless: attention is causal, and padded positions are masked by the caller."""
    logits = model(ids).logits[:, start - 1:-1].float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, start:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# --- rollouts ---------------------------------------------------------------------------------------------
@dataclass
class Completion:
    token_ids: list[int]  # the generated tokens, eos included when the model stopped on it
    text: str  # decoded without special tokens: "reasoning</think>\n\nanswer" under the R1 template
    finish_reason: str  # "stop" or "length"


def encode_prompt(tok: Any, sample: dict[str, Any], recipe: str) -> list[int]:
    """Prompt ids of a sample: the chat template (r1, ends with `<｜Assistant｜><think>\\n`) or the plain-text
    R1-Zero template (r1-zero, ends with "Assistant:")."""
    if sample.get("problem") is not None:
        question = sample["problem"].question
    elif "prompt" in sample:
        question = sample["prompt"]
    else:
        question = next((m["content"] for m in reversed(sample["messages"]) if m["role"] == "user"), "")
    if recipe == "r1-zero":
        return tok.encode((tok.bos_token or "") + R1_ZERO_TEMPLATE.format(question=question))
    messages = sample.get("messages") or [{"role": "user", "content": question}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


# --- the loop ---------------------------------------------------------------------------------------------
RECIPES = ("r1", "r1-zero")


@dataclass
class RLConfig:
    recipe: str = "r1"  # "r1": chat template, start from SFT; "r1-zero": R1-Zero plain-text template, from base
    steps: int = 100
    prompts_per_step: int = 8  # over all ranks: each rank rolls out its share
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # decay to lr * min_lr_ratio (RL drifts: decay it and keep the best)
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" or "wsd" (the trainer's schedules)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    mu: int = 1  # optimizer steps on each batch of rollouts
    micro_batch: int = 16  # completions per forward/backward
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher (e.g. 0.28); None: clip_eps
    beta: float = 0.0  # KL coefficient; 0 keeps no reference model in memory
    loss_agg: str = "seq-mean"  # "seq-mean" (GRPO), "token-mean" (DAPO), "dr-grpo"
    scale_std: bool = True  # False: Dr. GRPO advantages
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups, sample more prompts to refill the batch
    max_sampling_rounds: int = 3
    mask_truncated: bool = False  # leave completions cut at max_new_tokens out of the loss
    w_accuracy: float = 1.0
    w_format: float = 0.1
    w_overlong: float = 0.0
    w_custom: float = 0.0
    overlong_cache: int = 0  # DAPO's soft overlong window, in tokens before max_new_tokens
    eval_every: int = 0  # steps between held-out evals (needs an eval_fn); 0: at the start and the end only
    save_every: int = 20  # steps between resumable checkpoints (and at the end)
    time_budget_s: float | None = None  # wall-time budget for the whole run, resumes included
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    parallel: str = "ddp"  # with several ranks (torchrun): "ddp" or "fsdp" (FSDP2)
    ep: int = 1  # expert parallelism: routed experts sharded over groups of this many ranks

    def __post_init__(self) -> None:
        problems = []
        if self.recipe not in RECIPES:
            problems.append(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.loss_agg not in AGGREGATIONS:
            problems.append(f"loss_agg must be one of {AGGREGATIONS}, got {self.loss_agg!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.parallel not in PARALLEL:
            problems.append(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.group_size < 2:
            problems.append("group_size must be >= 2 (advantages are relative to the group)")
        if self.temperature <= 0:
            problems.append("temperature must be > 0 (RL samples; log-probs use logits / temperature)")
        if min(self.steps, self.prompts_per_step, self.max_new_tokens, self.mu, self.micro_batch,
               self.max_sampling_rounds, self.ep) < 1:
            problems.append("steps, prompts_per_step, max_new_tokens, mu, micro_batch, max_sampling_rounds "
                            "and ep must be >= 1")
        if self.w_overlong and not 0 < self.overlong_cache <= self.max_new_tokens:
            problems.append("w_overlong needs 0 < overlong_cache <= max_new_tokens")
        if problems:
            raise ValueError("bad RLConfig: " + "; ".join(problems))

    @property
    def min_lr(self) -> float:  # for the scaffold's lr_at
        return self.lr * self.min_lr_ratio

    def reward_weights(self) -> dict[str, float]:
        return {"accuracy": self.w_accuracy, "format": self.w_format, "overlong": self.w_overlong,
                "custom": self.w_custom}


def task_sampler(tasks: list[str], difficulties: list[int] | None, seed: int,
                 cells: list[tuple[str, int]] | None = None) -> Callable[[int, int], list]:
    """draw(cursor, n) -> the training problems cursor .. cursor + n - 1 of a stream that depends only on
    the seed (so a resumed run, restoring the cursor, sees the same problems); (task, difficulty) pairs in
    turn."""
    from seekling.tasks import TASKS, sample_problems

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    # cells: explicit (task, difficulty) pairs, e.g. the ones where the policy is neither hopeless nor solved
    pairs = [tuple(c) for c in cells] if cells else \
        [(t, d) for t in tasks for d in (difficulties or [None]) if d is None or d in TASKS[t].levels]
    if not pairs:
        raise ValueError(f"none of the difficulties {difficulties} exist in tasks {tasks}")

    def draw(cursor: int, n: int) -> list[dict[str, Any]]:
        out = []
        for i in range(cursor, cursor + n):
            task, d = pairs[i % len(pairs)]
            # One seed per problem index: problem i is the same whatever the batch boundaries were.
            p = sample_problems(task, 1, "train", d, seed=seed * 1_000_003 + i)[0]
            out.append({"problem": p, "prompt": p.question})
        return out

    return draw


def prompt_sampler(rows: list[dict[str, Any]], seed: int) -> Callable[[int, int], list]:
    """draw(cursor, n) over a user's prompts: epochs of fresh shuffles, deterministic in the seed."""
    def draw(cursor: int, n: int) -> list[dict[str, Any]]:
        orders: dict[int, list[int]] = {}
        out = []
        for i in range(cursor, cursor + n):
            epoch, j = divmod(i, len(rows))
            if epoch not in orders:
                orders[epoch] = list(range(len(rows)))
                random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
            out.append(rows[orders[epoch][j]])
        return out

    return draw


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)


Group = tuple[list[int], list[Completion], list[float]]  # prompt ids, its G completions, their G rewards


def train_rl(policy_dir: str | Path, out_dir: str | Path, state_dir: str | Path, cfg: RLConfig,
             tasks: list[str] | None = None, difficulties: list[int] | None = None,
             prompts: list[dict[str, Any]] | None = None, reward_fn: RewardFn | None = None,
             eval_fn: Callable[[nn.Module, Any], float] | None = None,
             log: Callable[[str], None] = print, cells: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """GRPO from the model in `policy_dir` on task problems (`tasks`) or a user's `prompts` (with
    `reward_fn`). The result goes to `out_dir`: the best model by `eval_fn(model, tokenizer)` (higher is
    better, evaluated at the start, every `eval_every` steps and at the end) or, without one, the last.
    `state_dir` holds what a resume needs (checkpoints/) and the per-step log (rl_log.jsonl). Under
    torchrun each rank rolls out its share of each step's prompts; the gradients are reduced over all
    ranks (DDP or FSDP2, experts by expert parallelism) and every rank applies the same update."""
    if (tasks is None) == (prompts is None):
        raise ValueError("give either tasks (verifiable problems) or prompts (with a reward function)")
    if cfg.w_custom and reward_fn is None:
        raise ValueError("w_custom > 0 needs a reward function")
    d = setup(cfg.device, cfg.ep)
    try:
        if cfg.prompts_per_step % d.world:
            raise ValueError(f"prompts_per_step {cfg.prompts_per_step} must be a multiple of the {d.world} ranks")
        draw = task_sampler(tasks, difficulties, cfg.seed, cells) if tasks is not None \
            else prompt_sampler(prompts, cfg.seed)
        loop = Loop(d, Path(state_dir), cfg, cfg.steps, seed=cfg.seed + d.rank, time_budget_s=cfg.time_budget_s,
                    clock="session", log_every=1, eval_every=cfg.eval_every, save_every=cfg.save_every,
                    metrics_file="rl_log.jsonl", config=dataclasses.asdict(cfg),
                    log=log if d.master else lambda s: None)
        job = GRPOJob(policy_dir, Path(out_dir), cfg, draw, tasks is not None, reward_fn, eval_fn, d)
        return loop.run(job)  # each rank samples its own rollouts: the seed is cfg.seed + rank
    finally:
        d.close()


class GRPOJob:
    """GRPO on the Loop: a step is one batch of rollouts (dynamic sampling refills it with groups that carry a
    signal) and the policy update on it; the state is the prompt cursor and the best eval. The model directory
    holds the best model by `eval_fn`, or without one the last."""

    eval_at_start = True  # the starting policy is the score the best checkpoint must beat

    def __init__(self, policy_dir: str | Path, out_dir: Path, cfg: RLConfig, draw: Callable[[int, int], list],
                 on_tasks: bool, reward_fn: RewardFn | None, eval_fn: Callable[[nn.Module, Any], float] | None,
                 d: Dist):
        from seekling.model.load import load_pretrained
        from seekling.tokenizer import load_tokenizer

        self.out_dir, self.cfg, self.draw, self.reward_fn, self.eval_fn, self.d = out_dir, cfg, draw, reward_fn, \
            eval_fn, d
        self.can_evaluate = eval_fn is not None
        policy = load_pretrained(policy_dir)
        self.tok = load_tokenizer(policy_dir)
        self.ref = load_pretrained(policy_dir, device=d.device).requires_grad_(False) if cfg.beta > 0 else None
        self.pm = Parallelized(policy, d, cfg.parallel, cfg.ep)
        self.opts = [torch.optim.AdamW(self.pm.module.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                       weight_decay=cfg.weight_decay)]
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.answer_ok = None
        if on_tasks and cfg.recipe == "r1":
            from seekling.tasks import extract_answer

            self.answer_ok = lambda a: extract_answer(a) is not None  # the tasks' answer format: \boxed{...}
        self.P = cfg.prompts_per_step // d.world  # this rank's prompts per step
        self.cursor, self.best = 0, None  # cursor: prompts drawn so far, all ranks

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "best": self.best}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.cursor, self.best = state["cursor"], state["best"]

    def begin(self, loop: Loop) -> None:
        self.engine = make_engine(self.pm.inference_view(), self.tok, max_num_seqs=self.P * self.cfg.group_size)

    def train_step(self, loop: Loop) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.pm.inference_view()  # the engine's module: refreshed from the shards when sharded
        self.pm.module.eval()
        kept, seen = self.rollouts()
        t_rollout, t1 = time.perf_counter() - t0, time.perf_counter()
        # the policy update: mu optimizer steps on this batch (every rank takes part, so that the gradients and
        # the update are the same everywhere)
        cfg = self.cfg
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        adv = group_advantages(torch.tensor([r for _, _, r in kept]), cfg.scale_std).flatten() if kept \
            else torch.zeros(0)
        if self.d.agree(bool(kept) and (adv.abs().max() > 0 or cfg.beta > 0)):
            stats = update_policy(self.pm.module, self.ref, self.opts[0], kept, adv, cfg, self.pad_id, self.pm)
        return {**seen, "n_kept": len(kept), "stats": stats, "t_rollout": t_rollout,
                "t_update": time.perf_counter() - t1}

    def rollouts(self) -> tuple[list[Group], dict[str, Any]]:
        """This rank's groups for one step and what was seen drawing them (rewards, lengths, zero-variance
        groups): with dynamic sampling, rounds of fresh prompts until P groups carry a signal."""
        cfg, d, P = self.cfg, self.d, self.P
        kept: list[Group] = []
        seen: dict[str, Any] = {"rewards": {}, "lengths": [], "truncated": 0, "n_groups": 0, "n_zero": 0}
        for _ in range(cfg.max_sampling_rounds):
            need = P - len(kept) if cfg.dynamic_sampling else P
            width = int(max(d.gather(need)))  # each rank's slice of this round's prompts
            batch = self.draw(self.cursor + d.rank * width, need)
            self.cursor += width * d.world
            if need:
                groups = rollout_and_score(self.engine, self.tok, batch, cfg, self.reward_fn, self.answer_ok,
                                           seen["rewards"])
                seen["lengths"] += [len(c.token_ids) for _, g, _ in groups for c in g]
                seen["truncated"] += sum(c.finish_reason == "length" for _, g, _ in groups for c in g)
                for group in groups:
                    zero = max(group[2]) - min(group[2]) < 1e-9
                    seen["n_groups"] += 1
                    seen["n_zero"] += zero
                    if not (zero and cfg.dynamic_sampling):
                        kept.append(group)
            if not cfg.dynamic_sampling or not d.agree(len(kept) < P):
                break
        return kept[:P], seen

    def record(self, loop: Loop, out: dict[str, Any]) -> tuple[dict[str, Any], str]:
        stats = out["stats"]
        record = step_record(self.d, loop.step, loop.lr, out["rewards"], out["lengths"], out["truncated"],
                             out["n_groups"], out["n_zero"], out["n_kept"], stats)
        record.update(t_rollout=out["t_rollout"], t_update=out["t_update"],
                      rollouts_per_s=record.pop("rollouts") / out["t_rollout"], elapsed_s=loop.elapsed())
        text = (f"reward {record['reward/total_mean']:.3f} "
                + (f"acc {record['accuracy']:.3f} " if "accuracy" in record else "")
                + f"len {record['len_mean']:.0f} zero-var {record['zero_var_frac']:.2f} kl {stats['kl']:.4f} "
                + f"clip {stats['clip_frac']:.3f} | rollout {out['t_rollout']:.1f}s update {out['t_update']:.1f}s "
                + f"{record['rollouts_per_s']:.0f} rollouts/s")
        return record, text

    def evaluate(self, loop: Loop) -> dict[str, float]:
        """eval_fn on rank 0 (on the unsharded weights), its score on every rank; keeps the best model."""
        t = time.perf_counter()
        view = self.pm.inference_view().eval()
        score = self.d.broadcast(float(self.eval_fn(view, self.tok)) if self.d.master else None)
        if self.best is None or score > self.best:
            self.best = score
            self.write_model()
        return {"eval": score, "t_eval": time.perf_counter() - t}

    def write_model(self) -> None:
        self.pm.save_pretrained(self.out_dir)
        if self.d.master:
            self.tok.save_pretrained(self.out_dir)

    def save_model(self, loop: Loop, final: bool) -> None:
        if final and self.eval_fn is None:  # with an eval, the model directory holds the best model already
            self.write_model()

    def summary(self, loop: Loop) -> dict[str, Any]:
        return {"steps": loop.step, "stop_reason": "steps" if loop.stopped == "max_steps" else loop.stopped,
                "wall_time_s": loop.elapsed(), "best_eval": self.best, "log": str(loop.metrics.path),
                "out_dir": str(self.out_dir)}


def rollout_and_score(engine: Any, tok: Any, batch: list[dict[str, Any]], cfg: RLConfig,
                      reward_fn: RewardFn | None, answer_ok: Callable[[str], bool] | None,
                      seen: dict[str, list[float]]) -> list[Group]:
    """G completions of each sample of `batch` and their rewards (each reward's values added to `seen`)."""
    G = cfg.group_size
    prompt_ids = [encode_prompt(tok, s, cfg.recipe) for s in batch]
    groups = rollout(engine, prompt_ids, G, cfg)
    flat = [c for g in groups for c in g]
    rewards = compute_rewards([s for s in batch for _ in range(G)], [c.text for c in flat],
                              [len(c.token_ids) for c in flat], cfg.reward_weights(), cfg.recipe,
                              reward_fn, cfg.max_new_tokens, cfg.overlong_cache, answer_ok)
    for name, values in rewards.items():
        seen.setdefault(name, []).extend(values)
    return [(ids, g, rewards["total"][i * G:(i + 1) * G]) for i, (ids, g) in enumerate(zip(prompt_ids, groups,
                                                                                            strict=True))]


def step_record(d: Dist, step: int, lr: float, seen: dict[str, list[float]], lengths: list[int], truncated: int,
                n_groups: int, n_zero: int, n_kept: int, stats: dict[str, float]) -> dict[str, Any]:
    """The step's log record over all ranks' rollouts (the update's statistics are already global)."""
    parts = d.gather((seen, lengths, truncated, n_groups, n_zero, n_kept))
    seen = {name: [v for p in parts for v in p[0].get(name, [])] for name in seen}
    lengths = [n for p in parts for n in p[1]]
    truncated, n_groups, n_zero, n_kept = (sum(p[i] for p in parts) for i in range(2, 6))
    record: dict[str, Any] = {"step": step, "lr": lr}
    for name, values in seen.items():
        t = torch.tensor(values)
        record[f"reward/{name}_mean"] = t.mean().item()
        record[f"reward/{name}_std"] = t.std().item() if len(values) > 1 else 0.0
    if "accuracy" in seen:
        record["accuracy"] = record["reward/accuracy_mean"]
    record.update(len_mean=sum(lengths) / len(lengths), len_max=max(lengths), truncated_frac=truncated / len(lengths),
                  zero_var_frac=n_zero / n_groups, groups_used=n_kept, **stats, rollouts=len(lengths))
    return record


def update_policy(policy: nn.Module, ref: nn.Module | None, opt: torch.optim.Optimizer,
                  kept: list[Group], adv: torch.Tensor, cfg: RLConfig, pad_id: int,
                  pm: Parallelized | None = None) -> dict[str, float]:
    """mu optimizer steps of the GRPO loss on one batch of groups; returns the step's statistics.
    Old log-probs (for the ratio) are computed once, before the first step; with mu = 1 they equal the
    current ones, so the ratio is 1 and no extra forward is needed. `pm` is the policy on the scaffold's
    ranks (None: `policy` alone, in this process): the loss is normalised over all ranks' completions and
    every rank runs the same number of micro-batches (padding with empty ones), as the collectives need."""
    pm = pm or Parallelized(policy, Dist(0, 1, 0, policy.device))
    d, device = pm.d, pm.d.device
    rows = [(ids, c, a) for (ids, g, _), a_g in zip(kept, adv.split([len(g) for _, g, _ in kept]), strict=True)
            for c, a in zip(g, a_g.tolist(), strict=True)]
    counted = lambda c: not (cfg.mask_truncated and c.finish_reason == "length")  # noqa: E731
    # the loss is normalised over every completion; those with advantage 0 add exactly 0 to it (and to its gradient)
    # when there is no KL term, so they are left out of the forward and backward: the same update, less compute
    n_seq, n_tok = d.sum([len(rows), sum(len(c.token_ids) for _, c, _ in rows if counted(c))])
    n_tok = max(n_tok, 1.0)
    if cfg.beta == 0:
        rows = [r for r in rows if r[2] != 0.0]
    chunks = loss_chunks(rows, cfg, pad_id, counted)
    n_chunks = int(max(d.gather(len(chunks))))
    n_live = max(d.sum([sum(float(c["mask"].sum()) for c in chunks)])[0], 1.0)  # for the entropy statistic
    for _ in range(n_chunks - len(chunks)):  # weight 0: no gradient, but the same collectives as the other ranks
        chunks.append({"ids": torch.full((1, 2), pad_id), "start": 1, "mask": torch.zeros(1, 1), "adv": torch.zeros(1),
                       "n": 0})
    for c in chunks:
        c.update(ids=c["ids"].to(device), mask=c["mask"].to(device), adv=c["adv"].to(device))
        with torch.no_grad(), autocast(device):
            if cfg.mu > 1:
                c["old"] = completion_logprobs(pm.fwd, c["ids"], c["start"], cfg.temperature)[0]
            if ref is not None:
                c["ref"] = completion_logprobs(ref, c["ids"], c["start"], cfg.temperature)[0]

    pm.module.train()
    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    for it in range(cfg.mu):
        for j, c in enumerate(chunks):
            with pm.no_sync(last=j == len(chunks) - 1):
                with autocast(device):
                    logp, entropy = completion_logprobs(pm.fwd, c["ids"], c["start"], cfg.temperature,
                                                        with_entropy=it == 0)
                old = c["old"] if cfg.mu > 1 else logp.detach()
                loss, st = policy_loss(logp, old, c.get("ref"), c["adv"], c["mask"], cfg.clip_eps, cfg.clip_eps_high,
                                       cfg.beta, cfg.loss_agg, cfg.max_new_tokens)
                # Weight each micro-batch so the sum over micro-batches (and the mean over ranks that the
                # gradient reduction takes) is the loss of the whole batch.
                tok_share = float(c["mask"].sum()) / n_tok
                share = tok_share if cfg.loss_agg == "token-mean" else c["n"] / n_seq
                (loss * (share * d.world)).backward()
            sums["loss"] += loss.item() * share / cfg.mu
            sums["kl"] += st["kl"] * tok_share / cfg.mu
            sums["clip_frac"] += st["clip_frac"] * tok_share / cfg.mu
            if entropy is not None:
                sums["entropy"] += float((entropy * c["mask"]).sum()) / n_live
        sums["grad_norm"] += float(pm.optimizer_step([opt], cfg.grad_clip)) / cfg.mu
    totals = d.sum([sums["loss"], sums["kl"], sums["clip_frac"], sums["entropy"]])
    return {**dict(zip(("loss", "kl", "clip_frac", "entropy"), totals, strict=True)), "grad_norm": sums["grad_norm"]}


def loss_chunks(rows: list[tuple[list[int], Completion, float]], cfg: RLConfig, pad_id: int,
                counted: Callable[[Completion], bool]) -> list[dict[str, Any]]:
    """Micro-batches of (prompt ids, completion, advantage) rows: padded ids, the position the completions start
    from, the mask of the completion tokens that count, the advantages. Similar lengths share a micro-batch."""
    rows = sorted(rows, key=lambda r: len(r[0]) + len(r[1].token_ids))
    chunks = []
    for i in range(0, len(rows), cfg.micro_batch):
        part = rows[i:i + cfg.micro_batch]
        ids = _pad([p + c.token_ids for p, c, _ in part], pad_id)
        start = min(len(p) for p, _, _ in part)
        pos = torch.arange(start, ids.shape[1])[None]
        lo = torch.tensor([len(p) for p, _, _ in part])[:, None]
        hi = torch.tensor([len(p) + len(c.token_ids) for p, c, _ in part])[:, None]
        keep = torch.tensor([counted(c) for _, c, _ in part])[:, None]
        mask = ((pos >= lo) & (pos < hi) & keep).float()
        chunks.append({"ids": ids, "start": start, "mask": mask, "adv": torch.tensor([a for _, _, a in part]),
                       "n": len(part)})
    return chunks


def make_engine(policy: nn.Module, tok: Any, max_num_seqs: int) -> Any:
    """The inference engine on the live policy module: it reads the weights at every forward, so each
    step's rollouts see the weights the previous optimizer step wrote (no copy, no reload)."""
    from seekling.engine import Engine

    return Engine(policy, tok, max_num_seqs=max_num_seqs)


def rollout(engine: Any, prompts_ids: list[list[int]], G: int, cfg: RLConfig) -> list[list[Completion]]:
    """G sampled completions of each prompt (continuous batching over all of them at once)."""
    from seekling.engine import SamplingParams

    params = SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                            detokenize=False)  # the token ids are decoded below
    outs = engine.generate(prompts_ids, params)
    tok = engine.tokenizer
    return [[Completion(o.token_ids, tok.decode(o.token_ids, skip_special_tokens=True), o.finish_reason)
             for o in out.outputs] for out in outs]


# --- evaluation and the command line ----------------------------------------------------------------------
def task_eval_fn(tasks: list[str], n: int, difficulties: list[int] | None = None, recipe: str = "r1",
                 max_new_tokens: int = 256, seed: int = 0) -> Callable[[nn.Module, Any], float]:
    """eval_fn(model, tok) -> greedy accuracy on n held-out (test split) problems per task and difficulty,
    for keeping the best checkpoint."""
    from seekling.engine import Engine, SamplingParams
    from seekling.tasks import TASKS, sample_problems

    samples = [{"problem": p} for t in tasks for d in (difficulties or [None])
               if d is None or d in TASKS[t].levels for p in sample_problems(t, n, "test", d, seed)]

    def eval_fn(model: nn.Module, tok: Any) -> float:
        engine = Engine(model, tok, max_num_seqs=min(len(samples), 64))
        outs = engine.generate([encode_prompt(tok, s, recipe) for s in samples],
                               SamplingParams(temperature=0, max_tokens=max_new_tokens, detokenize=False))
        texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        return sum(accuracy_reward(s["problem"], t, recipe) for s, t in zip(samples, texts, strict=True)) / len(samples)

    return eval_fn


def _field_type(f: dataclasses.Field) -> type:
    name = str(f.type).split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "bool": bool}[name]


def add_rl_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="model directory to start from (SFT for r1, base for r1-zero)")
    parser.add_argument("--out", required=True, help="output model directory (the best by --eval-n, else the last)")
    parser.add_argument("--state-dir", default=None,
                        help="resume state and rl_log.jsonl (default: <out>/../train_state/<out name>)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--tasks", help="comma-separated task families (seekling.tasks) to draw problems from")
    src.add_argument("--prompts", help='your prompts: JSONL of {"prompt"} or {"messages"} plus reward-function fields')
    parser.add_argument("--difficulty", default=None, help="comma-separated task levels (default: all)")
    parser.add_argument("--reward-fn", default=None,
                        help="module:function or file.py:function called as fn(prompt, completion, **fields)")
    parser.add_argument("--eval-n", type=int, default=0,
                        help="held-out problems per task and level for keeping the best checkpoint (0: keep the last)")
    for f in dataclasses.fields(RLConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        choices = {"recipe": RECIPES, "loss_agg": AGGREGATIONS, "schedule": SCHEDULES, "parallel": PARALLEL}.get(f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=f"(default: {f.default})")


def run_rl(args: argparse.Namespace) -> dict[str, Any]:
    cfg = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    out = Path(args.out)
    state_dir = Path(args.state_dir) if args.state_dir else state_dir_for(out)
    difficulties = [int(d) for d in args.difficulty.split(",")] if args.difficulty else None
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    if args.prompts:
        if reward_fn is None:
            raise SystemExit("--prompts needs --reward-fn module:function (there is no verifier for your prompts)")
        if not cfg.w_custom:
            cfg = dataclasses.replace(cfg, w_custom=1.0, w_accuracy=0.0)
    eval_fn = None
    if args.eval_n:
        if tasks is None:
            raise SystemExit("--eval-n needs --tasks (held-out problems with a verifier)")
        eval_fn = task_eval_fn(tasks, args.eval_n, difficulties, cfg.recipe, cfg.max_new_tokens, cfg.seed)
    prompts = load_prompts_jsonl(args.prompts) if args.prompts else None
    return train_rl(args.policy, out, state_dir, cfg, tasks=tasks, difficulties=difficulties, prompts=prompts,
                    reward_fn=reward_fn, eval_fn=eval_fn)
