"""The model forward on the latent cache: one packed "extend" pass for a batch of sequences.

Linear layers, norms and the MoE run on the packed tokens [N, h] (no padding); only attention
regroups queries per sequence. Attention is MLA's absorbed form (DeepSeek-V3 inference/model.py,
attn_impl="absorb"): with kv_b_proj's weight split per head into W_UK (keys) and W_UV (values),
    q_nope · k_nope = q_nope · (W_UK c_KV) = (W_UK^T q_nope) · c_KV
    o = Σ p · (W_UV c_KV) = W_UV (Σ p · c_KV)
so queries move into the latent space and attention reads the cached [c_KV | k_pe] directly:
one shared "key head" of kv_lora_rank + qk_rope_head_dim, never expanded per head. The same pass
serves prefill (many new tokens), decode (one) and speculative verification (last + drafts).

At the sizes we run on a CPU a decode step is bound by per-operator overhead (Python + ATen dispatch,
a few µs an op) and, at batch 1, by reading each weight once; so this file runs the model functionally
on weights prepared once (`Runner.prepare`, rebuilt when a parameter changes in place) with as few ops
as it can:
- W_UK is folded into the query projection and W_UV into o_proj; the query, latent and RoPE-key
  projections are one matmul (`w_x`), the RoPE parts first so all heads and the shared key rotate in
  one complex multiply by a precomputed table;
- RMSNorm is 4 ops (F.rms_norm is a composite of ~8 on CPU), 3 where its weight is folded into the
  next matmul (input, post-attention, q_lora, and the MTP module's enorm/hnorm);
- each SwiGLU's gate and up projections are one matmul; the routed experts are stacked;
- the MoE routes 1-2 tokens (decode, speculative verification) in Python and runs each token's k
  experts in turn; more tokens get one sort and a loop over the experts that got any;
- the attention mask is an additive bias built once per step and fused into the score matmul (baddbmm)
  when every sequence feeds the same number of tokens; the cache is read and written with
  index_select / index_copy_ (tensor indexing costs several times more);
- the MTP module computes its attention and FFN only at each sequence's last position (the others
  just write their latents): that is the one its draft comes from.
The module's own (training) forward is the reference: tests check this one against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seekling.model.mla import MLA
from seekling.model.moe import MLP, MoE


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N] packed new tokens
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] (padded with block 0)
    bias: torch.Tensor  # [B, T, 1, L] additive mask: -inf where a query must NOT see the cached position
    q_index: torch.Tensor | None  # [B, T] packed index of each sequence's t-th new token (padding -> 0)
    unpad: torch.Tensor | None  # [N] index into the flattened [B * T] padded layout
    keep: torch.Tensor | None = None  # [B] last_only: the rows whose block output is wanted
    scores_bias: torch.Tensor | None = None  # bias laid out for the score matmul (Runner.scores_bias)
    # q_index and unpad are None when no regrouping is needed: every sequence feeds the same number of
    # tokens (plain decode: one; speculative verification: 1 + drafts), so the packed rows are [B, T].


def make_batch(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device,
               last_only: bool = False) -> Batch:
    """items: (new token ids, position of the first one, block table) per sequence. last_only: every
    token writes its latent, but only each sequence's last one goes on through attention and the FFN
    (the MTP module drafts from the last position only)."""
    lengths = [len(ids) for ids, _, _ in items]
    t_max = 1 if last_only else max(lengths)
    uniform = last_only or min(lengths) == t_max
    max_blocks = max(len(table) for _, _, table in items)
    B, L = len(items), max_blocks * block_size
    ids, pos, slots, tables, keep = [], [], [], [], []
    q_index: list[list[int]] = []
    unpad: list[int] = []
    for b, (new, start, table) in enumerate(items):
        n = len(new)
        tables.append(table + [0] * (max_blocks - len(table)))
        if not uniform:
            q_index.append(list(range(len(ids), len(ids) + n)) + [0] * (t_max - n))
            unpad.extend(range(b * t_max, b * t_max + n))
        ids.extend(new)
        keep.append(len(ids) - 1)
        pos.extend(range(start, start + n))
        slots.extend(table[q // block_size] * block_size + q % block_size for q in range(start, start + n))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    key_pos = torch.arange(L, device=device)
    if uniform:  # query positions [B, T]: the last t_max of each sequence (all of them unless last_only)
        q_pos = [list(range(start + n - t_max, start + n)) for (_, start, _), n in zip(items, lengths, strict=True)]
    else:  # left-aligned, row t of sequence b is its t-th new token; padded rows -1
        q_pos = [list(range(start, start + n)) + [-1] * (t_max - n)
                 for (_, start, _), n in zip(items, lengths, strict=True)]
    hidden = key_pos > t(q_pos)[:, :, None]
    if not uniform:
        hidden[:, :, 0] = False  # padded query rows see one key, so their (discarded) softmax is finite
    bias = torch.zeros(B, t_max, 1, L, device=device).masked_fill_(hidden.unsqueeze(2), float("-inf"))
    return Batch(t(ids), t(pos), t(slots), t(tables), bias, None if uniform else t(q_index),
                 None if uniform else t(unpad), t(keep) if last_only else None)


@dataclass
class Norm:
    """An RMSNorm for `Runner.norm`: x / sqrt(mean(x²) + eps) · w = x / hypot(‖x‖, sqrt(eps·d)) · (w·sqrt(d)),
    four ops where F.rms_norm is a composite of ~8 on CPU. `folded`: the weight (w·sqrt(d)) went into the
    next matmul's input columns instead, and the norm is three ops."""
    weight: torch.Tensor  # the module's weight (used as is for non-fp32 activations)
    scaled: torch.Tensor  # weight * sqrt(d)
    c: torch.Tensor  # sqrt(eps * d), 0-dim
    folded: bool = False


