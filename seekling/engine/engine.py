"""The inference engine: requests in, text deltas out.

    engine = Engine("runs/speedrun/rl")                 # or Engine(model, tokenizer)
    outs = engine.generate(["What is 2 + 3?"], SamplingParams(temperature=0))
    for delta in engine.stream(prompt, params): ...

One `step()` = drain the inbox (requests and aborts from any thread), schedule (continuous batching over
the paged block cache), one packed forward of the model (its own `infer`: seekling/model), the writing of
the new cache entries it returns, sampling (or speculative verification), detokenisation, then — when
speculative — one packed forward of the MTP module that drafts each sequence's next token. Every model
family (seekling/model/families/: DeepSeek-V3/V2's `Transformer`, the Qwen2/Qwen3/Llama `DenseModel` of the
R1 distills) offers the same interface (`prepare`, `infer`, `logits`, `cache_entry_shape`, `num_cache_layers`,
`eos_token_ids`); the engine knows nothing of their layers. `compile=True` runs plain decode steps of up to `max_batch`
sequences through `torch.compile` of that same `infer`. Servers call `add_request` / `abort` from their
threads and `step()` from one loop; `generate` and `stream` drive `step()` themselves.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seekling.engine.cache import BlockManager
from seekling.engine.compiled import CompiledDecode
from seekling.engine.detok import IncrementalDecoder, TextStream, prompt_opens_think, turn_start_ids
from seekling.engine.grammar import Grammars, Matcher
from seekling.engine.sampling import (
    SamplingParams,
    StructuredOutputsParams,
    probs_from_logits,
    sample,
    token_logprobs,
    uniform,
)
from seekling.engine.scheduler import Scheduler, Sequence
from seekling.model.families import family_of
from seekling.model.layers import CausalLM, make_batch
from seekling.model.load import QUANTIZE, load_pretrained, release_freed_memory
from seekling.model.quant import use_kernels
from seekling.tokenizer import bundled_tokenizer

Prompt = str | list[dict[str, Any]] | list[int]
log = logging.getLogger("seekling.engine")


@dataclass
class Delta:
    index: int  # which of the request's n samples
    text: str
    reasoning: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's cached_tokens)
    error: str | None = None  # with finish_reason "error": what failed (the other requests went on)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None  # finish_reason "error": why


@dataclass
class RequestOutput:
    request_id: str
    prompt: Prompt
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (the first sample's)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def reasoning(self) -> str:
        return self.outputs[0].reasoning

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class _Request:
    params: SamplingParams
    seqs: dict[int, Sequence]  # by sample index (forks appear once the prompt is prefilled)
    unfinished: int


class Engine:
    def __init__(self, model_or_path: torch.nn.Module | str | Path, tokenizer: Any = None, *,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 4096, cache_blocks: int | None = None,
                 block_size: int = 16, device: str | torch.device | None = None, speculative: bool = False,
                 num_speculative_tokens: int = 1, cache_memory: int = 256 * 2**20,
                 dtype: str | torch.dtype | None = None, quantize: str | None = None,
                 max_memory_gb: float | None = None, compile: bool = False):
        """From a directory, `dtype` ("float32", "bfloat16"/"bf16", ...; default: the loader's choice),
        `quantize="int8"` / `"int4"` (weights quantised as the checkpoint is read, seekling/model/quant.py) and
        `max_memory_gb` (refuse weights that would not fit) apply to the load; the generation defaults of the
        checkpoint's generation_config.json end up in `generation_defaults` (for the server; `generate` does
        not apply them) and its eos ids all stop a sequence. A model object is prepared in place
        (`quantize` then frees its float weights). `compile=True` runs plain decode steps of up to
        `max_batch` sequences through torch.compile of the model's own `infer` (compiled here, ~1 minute the
        first time; torch caches the result on disk for later processes)."""
        if quantize not in (None, *QUANTIZE):
            raise ValueError(f"unknown quantize={quantize!r}: {', '.join(QUANTIZE)} (or None)")
        if quantize is not None and device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"quantize={quantize!r} runs seekling's CPU kernels; on a GPU run bf16 "
                             "(dtype='bfloat16')")
        if isinstance(model_or_path, (str, Path)):
            model = load_pretrained(model_or_path, device=device, dtype=dtype, max_memory_gb=max_memory_gb,
                                    quantize=quantize)
            if tokenizer is None:
                tokenizer = bundled_tokenizer(model_or_path)
                release_freed_memory()
        elif dtype is not None or max_memory_gb is not None:
            raise ValueError("dtype and max_memory_gb apply when the engine loads a directory; "
                             "convert a model object yourself")
        else:
            model = model_or_path
        if not isinstance(model, CausalLM):
            raise ValueError(f"the engine runs seekling's model families (seekling/model/families/: a Transformer "
                             f"or DenseModel), got {type(model).__name__}")
        self.device = torch.device(device) if device is not None else model.model.norm.weight.device
        if model.quantized is None:
            model.to(self.device)
        model.prepare(quantize)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.generation_defaults: dict[str, Any] = dict(model.generation_defaults)
        if speculative and num_speculative_tokens != 1:
            raise ValueError("num_speculative_tokens must be 1 (one MTP module drafts one token)")
        self.speculative = speculative
        self.max_model_len = model.config.max_position_embeddings
        kv_dtype = model.model.norm.weight.dtype  # the activations' dtype (int8 weights compute in fp32)
        layers, entry = model.num_cache_layers(speculative), model.cache_entry_shape()
        self.cache_bytes_per_token = layers * math.prod(entry) * kv_dtype.itemsize
        if cache_blocks is None:  # enough for every sequence at full length, within the memory budget
            want = max_num_seqs * -(-self.max_model_len // block_size)
            cache_blocks = max(1, min(want, cache_memory // (self.cache_bytes_per_token * block_size)))
        self.block_size = block_size
        # kv[layer, block, slot] = one token's entry: the MLA latent, or dense K/V per KV head (engine/cache.py)
        self.kv = torch.zeros(layers, cache_blocks, block_size, *entry, dtype=kv_dtype, device=self.device)
        self.blocks = BlockManager(cache_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        use_kernels(self.device)
        self.compiled = CompiledDecode(model, self.kv) if compile else None
        # Every eos id stops a sequence: the tokenizer's, the checkpoint's (generation_config.json may list
        # several, e.g. Llama-3's <|end_of_text|> and <|eot_id|>), the end-of-turn tokens of the family's chat
        # formats that the vocabulary has, and a token that opens the user's turn (detok.turn_start_ids).
        model_eos = list(model.eos_token_ids)
        eos = tokenizer.eos_token_id if tokenizer is not None else (model_eos or [model.config.eos_token_id])[0]
        turn_ends = [tokenizer.convert_tokens_to_ids(t) for t in family_of(model).stop_tokens] if tokenizer else []
        self.eos_token_id: int | None = eos
        self.eos_token_ids: set[int] = ({t for t in [eos, *model_eos, *turn_ends] if t is not None}
                                        | turn_start_ids(tokenizer))
        self.grammars = Grammars(tokenizer, model.config.vocab_size, sorted(self.eos_token_ids))  # constraints
        self._lock = threading.Lock()  # guards the inbox and the set of live request ids
        self._step_lock = threading.RLock()  # one step at a time
        self._inbox: list[tuple[str, Prompt, list[int], str, SamplingParams]] = []
        self._aborts: list[str] = []
        self._live: set[str] = set()
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.num_generated = 0
        self.num_drafted = 0
        self.num_accepted = 0

    # --- requests --------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> tuple[list[int], str]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            if tok is None:
                raise ValueError("a text prompt needs a tokenizer (pass token ids, or Engine(model, tok))")
            return tok.encode(prompt), prompt
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if tok is None:
                raise ValueError("a chat prompt needs a tokenizer")
            text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return tok.encode(text), text
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt), tok.decode(prompt) if tok is not None else ""
        raise ValueError("a prompt is a string, a list of chat messages ({'role', 'content'}) or a list of "
                         f"token ids; got {type(prompt).__name__}")

    def compile_constraint(self, constraint: StructuredOutputsParams, cancelled: Any = None) -> None:
        """Compile a request's constraint into the engine's cache (ValueError if it does not compile or is past
        the bounds of `grammars`). add_request does this itself; a server calls it first on a worker thread, since
        a new grammar can take seconds; `cancelled()` turning true stops a bounded compile (grammar.py)."""
        self.grammars.compile(constraint, cancelled)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_ids: list[int] | None = None) -> str:
        """Queue a request (thread-safe); returns its id. Bad input raises ValueError here, at once.
        `prompt_ids`: the tokens of a text prompt, when the caller has tokenized it already."""
        params = params if params is not None else SamplingParams()
        if prompt_ids is not None and isinstance(prompt, str):
            ids, text = list(prompt_ids), prompt
        else:
            ids, text = self._encode(prompt)
        V = self.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(t < 0 or t >= V for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        if any(t >= V for t in (*(params.stop_token_ids or ()), *(params.logit_bias or ()))):
            raise ValueError(f"stop_token_ids and logit_bias take token ids in [0, {V})")
        if params.stop_list and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.scheduler.max_num_seqs}")
        longest = len(ids) + (params.max_tokens or self.max_model_len)
        longest = min(longest, self.max_model_len) + (1 if self.speculative else 0)
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks:
            raise ValueError(f"the request needs up to {longest} cache slots but the cache holds "
                             f"{self.blocks.num_blocks * self.block_size}: it can never fit (lower "
                             "max_tokens or enlarge the cache)")
        if params.structured_outputs is not None:  # compiled here (cached), so a bad grammar is refused at once
            self.compile_constraint(params.structured_outputs)
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._live.add(request_id)
            self._inbox.append((request_id, prompt, ids, text, params))
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe); its sequences finish with finish_reason "abort" at the next step.
        Unknown or already finished ids are ignored (a request may finish while its abort is in flight)."""
        with self._lock:
            self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox) or self.scheduler.has_unfinished()

    def stats(self) -> dict[str, Any]:
        used = self.blocks.num_blocks - self.blocks.num_free
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "cache_blocks": self.blocks.num_blocks,
            "cache_blocks_used": used,
            "cache_usage": used / self.blocks.num_blocks,
            "block_size": self.block_size,
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.blocks.num_prefix_hits,
            "generated_tokens": self.num_generated,
            "spec_drafted": self.num_drafted,
            "spec_accepted": self.num_accepted,
            "spec_acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else None,
        }

    def _new_seq(self, request_id: str, index: int, ids: list[int], text: str,
                 params: SamplingParams, matcher: Matcher | None = None) -> Sequence:
        """A sample of a request; a constrained one gets `matcher` (a fork's copy of its parent's) or a new one."""
        if matcher is None and params.structured_outputs is not None:
            matcher = self.grammars.matcher(params.structured_outputs, params.stop_token_ids)
        gen = None
        if params.seed is not None:  # each sample its own stream: seed, seed + 1, ... (manual_seed's range)
            gen = torch.Generator(self.device).manual_seed((params.seed + index) % 2**64)
        tok = self.tokenizer
        text_out = tok is not None  # without a tokenizer only token ids come out
        return Sequence(
            seq_id=next(self._seq_ids), request_id=request_id, index=index, prompt_ids=ids, params=params,
            prompt_text=text, generator=gen, decoder=IncrementalDecoder(tok, ids) if text_out else None,
            stream=TextStream(params.stop_list, prompt_opens_think(text)) if text_out else None, matcher=matcher)

    # --- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, Delta]]:
        """One scheduler iteration; returns the (request_id, Delta) produced by it. A fault that belongs to one
        request (its admission, its rows of the batch, its tokens) ends that request with finish_reason "error"
        and the step goes on for the others."""
        with self._step_lock:
            with self._lock:  # moved under the lock, so has_unfinished() never misses a request
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                failed: list[tuple[str, Exception]] = []
                for request_id, _, ids, text, params in inbox:
                    self._requests[request_id] = _Request(params, {}, params.n)
                    try:
                        seq = self._new_seq(request_id, 0, ids, text, params)
                    except Exception as e:
                        failed.append((request_id, e))
                        continue
                    seq.num_forks = params.n - 1
                    self._requests[request_id].seqs[0] = seq
                    self.scheduler.add(seq)
            out: list[tuple[str, Delta]] = []
            for request_id, e in failed:
                out += self._end(request_id, "error", e)
            for request_id in aborts:
                out += self._end(request_id, "abort")
            batch = self.scheduler.schedule()
            if batch:
                # A trainer (GRPO rollouts) may hand us a model in training mode; MoE layers must not count
                # inference tokens as training load. Toggling walks every module (~ms), so only when needed:
                # calling model.eval() before sampling avoids the cost.
                training = self.model.training
                if training:
                    self.model.eval()
                try:
                    with torch.inference_mode():
                        out += self._run(batch)
                finally:
                    if training:
                        self.model.train()
            return out

    def _end(self, request_id: str, reason: str, error: BaseException | None = None) -> list[tuple[str, Delta]]:
        """Finish every unfinished sample of a request with `reason` ("abort", or "error" for a fault of its
        own); unknown or finished requests are ignored (a request may finish while its abort is in flight)."""
        req = self._requests.get(request_id)
        if req is None:
            return []
        message = None
        if error is not None:
            log.error("request %s failed alone: %r", request_id, error, exc_info=error)
            message = f"{type(error).__name__}: {error}"
        out = []
        for index in range(req.params.n):
            seq = req.seqs.get(index)
            if seq is not None and seq.finish_reason is not None:
                continue
            if seq is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
            out.append((request_id, Delta(index, "", "", [], reason, error=message)))
        self._close(request_id)
        return out

    def _close(self, request_id: str) -> None:
        del self._requests[request_id]
        with self._lock:
            self._live.discard(request_id)

    def _run(self, batch: list[tuple[Sequence, int]]) -> list[tuple[str, Delta]]:
        """Compute the batch (forward, masks, distributions, draws: nothing of a sequence changes), then let each
        sequence absorb its tokens. When the computation fails, each sequence is run alone, so that the one whose
        fault it is ends with an error and the others go on (the rerun writes the same cache entries again)."""
        try:
            computed = self._compute(batch)
        except Exception as e:
            if len(batch) == 1:
                return self._end(batch[0][0].request_id, "error", e)
            log.warning("a batch of %d sequences failed (%r): running each alone", len(batch), e)
            out: list[tuple[str, Delta]] = []
            for seq, n in batch:
                if seq.finish_reason is None:  # (a request of several samples may have failed already)
                    out += self._run([(seq, n)])
            return out
        return self._absorb(batch, *computed)

    def _compute(self, batch: list[tuple[Sequence, int]]) -> tuple:
        """The batch's forward (and cache writes), its sampled rows' masked logits, distributions and draws:
        (offsets of each sequence's fed tokens, hidden states, logits, probs or None, chosen tokens by row)."""
        items, offsets, off = [], [], 0
        for seq, n in batch:
            items.append((seq.pending()[:n], seq.num_cached, seq.block_table))
            offsets.append(off)
            off += n
        step = make_batch(items, self.block_size, self.device)
        step.cache = self.kv
        plain_decode = len(items) == off  # every sequence feeds one token
        if self.compiled is not None and plain_decode and len(items) <= self.compiled.max_batch:
            hidden, entries = self.compiled(step)
        else:
            hidden, entries = self.model.infer(step)
        self._write(entries, step.slots, 0)

        # Rows to sample from: the last fed token of a sequence that reached its end, or, when
        # verifying drafts, the last token and every draft (row j predicts output position j).
        rows: list[int] = []
        row_of: list[tuple[Sequence, int]] = []
        for (seq, n), o in zip(batch, offsets, strict=True):
            if seq.num_cached + n - len(seq.draft) < seq.num_tokens:
                continue  # a prefill chunk that does not reach the end yet
            first = o + n - 1 - len(seq.draft)
            for j in range(len(seq.draft) + 1):
                rows.append(first + j)
                row_of.append((seq, j))
        logits = self.model.logits(hidden[rows]) if rows else None
        if rows:
            self._constrain(logits, row_of)
        # Plain greedy rows (the common case in eval and benchmarks) need only the argmax of the raw (for
        # constrained rows, masked) logits: one op for the batch instead of the logits processor and the sampler.
        chosen: list[int] | dict[int, int] | None = None  # the token of each row not verifying drafts
        probs = None
        if rows and all(s.params.plain_greedy and not s.num_forks for s, _ in row_of):
            chosen = logits.argmax(-1).tolist()
        elif rows:
            probs = probs_from_logits(logits, [s.params for s, _ in row_of], [s.prompt_ids for s, _ in row_of],
                                      [s.output_ids + s.draft[:j] for s, j in row_of])
            # One batched draw for every sequence that is not verifying drafts.
            plain = [i for i, (s, _) in enumerate(row_of) if not s.draft]
            drawn = sample(probs[plain], [row_of[i][0].generator for i in plain]).tolist() if plain else []
            chosen = dict(zip(plain, drawn, strict=True))
        return offsets, hidden, logits, probs, chosen

    def _absorb(self, batch: list[tuple[Sequence, int]], offsets: list[int], hidden: torch.Tensor,
                logits: torch.Tensor | None, probs: torch.Tensor | None,
                chosen: list[int] | dict[int, int] | None) -> list[tuple[str, Delta]]:
        """Each sequence takes its tokens (verifying drafts, forking, stopping); a fault ends its request alone."""
        out: list[tuple[str, Delta]] = []
        mtp: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, first hidden row, count)
        r = 0
        for (seq, n), o in zip(batch, offsets, strict=True):
            start = seq.num_cached
            prefill = start + n - len(seq.draft) < seq.num_tokens  # a chunk that does not reach the end yet
            first, r = r, r if prefill else r + len(seq.draft) + 1
            if seq.finish_reason is not None:  # its request failed meanwhile (another of its samples)
                continue
            if prefill:
                seq.num_cached += n
                self._register(seq, seq.tokens)
                mtp.append((seq, start, o, n))
                continue
            try:
                out += self._take(seq, n, o, first, logits, probs, chosen, mtp)
            except Exception as e:
                out += self._end(seq.request_id, "error", e)
        mtp = [m for m in mtp if m[0].finish_reason is None]
        if self.speculative and mtp:
            try:
                self._draft(mtp, hidden)
            except Exception as e:  # drafts are only proposals: without them the step stays exact
                log.warning("MTP drafting failed (%r): this step drafts nothing", e)
                for seq, *_ in mtp:
                    seq.draft, seq.draft_probs = [], None
        return out

    def _take(self, seq: Sequence, n: int, o: int, r: int, logits: torch.Tensor, probs: torch.Tensor | None,
              chosen: list[int] | dict[int, int] | None, mtp: list) -> list[tuple[str, Delta]]:
        """One sequence's new tokens from rows r.. of the batch: verified drafts or its draw, plus its forks'."""
        start, k = seq.num_cached, len(seq.draft)
        if k:
            tokens = self._verify(seq, probs[r:r + k + 1] if probs is not None else None,
                                  chosen[r:r + k + 1] if probs is None else None)
        else:
            tokens = [chosen[r]]
        valid = n - k + len(tokens) - 1  # fed positions whose latent stays valid
        seq.num_cached = start + valid
        seq.draft, seq.draft_probs = [], None
        self._register(seq, seq.tokens + tokens)
        group = [(seq, tokens)]
        if seq.num_forks:
            group += self._fork(seq, probs[r:r + 1])
        out: list[tuple[str, Delta]] = []
        for s, toks in group:
            lp = None
            if s.params.logprobs is not None:
                lp = token_logprobs(logits[r:r + len(toks)], torch.tensor(toks), s.params.logprobs)
            out += self._append(s, toks, lp)
            if self.speculative and s.finish_reason is None:
                mtp.append((s, start, o, valid))
        return out

    def _constrain(self, logits: torch.Tensor, row_of: list[tuple[Sequence, int]]) -> None:
        """Mask, in place, the rows of constrained sequences to what their grammar allows: a sequence's row j
        (verifying drafts) to the state after its first j drafts. Nothing happens for unconstrained batches."""
        firsts = [i for i, (s, j) in enumerate(row_of) if j == 0 and s.matcher is not None]
        if not firsts:
            return
        bitmask, masked = self.grammars.bitmask(len(row_of)), []
        for i in firsts:
            seq = row_of[i][0]
            seq.matcher.fill(bitmask, i, seq.draft)
            masked.extend(range(i, i + len(seq.draft) + 1))
        self.grammars.apply(logits, bitmask, masked)

    def _write(self, entries: torch.Tensor, slots: torch.Tensor, first_layer: int) -> None:
        """Write a forward's new cache entries [layers, N, *entry] into their slots (index_copy_: several
        times cheaper than indexing with a tensor on a CPU)."""
        L = entries.shape[0]
        kv = self.kv[first_layer:first_layer + L]
        kv.view(L, -1, *kv.shape[3:]).index_copy_(1, slots, entries.to(kv.dtype))

    def _register(self, seq: Sequence, tokens: list[int]) -> None:
        """Remember the blocks the sequence filled completely (prefix caching), when there is a new one."""
        if seq.num_cached // self.block_size > len(seq.block_hashes):
            self.blocks.register(seq.block_table, seq.block_hashes, tokens, seq.num_cached)

    def _fork(self, parent: Sequence, probs: torch.Tensor) -> list[tuple[Sequence, list[int]]]:
        """Samples 1..n-1 of a request share the parent's prefilled prompt: share its full blocks, copy
        the rest, draw their own first token from the same distribution."""
        req = self._requests[parent.request_id]
        P = parent.num_cached
        # With MTP the last prompt position's MTP latent depends on the sampled token: keep it private.
        shared = P - 1 if self.speculative else P
        forked = []
        for index in range(1, parent.num_forks + 1):
            child = self._new_seq(parent.request_id, index, parent.prompt_ids, parent.prompt_text,
                                  parent.params, parent.matcher.copy() if parent.matcher is not None else None)
            req.seqs[index] = child
            table = self.blocks.fork(parent.block_table, P, shared, self.kv)
            if table is None:  # no room for its private blocks: recompute it later
                self.scheduler.waiting.appendleft(child)
                continue
            child.block_table, child.num_cached = table, P
            child.block_hashes = parent.block_hashes[:shared // self.block_size]
            self.scheduler.running.append(child)
            forked.append((child, [int(sample(probs, [child.generator])[0])]))
        parent.num_forks = 0
        return forked

    def _verify(self, seq: Sequence, p: torch.Tensor | None, target: list[int] | None) -> list[int]:
        """Speculative sampling (Leviathan et al. 2023): accept draft d with prob min(1, p(d)/q(d)); on
        rejection sample from norm(max(0, p - q)); if all are accepted add a bonus token from p.
        Greedy (p one-hot on the target's argmax) reduces to: accept while the draft is the argmax
        (`target`: the argmax of each row, when the caller has it)."""
        if seq.params.greedy:
            target = target if target is not None else p.argmax(-1).tolist()
            out = []
            for j, d in enumerate(seq.draft):
                self.num_drafted += 1
                if d != target[j]:
                    return out + [target[j]]
                out.append(d)
                self.num_accepted += 1
            return out + [target[len(seq.draft)]]
        out = []
        for j, d in enumerate(seq.draft):
            q = seq.draft_probs[j]
            self.num_drafted += 1
            if uniform(seq.generator) < min(1.0, float(p[j, d] / q[d])):
                out.append(d)
                self.num_accepted += 1
                continue
            residual = (p[j] - q).clamp(min=0)
            residual = residual / residual.sum() if residual.sum() > 0 else p[j]
            return out + [int(sample(residual[None], [seq.generator])[0])]
        return out + [int(sample(p[len(seq.draft)][None], [seq.generator])[0])]

    def _draft(self, mtp: list[tuple[Sequence, int, int, int]], hidden: torch.Tensor) -> None:
        """Run the MTP module over the positions just verified (it needs t_{i+1}, known now) and draft
        one token for every sequence that is decoding."""
        items, rows = [], []
        for seq, start, o, count in mtp:
            items.append((seq.tokens[start + 1:start + count + 1], start, seq.block_table))
            rows.extend(range(o, o + count))
        # Every position writes its MTP latent; only each sequence's last one drafts (last_only).
        step = make_batch(items, self.block_size, self.device, last_only=True)
        step.cache = self.kv
        h, entries = self.model.infer_mtp(step, hidden[rows])
        self._write(entries, step.slots, self.config.num_hidden_layers)
        drafting, last = [], []
        for i, (seq, start, _, count) in enumerate(mtp):
            remaining = (seq.params.max_tokens or self.max_model_len) - len(seq.output_ids)
            if start + count == seq.num_tokens - 1 and remaining > 1 and seq.num_tokens < self.max_model_len:
                drafting.append(seq)
                last.append(i)
        if not drafting:
            return
        logits = self.model.logits(h[last])
        self._constrain(logits, [(s, 0) for s in drafting])  # a draft the grammar forbids would be wasted
        if all(s.params.plain_greedy for s in drafting):  # the draft is the MTP head's argmax
            for seq, d in zip(drafting, logits.argmax(-1).tolist(), strict=True):
                seq.draft = [d]
            return
        q = probs_from_logits(logits, [s.params for s in drafting], [s.prompt_ids for s in drafting],
                              [s.output_ids for s in drafting])
        for i, seq in enumerate(drafting):
            seq.draft = [int(sample(q[i:i + 1], [seq.generator])[0])]
            seq.draft_probs = q[i:i + 1]

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[dict[int, float]] | None,
                ) -> list[tuple[str, Delta]]:
        """Append sampled tokens one by one until a stop condition; returns the sequence's delta."""
        p = seq.params
        new, text, reasoning = [], "", ""
        for t in tokens:
            seq.output_ids.append(t)
            new.append(t)
            self.num_generated += 1
            # A completed constraint (its stop token accepted) ends the sequence even with ignore_eos.
            completed = seq.matcher is not None and seq.matcher.accept(t)
            stop_token = completed or (t in self.eos_token_ids and not p.ignore_eos) or t in (p.stop_token_ids or ())
            reason = "stop" if stop_token else None
            if reason is None and (len(seq.output_ids) >= (p.max_tokens or self.max_model_len)
                                   or seq.num_tokens >= self.max_model_len):
                reason = "length"
            if seq.stream is not None:
                piece = "" if stop_token else seq.decoder.add(t)
                if reason is not None:
                    piece += seq.decoder.flush()
                rs, tx = seq.stream.push(piece, final=reason is not None)
                reasoning, text = reasoning + rs, text + tx
                if seq.stream.stopped:
                    reason = "stop"
            if reason is not None:
                seq.finish_reason = reason
                break
        lp = logprobs[:len(new)] if logprobs is not None else None
        if lp is not None:
            seq.logprobs.extend(lp)
        out = [(seq.request_id, Delta(seq.index, text, reasoning, new, seq.finish_reason, lp,
                                      seq.num_cached_prompt or 0))]
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            req = self._requests[seq.request_id]
            req.unfinished -= 1
            if req.unfinished == 0:
                self._close(seq.request_id)
        return out

    # --- convenience drivers -------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run the prompts to completion (batched); one RequestOutput per prompt, in order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], (dict, int)))
        if single:  # one prompt, not a list of them
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params_list, strict=True):
            p = p if p is not None else SamplingParams()
            rid = self.add_request(prompt, p)
            ids, _ = self._encode(prompt)
            results[rid] = RequestOutput(rid, prompt, ids, [CompletionOutput(i) for i in range(p.n)])
            order.append(rid)
        pending = set(order)
        while pending:
            for rid, d in self.step():
                if rid not in results:
                    continue
                o = results[rid].outputs[d.index]
                o.text += d.text
                o.reasoning += d.reasoning
                o.token_ids += d.token_ids
                if d.index == 0:
                    results[rid].num_cached_tokens = d.num_cached_tokens
                if d.logprobs is not None:
                    o.logprobs = (o.logprobs or []) + d.logprobs
                if d.finish_reason is not None:
                    o.finish_reason, o.error = d.finish_reason, d.error
                    if results[rid].finished:
                        pending.discard(rid)
        return [results[rid] for rid in order]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield the deltas of one request as they come; closing the iterator aborts the request."""
        params = params if params is not None else SamplingParams()
        rid = self.add_request(prompt, params)
        left = params.n
        try:
            while left:
                for r, d in self.step():
                    if r == rid:
                        left -= d.finish_reason is not None
                        yield d
        finally:
            if left:
                self.abort(rid)
                self.step()
