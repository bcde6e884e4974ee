"""Single-sequence decode as one compiled graph: `Engine(compile=True)`.

One sequence decoding one token at a time (a chat, `seekling sample`, a lone API client) is bound by
per-operator overhead: the runner's ~250 small ATen ops cost more than reading the weights. This module
writes that step (all main layers, latent-cache write and read, routing, final norm) as a single
traceable function of flat tensors and hands it to torch.compile: inductor fuses the element-wise ops
and norms into a few C++ kernels, and its C++ wrapper calls them and the matmuls with no Python in
between. The arithmetic is the runner's (same prepared, folded weights), so the outputs match it to
float rounding; tests compare the two.

What the trace needs: the weights are arguments (a flat list per layer), never attributes, so an
optimizer step that rebuilds them (RL) reuses the compiled code instead of recompiling; the routed
experts are selected by index from the stacked weights (a view, thanks to captured scalar outputs),
so no expert's weights are copied; RoPE is the real-valued rotation (inductor has no complex kernels);
the block table is padded to at least two blocks so its length can stay a symbolic size (0/1 are always
specialised). Everything else (batches, prefill, speculative verification, the MTP module) stays on the
eager runner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seekling.engine.runner import FFNWeights, Norm, Runner


def _norm(x: torch.Tensor, w: Norm) -> torch.Tensor:
    y = x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), w.c)
    return y if w.folded else y * w.scaled


def _swiglu(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    g, u = F.linear(x, w13).chunk(2, dim=-1)
    return F.silu(g) * u


class CompiledDecode:
    def __init__(self, runner: Runner):
        self.runner = runner
        cfg = runner.config
        self.H, self.r, self.dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.n_layers = cfg.num_hidden_layers  # the main layers (runner.layers ends with the MTP module's)
        self.cos, self.sin = runner.rope.real.contiguous(), runner.rope.imag.contiguous()
        self._fn = torch.compile(self._decode, fullgraph=True, dynamic=False,
                                 options={"cpp_wrapper": True})

    @staticmethod
    def supports(runner: Runner) -> bool:
        """Group-limited routing and non-fp32 weights stay on the eager runner."""
        moe = runner.model.moe_layers()
        return (all(m.gate.n_group == 1 for m in moe)
                and runner.kv.dtype == torch.float32 and runner.model.lm_head.weight.dtype == torch.float32)

    def step(self, token: int, position: int, block_table: list[int]) -> torch.Tensor:
        """Feed one sequence's one new token at `position`; -> its final normed hidden state [1, h]."""
        runner = self.runner
        runner.prepare()
        slot = block_table[position // runner.block_size] * runner.block_size + position % runner.block_size
        # At least two blocks, so the table length stays a symbolic size (sizes 0 and 1 are specialised).
        dev = runner.kv.device
        table = torch.tensor(block_table if len(block_table) > 1 else block_table + [0], device=dev)
        torch._dynamo.maybe_mark_dynamic(table, 0)
        kv = runner.kv[:self.n_layers]
        ids, pos = torch.tensor([token], device=dev), torch.tensor([position], device=dev)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            h, latents = self._fn(ids, pos, table, kv, self.cos, self.sin, runner.model.model.embed_tokens.weight,
                                  runner.layers[:self.n_layers], runner.final_norm)
        # The cache is written here, not in the graph: a graph that mutates its input is functionalised
        # into a copy of the whole cache every step.
        kv.view(self.n_layers, -1, kv.shape[-1]).index_copy_(1, torch.tensor([slot], device=dev), latents)
        return h

    def _attention(self, w, x, cos, sin, pos, table, kv):
        """Attention of the one new token over its cached latents (read, not written) and its own."""
        H, r, dr = self.H, self.r, self.dr
        y = F.linear(x, w.w_x)
        if w.w_q is None:
            pe, q_lat, c_kv = y.split(w.split, dim=-1)[:3]
        else:
            k_pe, q_a, c_kv = y.split(w.split, dim=-1)[:3]
            q_pe, q_lat = F.linear(_norm(q_a, w.q_norm), w.w_q).split([H * dr, H * r], dim=-1)
            pe = torch.cat([q_pe, k_pe], dim=-1)
        # RoPE on interleaved pairs (a, b): (a cos - b sin, a sin + b cos); heads first, shared key last.
        pe = pe.reshape(1, H + 1, dr // 2, 2)
        a, b = pe[..., 0], pe[..., 1]
        pe = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).view(1, H + 1, dr)
        latent = torch.cat([_norm(c_kv, w.kv_norm), pe[:, H]], dim=-1)  # [1, r + dr]
        q = torch.cat([q_lat.view(1, H, r), pe[:, :H]], dim=-1)  # [1, H, r + dr]
        cached = kv.index_select(0, table).view(-1, r + dr)
        keys = torch.cat([cached, latent]).unsqueeze(0)  # [1, L + 1, r + dr]: the new token's key last
        hidden = torch.arange(cached.shape[0] + 1, device=x.device) >= pos  # the cache from pos on is stale
        hidden[-1] = False
        bias = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill(hidden, float("-inf"))
        scores = torch.baddbmm(bias.view(1, 1, -1), q, keys.transpose(1, 2), alpha=w.scale)
        o = torch.bmm(scores.softmax(-1), keys[..., :r]).view(1, H * r)
        return F.linear(o, w.w_out), latent

    def _moe(self, w: FFNWeights, x: torch.Tensor) -> torch.Tensor:
        gate = w.moe.gate
        weights, indices = gate.route(F.linear(x, w.gate).sigmoid())
        out = F.linear(_swiglu(x, w.w13), w.w2)
        for j in range(gate.top_k):
            e = indices[0, j].item()
            out = out + weights[0, j] * F.linear(_swiglu(x, w.experts13_all[e]), w.experts2_all[e])
        return out

    def _decode(self, ids, pos, table, kv, cos, sin, embed, layers, final_norm):
        """-> the final normed hidden state [1, h] and each layer's new latent [layers, 1, r + dr]."""
        x = F.embedding(ids, embed)
        cos, sin = cos[pos].view(1, 1, -1), sin[pos].view(1, 1, -1)
        latents = []
        for i, w in enumerate(layers):
            a, latent = self._attention(w.attn, _norm(x, w.input_norm), cos, sin, pos, table, kv[i])
            latents.append(latent)
            x = x + a
            h = _norm(x, w.post_norm)
            x = x + (self._moe(w.ffn, h) if w.ffn.moe is not None else F.linear(_swiglu(h, w.ffn.w13), w.ffn.w2))
        return _norm(x, final_norm), torch.stack(latents)
