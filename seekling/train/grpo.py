"""GRPO on verifiable rewards (DeepSeekMath / DeepSeek-R1), with the DAPO and Dr. GRPO variants.

One step: sample G completions for each of B prompts with the current policy, score them, normalise the
rewards within each group to get advantages, then take mu optimizer steps on the clipped surrogate

    L = -agg_t[ min(r_t A, clip(r_t, 1 - eps, 1 + eps_high) A) - beta KL_k3(pi || pi_ref) ],
    r_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)

The maths are pure functions (`group_advantages`, `kl_k3`, `policy_loss`) tested on hand-computed cases;
`train_rl` is the loop: rollouts, rewards, updates, logging, checkpoints, resume and a wall-time budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekling.atomic import torch_save
from seekling.train.rewards import (
    R1_ZERO_TEMPLATE,
    RewardFn,
    accuracy_reward,
    compute_rewards,
    load_prompts_jsonl,
    load_reward_fn,
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
    prompts_per_step: int = 8
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio (RL drifts: decay it and keep the best)
    warmup_steps: int = 0
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

    def __post_init__(self) -> None:
        problems = []
        if self.recipe not in RECIPES:
            problems.append(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.loss_agg not in AGGREGATIONS:
            problems.append(f"loss_agg must be one of {AGGREGATIONS}, got {self.loss_agg!r}")
        if self.group_size < 2:
            problems.append("group_size must be >= 2 (advantages are relative to the group)")
        if self.temperature <= 0:
            problems.append("temperature must be > 0 (RL samples; log-probs use logits / temperature)")
        if min(self.steps, self.prompts_per_step, self.max_new_tokens, self.mu, self.micro_batch,
               self.max_sampling_rounds) < 1:
            problems.append("steps, prompts_per_step, max_new_tokens, mu, micro_batch and max_sampling_rounds "
                            "must be >= 1")
        if self.w_overlong and not 0 < self.overlong_cache <= self.max_new_tokens:
            problems.append("w_overlong needs 0 < overlong_cache <= max_new_tokens")
        if problems:
            raise ValueError("bad RLConfig: " + "; ".join(problems))

    def reward_weights(self) -> dict[str, float]:
        return {"accuracy": self.w_accuracy, "format": self.w_format, "overlong": self.w_overlong,
                "custom": self.w_custom}


def lr_at(cfg: RLConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def train_rl(policy_dir: str | Path, out_dir: str | Path, state_dir: str | Path, cfg: RLConfig,
             tasks: list[str] | None = None, difficulties: list[int] | None = None,
             prompts: list[dict[str, Any]] | None = None, reward_fn: RewardFn | None = None,
             eval_fn: Callable[[nn.Module, Any], float] | None = None,
             log: Callable[[str], None] = print, cells: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """GRPO from the model in `policy_dir` on task problems (`tasks`) or a user's `prompts` (with
    `reward_fn`). The result goes to `out_dir`: the best model by `eval_fn(model, tokenizer)` (higher is
    better, evaluated at the start, every `eval_every` steps and at the end) or, without one, the last.
    `state_dir` holds what a resume needs (rl_state.pt) and the per-step log (rl_log.jsonl)."""
    from seekling.model.load import load_pretrained
    from seekling.tokenizer import load_tokenizer

    if (tasks is None) == (prompts is None):
        raise ValueError("give either tasks (verifiable problems) or prompts (with a reward function)")
    if cfg.w_custom and reward_fn is None:
        raise ValueError("w_custom > 0 needs a reward function")
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = state_dir / "rl_state.pt", state_dir / "rl_log.jsonl"
    draw = task_sampler(tasks, difficulties, cfg.seed, cells) if tasks is not None \
        else prompt_sampler(prompts, cfg.seed)

    policy = load_pretrained(policy_dir)
    tok = load_tokenizer(policy_dir)
    ref = load_pretrained(policy_dir).requires_grad_(False) if cfg.beta > 0 else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answer_ok = None
    if tasks is not None and cfg.recipe == "r1":
        from seekling.tasks import extract_answer

        answer_ok = lambda a: extract_answer(a) is not None  # the tasks' answer format: \boxed{...}

    t_session = time.perf_counter()  # the budget counts everything: loading, evals, saving
    step, cursor, elapsed, best, last_eval_step = 0, 0, 0.0, None, -1  # cursor: prompts drawn so far
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        policy.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, cursor, elapsed, best = state["step"], state["cursor"], state["elapsed"], state["best"]
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if log_path.exists():  # drop lines of steps done after the checkpoint: they are about to be redone
            lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            log_path.write_text("".join(ln + "\n" for ln in lines))
        log(f"resumed from {state_path} at step {step}")
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        log_path.unlink(missing_ok=True)

    def save_state() -> None:
        state = {"step": step, "cursor": cursor, "elapsed": elapsed, "best": best, "model": policy.state_dict(),
                 "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg),
                 "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}
        torch_save(state_path, state)

    def save_model() -> None:
        policy.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)

    eval_s = 0.0

    def evaluate() -> float:
        nonlocal best, last_eval_step, eval_s
        t = time.perf_counter()
        policy.eval()
        score = float(eval_fn(policy, tok))
        last_eval_step = step
        eval_s = time.perf_counter() - t
        if best is None or score > best:
            best = score
            save_model()
        return score

    engine = make_engine(policy, tok, max_num_seqs=cfg.prompts_per_step * cfg.group_size)
    if eval_fn is not None and step == 0:
        log(f"step 0 eval {evaluate():.4f}")
    G, P = cfg.group_size, cfg.prompts_per_step
    elapsed_at_start, last_step_s = elapsed, 0.0
    stop_reason = "steps"
    while step < cfg.steps:
        elapsed = elapsed_at_start + (time.perf_counter() - t_session)
        # Stop when one more step (and the final eval) would overrun the budget.
        if cfg.time_budget_s and elapsed + last_step_s + eval_s > cfg.time_budget_s:
            stop_reason = "time_budget"
            break
        t0 = time.perf_counter()
        progress = step / cfg.steps
        if cfg.time_budget_s:
            progress = max(progress, elapsed / cfg.time_budget_s)
        lr = lr_at(cfg, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr

        # 1. rollouts and rewards; dynamic sampling refills the batch with groups that carry a signal
        policy.eval()
        kept: list[tuple[list[int], list[Completion], list[float]]] = []  # (prompt ids, G completions, G rewards)
        seen: dict[str, list[float]] = {}
        lengths: list[int] = []
        truncated = n_groups = n_zero = 0
        for _ in range(cfg.max_sampling_rounds):
            batch = draw(cursor, P - len(kept) if cfg.dynamic_sampling else P)
            cursor += len(batch)
            prompt_ids = [encode_prompt(tok, s, cfg.recipe) for s in batch]
            groups = rollout(engine, prompt_ids, G, cfg)
            flat = [c for g in groups for c in g]
            rewards = compute_rewards([s for s in batch for _ in range(G)], [c.text for c in flat],
                                      [len(c.token_ids) for c in flat], cfg.reward_weights(), cfg.recipe,
                                      reward_fn, cfg.max_new_tokens, cfg.overlong_cache, answer_ok)
            for name, values in rewards.items():
                seen.setdefault(name, []).extend(values)
            lengths += [len(c.token_ids) for c in flat]
            truncated += sum(c.finish_reason == "length" for c in flat)
            for i, (ids, g) in enumerate(zip(prompt_ids, groups, strict=True)):
                r = rewards["total"][i * G:(i + 1) * G]
                zero = max(r) - min(r) < 1e-9
                n_groups += 1
                n_zero += zero
                if not (zero and cfg.dynamic_sampling):
                    kept.append((ids, g, r))
            if not cfg.dynamic_sampling or len(kept) >= P:
                break
        kept = kept[:P]
        t_rollout = time.perf_counter() - t0

        # 2. the policy update: mu optimizer steps on this batch
        t1 = time.perf_counter()
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        if kept:
            adv = group_advantages(torch.tensor([r for _, _, r in kept]), cfg.scale_std).flatten()
        if kept and (adv.abs().max() > 0 or cfg.beta > 0):
            stats = update_policy(policy, ref, opt, kept, adv, cfg, pad_id)
        step += 1
        elapsed = elapsed_at_start + (time.perf_counter() - t_session)

        record: dict[str, Any] = {"step": step, "lr": lr}
        for name, values in seen.items():
            t = torch.tensor(values)
            record[f"reward/{name}_mean"] = t.mean().item()
            record[f"reward/{name}_std"] = t.std().item() if len(values) > 1 else 0.0
        if "accuracy" in seen:
            record["accuracy"] = record["reward/accuracy_mean"]
        record.update(len_mean=sum(lengths) / len(lengths), len_max=max(lengths),
                      truncated_frac=truncated / len(lengths),
                      zero_var_frac=n_zero / n_groups, groups_used=len(kept), **stats,
                      t_rollout=t_rollout, t_update=time.perf_counter() - t1, rollouts_per_s=len(lengths) / t_rollout,
                      elapsed_s=elapsed)
        if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0:
            record["eval"] = evaluate()
            record["t_eval"] = eval_s
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        last_step_s = time.perf_counter() - t0 - record.get("t_eval", 0.0)
        eta = (cfg.steps - step) * last_step_s
        if cfg.time_budget_s:
            eta = min(eta, cfg.time_budget_s - elapsed)
        log(f"step {step}/{cfg.steps} reward {record['reward/total_mean']:.3f} "
            + (f"acc {record['accuracy']:.3f} " if "accuracy" in record else "")
            + f"len {record['len_mean']:.0f} zero-var {record['zero_var_frac']:.2f} kl {stats['kl']:.4f} "
            + f"clip {stats['clip_frac']:.3f} | rollout {t_rollout:.1f}s update {record['t_update']:.1f}s "
            + f"{record['rollouts_per_s']:.0f} rollouts/s | ETA {max(eta, 0):.0f}s"
            + (f" | eval {record['eval']:.4f}" if "eval" in record else ""))
        if step % cfg.save_every == 0:
            save_state()

    if eval_fn is not None and last_eval_step != step:
        log(f"final eval {evaluate():.4f}")
    if eval_fn is None:
        save_model()
    elapsed = elapsed_at_start + (time.perf_counter() - t_session)
    save_state()
    log(f"RL done ({stop_reason}) after {step} steps, {elapsed:.0f}s; model in {out_dir}")
    return {"steps": step, "stop_reason": stop_reason, "wall_time_s": elapsed, "best_eval": best,
            "log": str(log_path), "out_dir": str(out_dir)}


def update_policy(policy: nn.Module, ref: nn.Module | None, opt: torch.optim.Optimizer,
                  kept: list[tuple[list[int], list[Completion], list[float]]], adv: torch.Tensor,
                  cfg: RLConfig, pad_id: int) -> dict[str, float]:
    """mu optimizer steps of the GRPO loss on one batch of groups; returns the step's statistics.
    Old log-probs (for the ratio) are computed once, before the first step; with mu = 1 they equal the
    current ones, so the ratio is 1 and no extra forward is needed."""
    rows = [(ids, c, a) for (ids, g, _), a_g in zip(kept, adv.view(len(kept), -1), strict=True)
            for c, a in zip(g, a_g.tolist(), strict=True)]
    rows.sort(key=lambda r: len(r[0]) + len(r[1].token_ids))  # similar lengths share a micro-batch: less padding
    chunks = []
    for i in range(0, len(rows), cfg.micro_batch):
        part = rows[i:i + cfg.micro_batch]
        ids = _pad([p + c.token_ids for p, c, _ in part], pad_id)
        start = min(len(p) for p, _, _ in part)
        pos = torch.arange(start, ids.shape[1])[None]
        lo = torch.tensor([len(p) for p, _, _ in part])[:, None]
        hi = torch.tensor([len(p) + len(c.token_ids) for p, c, _ in part])[:, None]
        keep = torch.tensor([not (cfg.mask_truncated and c.finish_reason == "length") for _, c, _ in part])[:, None]
        mask = ((pos >= lo) & (pos < hi) & keep).float()
        chunk = {"ids": ids, "start": start, "mask": mask, "adv": torch.tensor([a for _, _, a in part])}
        with torch.no_grad():
            if cfg.mu > 1:
                chunk["old"] = completion_logprobs(policy, ids, start, cfg.temperature)[0]
            if ref is not None:
                chunk["ref"] = completion_logprobs(ref, ids, start, cfg.temperature)[0]
        chunks.append(chunk)
    n_seq = len(rows)
    n_tok = max(sum(float(c["mask"].sum()) for c in chunks), 1.0)

    policy.train()
    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    for it in range(cfg.mu):
        opt.zero_grad(set_to_none=True)
        for c in chunks:
            logp, entropy = completion_logprobs(policy, c["ids"], c["start"], cfg.temperature, with_entropy=it == 0)
            old = c["old"] if cfg.mu > 1 else logp.detach()
            loss, st = policy_loss(logp, old, c.get("ref"), c["adv"], c["mask"], cfg.clip_eps, cfg.clip_eps_high,
                                   cfg.beta, cfg.loss_agg, cfg.max_new_tokens)
            # Weight each micro-batch so the sum over micro-batches is the loss of the whole batch.
            tok_share = float(c["mask"].sum()) / n_tok
            w = tok_share if cfg.loss_agg == "token-mean" else c["ids"].shape[0] / n_seq
            (loss * w).backward()
            sums["loss"] += loss.item() * w / cfg.mu
            sums["kl"] += st["kl"] * tok_share / cfg.mu
            sums["clip_frac"] += st["clip_frac"] * tok_share / cfg.mu
            if entropy is not None:
                sums["entropy"] += float((entropy * c["mask"]).sum()) / n_tok
        if cfg.grad_clip > 0:
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)) / cfg.mu
        opt.step()
        policy.update_expert_bias()
    return sums


def make_engine(policy: nn.Module, tok: Any, max_num_seqs: int) -> Any:
    """The inference engine on the live policy module: it reads the weights at every forward, so each
    step's rollouts see the weights the previous optimizer step wrote (no copy, no reload)."""
    from seekling.engine import Engine

    return Engine(policy, tok, max_num_seqs=max_num_seqs)


def rollout(engine: Any, prompts_ids: list[list[int]], G: int, cfg: RLConfig) -> list[list[Completion]]:
    """G sampled completions of each prompt (continuous batching over all of them at once)."""
    from seekling.engine import SamplingParams

    params = SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
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
                               SamplingParams(temperature=0, max_tokens=max_new_tokens))
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
        choices = {"recipe": RECIPES, "loss_agg": AGGREGATIONS}.get(f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=f"(default: {f.default})")


def run_rl(args: argparse.Namespace) -> dict[str, Any]:
    cfg = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    out = Path(args.out)
    state_dir = Path(args.state_dir) if args.state_dir else out.parent / "train_state" / out.name
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
