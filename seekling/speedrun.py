"""`seekling speedrun`: train a small DeepSeek-style reasoning model from nothing, on a CPU, and show
the evidence.

    tasks -> corpus -> tokenizer -> pretrain (base/) -> SFT on traces (sft/) -> GRPO (rl/)
          + the equal-time SFT control (sft_control/) -> held-out eval -> results.json + report.md

Every stage writes its model directory and records itself in results.json; a re-run skips the
stages already done and resumes an interrupted one (the trainers checkpoint as they go), so
Ctrl-C costs at most a few steps.

`--seeds N` replicates everything after pretraining (SFT, RL, the control, the evals) on N seeds from the
one base: seed 0 in the run directory as always, seed s in `seed<s>/`. The replicates train the step
counts seed 0's time budgets gave, on seed 0's RL cells, so they differ from it by the seed alone (not by
how loaded the machine was); results.json's "intervals" and the report give each figure as a mean with a
95% interval over seeds and problems (seekling.stats).

The recipe (sizes, budgets, levels) is chosen by measurement — docs/log.md has the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from seekling.atomic import write_text
from seekling.model.config import preset as model_preset
from seekling.report import run_intervals, write_report
from seekling.train.scaffold import state_dir_for

R1_ZERO_SHARE = 0.1  # share of pretraining documents written in the R1-Zero template (see pretrain_documents)


@dataclass
class Recipe:
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the `tiny` model preset
    vocab_size: int = 1024  # an upper bound: the task corpus supports ~550 tokens
    corpus_per_task: int = 12000  # training problems per task family for pretraining (~4M tokens)
    seq_len: int = 256
    batch_size: int = 16
    pretrain_s: float = 780.0
    pretrain_lr: float = 3e-3
    pretrain_mtp: bool = False  # MTP costs ~31% of a step (bench_model); the MTP module learns in SFT instead
    sft_s: float = 150.0
    sft_lr: float = 1e-3
    sft_batch_size: int = 32
    sft_levels: tuple[int, ...] = (1, 2)  # (1,) alone made word-2 collapse 45% -> 8% (docs/log.md)
    sft_per_task_level: int = 4000
    # families whose traces SFT never sees: RL learns them from the verifier alone (the issue's "point RL at
    # what the traces do not cover"); word: its base pass@4 (80%) is far above pass@1 (45%) at level 2
    rl_only_tasks: tuple[str, ...] = ("word",)
    rl_s: float = 180.0
    rl_levels: tuple[int, ...] = (3,)  # preferred RL targets: the level SFT's traces leave out
    rl_lr: float = 2e-4  # step-budgeted sweep on runs/speedrun4: 5e-5 +4.5, 2e-4 +13.3, 5e-4 -4 points (docs/log.md)
    rl_eval_every: int = 15
    rl_prompts_per_step: int = 8
    rl_group_size: int = 8
    rl_min_acc: float = 0.1  # RL targets the cells where SFT's pass@1 is in [rl_min_acc, rl_max_acc]
    rl_max_acc: float = 0.75
    rl_val_n: int = 16  # validation problems per task and RL level for keeping the best RL checkpoint (0: last)
    rl_eval_n: int = 100  # held-out problems per RL cell for the RL verdict (25 alone leave +-10 points of noise)
    # explicit RL target cells; () picks them by the SFT model's accuracy (rl_min_acc .. rl_max_acc, above)
    rl_cells: tuple[tuple[str, int], ...] = ()
    rl_dynamic_sampling: bool = False  # DAPO: refill each step's batch with groups whose rewards differ
    # the fixed measure every stage is scored on, whatever cells RL trained: the family SFT never sees, levels 1-2
    fixed_cells: tuple[tuple[str, int], ...] = (("word", 1), ("word", 2))
    fixed_n: int = 100  # held-out problems per fixed cell
    sft_chat: int = 0  # conversations (seekling.tasks.chat: identity, small talk, declining) in the SFT data
    sft_replay: float = 0.0  # share of the SFT samples that are pretraining documents (LM loss on every token)
    sft_replay_rl_only: bool = False  # replay the RL-only families' documents too (else they are left out)
    chat_eval_n: int = 100  # held-out conversations for the chat eval (0 skips it)
    r1_zero_s: float = 0.0  # the separate R1-Zero run (RL straight from base); 0 skips it
    eval_n: int = 25  # held-out problems per task and level
    eval_k: int = 4  # samples for pass@1 at T=0.6
    max_new_tokens: int = 200
    threads: int = 0  # torch threads (0: leave torch's default)
    # Step budgets: 0 lets the time budgets above decide (for seed 0), > 0 fixes the step count (a loaded
    # machine then makes the stage slower, not different). Replicate seeds train seed 0's counts.
    pretrain_steps: int = 0
    sft_steps: int = 0
    rl_steps: int = 0
    control_steps: int = 0
    r1_zero_steps: int = 0
    seeds: int = 1  # replicates of everything after pretraining: seed 0 here, seed s in seed<s>/


RECIPES: dict[str, Recipe] = {
    # ~2 minutes: every stage runs, on a smaller model; for tests and CI, not for results.
    "smoke": Recipe(model=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                               v_head_dim=16, n_routed_experts=4),
                    vocab_size=512, corpus_per_task=600, seq_len=256, batch_size=8, pretrain_s=25, sft_s=10,
                    sft_per_task_level=100, sft_batch_size=8, rl_s=10, rl_prompts_per_step=4, rl_group_size=4,
                    rl_val_n=0, rl_eval_n=4, r1_zero_s=0, eval_n=3, eval_k=2, max_new_tokens=48, fixed_n=4,
                    sft_chat=100, chat_eval_n=10),
    # <= 30 minutes on 2 CPU cores. (The levers of issue 22, sft_chat / sft_replay / rl_cells /
    # rl_dynamic_sampling, stay off here: one seed with all four on did not pay, docs/log.md 2026-12-07.)
    "default": Recipe(r1_zero_s=0.0),
    # the default recipe at the step counts a quiet default run reaches (runs/speedrun7-8), so that a loaded
    # or slower machine gives the same models, only later: for replicates and experiments (docs/science.md)
    "default-steps": Recipe(pretrain_steps=1731, sft_steps=336, rl_steps=125, control_steps=428),
    # default-steps with 3x the RL steps (and the control 3x longer, for the same time as RL): the recipe whose RL
    # ends above the base model (docs/science.md, Table 2). ~40 minutes for one seed on a quiet 2-core machine.
    "rl-long": Recipe(pretrain_steps=1731, sft_steps=336, rl_steps=375, control_steps=1284, rl_val_n=50),
}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Decoding a tiny model (evaluation, RL rollouts) is op-overhead bound: a second intra-op thread
    only adds synchronisation (4-25x slower measured on a busy 2-core machine), so those stages use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stop_if_interrupted(summary: dict[str, Any]) -> None:
    """The trainer and GRPO answer Ctrl-C / SIGTERM by saving and returning; the speedrun must then stop
    too, not mark the stage done and go on with a half-trained model."""
    if "interrupted" in (summary.get("stopped"), summary.get("stop_reason")):
        raise SystemExit("[speedrun] interrupted: the stage's state is saved; re-run the same command to resume")


def pretrain_documents(n_per_task: int, seed: int = 0) -> list[str]:
    """The pretraining corpus: solved training problems of every family and level, written as
    DeepSeek-R1 chat transcripts, with a share in the R1-Zero plain-text template so that a base
    model has seen that format too (the R1-Zero recipe starts from it)."""
    return [doc for _, doc in task_documents(n_per_task, seed)]


def task_documents(n_per_task: int, seed: int = 0) -> list[tuple[str, str]]:
    """(task family, document) of the pretraining corpus, in its order (the families interleaved)."""
    from seekling.tasks import TASKS, sample_problems
    from seekling.tokenizer import BOS, EOS, render_chat
    from seekling.train.rewards import R1_ZERO_TEMPLATE

    rng = random.Random(seed)
    docs = []
    per_task = [sample_problems(task, n_per_task, "train", None, seed) for task in sorted(TASKS)]
    for group in zip(*per_task, strict=True):
        for p in group:
            if rng.random() < R1_ZERO_SHARE:
                answer = f"\\boxed{{{p.answer}}}"
                docs.append((p.task, f"{BOS}{R1_ZERO_TEMPLATE.format(question=p.question)} <think>\n{p.trace}\n"
                                      f"</think> <answer> {answer} </answer>{EOS}"))
            else:
                docs.append((p.task, render_chat(p.messages(with_trace=True), add_generation_prompt=False)))
    return docs


def sft_messages(levels: tuple[int, ...], n_per_task_level: int, seed: int = 1,
                 tasks: list[str] | None = None) -> list[list[dict[str, str]]]:
    from seekling.tasks import TASKS, sample_problems

    out = []
    for task in tasks or sorted(TASKS):
        for lv in levels:
            out += [p.messages(with_trace=True) for p in sample_problems(task, n_per_task_level, "train", lv, seed)]
    random.Random(seed).shuffle(out)
    return out


class Speedrun:
    def __init__(self, out: str | Path, recipe_name: str = "default", **overrides: Any):
        if recipe_name not in RECIPES:
            raise ValueError(f"unknown preset {recipe_name!r}; choose from {sorted(RECIPES)}")
        self.out = Path(out)
        self.recipe_name = recipe_name
        self.recipe = Recipe(**{**asdict(RECIPES[recipe_name]), **overrides})
        if self.recipe.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.recipe.seeds}")
        self.results_path = self.out / "results.json"
        self.results: dict[str, Any] = (json.loads(self.results_path.read_text()) if self.results_path.exists()
                                        else {"preset": recipe_name, "stages": {}, "stage_time_s": {}})
        if self.results.get("preset") != recipe_name:
            raise ValueError(f"{self.out} holds a {self.results.get('preset')!r} run; use another --out")

    def save_results(self) -> None:
        write_text(self.results_path, json.dumps(self.results, indent=2))

    def stage(self, name: str, fn) -> Any:
        """Run a stage once: skipped when results.json says it finished (a re-run resumes)."""
        done = self.results.setdefault("done", [])
        if name in done:
            print(f"[speedrun] {name}: done already, skipping")
            return None
        print(f"\n[speedrun] === {name} ===", flush=True)
        t0 = time.time()
        value = fn()
        self.results["stage_time_s"][name] = round(time.time() - t0, 1)
        done.append(name)
        self.save_results()
        return value

    # --- seeds: seed 0 is the run directory itself (the single-seed layout), seed s lives in seed<s>/ ---------
    def seed_dir(self, seed: int) -> Path:
        return self.out if seed == 0 else self.out / f"seed{seed}"

    def seed_results(self, seed: int) -> dict[str, Any]:
        if seed == 0:
            return self.results
        return self.results.setdefault("replicates", {}).setdefault(str(seed), {"stages": {}})

    def steps_for(self, key: str, fixed: int, seed: int) -> int:
        """The step budget of a stage: the recipe's fixed count, else (replicates) the steps seed 0 trained,
        else 0 (seed 0 on its time budget)."""
        if fixed or seed == 0:
            return fixed
        summary = self.results[key]
        return summary.get("step", summary.get("steps"))

    # --- stages --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        r = self.recipe
        if r.threads:
            torch.set_num_threads(r.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("tokenizer", self.make_tokenizer)
        self.stage("pretrain", self.pretrain)
        self.stage("eval_base", lambda: self.evaluate("base"))
        for seed in range(r.seeds):
            self.run_seed(seed)
        # the main job's time (without R1-Zero), summed over stages so that resumed runs count right
        times = self.results["stage_time_s"]
        self.results["wall_time_s"] = round(sum(v for k, v in times.items() if not k.endswith("r1_zero")), 1)
        self.results["intervals"] = run_intervals(self.results)  # results.json carries them (the contract)
        self.save_results()
        if r.r1_zero_s > 0 or r.r1_zero_steps:
            for seed in range(r.seeds):
                self.stage(self.stage_name("r1_zero", seed), lambda s=seed: self.r1_zero(s))
        self.report()  # always rewritten, so not a stage
        return self.results

    @staticmethod
    def stage_name(name: str, seed: int) -> str:
        return name if seed == 0 else f"seed{seed}/{name}"

    def run_seed(self, seed: int) -> None:
        """SFT, RL, the equal-time control and their evals on one seed, from the shared base."""
        r = self.recipe
        for name, fn, wanted in (
                ("sft", self.sft, True), ("eval_sft", lambda s: self.evaluate("sft", s), True),
                ("rl", self.rl, True), ("sft_control", self.sft_control, True),
                ("eval_rl", lambda s: self.evaluate("rl", s), True),
                ("eval_sft_control", lambda s: self.evaluate("sft_control", s), True),
                ("eval_fixed", lambda s: self.evaluate_cells("fixed", r.fixed_cells, r.fixed_n, s), bool(r.fixed_n)),
                ("eval_rl_cells", self.evaluate_rl_cells, bool(r.rl_eval_n)),
                ("eval_chat", self.evaluate_chat, bool(r.chat_eval_n))):
            if wanted:
                self.stage(self.stage_name(name, seed), lambda fn=fn: fn(seed))

    def make_tokenizer(self) -> None:
        from seekling.tokenizer import train_tokenizer

        docs = pretrain_documents(self.recipe.corpus_per_task)
        tok = train_tokenizer(docs[:20000], self.recipe.vocab_size)
        tok.save_pretrained(self.out / "tokenizer")
        from seekling.data import write_shards

        t0 = time.time()
        index = write_shards((tok.encode(d) for d in docs), self.out / "data" / "pretrain",
                             eos_id=tok.eos_token_id, vocab_size=tok.vocab_size)
        print(f"tokenizer: {tok.vocab_size} tokens; corpus: {len(docs)} documents, {index['num_tokens']:,} tokens "
              f"({time.time() - t0:.0f}s)")
        self.results["data"] = {"vocab_size": tok.vocab_size, "pretrain_docs": len(docs),
                                "pretrain_tokens": index["num_tokens"]}

    def tokenizer(self):
        from seekling.tokenizer import load_tokenizer

        return load_tokenizer(self.out / "tokenizer")

    def pretrain(self) -> None:
        from seekling.data import BatchLoader, PackedDataset
        from seekling.model import Transformer
        from seekling.train.trainer import TrainConfig, train

        r, tok = self.recipe, self.tokenizer()
        cfg = model_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, max_position_embeddings=max(1024, r.seq_len), **r.model)
        torch.manual_seed(0)
        model = Transformer(cfg)
        if not r.pretrain_mtp:
            model.config.mtp_loss_weight = 0.0  # the MTP module is still there (and saved), just not trained yet
        print(f"model: {model.num_parameters() / 1e6:.2f}M parameters "
              f"({cfg.num_parameters(active=True) / 1e6:.2f}M active, MTP included)")
        data = PackedDataset(self.out / "data" / "pretrain", r.seq_len)
        loader = BatchLoader(data, r.batch_size, seed=0)
        held = [data.collate([data[len(data) - 1 - i] for i in range(b * 4, b * 4 + 4)]) for b in range(4)]
        tc = TrainConfig(max_steps=r.pretrain_steps or 100_000, lr=r.pretrain_lr, min_lr=r.pretrain_lr / 10,
                         time_budget_s=None if r.pretrain_steps else r.pretrain_s, warmup_steps=30, schedule="wsd",
                         eval_every=200, eval_batches=4, checkpoint_every=200, log_every=25)
        summary = train(model, loader, tc, self.out / "base", state_dir_for(self.out / "base"),
                        eval_batches=held, resume=True)
        stop_if_interrupted(summary)
        tok.save_pretrained(self.out / "base")
        self.results["pretrain"] = {**summary, "params": model.num_parameters()}

    def sft(self, seed: int = 0) -> None:
        r = self.recipe
        self._sft(self.out / "base", "sft", r.sft_s, self.steps_for("sft", r.sft_steps, seed), r.sft_lr,
                  seed=seed, data_seed=1 + 10 * seed)

    def _sft(self, src: Path, name: str, budget_s: float, steps: int, lr: float, seed: int, data_seed: int,
             warmup: int = 20) -> dict:
        """SFT on the traces, `steps` steps (or, with steps 0, for budget_s seconds), into seed_dir/name."""
        from seekling.data import BatchLoader, SFTDataset
        from seekling.model.load import load_pretrained
        from seekling.train.trainer import TrainConfig, train

        r, tok = self.recipe, self.tokenizer()
        data = SFTDataset(self.sft_samples(tok, data_seed), r.seq_len, pad_id=tok.pad_token_id)
        loader = BatchLoader(data, r.sft_batch_size, seed=data_seed)
        model = load_pretrained(src)
        model.config.mtp_loss_weight = 0.3  # SFT trains the MTP module too (speculative decoding drafts with it)
        tc = TrainConfig(max_steps=steps or 100_000, time_budget_s=None if steps else budget_s, lr=lr,
                         min_lr=lr / 20, warmup_steps=warmup, schedule="cosine", checkpoint_every=200, log_every=25,
                         seed=data_seed)
        dst = self.seed_dir(seed) / name
        summary = train(model, loader, tc, dst, state_dir_for(dst), resume=True)
        stop_if_interrupted(summary)
        tok.save_pretrained(dst)
        self.seed_results(seed)[name] = summary
        return summary

    def sft_samples(self, tok: Any, data_seed: int) -> list[tuple[list[int], list[int]]]:
        """The SFT data as (ids, loss mask): the other families' traces, the conversations that teach the model
        what it is (sft_chat), and replayed pretraining documents (sft_replay, the loss on every token), shuffled."""
        from seekling.tasks.chat import conversations

        r = self.recipe
        samples = [tok.encode_sft(m) for m in sft_messages(r.sft_levels, r.sft_per_task_level, seed=data_seed,
                                                           tasks=self.sft_tasks())]
        samples += [tok.encode_sft(list(c.messages)) for c in conversations(r.sft_chat, "train", data_seed)]
        if r.sft_replay > 0:
            n = round(len(samples) * r.sft_replay / (1 - r.sft_replay))
            docs = [d for t, d in task_documents(r.corpus_per_task) if r.sft_replay_rl_only or t not in r.rl_only_tasks]
            picked = random.Random(data_seed).sample(docs, min(n, len(docs)))
            samples += [(ids, [1] * len(ids)) for ids in map(tok.encode, picked)]
        if r.sft_chat or r.sft_replay:  # (the trace samples alone come shuffled already)
            random.Random(data_seed).shuffle(samples)
        return samples

    def sft_tasks(self) -> list[str]:
        from seekling.tasks import TASKS

        unknown = set(self.recipe.rl_only_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"rl_only_tasks: unknown task(s) {sorted(unknown)}; choose from {sorted(TASKS)}")
        return [t for t in sorted(TASKS) if t not in self.recipe.rl_only_tasks]

    def rl_config(self, recipe: str, budget_s: float, steps: int, seed: int) -> Any:
        from seekling.train.grpo import RLConfig

        r = self.recipe
        return RLConfig(recipe=recipe, steps=steps or 10_000, prompts_per_step=r.rl_prompts_per_step,
                        group_size=r.rl_group_size, max_new_tokens=r.max_new_tokens, lr=r.rl_lr,
                        time_budget_s=None if steps else budget_s, save_every=25, eval_every=r.rl_eval_every,
                        dynamic_sampling=r.rl_dynamic_sampling, seed=seed)

    def rl(self, seed: int = 0) -> None:
        from seekling.tasks import TASKS
        from seekling.train.grpo import train_rl

        r, d = self.recipe, self.seed_dir(seed)
        cfg = self.rl_config("r1", r.rl_s, self.steps_for("rl", r.rl_steps, seed), seed)
        cells = self.rl_cells() if seed == 0 else [tuple(c) for c in self.results["rl"]["cells"]]
        print(f"RL target cells (task, level): {cells}")
        with one_thread():
            summary = train_rl(d / "sft", d / "rl", state_dir_for(d / "rl"), cfg, tasks=sorted(TASKS), cells=cells,
                               eval_fn=self.validation_fn(cells, r.rl_val_n) if r.rl_val_n else None)
        stop_if_interrupted(summary)
        self.tokenizer().save_pretrained(d / "rl")
        self.seed_results(seed)["rl"] = {**summary, "cells": [list(c) for c in cells]}  # time is in stage_time_s

    def rl_cells(self) -> list[tuple[str, int]]:
        """Where RL can learn: the (task, level) cells on which the SFT model's held-out pass@1 lies in
        [rl_min_acc, rl_max_acc] — a group of G samples then usually holds a right and a wrong answer.
        What SFT's traces leave out comes first: the RL-only families, then the harder levels
        (rl_levels); the cells SFT trained on only when none of those qualifies."""
        r = self.recipe
        if r.rl_cells:
            return [tuple(c) for c in r.rl_cells]
        sft = self.results["stages"].get("sft", {}).get("by_task", {})
        ok = [(t, int(lv)) for t, v in sorted(sft.items()) for lv, c in v["by_level"].items()
              if r.rl_min_acc <= c.get("pass@1", 0.0) <= r.rl_max_acc]
        rl_only = [c for c in ok if c[0] in r.rl_only_tasks]
        harder = [c for c in ok if c[1] in r.rl_levels]
        from seekling.tasks import TASKS

        return rl_only or harder or ok or [(t, lv) for t in sorted(TASKS) for lv in r.rl_levels]

    def validation_fn(self, cells: list[tuple[str, int]], n: int):
        """Greedy accuracy on validation problems for keeping RL's best checkpoint. They come from the
        train split (another seed), never from the test split the report is scored on."""
        from seekling.engine import Engine
        from seekling.eval import evaluate
        from seekling.tasks import sample_problems

        problems = [p for t, lv in cells for p in sample_problems(t, n, "train", lv, seed=777)]
        return lambda model, tok: evaluate(Engine(model, tok, max_num_seqs=128), problems, k=0,
                                           max_tokens=self.recipe.max_new_tokens)["greedy"]

    def sft_control(self, seed: int = 0) -> None:
        """The control beside RL: the SFT checkpoint trained further by SFT for RL's wall time."""
        budget = self.seed_results(seed).get("rl", {}).get("wall_time_s", self.recipe.rl_s)  # RL's training time
        self._sft(self.seed_dir(seed) / "sft", "sft_control", budget,
                  self.steps_for("sft_control", self.recipe.control_steps, seed), self.recipe.sft_lr / 3,
                  seed=seed, data_seed=2 + 10 * seed, warmup=5)

    def r1_zero(self, seed: int = 0) -> None:
        from seekling.tasks import TASKS
        from seekling.train.grpo import train_rl

        r, d = self.recipe, self.seed_dir(seed)
        cfg = self.rl_config("r1-zero", r.r1_zero_s, self.steps_for("r1_zero", r.r1_zero_steps, seed), seed)
        with one_thread():
            self.seed_results(seed)["r1_zero"] = train_rl(self.out / "base", d / "r1_zero",
                                                          state_dir_for(d / "r1_zero"), cfg, tasks=sorted(TASKS))
        stop_if_interrupted(self.seed_results(seed)["r1_zero"])

    def score(self, model_dir: Path, problems: list, label: str = "") -> dict[str, Any]:
        """Held-out scores of one model (greedy, and pass@1 over eval_k samples)."""
        from seekling.engine import Engine
        from seekling.eval import evaluate

        r = self.recipe
        with one_thread():
            result = evaluate(Engine(model_dir, max_num_seqs=128), problems, k=r.eval_k,
                              max_tokens=r.max_new_tokens)
        print(f"{model_dir.relative_to(self.out)}{label}: greedy {result['greedy']:.3f}  "
              f"pass@1 {result.get('pass@1', 0):.3f}  ({result['eval_time_s']:.0f}s)")
        return result

    def evaluate(self, stage: str, seed: int = 0) -> None:
        from seekling.eval import eval_problems

        self.seed_results(seed)["stages"][stage] = self.score(self.seed_dir(seed) / stage,
                                                              eval_problems(self.recipe.eval_n))

    def evaluate_cells(self, key: str, cells: Any, n: int, seed: int = 0) -> None:
        """base, SFT, the equal-time control and RL on the same n held-out problems per (task, level) cell, into
        results[key] (the overview's eval_n per cell is too few to see a 10-point change). The replicates share
        seed 0's base (one pretraining), so its scores are not recomputed."""
        from seekling.tasks import sample_problems

        cells = [tuple(c) for c in cells]
        problems = [p for t, lv in cells for p in sample_problems(t, n, "test", lv, seed=0)]
        evals = {"base": self.results[key]["base"]} if seed else {}
        for stage in ("base", "sft", "sft_control", "rl"):
            if stage not in evals:
                evals[stage] = self.score(self.seed_dir(seed) / stage, problems, f" on the {key} cells")
        self.seed_results(seed)[key] = evals

    def evaluate_rl_cells(self, seed: int = 0) -> None:
        """RL's verdict on its own cells (rl_eval_n problems each); the fixed measure's scores when they are the same
        cells and problems."""
        r, cells = self.recipe, [tuple(c) for c in self.results["rl"]["cells"]]
        if sorted(cells) == sorted(tuple(c) for c in r.fixed_cells) and r.rl_eval_n == r.fixed_n and r.fixed_n:
            self.seed_results(seed)["rl_cells_eval"] = self.seed_results(seed)["fixed"]
        else:
            self.evaluate_cells("rl_cells_eval", cells, r.rl_eval_n, seed)

    def evaluate_chat(self, seed: int = 0) -> None:
        """Does the model know what it is? Each stage on the held-out conversations (seekling.eval.chat_eval; the
        base, which never saw a conversation, once)."""
        from seekling.engine import Engine
        from seekling.eval import chat_eval

        evals = {"base": self.results["chat"]["base"]} if seed else {}
        with one_thread():
            for stage in ("base", "sft", "sft_control", "rl"):
                if stage not in evals:
                    evals[stage] = chat_eval(Engine(self.seed_dir(seed) / stage, max_num_seqs=128),
                                             self.recipe.chat_eval_n, max_tokens=self.recipe.max_new_tokens)
                    print(f"{stage}: chat eval {evals[stage]['pass']:.3f} "
                          + " ".join(f"{k} {v:.2f}" for k, v in evals[stage]["by_kind"].items()))
        self.seed_results(seed)["chat"] = evals

    def report(self) -> None:
        write_report(self.out)