def prepare_norm(weight: torch.Tensor, eps: float, folded: bool = False) -> Norm:
    d = weight.shape[0]
    return Norm(weight, weight.detach() * d ** 0.5, weight.new_tensor((eps * d) ** 0.5), folded)


def norm_fp32(x: torch.Tensor, w: Norm) -> torch.Tensor:
    """`Norm` on fp32 activations (the engine's other dtypes go through F.rms_norm, see Runner.norm)."""
    y = torch.div(x, torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), w.c))
    return y if w.folded else y.mul_(w.scaled)


def fold(w: torch.Tensor, norm: Norm) -> torch.Tensor:
    """A linear weight [out, in] that consumes the normalised input without its norm weight."""
    return (w.float() * norm.scaled.float()).to(w.dtype)


@dataclass
class AttnWeights:
    w_x: torch.Tensor  # x -> [q_pe (H heads) | k_pe | q_lat (H heads) | c_KV], or with q_lora [k_pe | q_a | c_KV]
    w_q: torch.Tensor | None  # q_lora only: normed q_a -> [q_pe | q_lat]
    w_out: torch.Tensor  # attended latents [H * kv_lora_rank] -> hidden (W_UV and o_proj folded)
    q_norm: Norm | None
    kv_norm: Norm
    split: list[int]  # the column groups of w_x's output: [q_pe | k_pe], q_lat, c_KV (or k_pe, q_a, c_KV)
    scale: float  # softmax scale


@dataclass
class FFNWeights:
    w13: torch.Tensor  # dense / shared: [2I, h] = [gate; up]
    w2: torch.Tensor  # [h, I]
    moe: MoE | None = None  # routing settings are read from the module
    gate: torch.Tensor | None = None  # the router [E, h], fp32
    experts13_all: torch.Tensor | None = None  # the routed experts' [E, 2I, h], stacked
    experts2_all: torch.Tensor | None = None  # [E, h, I]
    experts2_cat: torch.Tensor | None = None  # [h, E * I]: all experts' down projections side by side
    experts13: list[torch.Tensor] | None = None  # per expert [2I, h] (views of the stacked tensor)
    experts2: list[torch.Tensor] | None = None  # per expert [h, I]
    experts2_t: list[torch.Tensor] | None = None  # per expert [I, h] (transposed views, for addmm)
    bias: list[float] | None = None  # e_score_correction_bias, for routing a few tokens in Python
    route_bias: torch.Tensor | None = None  # the module's live e_score_correction_bias buffer


@dataclass
class LayerWeights:
    attn: AttnWeights
    ffn: FFNWeights
    input_norm: Norm  # folded into attn.w_x
    post_norm: Norm  # folded into the FFN's input matmuls


