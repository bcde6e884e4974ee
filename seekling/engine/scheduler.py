"""Sequences and the continuous-batching scheduler.

Every step is one "extend" per scheduled sequence: feed the tokens whose latent is not cached yet
(the whole prompt on admission, possibly in chunks; the last sampled token, plus the MTP draft when
speculating, while decoding; everything again after a preemption). New sequences are admitted
between steps under a token budget (`max_num_batched_tokens`) and `max_num_seqs`; when the cache is
full the newest running sequence is preempted: its blocks are freed and it is requeued at the front
to be recomputed (prompt + what it generated so far).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from seekling.engine.cache import BlockManager
from seekling.engine.detok import IncrementalDecoder, TextStream
from seekling.engine.grammar import Matcher
from seekling.engine.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    decoder: IncrementalDecoder | None
    stream: TextStream | None
    prompt_text: str = ""  # the rendered prompt (forks build their own text streams from it)
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
    matcher: Matcher | None = None  # the constraint's state (constrained decoding: seekling/engine/grammar.py)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_cached + len(self.draft)

    def pending(self) -> list[int]:
        """Tokens to feed: the uncached ones, then the drafts (only when nothing else is uncached).
        Sliced from prompt and output separately: no copy of the whole sequence on every decode step."""
        P, c = len(self.prompt_ids), self.num_cached
        head = self.prompt_ids[c:] + self.output_ids if c < P else self.output_ids[c - P:]
        return head + self.draft if self.draft else head


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
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

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
