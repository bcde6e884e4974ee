"""GRPO speed: seekling's RL loop vs TRL's GRPOTrainer, side by side in one run.

Both train the same tiny DeepSeek-V3 checkpoint (seekling writes it; TRL loads it through transformers as
DeepseekV3ForCausalLM) on the same addition questions (chat template), with the same group size, completion
length, batch and loss settings (beta = 0, one update per batch, no vLLM). The reward is dense (the share
of digits in the completion) so that every group has a signal and both really run the update: the
verifier's accuracy is 0 everywhere for an untrained model, and seekling skips an update without signal.
Printed: rollouts/s (completions sampled per second of generation), tokens per completion, the time of one
RL step (rollouts + rewards + update), the RL steps that fit the speedrun's 180 s budget, and the ratios.
seekling runs twice: with the engine as the trainer gets it (the C++ step) and with the engine's Python step
(`Engine(native=False)`, the forward and sampler the engine ran before the C++ step), for the before/after.

    PYTHONPATH=. python benchmarks/bench_rl.py [--steps 3] [--prompts 8] [--group 8] [--max-new-tokens 64]
    PYTHONPATH=. python benchmarks/bench_rl.py --max-new-tokens 200 --skip-trl --rounds 3  # the speedrun's RL
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_model(directory: Path, vocab_size: int) -> None:
    from seekling.model import Transformer
    from seekling.model.config import preset
    from seekling.tasks import corpus_text
    from seekling.tokenizer import train_tokenizer

    tok = train_tokenizer(list(corpus_text(200)), vocab_size=vocab_size)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)


def digit_share(prompt, completion, **kw) -> float:
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def questions(args: argparse.Namespace) -> list[str]:
    from seekling.tasks import sample_problems

    return [p.question for p in sample_problems("addition", args.prompts * (args.steps + 1), seed=1)]


def bench_seekling(model_dir: Path, work: Path, args: argparse.Namespace, native: bool | None = None
                   ) -> dict[str, float]:
    """seekling's GRPO; native=False rolls out with the engine's Python step (the engine before its C++ step)."""
    from seekling.engine import Engine
    from seekling.train import grpo
    from seekling.train.grpo import RLConfig, train_rl

    make_engine = grpo.make_engine

    if native is False:  # the bench's own switch (the trainer always takes the engine's default)
        grpo.make_engine = lambda policy, tok, max_num_seqs: Engine(policy, tok, max_num_seqs=max_num_seqs,
                                                                     native=False)

    cfg = RLConfig(steps=args.steps + 1, prompts_per_step=args.prompts, group_size=args.group,
                   max_new_tokens=args.max_new_tokens, micro_batch=args.prompts * args.group, lr=1e-5,
                   w_accuracy=0.0, w_format=0.0, w_custom=1.0, save_every=10_000)
    prompts = [{"messages": [{"role": "user", "content": q}]} for q in questions(args)]
    tag = "python" if native is False else "native"
    try:
        summary = train_rl(model_dir, work / f"seekling_rl_{tag}", work / f"seekling_state_{tag}", cfg,
                           prompts=prompts, reward_fn=digit_share, log=lambda s: None)
    finally:
        grpo.make_engine = make_engine
    rows = [json.loads(line) for line in open(summary["log"])][1:]  # the first step warms up
    n = args.prompts * args.group
    return {"rollouts_per_s": n / statistics.mean(r["t_rollout"] for r in rows),
            "step_s": statistics.mean(r["t_rollout"] + r["t_update"] for r in rows),
            "tokens_per_completion": statistics.mean(r["len_mean"] for r in rows)}


def bench_trl(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True)} for q in questions(args)]

    def digits(prompts, completions, **kw):
        return [digit_share(p, c) for p, c in zip(prompts, completions, strict=True)]

    config = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.prompts * args.group,
                        num_generations=args.group, max_completion_length=args.max_new_tokens,
                        max_steps=args.steps + 1, learning_rate=1e-5, beta=0.0, num_iterations=1,
                        temperature=1.0, loss_type="grpo", logging_steps=1, report_to="none", save_strategy="no",
                        use_cpu=True, bf16=False, disable_dropout=True, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=digits, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    gen_times: list[float] = []
    generate = trainer.model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = generate(*a, **kw)
        gen_times.append(time.perf_counter() - t)
        return out

    trainer.model.generate = timed_generate
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            step_times.append(time.perf_counter() - self.t)

    trainer.add_callback(StepTimer())
    trainer.train()
    n = args.prompts * args.group
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"rollouts_per_s": n / statistics.mean(gen_times[1:]), "step_s": statistics.mean(step_times[1:]),
            "tokens_per_completion": statistics.mean(lengths[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--skip-trl", action="store_true", help="only seekling (C++ step vs Python step)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of the two seekling runs (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both (default: torch's; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_model(work / "base", args.vocab_size)
        runs: dict[str, list[dict[str, float]]] = {"seekling": [], "seekling, Python step": []}
        for r in range(args.rounds):  # alternating, so a change in the machine's load hits both alike
            runs["seekling"].append(bench_seekling(work / "base", work / f"r{r}", args))
            runs["seekling, Python step"].append(bench_seekling(work / "base", work / f"r{r}", args, native=False))
        rows = {name: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for name, xs in runs.items()}
        if not args.skip_trl:
            rows["trl"] = bench_trl(work / "base", work, args)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    print(f"model: preset tiny, vocab {args.vocab_size}; {args.prompts} prompts x {args.group} samples, "
          f"{args.max_new_tokens} new tokens max")
    print(f"{'':24}{'rollouts/s':>12}{'tokens/rollout':>16}{'step (s)':>10}{'steps in 180 s':>16}")
    for name, r in rows.items():
        print(f"{name:24}{r['rollouts_per_s']:12.1f}{r['tokens_per_completion']:16.1f}{r['step_s']:10.2f}"
              f"{180 / r['step_s']:16.1f}")
    ours, before = rows["seekling"], rows["seekling, Python step"]
    print(f"C++ step vs Python step (the engine before it): rollouts/s "
          f"x{ours['rollouts_per_s'] / before['rollouts_per_s']:.2f}, RL steps per budget "
          f"x{before['step_s'] / ours['step_s']:.2f}")
    if "trl" in rows:
        theirs = rows["trl"]
        print(f"vs TRL: rollouts/s x{ours['rollouts_per_s'] / theirs['rollouts_per_s']:.1f}, "
              f"step time x{theirs['step_s'] / ours['step_s']:.1f} faster")


if __name__ == "__main__":
    main()
