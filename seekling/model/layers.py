"""The maths every model family here shares, and the batch an inference step hands the model.

One function each, used by training and inference alike: `rms_norm` (RMSNorm), `apply_rope` (rotary
embeddings, DeepSeek's interleaved pairs or Llama/Qwen's halves), `silu_mul` (SwiGLU on a fused
[gate | up] projection), `attend` (softmax attention of packed queries over a paged cache plus the step's
own new keys).

The inference forward of every model (`Transformer.infer`, `DenseModel.infer`) reads a `Batch`: the new
tokens of each scheduled sequence packed into N rows (no padding), their positions, and each sequence's
block table into the paged cache. The forward only *reads* the cache: each layer returns its new cache
entries, and the engine writes them after the forward (one `index_copy_`). A compiled
graph that wrote into its cache input would be functionalised into a copy of the whole cache per step,
and a forward without side effects is one that `torch.compile` captures as it is.

Attention keys are [the sequence's cached slots | the step's new tokens]: cached slot j is visible while
j < the first new position (later slots are stale or another sequence's), new token u is visible to new
query t when u <= t. This serves prefill (many new tokens), decode (one), speculative verification (the
last token + drafts) and chunked prefill alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekling.model.config import yarn_mscale
from seekling.model.quant import Int4Weight, Int8Weight, head_kind, layer_mode, linear, quantize


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight, normalised in fp32 whatever x's dtype (as DeepSeek and transformers
    do) and scaled in x's dtype (transformers' rounding)."""
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return y if weight is None else weight * y


class RMSNorm(nn.Module):
    """`rms_norm` with its weight. A few fp32 rows outside autograd (an eager decode step) take the same
    maths as x · (w·sqrt(d)) / hypot(‖x‖, sqrt(eps·d)): three ops on constants kept beside the weight, where
    F.rms_norm's CPU composite costs twice the time (measured 7 vs 15 us a call at hidden size 192)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._rows_key: tuple[int, int] | None = None  # (weight version, data pointer) the constants are for
        self._rows_consts: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and x.shape[0] <= 16 and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)):
            scaled, c = self._row_constants()
            return torch.div(x, torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), c)).mul_(scaled)
        return rms_norm(x, self.weight, self.eps)

    def _row_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight
        key = (w._version, w.data_ptr())
        if key != self._rows_key:  # built once, and again after an in-place update (an optimizer step)
            d = w.shape[0]
            self._rows_consts = (w.detach() * d ** 0.5, w.new_tensor((self.eps * d) ** 0.5))
            self._rows_key = key
        return self._rows_consts


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised N(0, 1) as torch's own, except on the meta device (the loader builds there):
    nothing to initialise, and meta normal_ runs through torch._refs, whose first use imports torch._dynamo
    (sympy, triton): ~150 MB resident in an engine that never compiles."""
    weight = torch.empty(num_embeddings, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, dim, _weight=weight)


