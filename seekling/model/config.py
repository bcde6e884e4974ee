"""ModelConfig: the hyper-parameters of the DeepSeek MLA + MoE models (V3 and V2), with Hugging Face's
`DeepseekV3Config` / `DeepseekV2Config` field names.

A seekling checkpoint's `config.json` is exactly what transformers writes for `deepseek_v3`, so
either side reads the other's. DeepSeek-V2 differs only in its routing (softmax scores, greedy or
group-limited top-k, no balancing bias) and has no MTP module: `model_type`, `scoring_func` and
`topk_method` say which. Presets give the shapes we train (`tiny`, `small`) and the real DeepSeek
shapes (for reference and parameter counting only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seekling.atomic import write_text

# Fields of DeepSeek's own config.json files that transformers' configs do not define but inference engines
# read. scoring_func and topk_method are ModelConfig fields (always written); these are constants here (every
# layer past first_k_dense_replace an MoE one). Without them:
# - llama.cpp's convert_hf_to_gguf.py takes expert_gating_func from scoring_func and builds softmax routing;
# - vLLM defaults scoring_func to "softmax" and only loads the correction bias when topk_method is "noaux_tc";
# - SGLang reads config.topk_method and config.moe_layer_freq as attributes and fails without them;
# - DeepSeek's own modeling code (trust_remote_code) reads ep_size, seq_aux and aux_loss_alpha.
# aux_loss_alpha is DeepSeek's name for the sequence-wise balance loss weight (our seq_aux_alpha).
RELEASE_FIELDS: dict[str, Any] = {"moe_layer_freq": 1, "ep_size": 1, "seq_aux": True}
SCORING_FUNCS = ("sigmoid", "softmax")
# noaux_tc (V3): top-k on scores + e_score_correction_bias within the groups whose best two score highest;
# greedy (V2-Lite): top-k on the scores; group_limited_greedy (V2): within the groups whose best one scores highest
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"  # or "deepseek_v2" (the same modules; see the module docstring)
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 512  # dense FFN width (the first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 128  # width of each routed / shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # expert affinities: sigmoid (V3) or softmax (V2) of the router logits
    topk_method: str = "noaux_tc"  # see TOPK_METHODS
    q_lora_rank: int | None = None  # None: queries are not compressed (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1  # MTP depth D
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # Training-only knobs (kept in config.json under their own names; transformers ignores them).
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing
    seq_aux_alpha: float = 0.0  # alpha of the complementary sequence-wise balance loss
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, written back untouched

    def __post_init__(self) -> None:
        check_field_types(self)
        problems = []
        for name, value, allowed in (("model_type", self.model_type, MODEL_TYPES),
                                     ("scoring_func", self.scoring_func, SCORING_FUNCS),
                                     ("topk_method", self.topk_method, TOPK_METHODS)):
            if value not in allowed:
                problems.append(f"{name} {value!r} is not supported (one of {', '.join(allowed)})")
        if self.n_routed_experts % max(self.n_group, 1):
            problems.append(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            problems.append(f"topk_group={self.topk_group} > n_group={self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok > n_routed_experts")
        if self.n_group > 1 and (self.n_routed_experts // self.n_group) < 2:
            problems.append("group-limited routing needs at least 2 experts per group (top-2 group score)")
        if self.qk_rope_head_dim % 2:
            problems.append("qk_rope_head_dim must be even")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("yarn", "default", None):
                problems.append(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
        if problems:
            raise ValueError("unsupported ModelConfig: " + "; ".join(problems))

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 when the context is extended (DeepSeek-V3 eq. for mscale)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "yarn":
            m_all = rs.get("mscale_all_dim", 0)
            if m_all:
                m = yarn_mscale(rs["factor"], m_all)
                scale = scale * m * m
        return scale

    def num_parameters(self, include_mtp: bool = True, active: bool = False) -> int:
        """Parameter count computed from the shapes alone (works for the full-size presets)."""
        h, v = self.hidden_size, self.vocab_size
        nh = self.num_attention_heads
        if self.q_lora_rank is None:
            attn = h * nh * self.qk_head_dim
        else:
            attn = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        attn += h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        attn += nh * self.v_head_dim * h
        dense_ffn = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        n_exp = self.num_experts_per_tok if active else self.n_routed_experts
        moe_ffn = expert * (n_exp + self.n_shared_experts) + h * self.n_routed_experts
        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        n_moe = self.num_hidden_layers - n_dense
        block = attn + 2 * h
        total = n_dense * (block + dense_ffn) + n_moe * (block + moe_ffn)
        total += v * h + h + (0 if self.tie_word_embeddings else v * h)
        if include_mtp:
            mtp_ffn = moe_ffn if self.num_hidden_layers >= self.first_k_dense_replace else dense_ffn
            total += self.num_nextn_predict_layers * (block + mtp_ffn + 3 * h + 2 * h * h)
        return total

    # --- Hugging Face config.json ---------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d = {**self.extra, **d}
        d.update(
            architectures=["".join(p.capitalize() for p in self.model_type.split("_")) + "ForCausalLM"],
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            rope_interleave=True,
            attention_bias=False,
            dtype="float32",
            aux_loss_alpha=self.seq_aux_alpha,
            **RELEASE_FIELDS,
        )
        # transformers >= 5 reads `rope_parameters`; older readers and DeepSeek's own files use
        # `rope_theta` + `rope_scaling`. Write both so every reader sees the same RoPE.
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
            rope["rope_type"] = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "yarn"))
        d["rope_parameters"] = rope
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A config.json's fields; the ones it leaves out take DeepSeek-V3's defaults (a DeepSeek-V2 family
        merges its own defaults in first: seekling/model/families/deepseek_v2.py)."""
        if d.get("model_type", "deepseek_v3") not in MODEL_TYPES:
            raise ValueError(f"model_type {d['model_type']!r} is not a DeepSeek-V3/V2 config")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        if d.get("attention_bias"):
            raise ValueError("attention_bias=True is not supported")
        if d.get("rope_interleave") is False:
            raise ValueError("rope_interleave=False is not supported (DeepSeek checkpoints interleave)")
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"moe_layer_freq {d['moe_layer_freq']!r} is not supported (every layer after "
                             "first_k_dense_replace is an MoE layer)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names}
        if "seq_aux_alpha" not in d and d.get("seq_aux", True) and d.get("aux_loss_alpha") is not None:
            kw["seq_aux_alpha"] = float(d["aux_loss_alpha"])  # DeepSeek's release names it aux_loss_alpha
        rp = d.get("rope_parameters")
        if rp:
            kw["rope_theta"] = rp.get("rope_theta", kw.get("rope_theta", 10000.0))
            # rope_scaling, when a file has both, is the one written as the user gave it (a round trip keeps it)
            if rp.get("rope_type", rp.get("type", "default")) != "default" and not d.get("rope_scaling"):
                kw["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if kw.get("n_group") is None:
            kw["n_group"] = 1
        if kw.get("topk_group") is None:
            kw["topk_group"] = 1
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        skip = names | {"rope_parameters", "model_type", "architectures", "num_key_value_heads", "hidden_act",
                        "rope_interleave", "attention_bias", "dtype", "torch_dtype", "transformers_version",
                        "head_dim", "qk_head_dim", "aux_loss_alpha", *RELEASE_FIELDS}
        kw["extra"] = {k: v for k, v in d.items() if k not in skip}
        return cls(**kw)

    def save(self, directory: str | Path) -> None:
        write_text(Path(directory) / "config.json", json.dumps(self.to_hf_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a model directory")
        return cls.from_hf_dict(json.loads(path.read_text()))


def check_field_types(config: Any) -> None:
    """ValueError naming every field of a config dataclass whose value is not of its annotated type (a config.json
    with "hidden_size": "64" or "num_hidden_layers": null), before any layer is built from it."""
    hints = typing.get_type_hints(type(config))
    problems = [f"{f.name} must be {_type_name(hints[f.name])}, got {getattr(config, f.name)!r}"
                for f in dataclasses.fields(config) if not _is_a(getattr(config, f.name), hints[f.name])]
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def _alternatives(kind: Any) -> tuple[Any, ...]:
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def _is_a(value: Any, kind: Any) -> bool:
    for alt in _alternatives(kind):
        base = typing.get_origin(alt) or alt
        if alt is Any or (alt is type(None) and value is None):
            return True
        if base is bool and isinstance(value, bool):
            return True
        if base in (int, float) and isinstance(value, int if base is int else (int, float)) \
                and not isinstance(value, bool) and (base is int or math.isfinite(value)):
            return True
        if base in (dict, list, str) and isinstance(value, base):
            return True
    return False


def _type_name(kind: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
             list: "a list", type(None): "null"}
    return " or ".join(names.get(typing.get_origin(a) or a, str(a)) for a in _alternatives(kind))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# Presets. `tiny` is the CPU speedrun size; `small` a 25-50M model for a bigger machine;
# the DeepSeek shapes are for reference and parameter counting.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=192, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=1024,
    ),
    "small": dict(
        hidden_size=512, intermediate_size=1408, moe_intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4,
        topk_group=2, first_k_dense_replace=1, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=2.0, max_position_embeddings=4096,
        vocab_size=8192,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_nextn_predict_layers=0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_nextn_predict_layers=1, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
