"""Sequences and the continuous-batching scheduler: it plans each step (`schedule()` -> `SchedulerOutput`) and
absorbs what the step produced (`update_from_output(plan, StepOutput)`: tokens, drafts, forks, stops, finishes),
as vLLM's scheduler does; the step itself (seekling/engine/step.py) only computes.

Every step is one "extend" per scheduled sequence: feed the tokens whose latent is not cached yet (the whole prompt
on admission, possibly in chunks; the last sampled token, plus the MTP draft when speculating, while decoding;
everything again after a preemption). New sequences are admitted between steps under a token budget
(`max_num_batched_tokens`) and `max_num_seqs`; when the cache is full the newest running sequence is preempted:
its blocks are freed and it is requeued at the front to be recomputed (prompt + what it generated so far).

Multi-step (vLLM's multi-step scheduling): when every running sequence is decoding, none is waiting to be
admitted and the step can run them all without Python in between (`schedule(num_steps=k, ...)`), one step runs k
decode steps; block tables are grown for all of them first. New requests are admitted at the next plan, so at
most k tokens later.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from seekling.engine.cache import BlockManager
from seekling.engine.detok import IncrementalDecoder, TextStream
from seekling.engine.grammar import Matcher
from seekling.engine.request import Delta
from seekling.engine.sampling import SamplingParams

log = logging.getLogger("seekling.engine")
_seq_ids = itertools.count()
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]  # tokens that end it: the eos ids (unless ignore_eos) and stop_token_ids
    opens_think: bool = False  # the prompt opens a think block (the completion starts as reasoning)
    tokenizer: object = None  # for its text; None: token ids only
    matcher: Matcher | None = None  # the constraint's state (constrained decoding: seekling/engine/grammar.py)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_forks: int = 0  # samples still to fork from this one once its prompt is prefilled
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hashes of its full blocks
    num_cached: int = 0  # positions whose latent is in the cache
    num_cached_prompt: int | None = None  # prompt tokens found in the prefix cache at first admission
    draft: list[int] = field(default_factory=list)  # MTP draft tokens to verify next step
    draft_probs: torch.Tensor | None = None  # [k, V] the distributions the drafts were sampled from
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        seed = self.params.seed
        # Random state: a seeded sample draws from seed + index alone (reproducible, whatever else is batched);
        # torch.Generator for the Python sampler, a 64-bit state for the C++ one (seekling/model/native.cpp).
        self.generator = torch.Generator().manual_seed((seed + self.index) % 2**64) if seed is not None else None
        self.rng = ((seed + self.index) * _GOLDEN if seed is not None
                    else int(torch.randint(0, 2**62, ()))) & (2**64 - 1)
        text = self.tokenizer is not None and self.params.detokenize
        self.decoder = IncrementalDecoder(self.tokenizer, self.prompt_ids) if text else None
        self.stream = TextStream(self.params.stop_list, self.opens_think) if text else None

    def fork(self, index: int) -> Sequence:
        """Sample `index` of the same request: the same prompt, its own random state and text stream; the
        constraint's state copied (the fork is made before this sequence accepts its first token)."""
        return Sequence(self.request_id, index, self.prompt_ids, self.params, self.stop_ids, self.opens_think,
                        self.tokenizer, self.matcher.copy() if self.matcher is not None else None)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_cached + len(self.draft)

    @property
    def decoding(self) -> bool:
        """Only its last token (and drafts) are uncached: a plain decode (or verify) step."""
        return self.num_cached == self.num_tokens - 1 and not self.num_forks

    def pending(self) -> list[int]:
        """Tokens to feed: the uncached ones, then the drafts (only when nothing else is uncached).
        Sliced from prompt and output separately: no copy of the whole sequence on every decode step."""
        P, c = len(self.prompt_ids), self.num_cached
        head = self.prompt_ids[c:] + self.output_ids if c < P else self.output_ids[c - P:]
        return head + self.draft if self.draft else head


@dataclass
class SchedulerOutput:
    """One step's plan: the sequences to run and how many of their pending tokens each feeds; `num_steps` > 1 is
    a multi-step plan (every sequence decoding, up to that many tokens each, block tables grown for them)."""

    batch: list[tuple[Sequence, int]]
    num_steps: int = 1


@dataclass
class StepOutput:
    """What a step produced, for `update_from_output`. Sequences absent from `tokens` ran a prefill chunk that does
    not reach the end of their prompt."""

    tokens: dict[Sequence, list[int]] = field(default_factory=dict)  # new tokens (accepted drafts + the next one)
    cached: dict[Sequence, int] = field(default_factory=dict)  # positions in the cache after the step
    drafts: dict[Sequence, tuple[list[int], torch.Tensor | None]] = field(default_factory=dict)  # next drafts
    forks: dict[Sequence, list[tuple[Sequence, int]]] = field(default_factory=dict)  # new samples, first tokens
    logprobs: dict[Sequence, list[dict[int, float]]] = field(default_factory=dict)
    rng: dict[Sequence, int] = field(default_factory=dict)  # the C++ sampler's states after its draws
    errors: dict[Sequence, str] = field(default_factory=dict)  # sequences whose part of the step failed (why)

    def merge(self, other: StepOutput) -> None:
        for name in ("tokens", "cached", "drafts", "forks", "logprobs", "rng", "errors"):
            getattr(self, name).update(getattr(other, name))