def fuse_attention(attn: MLA, input_norm: Norm, eps: float) -> AttnWeights:
    """Absorb W_UK into the query projection and W_UV into o_proj; order the projections' rows so the
    RoPE parts come first (one rotation for queries and key) and the row count is even (a complex view
    of the RoPE columns needs an even row stride)."""
    H, r, dn, dr, dv = (attn.n_heads, attn.kv_lora_rank, attn.qk_nope_head_dim, attn.qk_rope_head_dim,
                        attn.v_head_dim)
    lora = attn.q_lora_rank is not None
    kv_b, o_w, kv_a = (w.detach() for w in (attn.kv_b_proj.weight, attn.o_proj.weight,
                                            attn.kv_a_proj_with_mqa.weight))
    w_kv = kv_b.view(H, dn + dv, r)
    q = (attn.q_b_proj if lora else attn.q_proj).weight.detach().view(H, dn + dr, -1)  # [H, dn + dr, in]
    q_lat = torch.einsum("hdc,hdi->hci", w_kv[:, :dn], q[:, :dn]).reshape(H * r, -1)  # [H * r, in]
    q_pe = q[:, dn:].reshape(H * dr, -1)
    c_kv, k_pe = kv_a[:r], kv_a[r:]
    q_norm = prepare_norm(attn.q_a_layernorm.weight, eps, folded=True) if lora else None
    if lora:
        rows = [k_pe, attn.q_a_proj.weight.detach(), c_kv]
        w_q = fold(torch.cat([q_pe, q_lat]), q_norm)
        split = [dr, attn.q_lora_rank, r]
    else:
        rows, w_q = [q_pe, k_pe, q_lat, c_kv], None
        split = [(H + 1) * dr, H * r, r]
    if sum(split) % 2:
        rows.append(kv_a.new_zeros(1, kv_a.shape[1]))
        split.append(1)
    w_out = torch.einsum("ohv,hvc->ohc", o_w.view(-1, H, dv), w_kv[:, dn:]).reshape(-1, H * r)
    return AttnWeights(fold(torch.cat(rows), input_norm), w_q, w_out, q_norm,
                       prepare_norm(attn.kv_a_layernorm.weight, eps), split, attn.softmax_scale)


def fuse_ffn(mlp: MLP | MoE, post_norm: Norm) -> FFNWeights:
    cat = lambda m: fold(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), post_norm)
    if isinstance(mlp, MLP):
        return FFNWeights(cat(mlp), mlp.down_proj.weight.detach())
    experts13 = torch.stack([cat(e) for e in mlp.experts])
    experts2 = torch.stack([e.down_proj.weight for e in mlp.experts]).detach()
    return FFNWeights(cat(mlp.shared_experts), mlp.shared_experts.down_proj.weight.detach(), mlp,
                      fold(mlp.gate.weight.detach().float(), post_norm), experts13, experts2,
                      experts2.permute(1, 0, 2).flatten(1), list(experts13), list(experts2),
                      [w.t() for w in experts2], mlp.gate.e_score_correction_bias.tolist(),
                      mlp.gate.e_score_correction_bias)


# Up to this many tokens the MoE routes in Python and loops over tokens and their experts (no topk /
# sort / bincount / index_add): faster for 1-2 tokens (decode, speculative verification), slower beyond.
SMALL_MOE = 2


