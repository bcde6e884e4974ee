"""The model forward on the latent cache: one packed "extend" pass for a batch of sequences.

Linear layers, norms and the MoE run on the packed tokens [N, h] (no padding); only attention
regroups queries per sequence. Attention is MLA's absorbed form (DeepSeek-V3 inference/model.py,
attn_impl="absorb"): with kv_b_proj's weight split per head into W_UK (keys) and W_UV (values),
    q_nope · k_nope = q_nope · (W_UK c_KV) = (W_UK^T q_nope) · c_KV
    o = Σ p · (W_UV c_KV) = W_UV (Σ p · c_KV)
so queries move into the latent space and attention reads the cached [c_KV | k_pe] directly:
one shared "key head" of kv_lora_rank + qk_rope_head_dim, never expanded per head. W_UK is folded
into the query projection and W_UV into o_proj ahead of time (`fused_weights`). The same pass
serves prefill (many new tokens), decode (one) and speculative verification (last + drafts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seekling.model.mla import MLA, apply_rope


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N] packed new tokens
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] (padded with block 0)
    q_index: torch.Tensor  # [B, Tmax] packed index of each sequence's t-th new token (padding -> 0)
    unpad: torch.Tensor  # [N] index into the flattened [B * Tmax] padded layout
    mask: torch.Tensor  # [B, Tmax, 1, Lmax] True where a query must NOT see the cached position


def make_batch(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device) -> Batch:
    """items: (new token ids, position of the first one, block table) per sequence."""
    t_max = max(len(ids) for ids, _, _ in items)
    max_blocks = max(len(table) for _, _, table in items)
    ids, pos, slots, q_index, q_pos, unpad, tables = [], [], [], [], [], [], []
    for b, (new, start, table) in enumerate(items):
        n = len(new)
        tables.append(table + [0] * (max_blocks - len(table)))
        p = list(range(start, start + n))
        q_pos.append(p + [-1] * (t_max - n))
        q_index.append(list(range(len(ids), len(ids) + n)) + [0] * (t_max - n))
        unpad.extend(range(b * t_max, b * t_max + n))
        ids.extend(new)
        pos.extend(p)
        slots.extend(table[q // block_size] * block_size + q % block_size for q in p)
    t = lambda x: torch.tensor(x, dtype=torch.long)
    key_pos = torch.arange(max_blocks * block_size)
    hidden = key_pos[None, None, :] > t(q_pos)[:, :, None]
    hidden[:, :, 0] = False  # padded query rows see one key, so their (discarded) softmax is finite
    return Batch(*(x.to(device) for x in (t(ids), t(pos), t(slots), t(tables), t(q_index), t(unpad),
                                          hidden.unsqueeze(2))))


class Runner:
    def __init__(self, model: torch.nn.Module, kv: torch.Tensor, block_size: int):
        self.model, self.kv, self.block_size = model, kv, block_size
        self.config = model.config
        self.rotary = model.model.rotary_emb
        self._fused: dict[int, tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]] = {}

    def fused_weights(self, attn: MLA) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The absorbed projections of one MLA layer, as few matrices as possible:
        w_x   maps x to [queries | c_KV | k_pe], or to [q_lora latent | c_KV | k_pe] with q_lora_rank;
        w_q   (q_lora_rank only) maps the normed q latent to the queries;
        w_out maps the attended latents [H * kv_lora_rank] through W_UV and o_proj to the hidden size;
        where "queries" are [W_UK^T q_nope per head | q_pe per head].
        At these widths one bigger matmul beats several small ones (per-op overhead dominates decode).
        Rebuilt whenever a weight changed in place (an optimizer step between RL rollouts, a load)."""
        lora = attn.q_lora_rank is not None
        ws = [attn.kv_b_proj.weight, attn.o_proj.weight, attn.kv_a_proj_with_mqa.weight]
        ws += [attn.q_a_proj.weight, attn.q_b_proj.weight] if lora else [attn.q_proj.weight]
        key = tuple(w._version for w in ws) + tuple(w.data_ptr() for w in ws)
        cached = self._fused.get(id(attn))
        if cached is not None and cached[0] == key:
            return cached[1]
        H, r, dn, dr, dv = (attn.n_heads, attn.kv_lora_rank, attn.qk_nope_head_dim, attn.qk_rope_head_dim,
                            attn.v_head_dim)
        kv_b, o_w, kv_a, *q_ws = (w.detach() for w in ws)
        w_kv = kv_b.view(H, dn + dv, r)
        q = q_ws[-1].view(H, dn + dr, -1)  # [H, dn + dr, in]
        q_lat = torch.einsum("hdc,hdi->hci", w_kv[:, :dn], q[:, :dn])  # [H, r, in]
        w_q = torch.cat([q_lat.reshape(H * r, -1), q[:, dn:].reshape(H * dr, -1)])
        w_x = torch.cat([q_ws[0], kv_a]) if lora else torch.cat([w_q, kv_a])
        w_out = torch.einsum("ohv,hvc->ohc", o_w.view(-1, H, dv), w_kv[:, dn:]).reshape(-1, H * r)
        fused = (w_x, w_q if lora else None, w_out)
        self._fused[id(attn)] = (key, fused)
        return fused

    def attention(self, attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                  batch: Batch) -> torch.Tensor:
        H, r, dr = attn.n_heads, attn.kv_lora_rank, attn.qk_rope_head_dim
        w_x, w_q, w_out = self.fused_weights(attn)
        N = x.shape[0]
        y = F.linear(x, w_x)
        if w_q is None:
            q, c_kv, k_pe = y.split([H * (r + dr), r, dr], dim=-1)
        else:
            q_a, c_kv, k_pe = y.split([attn.q_lora_rank, r, dr], dim=-1)
            q = F.linear(attn.q_a_layernorm(q_a), w_q)
        q_lat, q_pe = q.split([H * r, H * dr], dim=-1)
        # Rotate the H query heads and the one shared key together.
        pe = apply_rope(torch.cat([q_pe.view(1, N, H, dr), k_pe.view(1, N, 1, dr)], dim=2), cos, sin)[0]
        cache = self.kv[layer].view(-1, self.kv.shape[-1])  # [num_blocks * block_size, r + dr]
        cache[batch.slots] = torch.cat([attn.kv_a_layernorm(c_kv), pe[:, H]], dim=-1).to(cache.dtype)
        q = torch.cat([q_lat.view(N, H, r), pe[:, :H]], dim=-1)[batch.q_index]  # [B, Tmax, H, r + dr]
        B, T = q.shape[:2]
        keys = self.kv[layer][batch.block_tables].view(B, -1, self.kv.shape[-1])  # [B, L, r + dr]
        # All heads share the one latent key/value: a single bmm per sequence over its T * H query rows
        # (SDPA would broadcast the key to every head first).
        scores = torch.bmm(q.view(B, T * H, -1), keys.transpose(1, 2)).view(B, T, H, -1) * attn.softmax_scale
        scores = scores.masked_fill(batch.mask, float("-inf")).softmax(-1)
        o = torch.bmm(scores.view(B, T * H, -1), keys[..., :r])  # [B, T * H, r]
        o = o.view(B * T, H * r)[batch.unpad]  # [N, H * r]
        return F.linear(o, w_out)

    def block(self, layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              cache_layer: int, batch: Batch) -> torch.Tensor:
        x = x + self.attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache_layer, batch)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Main model over the batch's new tokens; writes their latents; returns the final normed
        hidden states [N, h] (lm_head of a row gives its next-token logits, MTP starts from them)."""
        cos, sin = self.rotary(batch.positions[None])
        x = self.model.model.embed_tokens(batch.input_ids)
        for i, layer in enumerate(self.model.main_layers):
            x = self.block(layer, x, cos, sin, i, batch)
        return self.model.model.norm(x)

    def mtp(self, batch: Batch, h_prev: torch.Tensor) -> torch.Tensor:
        """The first MTP module: at position i it takes h_i and Emb(t_{i+1}) (batch.input_ids holds
        t_{i+1}) and writes its own latent cache layer; returns shared_head.norm(h^1) [N, h]."""
        layer = self.model.mtp_layers[0]
        cos, sin = self.rotary(batch.positions[None])
        emb = self.model.model.embed_tokens(batch.input_ids)
        x = layer.eh_proj(torch.cat([layer.enorm(emb), layer.hnorm(h_prev)], dim=-1))
        x = self.block(layer, x, cos, sin, self.config.num_hidden_layers, batch)
        return layer.shared_head.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h)
