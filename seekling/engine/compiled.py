"""`Engine(compile=True)`: plain decode steps through torch.compile of the model's own `infer`.

A decode step of a few sequences (a chat, `seekling sample`, a handful of API clients) on a small model is
bound by per-operator overhead: each of the forward's few hundred small ops costs a few microseconds of
Python and dispatch. Inductor fuses the element-wise ops and norms into a few C++ kernels, and its C++
wrapper calls them and the matmuls with no Python in between. It compiles the same `infer` the eager steps
run (no second copy of the maths), so the outputs match the eager forward to float rounding (tested).

Two graphs per model: batch 1, and any batch from 2 to `max_batch` (the batch size, the block-table width
and the cache's block count are marked dynamic once, at warm-up, so longer conversations and more
sequences reuse them). `infer` only reads the cache and returns the new entries, which the engine writes:
a graph that mutated its cache input would be functionalised into a copy of the whole cache every step.
Prefill, speculative verification, the MTP module and batches above `max_batch` stay eager: in a graph the
MoE runs every expert on every token of a batch (a data-dependent dispatch cannot be captured), E/k the
routed FLOPs, which pays only while the batch is small.
"""

from __future__ import annotations

import torch

from seekling.model.layers import Batch, CausalLM, make_batch


class CompiledDecode:
    max_batch = 16

    def __init__(self, model: CausalLM, kv: torch.Tensor):
        self.kv = kv
        self._fn = torch.compile(model.infer, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
        try:
            self._warm_up(kv.device)
        except Exception as e:  # inductor needs a working C++ toolchain; say what to do instead
            raise RuntimeError(f"compile=True: compiling the decode step failed ({type(e).__name__}: {e}); "
                               "torch.compile needs a C++ compiler on the CPU; run with compile=False "
                               "(no --compile)") from e

    def _warm_up(self, device: torch.device) -> None:
        """Compile both graphs now (batch 1, batch >= 2) rather than stall the first requests, with symbolic
        sizes for the batch, the block table's width and the cache's block count (marking costs ~10 us a
        tensor, so it is done here, once). A warm-up step writes nothing: `infer` only reads the cache."""
        with torch.inference_mode():
            for items in ([(0, 0, [0, 0])], [(0, 0, [0, 0]), (0, 1, [0, 0])]):
                batch = make_batch([([t], p, table) for t, p, table in items], self.kv.shape[2], device)
                batch.cache = self.kv
                marks = [(batch.block_tables, 1), (batch.bias, 4), (batch.cache, 1)]
                if len(items) > 1:
                    marks += [(batch.input_ids, 0), (batch.positions, 0), (batch.slots, 0), (batch.block_tables, 0),
                              (batch.bias, 0)]
                for x, dim in marks:
                    torch._dynamo.maybe_mark_dynamic(x, dim)
                self(batch)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`infer` of a plain decode batch (every sequence feeds one token). Block tables shorter than two
        blocks are padded to two: sizes 0 and 1 are always specialised, which would add graphs."""
        if batch.block_tables.shape[1] < 2:
            pad = 2 - batch.block_tables.shape[1]
            bs = self.kv.shape[2]
            batch.block_tables = torch.nn.functional.pad(batch.block_tables, (0, pad))
            cached, new = batch.bias[..., :-1], batch.bias[..., -1:]
            batch.bias = torch.cat([cached, cached.new_full((*cached.shape[:-1], pad * bs), float("-inf")), new], -1)
        # .item() inside the graph (the MoE's experts of one token), and room for more than dynamo's default
        # 8 graphs of this code (one per model instance) in processes that build many engines (tests, sweeps).
        # Set for this call only.
        config = torch._dynamo.config
        saved = config.capture_scalar_outputs, config.recompile_limit
        config.capture_scalar_outputs, config.recompile_limit = True, max(64, saved[1])
        try:
            return self._fn(batch)
        finally:
            config.capture_scalar_outputs, config.recompile_limit = saved
