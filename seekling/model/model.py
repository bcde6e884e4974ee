"""The DeepSeek-V3 transformer: MLA blocks with dense or MoE FFNs, and multi-token prediction.

Module and parameter names are those of Hugging Face's `DeepseekV3ForCausalLM`, and the MTP
modules sit at `model.layers.{num_hidden_layers + k}` with DeepSeek-V3's names, so a state dict
is a checkpoint (see seekling/checkpoint.py).

MTP (V3 §2.2), depth k = 1..D, for position i:
    h'_i^k = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i^{k-1})])
    h_i^k  = Block_k(h'_{1:T-k}^k)
    P^k_{i+k+1} = lm_head(shared_head.norm(h_i^k))
with h^0 the main model's final (normed) hidden states, as vLLM feeds DeepSeek-V3's MTP layer.

Inference (the engine's step) goes through `prepare` (once, and again when a parameter's storage is
replaced) and `infer` / `infer_mtp`: the same modules on packed rows and a paged latent cache, see
seekling/model/layers.py for the batch they read and mla.py for the absorbed attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekling.checkpoint import save_pretrained
from seekling.model.config import ModelConfig
from seekling.model.layers import MLP, Batch, CausalLM, RMSNorm, alias, embedding
from seekling.model.mla import MLA, RotaryEmbedding, rope_inv_freq
from seekling.model.moe import MoE
from seekling.model.quant import Int8Weight, embed, linear, quantize


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor  # final normed hidden states [B, T, h] (the MTP modules start from them)
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean cross-entropy of logits [B, L, V] at position i against labels[:, i + shift] (-100 ignored).

    The labels are shifted and padded with -100 rather than the logits sliced: slicing copies the
    whole [B, L-1, V] logits (and its backward writes a zero-filled copy back)."""
    L = logits.shape[1]
    targets = F.pad(labels[:, shift:shift + L], (0, L - (labels.shape[1] - shift)), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = layer_idx >= config.first_k_dense_replace and config.n_routed_experts > 0
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prepare(self, quantize_to: str | None = None) -> list[nn.Parameter]:
        return self.self_attn.prepare(quantize_to) + self.mlp.prepare(quantize_to)

    def infer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on packed rows; -> (its output, its new cache latents). A last_only batch keeps only
        each sequence's last row from the attention on."""
        a, latent = self.self_attn.infer(self.input_layernorm(x), cos, sin, batch)
        x = (x if batch.keep is None else x.index_select(0, batch.keep)) + a
        return x + self.mlp.infer(self.post_attention_layernorm(x)), latent


class SharedHead(nn.Module):
    """DeepSeek-V3's `shared_head`: a norm of its own; the output projection is the shared lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(Block):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)
        self.w_eh: torch.Tensor | Int8Weight | None = None  # eh_proj for `infer_mtp`, built by `prepare`

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor,  # type: ignore[override]
                sin: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h_prev: h^{k-1} at positions i; emb_next: Emb(t_{i+k}). Returns h^k (before shared_head.norm)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, cos, sin, attn_mask)

    def prepare(self, quantize_to: str | None = None) -> list[nn.Parameter]:
        self.w_eh = alias(self.eh_proj.weight, self) if quantize_to is None else quantize(self.eh_proj.weight,
                                                                                          quantize_to)
        return super().prepare(quantize_to) + ([self.eh_proj.weight] if quantize_to is not None else [])

    def infer_mtp(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on packed rows: -> (shared_head.norm(h^k), this layer's new cache latents)."""
        x = linear(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1), self.w_eh)
        x, latent = self.infer(x, cos, sin, batch)
        return self.shared_head.norm(x), latent


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        n, d = config.num_hidden_layers, config.num_nextn_predict_layers
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Block(config, i) for i in range(n)] + [MTPLayer(config, n + k) for k in range(d)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.eos_token_ids: list[int] = []  # generation_config.json's, when loaded (else config.eos_token_id)
        self.generation_defaults: dict[str, Any] = {}  # from generation_config.json when loaded from a directory
        self.init_inference()
        if self.lm_head.weight.is_meta:  # the loader's build: the checkpoint fills every weight
            return
        self.apply(self._init_weights)
        # Scale the residual-branch outputs down with depth (GPT-2 style) for a stable start.
        std = config.initializer_range / (2 * max(config.num_hidden_layers, 1)) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoE):
            nn.init.normal_(module.gate.weight, mean=0.0, std=std)

    # --- structure helpers -------------------------------------------------------------------
    @property
    def main_layers(self) -> nn.ModuleList:
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.model.layers[self.config.num_hidden_layers:]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_parameters(self, include_mtp: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_mtp:
            n -= sum(p.numel() for p in self.mtp_layers.parameters())
        return n

    def reset_buffers(self, device: torch.device) -> None:
        """Compute the buffers no checkpoint stores (the loader builds the model on meta): the RoPE frequencies
        and the expert load counters."""
        inv_freq, factor = rope_inv_freq(self.config)
        self.model.rotary_emb.inv_freq = inv_freq.to(device)
        self.model.rotary_emb.attention_factor = factor
        for moe in self.moe_layers():
            moe.load.zero_()
            moe.last_load.zero_()

    # --- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                ) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, V]; with labels (HF convention: aligned with input_ids,
        shifted here, -100 ignored) also the loss = ce + λ·mean(mtp_k) + Σ balance losses.
        attention_mask [B, T] (1 = token, 0 = padding) is optional; causal attention always."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
        cos, sin = self.model.rotary_emb(position_ids)
        mask = self._attn_mask(attention_mask, T) if attention_mask is not None else None
        emb = self.model.embed_tokens(input_ids)
        h = emb
        for layer in self.main_layers:
            h = layer(h, cos, sin, mask)
        h = self.model.norm(h)
        logits = self.lm_head(h)
        out = ModelOutput(logits=logits, hidden_states=h)
        if labels is None:
            return out

        out.ce_loss = shifted_cross_entropy(logits, labels, 1)
        out.loss = out.ce_loss
        if self.training and len(self.mtp_layers) and self.config.mtp_loss_weight > 0:
            mtp_losses = []
            h_k = h
            for k, layer in enumerate(self.mtp_layers, start=1):
                if T - k < 2:
                    break
                sub_mask = mask[..., :T - k, :T - k] if mask is not None else None
                h_k = layer(h_k[:, :-1], emb[:, k:], cos[:, :T - k], sin[:, :T - k], sub_mask)
                logits_k = self.lm_head(layer.shared_head.norm(h_k))
                mtp_losses.append(shifted_cross_entropy(logits_k, labels, k + 1))
            if mtp_losses:
                out.mtp_loss = torch.stack(mtp_losses).mean()
                out.loss = out.loss + self.config.mtp_loss_weight * out.mtp_loss
        balance = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        if self.training and balance:
            out.balance_loss = torch.stack(balance).sum()
            out.loss = out.loss + out.balance_loss
        return out

    @staticmethod
    def _attn_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
        """Boolean [B, 1, T, T] mask: causal and not attending to padding (a padded query row
        still sees itself, so no row is empty and SDPA never returns NaN)."""
        causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
        keep = causal & attention_mask.bool()[:, None, None, :]
        return keep | torch.eye(T, dtype=torch.bool, device=attention_mask.device)

    def mtp_logits(self, h_prev: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor,
                   depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module on full sequences (no cache): returns (logits, h^depth)."""
        layer = self.mtp_layers[depth - 1]
        cos, sin = self.model.rotary_emb(position_ids)
        h_k = layer(h_prev, self.model.embed_tokens(next_ids), cos, sin)
        return self.lm_head(layer.shared_head.norm(h_k)), h_k

    # --- load balancing -----------------------------------------------------------------------
    def update_expert_bias(self) -> None:
        """Call after every optimizer step: the auxiliary-loss-free bias update of each MoE layer."""
        for moe in self.moe_layers():
            moe.update_bias()

    def expert_load(self) -> list[torch.Tensor]:
        """Per MoE layer, the tokens routed to each expert over the last optimizer step."""
        return [m.last_load.clone() for m in self.moe_layers()]

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, max_shard_bytes: int | None = None) -> None:
        if self.quantized:
            raise ValueError(f"this model was quantised to {self.quantized} for inference; save the original")
        save_pretrained(self, directory, max_shard_bytes=max_shard_bytes)

    # --- inference (the engine's interface; DenseModel has the same) ---------------------------------------
    def cache_entry_shape(self) -> tuple[int, ...]:
        """One token's entry in one layer of the paged cache: the latent [c_KV | k_pe]."""
        return (self.config.kv_lora_rank + self.config.qk_rope_head_dim,)

    def num_cache_layers(self, speculative: bool) -> int:
        """The main layers, plus the MTP module's when it drafts."""
        if speculative and not len(self.mtp_layers):
            raise ValueError("speculative decoding drafts with the MTP module; this model has none "
                             "(num_nextn_predict_layers=0: run it with speculative=False)")
        return self.config.num_hidden_layers + (1 if speculative else 0)

    def infer(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The main model over the batch's new tokens (after `prepare`): -> (final normed hidden states [N, h],
        every main layer's new cache latents [num_hidden_layers, N, r + dr]). The cache is only read."""
        cos, sin = self.model.rotary_emb(batch.positions)
        x = embed(batch.input_ids, self.embed_w)
        latents = []
        for layer in self.main_layers:
            x, latent = layer.infer(x, cos, sin, batch)
            latents.append(latent)
        return self.model.norm(x), torch.stack(latents)

    def infer_mtp(self, batch: Batch, h_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MTP module after `infer`: at position i it takes h_i and Emb(t_{i+1}) (batch.input_ids
        holds t_{i+1}); -> (shared_head.norm(h^1) [N, h], or [B, h] at each sequence's last row for a last_only
        batch; the module's new cache latents [1, N, r + dr])."""
        cos, sin = self.model.rotary_emb(batch.positions)
        h, latent = self.mtp_layers[0].infer_mtp(h_prev, embed(batch.input_ids, self.embed_w), cos, sin, batch)
        return h, latent.unsqueeze(0)
