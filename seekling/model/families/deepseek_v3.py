"""DeepSeek-V3 (`deepseek_v3`, DeepseekV3ForCausalLM): MLA, DeepSeekMoE with sigmoid noaux_tc routing, MTP.
seekling's own models are of this family.

GGUF (llama.cpp's `deepseek2` architecture, as its convert_hf_to_gguf.py writes it and src/models/deepseek2.cpp
reads it):
- MLA runs there as MQA over the latent (head_count_kv 1, key_length kv_lora_rank + rope dims, value_length
  kv_lora_rank; key/value_length_mla the per-head sizes), so kv_b_proj is split per head into attn_k_b
  (transposed) and attn_v_b; files from converters before that split hold attn_kv_b, read as it is.
  `attention.q_lora_rank` is 0 when queries are not compressed.
- The router: expert_gating_func (sigmoid 2, softmax 1: llama.cpp's default without the key), top-k on scores +
  e_score_correction_bias (exp_probs_b, present only for noaux_tc routing), weights renormalised
  (expert_weights_norm) and scaled (expert_weights_scale); the routed experts of a layer are stacked into one
  [n_expert, out, in] tensor per projection. llama.cpp's group-limited routing is noaux_tc's (the best two of a
  group), so DeepSeek-V2's group_limited_greedy with several groups is refused on export.
- MTP layers are left out, as the converter does (llama.cpp's MTP graph for it also needs q_lora_rank > 0).
- YaRN: llama.cpp takes the attention scale from yarn_log_multiplier (0.1 * mscale_all_dim) and mscale equal to
  it, which is DeepSeek's YaRN exactly only when mscale == mscale_all_dim (DeepSeek-V3: 1 and 1; V2-Lite: 0.707).
- RoPE pairs are interleaved as in GGML's "normal" rope, so no permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gguf
import torch

from seekling.model.config import ModelConfig
from seekling.model.family import Family, renamed_from_gguf, row_blocks, shape_fields, shape_keys
from seekling.model.gguf_file import Derived, GGUFFile, GGUFTensor
from seekling.model.layers import CausalLM
from seekling.model.model import Transformer

EXPERTS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}
GATING = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}


class DeepseekV3(Family):
    model_type = "deepseek_v3"
    gguf_arch = "deepseek2"
    mtp = True
    defaults: dict[str, Any] = {}  # what a config.json that leaves a field out means, beyond ModelConfig's
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_a_proj.weight": "attn_q_a.weight",
        "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
        "self_attn.q_b_proj.weight": "attn_q_b.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
        "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
        "self_attn.kv_b_proj.weight": "attn_kv_b.weight",  # read from older files; written split (split_kv_b)
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    }

    def read_config(self, raw: dict[str, Any]) -> ModelConfig:
        return ModelConfig.from_hf_dict({**self.defaults, **raw})

    def build(self, config: ModelConfig) -> CausalLM:
        return Transformer(config)

    def fit_to_checkpoint(self, model: CausalLM, names: set[str]) -> None:
        """transformers' DeepseekV3ForCausalLM has no MTP modules and saves none while its config still says
        num_nextn_predict_layers=1: build only the MTP layers the checkpoint really holds."""
        cfg, n = model.config, model.config.num_hidden_layers
        present = [k for k in range(cfg.num_nextn_predict_layers) if f"model.layers.{n + k}.eh_proj.weight" in names]
        if len(present) != cfg.num_nextn_predict_layers:
            cfg.extra["num_nextn_predict_layers_in_config"] = cfg.num_nextn_predict_layers
            cfg.num_nextn_predict_layers = len(present)
            del model.model.layers[n + len(present):]

    def unread_tensors(self, config: ModelConfig) -> set[str]:
        """DeepSeek's MTP modules carry copies of the shared embedding and head."""
        n = config.num_hidden_layers
        return {f"model.layers.{n + k}.{s}" for k in range(config.num_nextn_predict_layers)
                for s in ("embed_tokens.weight", "shared_head.head.weight")}

    # --- GGUF export ---------------------------------------------------------------------------------------
    def gguf_keys(self, cfg: ModelConfig) -> dict[str, Any]:
        n_dense = cfg.num_hidden_layers if cfg.n_routed_experts == 0 else cfg.first_k_dense_replace
        if cfg.topk_method == "group_limited_greedy" and cfg.topk_group < cfg.n_group:
            raise ValueError("llama.cpp cannot reproduce group_limited_greedy routing over several groups (it "
                             "ranks a group by its best two experts, DeepSeek-V2 by its best one)")
        # llama.cpp asserts topk_group < n_group; keeping every group (topk_group == n_group) is no grouping.
        groups = (cfg.n_group, cfg.topk_group) if cfg.topk_group < cfg.n_group else (1, 1)
        return {
            **shape_keys(cfg),
            "attention.head_count_kv": 1,
            "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            "attention.q_lora_rank": cfg.q_lora_rank or 0,
            "attention.kv_lora_rank": cfg.kv_lora_rank,
            "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            "attention.value_length": cfg.kv_lora_rank,
            "attention.key_length_mla": cfg.qk_head_dim,
            "attention.value_length_mla": cfg.v_head_dim,
            "rope.dimension_count": cfg.qk_rope_head_dim,
            "rope.freq_base": float(cfg.rope_theta),
            "leading_dense_block_count": n_dense,
            "expert_count": cfg.n_routed_experts,
            "expert_used_count": cfg.num_experts_per_tok,
            "expert_shared_count": cfg.n_shared_experts,
            "expert_feed_forward_length": cfg.moe_intermediate_size,
            "expert_group_count": groups[0],
            "expert_group_used_count": groups[1],
            "expert_gating_func": int(GATING[cfg.scoring_func]),
            "expert_weights_norm": cfg.norm_topk_prob,
            "expert_weights_scale": float(cfg.routed_scaling_factor),
            **yarn_keys(cfg.rope_scaling),
        }

    def gguf_tensors(self, model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
        """Main layers only (the MTP layers are dropped); kv_b_proj split, the routed experts stacked."""
        cfg: ModelConfig = model.config
        state = model.state_dict()
        mtp = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
        for name, t in state.items():
            if name.startswith(mtp) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            if name.endswith("kv_b_proj.weight"):
                yield from split_kv_b(name, t, cfg)
            elif ".mlp.experts." in name:
                if name.endswith(".experts.0.down_proj.weight"):  # once per layer: the whole stack
                    yield from stack_experts(name.split(".mlp.")[0], state, cfg.n_routed_experts)
            else:
                yield self.gguf_name(name), t

    # --- GGUF import ---------------------------------------------------------------------------------------
    def config_from_gguf(self, f: GGUFFile) -> dict[str, Any]:
        """A noaux_tc router (the exp_probs_b tensors) makes it DeepSeek-V3, else DeepSeek-V2 (softmax unless the
        file says sigmoid, group-limited when it has several groups)."""
        noaux = any(name.endswith(".exp_probs_b.bias") for name in f.tensors)
        n_group = f.get("expert_group_count") or 1
        gating = f.get("expert_gating_func", int(GATING["softmax"]))
        rope = f["rope.dimension_count"]
        return {
            **shape_fields(f),
            "model_type": "deepseek_v3" if noaux else "deepseek_v2",
            "moe_intermediate_size": f["expert_feed_forward_length"],
            "n_routed_experts": f.get("expert_count", 0),
            "num_experts_per_tok": f.get("expert_used_count", 0),
            "n_shared_experts": f.get("expert_shared_count", 0),
            "first_k_dense_replace": f.get("leading_dense_block_count", 0),
            "n_group": n_group,
            "topk_group": f.get("expert_group_used_count") or n_group,
            "routed_scaling_factor": f.get("expert_weights_scale", 1.0),
            "norm_topk_prob": bool(f.get("expert_weights_norm", False)),
            "scoring_func": "sigmoid" if gating == int(GATING["sigmoid"]) else "softmax",
            "topk_method": "noaux_tc" if noaux else "group_limited_greedy" if n_group > 1 else "greedy",
            "q_lora_rank": f.get("attention.q_lora_rank") or None,
            "kv_lora_rank": f["attention.kv_lora_rank"],
            "qk_rope_head_dim": rope,
            # files from before the absorbed MLA have the per-head sizes as key/value_length
            "qk_nope_head_dim": (f.get("attention.key_length_mla") or f["attention.key_length"]) - rope,
            "v_head_dim": f.get("attention.value_length_mla") or f["attention.value_length"],
            "num_nextn_predict_layers": 0,
            "rope_scaling": yarn_from_gguf(f),
        }

    def tensors_from_gguf(self, f: GGUFFile, cfg: ModelConfig) -> dict[str, Any]:
        out: dict[str, Any] = renamed_from_gguf(f, self.layer_names)
        for layer in range(cfg.num_hidden_layers):
            blk, hf = f"blk.{layer}.", f"model.layers.{layer}."
            for proj, name in EXPERTS.items():
                if blk + name in f.tensors:
                    out.update(unstack_experts(f.tensors[blk + name], f"{hf}mlp.experts.{{}}.{proj}.weight"))
            if blk + "attn_k_b.weight" in f.tensors:
                k_b, v_b = f.tensors[blk + "attn_k_b.weight"], f.tensors[blk + "attn_v_b.weight"]
                out[hf + "self_attn.kv_b_proj.weight"] = joined_kv_b(k_b, v_b)
        return out


def split_kv_b(name: str, w: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """kv_b_proj [H*(nope+v), rank] -> k_b [H, rank, nope] (transposed, to multiply the queries into the
    latent) and v_b [H, v, rank], the layout llama.cpp's absorbed MLA reads."""
    layer = name.split(".")[2]
    per_head = w.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    k_b, v_b = per_head.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
    yield f"blk.{layer}.attn_k_b.weight", k_b.transpose(1, 2)
    yield f"blk.{layer}.attn_v_b.weight", v_b


def joined_kv_b(k_b: GGUFTensor, v_b: GGUFTensor) -> Derived:
    """`split_kv_b` undone: [H, rank, nope] and [H, v, rank] -> kv_b_proj [H*(nope+v), rank] (fp32)."""
    heads, rank, nope = k_b.shape
    v = v_b.shape[1]
    return Derived(k_b.file, k_b.name, (heads * (nope + v), rank),
                   lambda: torch.cat([k_b.read().transpose(1, 2), v_b.read()], dim=1).reshape(-1, rank))


def stack_experts(prefix: str, state: dict[str, torch.Tensor], n_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    layer = prefix.split(".")[2]
    for proj, gguf_name in EXPERTS.items():
        stacked = torch.stack([state[f"{prefix}.mlp.experts.{e}.{proj}.weight"] for e in range(n_experts)])
        yield f"blk.{layer}.{gguf_name}", stacked


def unstack_experts(stacked: GGUFTensor, name: str) -> dict[str, GGUFTensor]:
    """A stacked [n_expert, out, in] tensor as each expert's [out, in] (rows of the stored tensor: no copy)."""
    n_experts, out_rows, cols = stacked.shape
    return {name.format(e): stacked.select(rows, (out_rows, cols))
            for e, rows in enumerate(row_blocks(n_experts, out_rows))}


def yarn_keys(rs: dict[str, Any] | None) -> dict[str, Any]:
    """The YaRN keys as the converter writes them (see the module docstring for what llama.cpp can run)."""
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return {}
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None or not m or m != m_all or rs.get("truncate", True) is False:
        raise ValueError(f"llama.cpp cannot reproduce this YaRN configuration ({rs}): it needs mscale == "
                         "mscale_all_dim, no attention_factor and truncated correction dims")
    return {"rope.scaling.type": "yarn", "rope.scaling.factor": float(rs["factor"]),
            "rope.scaling.original_context_length": int(rs["original_max_position_embeddings"]),
            "rope.scaling.yarn_beta_fast": float(rs.get("beta_fast") or 32),
            "rope.scaling.yarn_beta_slow": float(rs.get("beta_slow") or 1),
            "rope.scaling.yarn_log_multiplier": 0.1 * float(m_all)}


def yarn_from_gguf(f: GGUFFile) -> dict[str, Any] | None:
    """`yarn_keys` read back: mscale = mscale_all_dim = yarn_log_multiplier / 0.1, as llama.cpp runs it."""
    kind = f.get("rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if kind != "yarn":
        raise ValueError(f"{f.path.name}: rope scaling {kind!r} is not supported for {f.arch} (only yarn)")
    rs = {"type": "yarn", "factor": float(f["rope.scaling.factor"]),
          "original_max_position_embeddings": int(f["rope.scaling.original_context_length"]),
          "beta_fast": float(f.get("rope.scaling.yarn_beta_fast", 32.0)),
          "beta_slow": float(f.get("rope.scaling.yarn_beta_slow", 1.0))}
    m = round(float(f.get("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1, 6)  # float32 in the file
    return {**rs, "mscale": m, "mscale_all_dim": m} if m else rs
