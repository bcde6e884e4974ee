"""config.json: DeepSeek-V3's own fields that inference engines read, round trips, and older configs."""

import json

import pytest
import torch

import seekling
from seekling.model import Transformer
from seekling.model.config import PRESETS, ModelConfig, preset

# DeepSeek-V3's released config.json (deepseek-ai/DeepSeek-V3), without its fp8 quantization_config and auto_map.
DEEPSEEK_V3_RELEASE = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
# what llama.cpp's converter, vLLM, SGLang and DeepSeek's modeling code read beyond DeepseekV3Config
ENGINE_FIELDS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "ep_size": 1,
                 "seq_aux": True}
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, n_routed_experts=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_with_the_release_fields(name):
    cfg = preset(name, seq_aux_alpha=1e-4)
    d = json.loads(json.dumps(cfg.to_hf_dict()))  # through JSON, as config.json is
    routing = {"scoring_func": cfg.scoring_func, "topk_method": cfg.topk_method}  # V2-Lite: softmax, greedy
    assert {k: d[k] for k in ENGINE_FIELDS} == {**ENGINE_FIELDS, **routing}
    assert d["model_type"] == cfg.model_type and d["architectures"] == [
        {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}[cfg.model_type]]
    assert d["aux_loss_alpha"] == 1e-4 and d["q_lora_rank"] == cfg.q_lora_rank  # null stays null in config.json
    back = ModelConfig.from_hf_dict(d)
    assert back == cfg and back.extra == {}  # the derived fields are not carried as unknown extras
    assert back.to_hf_dict() == cfg.to_hf_dict()


def test_deepseek_v3_release_config_reads_as_the_preset():
    cfg = ModelConfig.from_hf_dict(DEEPSEEK_V3_RELEASE)
    ref = preset("deepseek-v3")
    for field in PRESETS["deepseek-v3"]:
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.seq_aux_alpha == 0.001  # DeepSeek's aux_loss_alpha is our sequence-wise balance weight
    assert {"use_cache", "pretraining_tp", "attention_dropout"} <= set(cfg.extra)  # kept for the next save
    assert not set(ENGINE_FIELDS) & set(cfg.extra)


def test_old_checkpoint_without_the_fields_loads_and_gains_them(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in raw.items() if k not in {*ENGINE_FIELDS, "aux_loss_alpha"}}
    (tmp_path / "config.json").write_text(json.dumps(old))  # as checkpoints were written before
    loaded = seekling.load_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert {k: resaved[k] for k in ENGINE_FIELDS} == ENGINE_FIELDS


@pytest.mark.parametrize("field,value,match", [
    ("scoring_func", "sqrtsoftplus", "scoring_func"),
    ("topk_method", "random", "topk_method"),
    ("moe_layer_freq", 2, "moe_layer_freq"),
    ("model_type", "deepseek_v32", "model_type"),
])
def test_routing_we_do_not_implement_is_refused(field, value, match):
    d = ModelConfig(**TINY).to_hf_dict()
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict({**d, field: value})