def add_speedrun_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(RECIPES), default="default",
                   help="smoke: ~2 minutes, every stage on a small model (tests, CI); default: <= 30 minutes; "
                        "default-steps: the default at a quiet run's step counts (same models on a loaded machine); "
                        "rl-long: default-steps with 3x the RL (and control) steps, ~40 minutes a seed")
    p.add_argument("--out", default="runs/speedrun", help="run directory (re-running resumes it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--r1-zero", type=float, default=None, metavar="SECONDS",
                   help="also run R1-Zero (GRPO straight from the base model) for this long, after the main stages")
    p.add_argument("--seeds", type=int, default=1,
                   help="replicate SFT, RL, the control and the evals on this many seeds from the one base; the "
                        "report gives means with 95%% intervals over seeds and problems (each extra seed adds the "
                        "post-pretraining time again: ~10 minutes for the default preset)")


def run_speedrun(args: argparse.Namespace) -> dict[str, Any]:
    extra = {"r1_zero_s": args.r1_zero} if args.r1_zero is not None else {}
    run = Speedrun(args.out, args.preset, threads=args.threads, seeds=args.seeds, **extra)
    results = run.run()
    out = Path(args.out)
    print(f"\n[speedrun] finished in {results['wall_time_s'] / 60:.1f} min; report: {out / 'report.md'}")
    print("Talk to the model:")
    print(f"  seekling chat --model {out / 'rl'}")
    print(f"  seekling serve --model {out / 'rl'}    # then open http://127.0.0.1:8000/")
    return results