def swiglu(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    g, u = F.linear(x, w13).chunk(2, dim=-1)
    return F.silu(g, inplace=True).mul_(u)


class Runner:
    def __init__(self, model: torch.nn.Module, kv: torch.Tensor, block_size: int):
        self.model, self.kv, self.block_size = model, kv, block_size
        self.config = cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.layers: list[LayerWeights] = []
        self._key: list[int] | None = None
        self.final_norm: Norm | None = None
        self.mtp_norms: list[Norm] = []
        self.eh_proj: torch.Tensor | None = None
        # What the prepared weights are computed from (all but the embedding and lm_head, used in place),
        # the routers' balancing biases included (training moves them in place).
        self._sources = [p for name, p in model.named_parameters()
                         if not name.endswith("embed_tokens.weight") and name != "lm_head.weight"]
        self._sources += [m.gate.e_score_correction_bias for m in model.moe_layers()]
        # RoPE as a complex multiply by e^{i·pos·θ} (times YaRN's attention factor), tabulated once with
        # the rotary module's own formula. It rotates interleaved pairs as DeepSeek lays them out.
        rotary = model.model.rotary_emb
        freqs = torch.arange(cfg.max_position_embeddings, device=kv.device)[:, None].float() * rotary.inv_freq
        self.rope = torch.complex(freqs.cos() * rotary.attention_factor, freqs.sin() * rotary.attention_factor)

    def prepare(self) -> None:
        """(Re)build the prepared weights when a parameter changed in place (an optimizer step between
        RL rollouts, a load); the version check costs ~10 µs a step."""
        key = [p._version for p in self._sources]
        if key == self._key:
            return
        eps = self.eps
        with torch.no_grad():
            self.layers = []
            for layer in self.model.model.layers:
                input_norm = prepare_norm(layer.input_layernorm.weight, eps, folded=True)
                post_norm = prepare_norm(layer.post_attention_layernorm.weight, eps, folded=True)
                self.layers.append(LayerWeights(fuse_attention(layer.self_attn, input_norm, eps),
                                                fuse_ffn(layer.mlp, post_norm), input_norm, post_norm))
            self.final_norm = prepare_norm(self.model.model.norm.weight, eps)
            mtp = self.model.mtp_layers
            if len(mtp):  # eh_proj consumes [enorm(emb) | hnorm(h)]: both norms fold into its two halves
                enorm = prepare_norm(mtp[0].enorm.weight, eps, folded=True)
                hnorm = prepare_norm(mtp[0].hnorm.weight, eps, folded=True)
                self.mtp_norms = [enorm, hnorm, prepare_norm(mtp[0].shared_head.norm.weight, eps)]
                w_e, w_h = mtp[0].eh_proj.weight.detach().chunk(2, dim=-1)
                self.eh_proj = torch.cat([fold(w_e, enorm), fold(w_h, hnorm)], dim=-1)
        self._key = key

    def norm(self, x: torch.Tensor, w: Norm) -> torch.Tensor:
        if x.dtype == torch.float32:
            return norm_fp32(x, w)
        # Other dtypes: normalise in fp32, as RMSNorm does.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * x.shape[-1] ** 0.5 if w.folded else w.weight * y

    def rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x [N, heads, d_rope / 2, 2] (interleaved pairs), rope [N, 1, d_rope / 2] complex (fp32)
        -> [N, heads, d_rope]."""
        if x.dtype != torch.float32:
            return self.rotate(x.float(), rope).to(x.dtype)
        return torch.view_as_real(torch.view_as_complex(x) * rope).flatten(-2)

    def scores_bias(self, batch: Batch, T: int) -> torch.Tensor:
        """The mask as the [B, T * H, L] addend of the score matmul, built once per batch (a view when T == 1)."""
        if batch.scores_bias is None:
            B, H = batch.bias.shape[0], self.config.num_attention_heads
            batch.scores_bias = batch.bias.expand(B, T, H, -1).reshape(B, T * H, -1)
        return batch.scores_bias

    def attention(self, w: AttnWeights, x: torch.Tensor, rope: torch.Tensor, layer: int,
                  batch: Batch) -> torch.Tensor:
        H, r = self.config.num_attention_heads, self.config.kv_lora_rank
        dr = self.config.qk_rope_head_dim
        N = x.shape[0]
        y = F.linear(x, w.w_x)
        if w.w_q is None:
            pe, q_lat, c_kv = y.split(w.split, dim=-1)[:3]
            pe = self.rotate(pe.view(N, H + 1, dr // 2, 2), rope)
            q_pe, k_pe = pe[:, :H], pe[:, H]
        else:
            k_pe, q_a, c_kv = y.split(w.split, dim=-1)[:3]
            q = F.linear(self.norm(q_a, w.q_norm), w.w_q)
            q_pe, q_lat = q.split([H * dr, H * r], dim=-1)
            q_pe = self.rotate(q_pe.view(N, H, dr // 2, 2), rope)
            k_pe = self.rotate(k_pe.view(N, 1, dr // 2, 2), rope)[:, 0]
        kv = self.kv[layer]  # [num_blocks, block_size, r + dr]
        latent = torch.cat([self.norm(c_kv, w.kv_norm), k_pe], dim=-1)
        # index_copy_ / index_select: the same as indexing with a tensor, at a fraction of the cost
        # (advanced indexing is ~5x slower on CPU for a batch of 32 block tables).
        kv.view(-1, kv.shape[-1]).index_copy_(0, batch.slots, latent if latent.dtype == kv.dtype
                                              else latent.to(kv.dtype))
        q = torch.cat([q_lat.view(N, H, r), q_pe], dim=-1)  # [N, H, r + dr]
        if batch.keep is not None:
            q = q.index_select(0, batch.keep)
        B = batch.block_tables.shape[0]
        keys = kv.index_select(0, batch.block_tables.view(-1)).view(B, -1, kv.shape[-1])  # [B, L, r + dr]
        # All heads share the one latent key/value: a single bmm per sequence over its T * H query rows
        # (SDPA would broadcast the key to every head first); the mask and the scale ride along (baddbmm).
        if batch.q_index is None:
            T = q.shape[0] // B
            scores = torch.baddbmm(self.scores_bias(batch, T), q.view(B, T * H, -1), keys.transpose(1, 2),
                                   alpha=w.scale)
        else:
            q = q[batch.q_index]  # [B, T, H, r + dr]
            T = q.shape[1]
            scores = torch.bmm(q.view(B, T * H, -1), keys.transpose(1, 2))
            scores.view(B, T, H, -1).mul_(w.scale).add_(batch.bias)
        o = torch.bmm(scores.softmax(-1), keys[..., :r]).view(B * T, H * r)  # [B * T, H * r]
        return F.linear(o if batch.unpad is None else o[batch.unpad], w.w_out)

    def moe(self, w: FFNWeights, x: torch.Tensor) -> torch.Tensor:
        """DeepSeekMoE on prepared weights (x is the normalised input; the norm weight is folded in)."""
        gate = w.moe.gate
        scores = F.linear(x if x.dtype == torch.float32 else x.float(), w.gate).sigmoid()  # routing in fp32
        out = F.linear(swiglu(x, w.w13), w.w2)  # the shared experts
        N = x.shape[0]
        if N <= SMALL_MOE and gate.n_group == 1:
            # A few tokens: route in Python (Gate.route's arithmetic on E floats) and run each token's
            # k experts one after the other, accumulating into its output row.
            for i, s in enumerate(scores.tolist()):
                top = sorted(range(len(s)), key=lambda e: s[e] + w.bias[e], reverse=True)[:gate.top_k]
                total = sum(s[e] for e in top) + 1e-20 if gate.norm_topk_prob else 1.0
                xi, oi = (x, out) if N == 1 else (x[i:i + 1], out[i:i + 1])
                for e in top:
                    oi.addmm_(swiglu(xi, w.experts13[e]), w.experts2_t[e], alpha=s[e] / total * gate.route_scale)
            return out
        weights, indices = gate.route(scores)
        # Many tokens: group the (token, expert) pairs by expert with one sort (as MoE.dispatch does).
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        token_of = order // gate.top_k
        counts = torch.bincount(flat, minlength=gate.n_experts).tolist()
        xs = x.index_select(0, token_of).split(counts)
        ws = weights.flatten().index_select(0, order).unsqueeze(-1).to(x.dtype).split(counts)
        ys = [F.linear(swiglu(xe, w.experts13[e]).mul_(we), w.experts2[e])
              for e, (xe, we, n) in enumerate(zip(xs, ws, counts, strict=True)) if n]
        return out.index_add_(0, token_of, torch.cat(ys))

    def block(self, w: LayerWeights, x: torch.Tensor, rope: torch.Tensor, cache_layer: int,
              batch: Batch) -> torch.Tensor:
        a = self.attention(w.attn, self.norm(x, w.input_norm), rope, cache_layer, batch)
        x = (x if batch.keep is None else x.index_select(0, batch.keep)) + a
        h = self.norm(x, w.post_norm)
        return x + (self.moe(w.ffn, h) if w.ffn.moe is not None else F.linear(swiglu(h, w.ffn.w13), w.ffn.w2))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Main model over the batch's new tokens; writes their latents; returns the final normed
        hidden states [N, h] (lm_head of a row gives its next-token logits, MTP starts from them)."""
        self.prepare()
        rope = self.rope[batch.positions].unsqueeze(1)
        x = F.embedding(batch.input_ids, self.model.model.embed_tokens.weight)
        if batch.keep is not None:
            raise ValueError("a last_only batch is for the MTP module (the main layers need every row)")
        for i in range(self.config.num_hidden_layers):
            x = self.block(self.layers[i], x, rope, i, batch)
        return self.norm(x, self.final_norm)

    def mtp(self, batch: Batch, h_prev: torch.Tensor) -> torch.Tensor:
        """The first MTP module: at position i it takes h_i and Emb(t_{i+1}) (batch.input_ids holds
        t_{i+1}) and writes its own latent cache layer; returns shared_head.norm(h^1) [N, h], or [B, h] at
        each sequence's last position for a last_only batch. Runs after `forward` (which prepared the
        weights) in the same step."""
        n = self.config.num_hidden_layers
        rope = self.rope[batch.positions].unsqueeze(1)
        emb = F.embedding(batch.input_ids, self.model.model.embed_tokens.weight)
        enorm, hnorm, head_norm = self.mtp_norms
        x = F.linear(torch.cat([self.norm(emb, enorm), self.norm(h_prev, hnorm)], dim=-1), self.eh_proj)
        x = self.block(self.layers[n], x, rope, n, batch)
        return self.norm(x, head_norm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.model.lm_head.weight)
