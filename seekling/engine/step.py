"""The model step: runs a `SchedulerOutput` and returns a `StepOutput` — it builds the batch, runs the forward,
samples, verifies drafts and drafts with the MTP module. It decides nothing about sequences' lives (the scheduler
does); it computes.

Two forwards compute the same thing (tested to float rounding):
  - `NativeForward`: seekling/model/native.cpp, the DeepSeek-V3 forward in C++ over the model's own tensors. The
    default wherever it runs (fp32 DeepSeek-V3 on the CPU, a C++ compiler at hand). It also runs whole multi-step
    plans: k decode steps (sampling, stop tokens, cache writes) in one call, or k greedy speculative steps.
  - `PythonForward`: the model's own `infer` / `infer_mtp` (seekling/model), optionally torch.compile'd for plain
    decode steps (`compile=True`, seekling/engine/compiled.py): every other model (dense families, int8, bf16, GPU)
    and the fallback without a compiler.
Sampling: rows without penalties draw with the C++ sampler (one draw from the sequence's own 64-bit state, so a
seeded sequence gives the same tokens whatever else is batched, in one step or k); rows with penalties, or
sampled rows verifying drafts, take the Python logits processor and the sequence's torch.Generator.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from seekling.engine.compiled import CompiledDecode
from seekling.engine.grammar import Grammars
from seekling.engine.sampling import probs_from_logits, sample, token_logprobs, uniform
from seekling.engine.scheduler import SchedulerOutput, Sequence, StepOutput, describe
from seekling.model.layers import CausalLM, make_batch
from seekling.model.native import NativeModel, load_native, unsupported

log = logging.getLogger("seekling.engine")
Items = list[tuple[list[int], int, list[int]]]  # (tokens, position of the first, block table) per sequence


class PythonForward:
    """The model's own inference forward (seekling/model): make_batch, infer, the cache write, the head."""

    def __init__(self, model: CausalLM, kv: torch.Tensor, compile: bool):
        self.model, self.kv, self.block_size = model, kv, kv.shape[2]
        self.compiled = CompiledDecode(model, kv) if compile else None

    def forward(self, items: Items, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (logits of the packed rows `rows`, every row's final hidden state)."""
        batch = make_batch(items, self.block_size, self.kv.device)
        batch.cache = self.kv
        plain = len(items) == batch.input_ids.shape[0]  # every sequence feeds one token
        if self.compiled is not None and plain and len(items) <= self.compiled.max_batch:
            hidden, entries = self.compiled(batch)
        else:
            hidden, entries = self.model.infer(batch)
        self.write(entries, batch.slots, 0)
        return (self.model.logits(hidden[rows]) if rows else None), hidden

    def mtp(self, items: Items, hidden: torch.Tensor, drafting: list[int]) -> torch.Tensor | None:
        """The MTP module over every item's rows (writing its cache layer); -> logits at the last row of the
        items `drafting`."""
        batch = make_batch(items, self.block_size, self.kv.device, last_only=True)
        batch.cache = self.kv
        h, entries = self.model.infer_mtp(batch, hidden)
        self.write(entries, batch.slots, self.model.config.num_hidden_layers)
        return self.model.logits(h[drafting]) if drafting else None

    def write(self, entries: torch.Tensor, slots: torch.Tensor, first_layer: int) -> None:
        """A forward's new cache entries [layers, N, *entry] into their slots (index_copy_: several times cheaper
        than indexing with a tensor on a CPU)."""
        L = entries.shape[0]
        kv = self.kv[first_layer:first_layer + L]
        kv.view(L, -1, *kv.shape[3:]).index_copy_(1, slots, entries.to(kv.dtype))


class NativeForward:
    """The C++ forward (seekling/model/native.py) behind the same two calls, plus the multi-step loops."""

    def __init__(self, model: CausalLM, kv: torch.Tensor):
        self.native = NativeModel(model, kv)

    @staticmethod
    def _flatten(items: Items) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        tokens, pos, seq = [], [], []
        for b, (new, start, _) in enumerate(items):
            tokens += new
            pos += range(start, start + len(new))
            seq += [b] * len(new)
        return tokens, pos, seq, [table for _, _, table in items]

    def forward(self, items: Items, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        logits, hidden = self.native.impl.forward(*self._flatten(items), rows)
        return (logits if rows else None), hidden

    def mtp(self, items: Items, hidden: torch.Tensor, drafting: list[int]) -> torch.Tensor | None:
        tokens, pos, seq, tables = self._flatten(items)
        ends = list(itertools.accumulate(len(new) for new, _, _ in items))
        logits = self.native.impl.mtp(tokens, pos, seq, tables, hidden.contiguous(), [ends[i] - 1 for i in drafting])
        return logits if drafting else None


class ModelStep:
    """Runs plans on the model. `native=None` picks the C++ forward wherever it runs (logged otherwise)."""

    def __init__(self, model: CausalLM, kv: torch.Tensor, grammars: Grammars, max_model_len: int, *,
                 speculative: bool = False, compile: bool = False, native: bool | None = None,
                 num_scheduler_steps: int = 16):
        self.model, self.kv, self.grammars = model, kv, grammars
        self.block_size, self.max_model_len, self.speculative = kv.shape[2], max_model_len, speculative
        self.backend: PythonForward | NativeForward = self._backend(model, kv, compile, native)
        self.multi = isinstance(self.backend, NativeForward) and num_scheduler_steps > 1
        self.num_steps = num_scheduler_steps if self.multi else 1
        self.lookahead = 2 if speculative else 1  # positions a decode step may fill per sequence
        self._sampler = load_native() if native is not False and kv.device.type == "cpu" else None
        self.num_drafted = self.num_accepted = 0

    @staticmethod
    def _backend(model: CausalLM, kv: torch.Tensor, compile: bool, native: bool | None) -> Any:
        """The C++ forward wherever it runs (compile=True then changes nothing: it compiles the Python step);
        otherwise the model's Python forward, torch.compile'd with compile=True. The choice is logged."""
        why = "native=False" if native is False else unsupported(model)
        if why is None and load_native() is None:
            why = "no C++ toolchain (see the warning above)"
        if why is None:
            if compile:
                log.info("compile=True is for the Python step; this model runs the C++ step")
            return NativeForward(model, kv)
        if native:
            raise ValueError(f"native=True, but the C++ step cannot run here: {why}")
        log.info("the engine runs the Python step%s: %s", " (torch.compile'd)" if compile else "", why)
        return PythonForward(model, kv, compile)

    @property
    def native(self) -> bool:
        return isinstance(self.backend, NativeForward)

    # --- which sampler, which loop ----------------------------------------------------------------------------
    def native_sampling(self, seq: Sequence) -> bool:
        """The C++ sampler draws this sequence's tokens: no constraint and no penalties (those take the Python
        logits processor), and greedy when drafts are verified (sampled verification needs the distributions)."""
        p = seq.params
        return (self._sampler is not None and seq.matcher is None and p.repetition_penalty == 1.0
                and not p.presence_penalty and not p.frequency_penalty and not p.logit_bias
                and (p.greedy or not self.speculative))

    def multi_step(self, seq: Sequence) -> bool:
        """The C++ loop can run this sequence k steps at a time (no constraint, no logprobs, and plain greedy when
        speculating: the loop verifies greedily)."""
        p = seq.params
        return (self.multi and p.logprobs is None and self.native_sampling(seq)
                and (not self.speculative or p.plain_greedy))

    def execute(self, plan: SchedulerOutput) -> StepOutput:
        """Compute the plan; nothing of a sequence changes here (the scheduler applies the output). When the batch
        fails, each sequence runs alone, so the one whose fault it is ends with an error and the others go on (the
        rerun writes the same cache entries again)."""
        try:
            with torch.inference_mode():
                return self._multi(plan) if plan.num_steps > 1 else self._single(plan)
        except Exception as e:
            if len(plan.batch) == 1:
                return StepOutput(errors={plan.batch[0][0]: describe(e)})
            log.warning("a batch of %d sequences failed (%r): running each alone", len(plan.batch), e)
            out = StepOutput()
            for item in plan.batch:
                out.merge(self.execute(SchedulerOutput([item], plan.num_steps)))
            return out

    # --- k steps in C++ ---------------------------------------------------------------------------------------
    def _multi(self, plan: SchedulerOutput) -> StepOutput:
        seqs = [s for s, _ in plan.batch]
        impl = self.backend.native.impl
        last = [s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in seqs]
        pos = [s.num_cached for s in seqs]
        tables = [s.block_table for s in seqs]
        limits = [min((s.params.max_tokens or self.max_model_len) - len(s.output_ids),
                      self.max_model_len - s.num_tokens) for s in seqs]
        stops = [sorted(s.stop_ids) for s in seqs]
        out = StepOutput()
        if self.speculative:
            drafts = [s.draft[0] if s.draft else -1 for s in seqs]
            tokens, nxt, drafted, accepted = impl.speculate(last, pos, drafts, tables, limits, stops, plan.num_steps)
            self.num_drafted += drafted
            self.num_accepted += accepted
            out.drafts = {s: ([d] if d >= 0 else [], None) for s, d in zip(seqs, nxt, strict=True)}
        else:
            tokens, rng = impl.decode(last, pos, tables, limits, stops, [_sampling(s) for s in seqs],
                                      [s.rng for s in seqs], plan.num_steps)
            out.rng = dict(zip(seqs, rng, strict=True))
        for s, toks in zip(seqs, tokens, strict=True):
            out.tokens[s], out.cached[s] = toks, s.num_cached + len(toks)
        return out

    # --- one step ---------------------------------------------------------------------------------------------
    def _single(self, plan: SchedulerOutput) -> StepOutput:
        batch = plan.batch
        items, offsets, off = [], [], 0
        for seq, n in batch:
            items.append((seq.pending()[:n], seq.num_cached, seq.block_table))
            offsets.append(off)
            off += n
        # Rows to sample from: the last fed token of a sequence that reached its end, or, when verifying drafts,
        # the last token and every draft (row j predicts output position j).
        rows: list[int] = []
        row_of: list[tuple[Sequence, int]] = []
        for (seq, n), o in zip(batch, offsets, strict=True):
            if seq.num_cached + n - len(seq.draft) < seq.num_tokens:
                continue  # a prefill chunk that does not reach the end yet
            first = o + n - 1 - len(seq.draft)
            for j in range(len(seq.draft) + 1):
                rows.append(first + j)
                row_of.append((seq, j))
        logits, hidden = self.backend.forward(items, rows)
        if rows:
            self._constrain(logits, row_of)
        out = StepOutput()
        chosen, probs = self._sample(logits, row_of, out.rng) if rows else ([], None)
        mtp: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, first hidden row, count)
        r = 0
        for (seq, n), o in zip(batch, offsets, strict=True):
            start = seq.num_cached
            if start + n - len(seq.draft) < seq.num_tokens:
                mtp.append((seq, start, o, n))
                continue
            try:
                valid = self._take(seq, n, r, logits, probs, chosen, out)
                if self.speculative:
                    mtp.append((seq, start, o, valid))
            except Exception as e:  # a fault of this sequence's own: it ends alone
                out.errors[seq] = describe(e)
            r += len(seq.draft) + 1
        mtp = [m for m in mtp if m[0] not in out.errors]
        if self.speculative and mtp:
            try:
                out.drafts = self._draft(mtp, hidden, out)
            except Exception as e:  # drafts are only proposals: without them the step stays exact
                log.warning("MTP drafting failed (%r): this step drafts nothing", e)
        return out

    def _take(self, seq: Sequence, n: int, r: int, logits: torch.Tensor, probs: torch.Tensor | None,
              chosen: list[int], out: StepOutput) -> int:
        """One sequence's new tokens from rows r.. (verified drafts, or its draw), its forks' and its logprobs;
        -> how many fed positions stay valid."""
        k = len(seq.draft)
        if k:
            tokens = self._verify(seq, probs[r:r + k + 1] if seq.draft_probs is not None else None,
                                  chosen[r:r + k + 1])
        else:
            tokens = [chosen[r]]
        valid = n - k + len(tokens) - 1  # fed positions whose latent stays valid
        out.tokens[seq], out.cached[seq] = tokens, seq.num_cached + valid
        if seq.num_forks:
            out.forks[seq] = self._fork(seq, logits[r], probs[r:r + 1] if probs is not None else None)
        if seq.params.logprobs is not None:
            out.logprobs[seq] = token_logprobs(logits[r:r + len(tokens)], torch.tensor(tokens), seq.params.logprobs)
        return valid

    def _sample(self, logits: torch.Tensor, row_of: list[tuple[Sequence, int]], rng: dict[Sequence, int]
                ) -> tuple[list[int], torch.Tensor | None]:
        """The token of every row (for rows verifying drafts: the target's choice, used when greedy), and the
        distributions of the rows the Python sampler serves (None when there are none); the C++ sampler's new
        random states go to `rng`."""
        if all(s.params.plain_greedy and not s.num_forks for s, _ in row_of):  # one argmax for the batch
            return logits.argmax(-1).tolist(), None
        chosen = logits.argmax(-1).tolist()
        native = [i for i, (s, j) in enumerate(row_of) if self.native_sampling(s) and not s.params.greedy]
        if native:
            seqs = [row_of[i][0] for i in native]
            drawn, states = self._sampler.sample_rows(logits[native].float(), [_sampling(s) for s in seqs],
                                                      [s.rng for s in seqs])
            for i, s, t, st in zip(native, seqs, drawn, states, strict=True):
                chosen[i], rng[s] = t, st
        python = [i for i, (s, _) in enumerate(row_of) if not self.native_sampling(s)]
        probs = None
        if python:
            probs = probs_from_logits(logits, [s.params for s, _ in row_of], [s.prompt_ids for s, _ in row_of],
                                      [s.output_ids + s.draft[:j] for s, j in row_of])
            greedy = [i for i in python if row_of[i][0].params.greedy]  # the argmax after penalties
            for i, t in zip(greedy, probs[greedy].argmax(-1).tolist(), strict=True):
                chosen[i] = t
            drawn = [i for i in python if not row_of[i][0].params.greedy and not row_of[i][0].draft]
            for i, t in zip(drawn, sample(probs[drawn], [row_of[i][0].generator for i in drawn]).tolist(),
                            strict=True):
                chosen[i] = t
        return chosen, probs

    def _constrain(self, logits: torch.Tensor, row_of: list[tuple[Sequence, int]],
                   ahead: dict[Sequence, list[int]] | None = None) -> None:
        """Mask, in place, the rows of constrained sequences to what their grammar allows: a sequence's row j
        (verifying drafts) to the state after its first j drafts; with `ahead` (drafting before the scheduler has
        appended a step's tokens), to the state after those tokens. Nothing happens for unconstrained batches."""
        firsts = [i for i, (s, j) in enumerate(row_of) if j == 0 and s.matcher is not None]
        if not firsts:
            return
        bitmask, masked = self.grammars.bitmask(len(row_of)), []
        for i in firsts:
            seq = row_of[i][0]
            if ahead is not None:
                scratch = self.grammars.bitmask(len(ahead[seq]) + 1)
                seq.matcher.fill(scratch, 0, ahead[seq])
                bitmask[i] = scratch[len(ahead[seq])]
                masked.append(i)
            else:
                seq.matcher.fill(bitmask, i, seq.draft)
                masked.extend(range(i, i + len(seq.draft) + 1))
        self.grammars.apply(logits, bitmask, masked)

    def _fork(self, parent: Sequence, logits: torch.Tensor, probs: torch.Tensor | None) -> list[tuple[Sequence, int]]:
        """Samples 1..n-1 of the request: each draws its first token from the parent's distribution with its own
        random state (the scheduler gives them their blocks)."""
        children = [parent.fork(i) for i in range(1, parent.num_forks + 1)]
        if parent.params.greedy:
            return [(c, int(logits.argmax())) for c in children]
        if self.native_sampling(parent):
            drawn, rng = self._sampler.sample_rows(logits.float().expand(len(children), -1).contiguous(),
                                                   [_sampling(c) for c in children], [c.rng for c in children])
            for c, st in zip(children, rng, strict=True):
                c.rng = st
            return list(zip(children, drawn, strict=True))
        return [(c, int(sample(probs, [c.generator])[0])) for c in children]

    def _verify(self, seq: Sequence, p: torch.Tensor | None, target: list[int]) -> list[int]:
        """Speculative sampling (Leviathan et al. 2023): accept draft d with prob min(1, p(d)/q(d)); on rejection
        sample from norm(max(0, p - q)); if all are accepted add a bonus token from p. Greedy (p one-hot on the
        target's argmax) reduces to: accept while the draft is the argmax (`target`: each row's argmax)."""
        out = []
        for j, d in enumerate(seq.draft):
            self.num_drafted += 1
            if p is None:  # greedy
                if d != target[j]:
                    return out + [target[j]]
                out.append(d)
                self.num_accepted += 1
                continue
            q = seq.draft_probs[j]
            if uniform(seq.generator) < min(1.0, float(p[j, d] / q[d])):
                out.append(d)
                self.num_accepted += 1
                continue
            residual = (p[j] - q).clamp(min=0)
            residual = residual / residual.sum() if residual.sum() > 0 else p[j]
            return out + [int(sample(residual[None], [seq.generator])[0])]
        if p is None:
            return out + [target[len(seq.draft)]]
        return out + [int(sample(p[len(seq.draft)][None], [seq.generator])[0])]

    def _draft(self, mtp: list[tuple[Sequence, int, int, int]], hidden: torch.Tensor,
               out: StepOutput) -> dict[Sequence, tuple[list[int], torch.Tensor | None]]:
        """Run the MTP module over the positions just verified (it needs t_{i+1}, known now) and draft one token
        for every sequence that goes on decoding."""
        items, rows, drafting, seqs = [], [], [], []
        for i, (seq, start, o, count) in enumerate(mtp):
            known = seq.tokens + out.tokens.get(seq, [])
            items.append((known[start + 1:start + count + 1], start, seq.block_table))
            rows.extend(range(o, o + count))
            new = out.tokens.get(seq)
            if new is None:
                continue
            made = len(seq.output_ids) + len(new)
            remaining = (seq.params.max_tokens or self.max_model_len) - made
            if start + count == seq.num_tokens + len(new) - 1 and remaining > 1 and \
                    seq.num_tokens + len(new) < self.max_model_len and not seq.stop_ids.intersection(new):
                drafting.append(i)
                seqs.append(seq)
        logits = self.backend.mtp(items, hidden[rows], drafting)
        if not seqs:
            return {}
        self._constrain(logits, [(s, 0) for s in seqs], ahead={s: out.tokens[s] for s in seqs})
        if all(s.params.plain_greedy for s in seqs):  # the draft is the MTP head's argmax
            return {s: ([d], None) for s, d in zip(seqs, logits.argmax(-1).tolist(), strict=True)}
        q = probs_from_logits(logits, [s.params for s in seqs], [s.prompt_ids for s in seqs],
                              [s.output_ids + out.tokens[s] for s in seqs])
        return {s: ([int(sample(q[i:i + 1], [s.generator])[0])], q[i:i + 1]) for i, s in enumerate(seqs)}


def _sampling(seq: Sequence) -> list[float]:
    p = seq.params
    return [float(p.temperature), float(p.top_k), float(p.top_p), float(p.min_p)]