def rope_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies over `dim` rotated dims [dim/2], and the factor cos/sin are multiplied by.

    scaling (a config's rope_scaling): None / default; "yarn" (YaRN as DeepSeek and transformers compute it: the
    low frequencies interpolated by `factor`, the high ones kept, a linear ramp between the correction dims of
    beta_fast / beta_slow; the factor is attention_factor when given, else mscale(factor, mscale) /
    mscale(factor, mscale_all_dim), else mscale(factor) — times attn_factor when a config gives one, as vLLM
    and llama.cpp read it: Qwen3's R1-0528 distill sets it to cancel mscale); "llama3" (Llama-3.1's: long
    wavelengths divided by factor, short ones kept, the band between interpolated)."""
    # On the CPU whatever the ambient device (a buffer moves with its module): the loader builds on meta, where
    # arange runs through torch._refs and its first use imports torch._dynamo (+150 MB resident).
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    inv_freq = 1.0 / pos_freqs
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return inv_freq, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind != "yarn":
        raise ValueError(f"rope scaling {kind!r} is not supported (default, yarn, llama3)")
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(original / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + inv_freq * (1 - ramp)  # ramp 0: the original frequency
    if scaling.get("attention_factor") is not None:
        attention_factor = float(scaling["attention_factor"])
    elif scaling.get("mscale") and scaling.get("mscale_all_dim"):
        attention_factor = yarn_mscale(factor, scaling["mscale"]) / yarn_mscale(factor, scaling["mscale_all_dim"])
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor * float(scaling.get("attn_factor", 1.0))


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """transformers' `_compute_llama3_parameters`."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the pairs of x [..., heads, d] by the angles whose cos/sin are [..., 1, d/2] (the rotary modules
    make them so: one head axis, broadcast over the heads).

    interleaved (DeepSeek): the pairs are (x0, x1), (x2, x3), ...; the result is written de-interleaved (all
    first elements, then all second ones) — a fixed permutation applied to queries and keys alike, so q·k is
    unchanged and an interleaving copy is saved (transformers does the same). Otherwise (Llama, Qwen2) the
    pairs are (x_i, x_{i + d/2}), transformers' rotate_half layout."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation of a fused [gate | up] projection: silu(gate) * up."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


class MLP(nn.Module):
    """SwiGLU feed-forward: DeepSeek's dense FFN, each routed expert and the shared experts; Qwen2/Llama's MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        # `infer` reads these (built by `prepare` or, for routed experts, by their MoE): [gate; up], down.
        self.w13: torch.Tensor | Int8Weight | None = None
        self.b13: torch.Tensor | None = None
        self.w2: torch.Tensor | Int8Weight | None = None

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU of x [n, h]; `scale` [n, 1] (a routing weight) multiplies the intermediate
        activations, which by linearity equals scaling the output, on the narrower tensor."""
        act = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(act if scale is None else act * scale)

    def prepare(self, quantize_to: str | None = None) -> list[nn.Parameter]:
        """gate and up as one matmul: views of one fused tensor (fp32 / bf16), or an int8 / int4 copy (returns
        the parameters it replaced, for the caller to free)."""
        pair = [self.gate_proj.weight, self.up_proj.weight]
        biases = [self.gate_proj.bias, self.up_proj.bias]
        self.b13 = None if biases[0] is None else fuse_parameters(biases, self)
        if quantize_to is None:
            self.w13, self.w2 = fuse_parameters(pair, self), alias(self.down_proj.weight, self)
            return []
        self.w13, self.w2 = quantize(pair, quantize_to), quantize(self.down_proj.weight, quantize_to, "down")
        return pair + [self.down_proj.weight]

    def infer(self, x: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        act = silu_mul(linear(x, self.w13, self.b13))
        return linear(act if scale is None else act * scale, self.w2, self.down_proj.bias)


@dataclass
class Batch:
    """One inference step: what the engine asks of the model. Built by `make_batch`."""

    input_ids: torch.Tensor  # [N] the new tokens of every sequence, packed
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) each new token's entries go to
    block_tables: torch.Tensor  # [B, W] (padded with block 0; those slots are masked)
    bias: torch.Tensor  # [B, 1, Tq, 1, W * block_size + Tk] additive mask over [cached slots | new tokens]
    # (the 1s broadcast over key heads and the query heads of a group: laid out once for every layer's `attend`)
    q_index: torch.Tensor | None  # [B, Tk] packed row of each sequence's t-th new token (padding -> 0), or
    # None when every sequence feeds the same number Tk of tokens (the packed rows are then [B, Tk] as they are)
    unpad: torch.Tensor | None  # [N] rows of the flattened padded [B * Tq] layout that are real queries
    keep: torch.Tensor | None  # [B] last_only: the packed row of each sequence's last new token
    cache: torch.Tensor | None = None  # [layers, blocks, block_size, *entry] read-only during the forward
    scores_bias: tuple[tuple[int, int], torch.Tensor] | None = None  # the mask laid out for `attend`

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


