"""Plain decode steps as one compiled graph: `Engine(compile=True)`.

A decode step of a few sequences (a chat, `seekling sample`, a handful of API clients) is bound by
per-operator overhead: the runner's ~250 small ATen ops cost more than reading the weights. This module
writes that step (all main layers, the latent-cache read, routing, the final norm) as one traceable
function of tensors and hands it to torch.compile: inductor fuses the element-wise ops and norms into
a few C++ kernels, and its C++ wrapper calls them and the matmuls with no Python in between. The
arithmetic is the runner's (the same prepared, folded weights), so the outputs match it to float
rounding; tests compare the two.

What the trace needs:
- the weights are arguments, never attributes, so an optimizer step that rebuilds them (RL) reuses the
  compiled code instead of recompiling;
- the graph reads the cache and returns the new latents; the caller writes them (a graph that mutates
  its input is functionalised into a copy of the whole cache every step);
- RoPE is the real-valued rotation (inductor has no complex kernels);
- the MoE cannot dispatch tokens to experts inside a graph (data-dependent shapes). One token takes its
  k experts by index (views of the stacked weights, via captured scalar outputs); a batch runs every
  expert on every token, weighted by the gate (zero for experts not chosen): E/k times the routed
  FLOPs, a win only while the batch is small, hence `max_batch`;
- the block table is padded to at least two blocks, so its length stays a symbolic size (sizes 0 and
  1 are always specialised). Two graphs in all: batch 1, and any batch from 2 to max_batch.
Prefill, larger batches, speculative verification and the MTP module stay on the eager runner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seekling.engine.runner import FFNWeights, Runner, norm_fp32, swiglu
from seekling.model.moe import route


class CompiledDecode:
    def __init__(self, runner: Runner):
        self.runner = runner
        cfg = runner.config
        self.H, self.r, self.dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.n_layers = cfg.num_hidden_layers  # the main layers (runner.layers ends with the MTP module's)
        self.routing = (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                        cfg.routed_scaling_factor)
        self.cos, self.sin = runner.rope.real.contiguous(), runner.rope.imag.contiguous()
        # Dense experts cost B x E/k the routed FLOPs: measured on the speedrun model, the graph beats the
        # eager runner by 1.6x at batch 1, 1.15-1.25x at 2-16 and ties at 32 (docs/benchmarks.md).
        self.max_batch = 16
        self._fn = torch.compile(self._decode, fullgraph=True, dynamic=False,
                                 options={"cpp_wrapper": True})

    @staticmethod
    def supports(runner: Runner) -> bool:
        """fp32 only: the other dtypes' norms take the runner's F.rms_norm path, which is not written here."""
        return runner.kv.dtype == torch.float32 and runner.model.lm_head.weight.dtype == torch.float32

    def warm_up(self) -> None:
        """Compile both graphs now (batch 1 and batch >= 2) rather than stall the first requests. The cache is
        free at this point: the latents written to block 0 are overwritten before anything reads them."""
        with torch.inference_mode():
            self.step([(0, 0, [0])], mark_dynamic=True)
            self.step([(0, 0, [0]), (0, 1, [0])], mark_dynamic=True)

    def step(self, items: list[tuple[int, int, list[int]]], mark_dynamic: bool = False) -> torch.Tensor:
        """Feed each sequence's one new token: items are (token, its position, block table);
        -> the final normed hidden states [B, h]. `mark_dynamic` (warm_up) compiles with symbolic sizes for
        the batch (beyond 1), the block table's length and the cache's block count: later steps of any such
        size reuse those graphs (marking costs ~10 us a tensor, so it is done once)."""
        runner, bs = self.runner, self.runner.block_size
        runner.prepare()
        dev = runner.kv.device
        width = max(2, max(len(t) for _, _, t in items))  # >= 2: the table length stays a symbolic size
        table = torch.tensor([t + [0] * (width - len(t)) for _, _, t in items], device=dev)
        ids = torch.tensor([tok for tok, _, _ in items], device=dev)
        pos = torch.tensor([p for _, p, _ in items], device=dev)
        slots = torch.tensor([t[p // bs] * bs + p % bs for _, p, t in items], device=dev)
        kv = runner.kv[:self.n_layers]
        if mark_dynamic:
            for x, dim in [(table, 1), (kv, 1)] + ([(table, 0), (ids, 0), (pos, 0)] if len(items) > 1 else []):
                torch._dynamo.maybe_mark_dynamic(x, dim)
        # .item() inside the graph, and room for more than dynamo's default 8 graphs of this function (one
        # per model config) in processes that build many engines (tests, sweeps). Set for this call only.
        config = torch._dynamo.config
        saved = config.capture_scalar_outputs, config.recompile_limit
        config.capture_scalar_outputs, config.recompile_limit = True, max(64, saved[1])
        try:
            h, latents = self._fn(ids, pos, table, kv, self.cos, self.sin, runner.model.model.embed_tokens.weight,
                                  runner.layers[:self.n_layers], runner.final_norm)
        finally:
            config.capture_scalar_outputs, config.recompile_limit = saved
        # The cache is written here, not in the graph: a graph that mutates its input is functionalised
        # into a copy of the whole cache every step.
        kv.view(self.n_layers, -1, kv.shape[-1]).index_copy_(1, slots, latents)
        return h

    def _attention(self, w, x, cos, sin, pos, table, kv):
        """Attention of each sequence's new token over its cached latents (read, not written) and its own;
        -> the output [B, h] and the new latents [B, r + dr]."""
        H, r, dr, B = self.H, self.r, self.dr, x.shape[0]
        y = F.linear(x, w.w_x)
        if w.w_q is None:
            pe, q_lat, c_kv = y.split(w.split, dim=-1)[:3]
        else:
            k_pe, q_a, c_kv = y.split(w.split, dim=-1)[:3]
            q_pe, q_lat = F.linear(norm_fp32(q_a, w.q_norm), w.w_q).split([H * dr, H * r], dim=-1)
            pe = torch.cat([q_pe, k_pe], dim=-1)
        # RoPE on interleaved pairs (a, b): (a cos - b sin, a sin + b cos); heads first, shared key last.
        pe = pe.reshape(B, H + 1, dr // 2, 2)
        a, b = pe[..., 0], pe[..., 1]
        pe = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).view(B, H + 1, dr)
        latent = torch.cat([norm_fp32(c_kv, w.kv_norm), pe[:, H]], dim=-1)  # [B, r + dr]
        q = torch.cat([q_lat.view(B, H, r), pe[:, :H]], dim=-1)  # [B, H, r + dr]
        cached = kv.index_select(0, table.view(-1)).view(B, -1, r + dr)
        keys = torch.cat([cached, latent.unsqueeze(1)], dim=1)  # [B, L + 1, r + dr]: the new token's key last
        L = cached.shape[1]
        # Cached positions from the new token's on are stale (or another sequence's padding): masked.
        hidden = (torch.arange(L + 1, device=x.device) >= pos[:, None]) & (torch.arange(L + 1, device=x.device) < L)
        bias = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill(hidden, float("-inf"))
        scores = torch.baddbmm(bias.unsqueeze(1), q, keys.transpose(1, 2), alpha=w.scale)  # [B, H, L + 1]
        o = torch.bmm(scores.softmax(-1), keys[..., :r]).view(B, H * r)
        return F.linear(o, w.w_out), latent

    def _moe(self, w: FFNWeights, x: torch.Tensor) -> torch.Tensor:
        # Routing reads the live balancing bias and this model's settings, never the module (a graph that
        # touched the module would be guarded on its identity: every new model would recompile).
        weights, indices = route(F.linear(x, w.gate).sigmoid(), w.route_bias, *self.routing)
        out = F.linear(swiglu(x, w.w13), w.w2)
        if x.shape[0] == 1:  # one token: its k experts, selected by index (views, no weights copied)
            for j in range(self.routing[0]):
                e = indices[0, j].item()
                out = out + weights[0, j] * F.linear(swiglu(x, w.experts13_all[e]), w.experts2_all[e])
            return out
        # A batch: every expert on every token, weighted by the gate (0 for the experts not chosen). k/E of
        # this compute is needed, but it is two matmuls instead of a data-dependent dispatch, which a graph
        # cannot hold; Engine(compile=True) takes this path up to CompiledDecode.max_batch sequences.
        E, two_i, h = w.experts13_all.shape
        act = F.linear(x, w.experts13_all.view(E * two_i, h)).view(-1, E, 2, two_i // 2)
        gates = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device).scatter(1, indices, weights.to(x.dtype))
        act = F.silu(act[:, :, 0]) * act[:, :, 1] * gates.unsqueeze(-1)  # [B, E, I]
        return out + F.linear(act.flatten(1), w.experts2_cat)

    def _decode(self, ids, pos, table, kv, cos, sin, embed, layers, final_norm):
        """-> the final normed hidden states [B, h] and each layer's new latents [layers, B, r + dr]."""
        x = F.embedding(ids, embed)
        cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # [B, 1, dr / 2]
        latents = []
        for i, w in enumerate(layers):
            a, latent = self._attention(w.attn, norm_fp32(x, w.input_norm), cos, sin, pos, table, kv[i])
            latents.append(latent)
            x = x + a
            h = norm_fp32(x, w.post_norm)
            routed = w.ffn.experts13_all is not None
            x = x + (self._moe(w.ffn, h) if routed else F.linear(swiglu(h, w.ffn.w13), w.ffn.w2))
        return norm_fp32(x, final_norm), torch.stack(latents)