@dataclass
class _Request:
    params: SamplingParams
    seqs: dict[int, Sequence]  # by sample index (forks appear once the prompt is prefilled)
    unfinished: int


def describe(error: BaseException) -> str:
    """What a request that failed alone is told (and the log keeps, with the traceback)."""
    log.error("a request failed alone: %r", error, exc_info=error)
    return f"{type(error).__name__}: {error}"


class Scheduler:
    def __init__(self, blocks: BlockManager, kv: torch.Tensor, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, speculative: bool = False):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks, self.kv = blocks, kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.speculative = speculative  # the MTP module keeps a cache layer of its own
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is the newest
        self.requests: dict[str, _Request] = {}
        self.num_preemptions = 0
        self.num_generated = 0

    def add(self, seq: Sequence) -> None:
        """Queue a request's first sample; its others fork from it once its prompt is in the cache."""
        seq.num_forks = seq.params.n - 1
        self.requests[seq.request_id] = _Request(seq.params, {0: seq}, seq.params.n)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- planning ---------------------------------------------------------------------------------------------
    def schedule(self, num_steps: int = 1, lookahead: int = 1,
                 multi_step: Callable[[Sequence], bool] | None = None) -> SchedulerOutput:
        """The next step. A multi-step plan when `num_steps` > 1, every running sequence is decoding and passes
        `multi_step`, no waiting sequence could be admitted now, and the cache holds `lookahead` positions a step
        for all of them; otherwise one step."""
        if num_steps > 1 and multi_step is not None and self.running and not self._admissible():
            if all(s.decoding and multi_step(s) for s in self.running):
                grow = [(s, min(s.num_cached + num_steps * lookahead, self._max_len(s) + lookahead - 1))
                        for s in self.running]
                need = sum(max(0, self.blocks.blocks_for(n) - len(s.block_table)) for s, n in grow)
                if need <= self.blocks.num_free:
                    for s, n in grow:
                        self.blocks.grow(s.block_table, n)
                    return SchedulerOutput([(s, 1 + len(s.draft)) for s in self.running], num_steps)
        return SchedulerOutput(self._schedule_one())

    def _max_len(self, seq: Sequence) -> int:
        return min(len(seq.prompt_ids) + (seq.params.max_tokens or self.max_model_len), self.max_model_len)

    def _admissible(self) -> bool:
        return bool(self.waiting) and len(self.running) + 1 + self.waiting[0].num_forks <= self.max_num_seqs

    def _schedule_one(self) -> list[tuple[Sequence, int]]:
        """The sequences to run this step and how many of their pending tokens to feed."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            pending = seq.num_pending
            if pending > budget and seq.draft:  # a verify is all or nothing: drop the drafts instead
                seq.draft, seq.draft_probs = [], None
                pending = seq.num_pending
            n = min(pending, budget)
            while not self.blocks.can_grow(seq.block_table, seq.num_cached + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq.block_table, seq.num_cached + n)
            batch.append((seq, n))
            budget -= n
        # Admit waiting sequences (a preempted one is at the front) unless we just ran out of cache.
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.num_forks > self.max_num_seqs:
                break
            if not seq.block_table:  # reuse cached blocks of its prefix; keep one token to compute
                seq.block_table, seq.block_hashes = self.blocks.match_prefix(seq.tokens, seq.num_tokens - 1)
                seq.num_cached = len(seq.block_table) * self.blocks.block_size
                if seq.num_cached_prompt is None:  # what `usage` reports; a recompute after preemption is ours
                    seq.num_cached_prompt = min(seq.num_cached, len(seq.prompt_ids))
            n = min(seq.num_pending, budget)
            # The forks each want a private copy of the prompt's last block(s); alone, it goes anyway
            # (a fork that finds no free block is recomputed later).
            extra = 2 * seq.num_forks if self.running else 0
            if not self.blocks.can_grow(seq.block_table, seq.num_cached + n, extra=extra):
                self.blocks.release(seq.block_table)
                seq.block_hashes, seq.num_cached = [], 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.blocks.grow(seq.block_table, seq.num_cached + n)
            batch.append((seq, n))
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_cached, seq.block_hashes, seq.draft, seq.draft_probs = 0, [], [], None
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # --- absorbing a step's results ----------------------------------------------------------------------------
    def update_from_output(self, plan: SchedulerOutput, out: StepOutput) -> list[tuple[str, Delta]]:
        """Apply a step's results: new tokens (stops, lengths, stop strings, text), cache positions, drafts, forks
        and finished sequences; returns the (request_id, Delta) of every sequence that produced something."""
        deltas: list[tuple[str, Delta]] = []
        for seq, n in plan.batch:
            if seq.finish_reason is not None:  # finished while the step ran (a fork's parent, an abort)
                continue
            if seq in out.errors:
                deltas += self.end(seq.request_id, "error", out.errors[seq])
                continue
            try:
                deltas += self._absorb(seq, n, out)
            except Exception as e:  # a fault of this request's own (its text, its grammar): it ends alone
                deltas += self.end(seq.request_id, "error", describe(e))
        return deltas

    def _absorb(self, seq: Sequence, n: int, out: StepOutput) -> list[tuple[str, Delta]]:
        if seq in out.rng:
            seq.rng = out.rng[seq]
        if seq not in out.tokens:  # a prefill chunk that does not reach the end of the prompt yet
            seq.num_cached += n
            self._register(seq, seq.tokens)
            return []
        tokens = out.tokens[seq]
        seq.num_cached = out.cached[seq]
        seq.draft, seq.draft_probs = out.drafts.get(seq, ([], None))
        self._register(seq, seq.tokens + tokens)
        group = [(seq, tokens, out.logprobs.get(seq))]
        for child, token in out.forks.get(seq, []):
            if self._adopt(seq, child):
                group.append((child, [token], None))
        seq.num_forks = 0
        return [(s.request_id, self._append(s, toks, lp)) for s, toks, lp in group]

    def _register(self, seq: Sequence, tokens: list[int]) -> None:
        """Remember the blocks the sequence filled completely (prefix caching), when there is a new one."""
        if seq.num_cached // self.blocks.block_size > len(seq.block_hashes):
            self.blocks.register(seq.block_table, seq.block_hashes, tokens, seq.num_cached)

    def _adopt(self, parent: Sequence, child: Sequence) -> bool:
        """A fork shares the parent's prefilled prompt: its full blocks shared, the rest copied. With MTP the last
        prompt position's MTP latent depends on the sampled token, so that block stays private too. False when
        there is no room for the copies: the fork then waits, to be recomputed from its prompt."""
        self.requests[parent.request_id].seqs[child.index] = child
        P = parent.num_cached
        shared = P - 1 if self.speculative else P
        table = self.blocks.fork(parent.block_table, P, shared, self.kv)
        if table is None:
            self.waiting.appendleft(child)
            return False
        child.block_table, child.num_cached = table, P
        child.block_hashes = parent.block_hashes[:shared // self.blocks.block_size]
        self.running.append(child)
        return True

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[dict[int, float]] | None) -> Delta:
        """Append sampled tokens until a stop condition (a stop token, a completed constraint, max_tokens, the
        context, a stop string); text is decoded once for the tokens of a sequence without stop strings."""
        p = seq.params
        limit = min(p.max_tokens or self.max_model_len, self.max_model_len - len(seq.prompt_ids))
        per_token = seq.stream is not None and bool(p.stop_list)
        new, text, reasoning, reason = [], "", "", None
        for t in tokens:
            seq.output_ids.append(t)
            new.append(t)
            self.num_generated += 1
            # A completed constraint (its stop token accepted) ends the sequence even with ignore_eos.
            completed = seq.matcher is not None and seq.matcher.accept(t)
            stop_token = completed or t in seq.stop_ids
            reason = "stop" if stop_token else "length" if len(seq.output_ids) >= limit else None
            if per_token:
                rs, tx = self._text(seq, [t], stop_token, reason is not None)
                reasoning, text = reasoning + rs, text + tx
                reason = "stop" if seq.stream.stopped else reason
            if reason is not None:
                break
        if seq.stream is not None and not per_token:
            reasoning, text = self._text(seq, new, reason == "stop", reason is not None)
        lp = logprobs[:len(new)] if logprobs is not None else None
        if lp is not None:
            seq.logprobs.extend(lp)
        if reason is not None:
            self.finish(seq, reason)
        return Delta(seq.index, text, reasoning, new, seq.finish_reason, lp, seq.num_cached_prompt or 0)

    @staticmethod
    def _text(seq: Sequence, tokens: list[int], ends_on_stop_token: bool, final: bool) -> tuple[str, str]:
        """(reasoning, text) released by these tokens; a stop token ending them is not part of the text."""
        piece = seq.decoder.add(tokens[:-1] if ends_on_stop_token else tokens)
        if final:
            piece += seq.decoder.flush()
        return seq.stream.push(piece, final=final)

    # --- finishing ---------------------------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence: free its blocks; a request whose samples have all finished is forgotten."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        req = self.requests.get(seq.request_id)
        if req is not None:
            req.unfinished -= 1
            if req.unfinished == 0:
                del self.requests[seq.request_id]

    def end(self, request_id: str, reason: str, error: str | None = None) -> list[tuple[str, Delta]]:
        """Finish every unfinished sample of a request with `reason` ("abort", or "error" for a fault of its own,
        described by `error`), those not forked yet included; unknown or finished requests are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        out = []
        for index in range(req.params.n):
            seq = req.seqs.get(index)
            if seq is not None and seq.finish_reason is not None:
                continue
            if seq is not None:
                self.finish(seq, reason)
            out.append((request_id, Delta(index, "", "", [], reason, error=error)))
        self.requests.pop(request_id, None)
        return out
