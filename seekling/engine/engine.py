"""The inference engine: requests in, text deltas out.

    engine = Engine("runs/speedrun/rl")                 # or Engine(model, tokenizer)
    outs = engine.generate(["What is 2 + 3?"], SamplingParams(temperature=0))
    for delta in engine.stream(prompt, params): ...

The engine keeps the inbox (requests and aborts from any thread) and the drivers; each `step()` is the loop of
vLLM's engine core: the scheduler plans (seekling/engine/scheduler.py: continuous batching over the paged block
cache, `schedule()` -> a SchedulerOutput), the model step computes (seekling/engine/step.py: batch, forward,
sample, verify, draft; the C++ forward of seekling/model/native.cpp where it runs, k decode steps per call when
every sequence is decoding), and the scheduler absorbs the results (`update_from_output`: tokens, stops,
finishes, forks) into text deltas. Every model family offers the same interface (`prepare`, `infer`, `logits`,
`cache_entry_shape`, `num_cache_layers`, `eos_token_ids`); the engine knows nothing of their layers. Servers call
`add_request` / `abort` from their threads and `step()` from one loop; `generate` and `stream` drive `step()`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from seekling.engine.cache import BlockManager, allocate
from seekling.engine.detok import turn_start_ids
from seekling.engine.grammar import Grammars
from seekling.engine.request import (
    CompletionOutput,
    Delta,
    Prompt,
    RequestOutput,
    check_request,
    encode_prompt,
    load_model,
)
from seekling.engine.sampling import SamplingParams, StructuredOutputsParams
from seekling.engine.scheduler import Scheduler, Sequence, describe
from seekling.engine.step import ModelStep
from seekling.model.families import family_of
from seekling.model.quant import use_kernels

__all__ = ["CompletionOutput", "Delta", "Engine", "Prompt", "RequestOutput"]


class Engine:
    def __init__(self, model_or_path: torch.nn.Module | str | Path, tokenizer: Any = None, *,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 4096, cache_blocks: int | None = None,
                 block_size: int = 16, device: str | torch.device | None = None, speculative: bool = False,
                 num_speculative_tokens: int = 1, cache_memory: int = 256 * 2**20,
                 dtype: str | torch.dtype | None = None, quantize: str | None = None,
                 max_memory_gb: float | None = None, compile: bool = False, native: bool | None = None,
                 num_scheduler_steps: int = 16):
        """From a directory, `dtype`, `quantize="int8"` / `"int4"` and `max_memory_gb` (refuse weights that would
        not fit) apply to the load; the checkpoint's generation_config.json defaults end up in
        `generation_defaults` (for the server; `generate` does not apply them) and its eos ids all stop a
        sequence. A model object is prepared in place (`quantize` then frees its float weights).
        The step runs the C++ forward (seekling/model/native.cpp) wherever it can (`native=None`; True: insist,
        False: never), `num_scheduler_steps` decode steps per call when every sequence is decoding; elsewhere
        the model's Python forward, torch.compile'd for plain decode steps with `compile=True` (~1 minute the
        first time, cached on disk)."""
        model, tokenizer = load_model(model_or_path, tokenizer, device, dtype, quantize, max_memory_gb)
        self.device = torch.device(device) if device is not None else model.model.norm.weight.device
        if model.quantized is None:
            model.to(self.device)
        model.prepare(quantize)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.generation_defaults: dict[str, Any] = dict(model.generation_defaults)
        model.num_cache_layers(speculative)  # a model without an MTP module says why it cannot draft
        if speculative and num_speculative_tokens != 1:
            raise ValueError("num_speculative_tokens must be 1 (one MTP module drafts one token)")
        self.speculative, self.block_size = speculative, block_size
        self.max_model_len = model.config.max_position_embeddings
        self.kv = allocate(model, speculative, max_num_seqs, block_size, cache_blocks, cache_memory, self.device)
        self.cache_bytes_per_token = self.kv[:, 0, 0].numel() * self.kv.element_size()
        self.blocks = BlockManager(self.kv.shape[1], block_size)
        self.scheduler = Scheduler(self.blocks, self.kv, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                                   speculative)
        use_kernels(self.device)
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
        self.step_module = ModelStep(model, self.kv, self.grammars, self.max_model_len, speculative=speculative,
                                     compile=compile, native=native, num_scheduler_steps=num_scheduler_steps)
        self._lock = threading.Lock()  # guards the inbox and the set of live request ids
        self._step_lock = threading.RLock()  # one step at a time
        self._inbox: list[tuple[str, list[int], bool, SamplingParams]] = []
        self._aborts: list[str] = []
        self._live: set[str] = set()

    # --- requests --------------------------------------------------------------------------------------------
    def compile_constraint(self, constraint: StructuredOutputsParams, cancelled: Any = None) -> None:
        """Compile a request's constraint into the engine's cache (ValueError if it does not compile or is past
        the bounds of `grammars`). add_request does this itself; a server calls it first on a worker thread, since
        a new grammar can take seconds; `cancelled()` turning true stops a bounded compile (grammar.py)."""
        self.grammars.compile(constraint, cancelled)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    prompt_ids: list[int] | None = None) -> str:
        """Queue a request (thread-safe); returns its id. Bad input raises ValueError here, at once. A prompt of
        token ids is used as it is; `prompt_ids`: the tokens of a text prompt the caller has tokenised already
        (a server renders and tokenises a chat once)."""
        return self._queue(prompt, params if params is not None else SamplingParams(), request_id, prompt_ids)[0]

    def _queue(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
               prompt_ids: list[int] | None = None) -> tuple[str, list[int]]:
        ids, opens_think = encode_prompt(prompt, self.tokenizer, prompt_ids)
        check_request(ids, params, vocab_size=self.config.vocab_size, max_model_len=self.max_model_len,
                      max_num_seqs=self.scheduler.max_num_seqs, has_tokenizer=self.tokenizer is not None,
                      cache_slots=self.blocks.num_blocks * self.block_size, extra_slots=int(self.speculative))
        if params.structured_outputs is not None:  # compiled here (cached), so a bad grammar is refused at once
            self.compile_constraint(params.structured_outputs)
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._live.add(request_id)
            self._inbox.append((request_id, ids, opens_think, params))
        return request_id, ids

    def _sequence(self, request_id: str, ids: list[int], opens_think: bool, params: SamplingParams) -> Sequence:
        """A request's first sample (the others fork from it once its prompt is in the cache)."""
        matcher = None
        if params.structured_outputs is not None:
            matcher = self.grammars.matcher(params.structured_outputs, params.stop_token_ids)
        stops = frozenset((set() if params.ignore_eos else self.eos_token_ids) | set(params.stop_token_ids or ()))
        return Sequence(request_id, 0, ids, params, stops, opens_think, self.tokenizer, matcher)

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe); its sequences finish with finish_reason "abort" at the next step.
        Unknown or already finished ids are ignored (a request may finish while its abort is in flight)."""
        with self._lock:
            self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox) or self.scheduler.has_unfinished()

    def stats(self) -> dict[str, Any]:
        used, s, m, b = self.blocks.num_blocks - self.blocks.num_free, self.scheduler, self.step_module, self.blocks
        return {"running": len(s.running), "waiting": len(s.waiting) + len(self._inbox), "cache_blocks": b.num_blocks,
                "cache_blocks_used": used, "cache_usage": used / b.num_blocks, "block_size": self.block_size,
                "cache_bytes_per_token": self.cache_bytes_per_token, "num_preemptions": s.num_preemptions,
                "prefix_cache_hit_tokens": b.num_prefix_hits, "generated_tokens": s.num_generated,
                "spec_drafted": m.num_drafted, "spec_accepted": m.num_accepted, "native": m.native,
                "spec_acceptance_rate": m.num_accepted / m.num_drafted if m.num_drafted else None}

    # --- the loop --------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, Delta]]:
        """One scheduler iteration (one model call: one step, or k decode steps); returns its (request_id, Delta)s.
        A fault that belongs to one request (its admission, its part of the step, its tokens) ends that request
        with finish_reason "error"; the step goes on for the others."""
        with self._step_lock:
            out: list[tuple[str, Delta]] = []
            with self._lock:  # moved under the lock, so has_unfinished() never misses a request
                for request_id, ids, opens_think, params in self._inbox:
                    try:
                        self.scheduler.add(self._sequence(request_id, ids, opens_think, params))
                    except Exception as e:
                        self._live.discard(request_id)
                        out += [(request_id, Delta(i, "", "", [], "error", error=describe(e)))
                                for i in range(params.n)]
                self._inbox = []
                aborts, self._aborts = self._aborts, []
            out += [d for request_id in aborts for d in self.scheduler.end(request_id, "abort")]
            m = self.step_module
            plan = self.scheduler.schedule(m.num_steps, m.lookahead, m.multi_step)
            if plan.batch:
                # A trainer (GRPO rollouts) may hand us a model in training mode; MoE layers must not count
                # inference tokens as training load. Toggling walks every module (~ms), so only when needed.
                training = self.model.training
                if training:
                    self.model.eval()
                try:
                    out += self.scheduler.update_from_output(plan, m.execute(plan))
                finally:
                    if training:
                        self.model.train()
            closed = {rid for rid, d in out if d.finish_reason is not None and rid not in self.scheduler.requests}
            if closed:
                with self._lock:
                    self._live -= closed
            return out

    # --- convenience drivers ---------------------------------------------------------------------------------
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
        for prompt, p in zip(prompts, params_list, strict=True):
            p = p if p is not None else SamplingParams()
            rid, ids = self._queue(prompt, p, None)
            results[rid] = RequestOutput(rid, prompt, ids, [CompletionOutput(i) for i in range(p.n)])
        pending = set(results)
        while pending:
            for rid, d in self.step():
                if rid not in results:
                    continue
                results[rid].outputs[d.index].absorb(d)
                if d.index == 0:
                    results[rid].num_cached_tokens = d.num_cached_tokens
                if d.finish_reason is not None and results[rid].finished:
                    pending.discard(rid)
        return list(results.values())

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
