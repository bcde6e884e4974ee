"""The cost of constrained decoding per token: seekling's engine with a json_schema constraint vs none.

The same chat prompts (held-out task problems, as `seekling eval` sends them) for both; every sequence
generates exactly --new tokens in both: the schema is an array of at least 64 objects, which no sequence
completes within --new tokens (so the constrained runs never stop early), the free runs ignore eos.
Greedy (the plain-argmax path), seeded sampling at temperature 1, and MTP speculative greedy when the model
has an MTP module; batch 1 and --batch. Median of --repeat runs, the two contenders alternating so that both
see the same machine load; tokens/s of this process's CPU time (wall-clock in brackets). Also the one-off
cost of a constraint's first request (importing xgrammar, reading the vocabulary, compiling the schema).

    python benchmarks/bench_constrained.py --threads 1                  # the speedrun model /work/runs/sr1/rl
    python benchmarks/bench_constrained.py --model DIR --batch 8 --new 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timezone

import torch
from bench_decode import cpu_model, task_prompts

from seekling.engine import Engine, SamplingParams
from seekling.engine.sampling import StructuredOutputsParams

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "value": {"type": "integer"}},
    "required": ["name", "value"], "additionalProperties": False}}


class Median:
    """Median timings on two clocks: this process's CPU time (steadier on a shared machine) and wall time; and
    the MTP drafts accepted over all runs (speculative engines)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.drafted = self.accepted = 0

    def time(self, fn, engine: Engine, *args):
        before = engine.stats()
        w, c = time.perf_counter(), time.process_time()
        out = fn(engine, *args)
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)
        after = engine.stats()
        self.drafted += after["spec_drafted"] - before["spec_drafted"]
        self.accepted += after["spec_accepted"] - before["spec_accepted"]
        return out

    def acceptance(self) -> str:
        return f"{self.accepted / self.drafted:.2f}" if self.drafted else "-"

    def rate(self, n: int) -> str:
        return f"{n / statistics.median(self.cpu):7.1f} ({n / statistics.median(self.wall):7.1f} wall)"


class MaskClock:
    """Time spent in the engine's masking (filling the matchers' bitmasks and applying them), per masked row."""

    def __init__(self, engine: Engine) -> None:
        self.seconds, self.rows = 0.0, 0
        step = engine.step_module  # the model step masks the rows (seekling/engine/step.py)
        inner = step._constrain

        def timed(logits, row_of, ahead=None):
            t = time.perf_counter()
            inner(logits, row_of, ahead)
            self.seconds += time.perf_counter() - t
            self.rows += sum(s.matcher is not None for s, _ in row_of)

        step._constrain = timed

    def per_row_us(self) -> float:
        return 1e6 * self.seconds / max(self.rows, 1)


def run(engine: Engine, prompts: list, params: SamplingParams) -> int:
    """Tokens generated; each sequence must give exactly max_tokens (the comparison is per token)."""
    outs = engine.generate(prompts, params)
    lengths = {len(o.token_ids) for o in outs}
    if lengths != {params.max_tokens}:
        raise RuntimeError(f"sequences of {sorted(lengths)} tokens, expected {params.max_tokens} each")
    return sum(len(o.token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/runs/sr1/rl", help="checkpoint dir with its tokenizer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine is shared)")
    ap.add_argument("--repeat", type=int, default=7, help="median of N timings, alternating the contenders")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plain = Engine(args.model, max_num_seqs=args.batch)
    engines = {"plain": plain}
    if plain.config.num_nextn_predict_layers > 0:
        engines["speculative"] = Engine(args.model, max_num_seqs=args.batch, speculative=True)
    constraint = StructuredOutputsParams(json=SCHEMA)
    cfg = plain.config
    print(f"# bench_constrained  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  cpu: {cpu_model()}  "
          f"threads: {args.threads}  torch {torch.__version__}  load {os.getloadavg()[0]:.2f}")
    print(f"# model: {args.model}; {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    print(f"# {args.new} new tokens per sequence, median of {args.repeat}; constraint: json_schema {SCHEMA}")
    for name, engine in engines.items():
        t = time.perf_counter()
        engine.grammars.compile(constraint)  # xgrammar import + vocabulary + compile, once per engine
        print(f"# {name} engine: first constraint ready in {1e3 * (time.perf_counter() - t):.0f} ms; "
              f"cached: {1e6 * _cached(engine, constraint):.0f} us")
    prompts = task_prompts(args.batch)
    modes = [("greedy", "plain", dict(temperature=0)), ("sampled T=1", "plain", dict(temperature=1.0, seed=0))]
    if "speculative" in engines:
        modes.append(("MTP greedy", "speculative", dict(temperature=0)))
    clocks = {name: MaskClock(engine) for name, engine in engines.items()}
    print("# tokens/s of CPU time (wall-clock in brackets); cost = constrained time per token / free time - 1;")
    print("# mask = wall time of filling + applying the masks, per masked row (a verify step masks 2 rows a sequence)")
    with torch.inference_mode():
        for label, name, kw in modes:
            engine = engines[name]
            free = SamplingParams(max_tokens=args.new, ignore_eos=True, **kw)
            json_params = SamplingParams(max_tokens=args.new, structured_outputs=constraint, **kw)
            for bs in (1, args.batch):
                p = prompts[:bs]
                run(engine, p[:1], free), run(engine, p[:1], json_params)  # warm-up
                t_free, t_json = Median(), Median()
                clock = clocks[name]
                clock.seconds, clock.rows = 0.0, 0
                for _ in range(args.repeat):
                    n = t_free.time(run, engine, p, free)
                    t_json.time(run, engine, p, json_params)
                cost = statistics.median(t_json.cpu) / statistics.median(t_free.cpu) - 1
                wall = statistics.median(t_json.wall) / statistics.median(t_free.wall) - 1
                print(f"{label:12s} batch {bs:3d}: none / json_schema {t_free.rate(n)} / {t_json.rate(n)} tok/s | "
                      f"cost {100 * cost:+5.1f}% ({100 * wall:+5.1f}% wall) | mask {clock.per_row_us():4.0f} us/row | "
                      f"MTP acceptance {t_free.acceptance()} / {t_json.acceptance()}")


def _cached(engine: Engine, constraint: StructuredOutputsParams) -> float:
    t = time.perf_counter()
    engine.grammars.compile(constraint)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