def make_batch(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device,
               last_only: bool = False) -> Batch:
    """items: (new token ids, position of the first one, block table) per sequence. last_only: every token
    computes its cache entries, but only each sequence's last one goes on as a query (the MTP module drafts
    from the last position only)."""
    lengths = [len(ids) for ids, _, _ in items]
    if not last_only and max(lengths) == 1:
        return _decode_batch(items, block_size, device)
    t_k = max(lengths)
    uniform = min(lengths) == t_k
    t_q = 1 if last_only else t_k
    width = max(len(table) for _, _, table in items)
    ids, pos, slots, tables, keep, q_index, unpad = [], [], [], [], [], [], []
    for b, (new, start, table) in enumerate(items):
        n = len(new)
        tables.append(table + [0] * (width - len(table)))
        if not uniform:
            q_index.append(list(range(len(ids), len(ids) + n)) + [0] * (t_k - n))
            if not last_only:
                unpad.extend(range(b * t_k, b * t_k + n))
        ids.extend(new)
        keep.append(len(ids) - 1)
        pos.extend(range(start, start + n))
        slots.extend(table[q // block_size] * block_size + q % block_size for q in range(start, start + n))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    starts, n_new = t([start for _, start, _ in items]), t(lengths)
    # Query t of sequence b is its new token number t (last_only: its last one, n_b - 1).
    q_num = (n_new - 1)[:, None] if last_only else torch.arange(t_q, device=device)[None, :]
    cached = torch.arange(width * block_size, device=device)[None, None, :] >= starts[:, None, None]
    u = torch.arange(t_k, device=device)[None, None, :]
    new = (u > q_num[:, :, None]) | (u >= n_new[:, None, None])
    hidden = torch.cat([cached.expand(-1, t_q, -1), new], dim=-1)  # [B, Tq, W * bs + Tk]
    bias = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, float("-inf"))[:, None, :, None, :]
    return Batch(t(ids), t(pos), t(slots), t(tables), bias, None if uniform else t(q_index),
                 None if uniform or last_only else t(unpad), t(keep) if last_only else None)


def _decode_batch(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device) -> Batch:
    """make_batch for plain decode (one new token per sequence), in a few ops: it runs every step."""
    width = max(len(table) for _, _, table in items)
    rows = [[new[0], start, table[start // block_size] * block_size + start % block_size]
            for new, start, table in items]
    ids, pos, slots = torch.tensor(rows, dtype=torch.long, device=device).T.contiguous()
    padded = [table + [0] * (width - len(table)) for _, _, table in items]
    tables = torch.tensor(padded, dtype=torch.long, device=device)
    key = torch.arange(width * block_size + 1, device=device)
    key[-1] = -1  # the new token itself (the last key) is always visible
    bias = torch.zeros(len(items), width * block_size + 1, device=device).masked_fill_(
        key >= pos[:, None], float("-inf"))
    return Batch(ids, pos, slots, tables, bias[:, None, None, None, :], None, None, None)


def gather_cache(batch: Batch, layer: int) -> torch.Tensor:
    """The cached entries of each sequence's blocks: [B, W * block_size, *entry]."""
    cache = batch.cache[layer]
    B, entry = batch.num_seqs, cache.shape[2:]
    return cache.index_select(0, batch.block_tables.view(-1)).view(B, -1, *entry)


def per_sequence(rows: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Packed rows [N, ...] -> [B, Tk, ...]: each sequence's new tokens (padding rows repeat row 0, masked)."""
    if batch.q_index is None:
        return rows.view(batch.num_seqs, -1, *rows.shape[1:])
    return rows[batch.q_index]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: Batch, scale: float) -> torch.Tensor:
    """Softmax attention of the step's queries over [cached | new] keys, with grouped query heads.

    q [N or B (last_only), H, Dk] packed; keys [B, S, Hkv, Dk], values [B, S, Hkv, Dv] per sequence (S = the
    cached slots + the new tokens); query head h reads key head h // (H / Hkv) (transformers' repeat_kv
    order). MLA is the case Hkv = 1: every head reads the one latent key. The heads that share a key head are
    rows of one batched matmul, so keys are never copied per head, and in fp32 the scale and the mask ride in
    the score matmul (baddbmm). -> [N or B, H, Dv]."""
    B, S, Hkv, Dk = keys.shape
    H = q.shape[1]
    g = H // Hkv
    if batch.keep is None and batch.q_index is not None:
        q = per_sequence(q, batch)  # [B, Tq, H, Dk]
    T = q.numel() // (B * H * Dk)
    if Hkv == 1:  # (B, T * H) query rows against each sequence's one key head: views only
        q, k, v = q.reshape(B, T * H, Dk), keys.view(B, S, Dk).transpose(1, 2), values.view(B, S, -1)
    else:
        q = q.reshape(B, T, Hkv, g, Dk).transpose(1, 2).reshape(B * Hkv, T * g, Dk)
        k = keys.permute(0, 2, 3, 1).reshape(B * Hkv, Dk, S)
        v = values.transpose(1, 2).reshape(B * Hkv, S, -1)
    bias = _scores_bias(batch, Hkv, g)  # [B * Hkv, T * g, S]
    if q.dtype == torch.float32:
        scores = torch.baddbmm(bias, q, k, alpha=scale)
    else:  # softmax in fp32 (as transformers' eager/SDPA paths do) so bf16 weights keep the same ranking
        scores = torch.bmm(q, k).float().mul_(scale).add_(bias)
    p = scores.softmax(-1)
    o = torch.bmm(p if p.dtype == v.dtype else p.to(v.dtype), v)  # [B * Hkv, T * g, Dv]
    if Hkv == 1:
        o = o.view(B * T, H, -1)
    else:
        o = o.view(B, Hkv, T, g, -1).transpose(1, 2).reshape(B * T, H, -1)
    return o if batch.unpad is None else o[batch.unpad]


def _scores_bias(batch: Batch, Hkv: int, g: int) -> torch.Tensor:
    """The mask laid out as the score matmul's addend, [B * Hkv, T * g, S]: built once per batch and head
    layout (every layer of the step reuses it); a view when nothing needs repeating."""
    key = (Hkv, g)
    if batch.scores_bias is None or batch.scores_bias[0] != key:
        b = batch.bias  # [B, 1, Tq, 1, S]
        B, _, T, _, S = b.shape
        laid = b.view(B, T, S) if Hkv == 1 and g == 1 else b.expand(B, Hkv, T, g, S).reshape(B * Hkv, T * g, S)
        batch.scores_bias = (key, laid)
    return batch.scores_bias[1]


def fuse_parameters(params: list[nn.Parameter], owner: nn.Module | None = None) -> torch.Tensor:
    """Give `params` (same trailing shape, dtype, device) one storage, concatenated on dim 0, and make each a
    view of it: a fused projection is then one matmul over the same memory the parameters live in (no second
    copy), and in-place updates to the parameters (optimizer steps, load_state_dict) are seen by it. The
    Parameter objects stay the same, so an optimizer built before keeps working. Returns the fused tensor."""
    fused = torch.cat([p.detach() for p in params])
    offset = 0
    for p in params:
        p.data = fused[offset:offset + p.shape[0]]
        offset += p.shape[0]
    if owner is not None:  # remembered, so `CausalLM.prepare` can tell when the fusion was undone
        owner.fusions = [*getattr(owner, "fusions", []), (params, fused)]
    return fused


def alias(param: nn.Parameter, owner: nn.Module) -> torch.Tensor:
    """The parameter's tensor for an inference forward to read, without registering it a second time (a
    Parameter assigned to a module attribute becomes a parameter of that name); remembered like a fusion, so
    `prepare` notices when the parameter's storage is replaced."""
    t = param.detach()
    owner.fusions = [*getattr(owner, "fusions", []), ([param], t)]
    return t


def still_fused(params: list[nn.Parameter], fused: torch.Tensor | None) -> bool:
    """Whether every parameter still lives in `fused`, in order (`.to()`, `.half()` or a `p.data = ...`
    replace a parameter's storage; then the fusion must be redone)."""
    if fused is None:
        return False
    ptr, step = fused.data_ptr(), fused.stride(0) * fused.element_size()
    offset = 0
    for p in params:
        if p.data_ptr() != ptr + offset * step or p.dtype != fused.dtype:
            return False
        offset += p.shape[0]
    return offset == fused.shape[0]


def free_parameters(root: nn.Module, params: list[nn.Parameter]) -> None:
    """Release the parameters under `root` that an int8 copy replaced: each becomes a meta parameter of the
    same shape (the name stays; no storage)."""
    gone = {id(p) for p in params}
    for module in root.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in gone:
                # torch.empty, not empty_like: meta empty_like runs through torch._refs (imports torch._dynamo)
                meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
                module._parameters[name] = nn.Parameter(meta, requires_grad=False)


class CausalLM(nn.Module):
    """What the model families (seekling.model.Transformer, DenseModel) share for inference: `prepare`
    builds what their `infer` reads, layer by layer (each layer's `prepare(quantize_to)` returns the float
    parameters an int8 copy replaced), plus the embedding and output head; `logits` applies the head.
    Subclasses have `model.layers`, `model.embed_tokens` and `lm_head` (the Hugging Face layout)."""

    def init_inference(self) -> None:
        self.quantized: str | None = None
        self.embed_w: torch.Tensor | Int8Weight | None = None
        self.head_w: torch.Tensor | Int8Weight | None = None

    def prepare(self, quantize_to: str | None = None) -> None:
        """Cheap when nothing changed; redone when a parameter's storage was replaced (`.to()`, a dtype
        change). In-place updates (optimizer steps, load_state_dict) need nothing: fused weights are the
        parameters' own storage. quantize_to="int8" makes int8 copies and frees the float weights they
        replace: the model is then for inference only."""
        if self.quantized is not None:  # already prepared for good (None: use it as it is)
            if quantize_to not in (None, self.quantized):
                raise ValueError(f"the model is already quantised to {self.quantized}")
            return
        if quantize_to is None and self.embed_w is not None and all(
                still_fused(p, f) for m in self.modules() for p, f in getattr(m, "fusions", [])):
            return
        for m in self.modules():
            m.fusions = []
        with torch.no_grad():
            n = len(self.model.layers)
            replaced = [p for i, layer in enumerate(self.model.layers)
                        for p in layer.prepare(layer_mode(quantize_to, i, n))]
            replaced += self.prepare_head(quantize_to)
        if quantize_to is not None:
            free_parameters(self, replaced)
            self.quantized = quantize_to

    def prepare_head(self, quantize_to: str | None, head_w: Int8Weight | None = None,
                     embed_w: Int8Weight | Int4Weight | None = None) -> list[nn.Parameter]:
        """The embedding and output head (one tensor when tied; the head at 8 bits under int4, `head_kind`);
        a streaming loader passes the copies it made. Returns the float parameters replaced."""
        head, emb = self.lm_head.weight, self.model.embed_tokens.weight
        if quantize_to is None:
            self.embed_w, self.head_w = alias(emb, self), alias(head, self)
            return []
        tied = head is emb
        self.head_w = head_w if head_w is not None else quantize(head, head_kind(quantize_to))
        self.embed_w = self.head_w if tied else embed_w if embed_w is not None else quantize(emb, quantize_to,
                                                                                            "embed")
        return [head] if tied else [head, emb]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.head_w)
