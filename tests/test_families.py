"""The model families: DeepSeek-V2 and Qwen3 against transformers' own models (logits, both directions), the
routing variants, the registry, and every family's engine decoding against a full recompute."""

from __future__ import annotations

import math

import pytest
import torch

import seekling
from seekling.engine import Engine, SamplingParams
from seekling.model.config import ModelConfig
from seekling.model.families import FAMILIES, family, family_of
from seekling.model.layers import rope_frequencies
from seekling.model.moe import route
from seekling.serve.tools import tool_format
from seekling.tokenizer import R1_0528_TEMPLATE

transformers = pytest.importorskip("transformers")

V2_BASE = dict(model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False, vocab_size=96, hidden_size=48,
               intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=3,
               n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, max_position_embeddings=256,
               num_nextn_predict_layers=0)
# V2-Lite's YaRN (factor 40, mscale = mscale_all_dim = 0.707) with an original context the test sequences pass
V2_LITE_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
V2_CONFIGS = {
    "v2-lite-like": dict(q_lora_rank=None, topk_method="greedy", rope_scaling=V2_LITE_YARN),
    "q-lora-greedy-scaled": dict(q_lora_rank=24, topk_method="greedy", routed_scaling_factor=16.0),
    "group-limited": dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                          routed_scaling_factor=2.0),
    "q-lora-group-limited-yarn": dict(q_lora_rank=16, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                      rope_scaling=V2_LITE_YARN, first_k_dense_replace=2),
}
QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=24, vocab_size=128, max_position_embeddings=256)  # head_dim != hidden / heads, as Qwen3's


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """O(1) activations everywhere (the default init gives near-zero logits that hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if is_norm else 0.3) + (1.0 if is_norm else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", sorted(V2_CONFIGS))
def test_deepseek_v2_matches_transformers_both_ways(name, tmp_path):
    cfg = ModelConfig(**{**V2_BASE, **V2_CONFIGS[name]})
    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**cfg.to_hf_dict())).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = seekling.load_pretrained(tmp_path / "hf")
    assert family_of(ours).model_type == "deepseek_v2" and not family_of(ours).mtp
    assert ours.config.topk_method == cfg.topk_method and ours.config.scoring_func == "softmax"
    assert all(m.gate.e_score_correction_bias is None for m in ours.moe_layers())  # V2 has no balancing bias
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = logits_of(hf, ids)
    got = logits_of(ours, ids)
    assert ref.abs().max() > 1.0  # not two near-zero tensors
    assert (ref - got).abs().max().item() <= 1e-4

    ours.save_pretrained(tmp_path / "ours")  # and back: a seekling V2 checkpoint in transformers
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == "DeepseekV2ForCausalLM"
    assert (logits_of(again, ids) - got).abs().max().item() <= 1e-4


def test_route_variants_by_hand():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0, -1.0, 0.5, 2.5, 1.5]])
    soft = logits.softmax(-1)
    # greedy: the top-3 softmax scores, weights not renormalised, scaled
    w, idx, scores = route(logits, 3, "softmax", "greedy", route_scale=2.0, norm_topk_prob=False)
    assert idx[0].tolist() == [3, 6, 1] and torch.allclose(w, 2.0 * soft[:, [3, 6, 1]]) and torch.equal(scores, soft)
    # group-limited greedy: 4 groups of 2 ranked by their best score -> groups 1 (3.0) and 3 (2.5) only
    w, idx, _ = route(logits, 3, "softmax", "group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=True)
    assert idx[0].tolist() == [3, 6, 7] and torch.allclose(w.sum(), torch.tensor(1.0))
    # noaux_tc: groups by the sum of their best two biased scores, top-k on biased scores, unbiased weights
    bias = torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0])
    w, idx, scores = route(logits, 2, "sigmoid", "noaux_tc", bias, n_group=4, topk_group=1, norm_topk_prob=False)
    assert idx[0].tolist() == [0, 1] and torch.allclose(w, logits.sigmoid()[:, [0, 1]])


# YaRN as R1-0528-Qwen3-8B extends Qwen3 (factor 4 over 32k there; over 16 positions here, so the test passes it)
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope", ["default", "yarn", "yarn-attention-factor"])
def test_qwen3_matches_transformers(rope, tmp_path):
    scaling = {"default": None, "yarn": QWEN3_YARN, "yarn-attention-factor": {**QWEN3_YARN, "attention_factor": 0.9,
                                                                              "beta_fast": 16.0}}[rope]
    cfg = transformers.Qwen3Config(**QWEN3, tie_word_embeddings=True, rope_scaling=scaling)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = seekling.load_pretrained(tmp_path)
    assert family_of(ours).model_type == "qwen3" and ours.config.qk_norm and ours.config.head_dim == 24
    assert ours.num_parameters() == hf.num_parameters()
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(2))
    ref = logits_of(hf, ids)
    assert ref.abs().max() > 1.0
    assert (logits_of(ours, ids) - ref).abs().max().item() <= 1e-4


def test_yarn_attn_factor_multiplies_mscale_as_vllm_and_llama_cpp_read_it():
    """R1-0528-Qwen3-8B's config gives attn_factor 0.878 = 1 / mscale(4): vLLM and llama.cpp multiply it into
    YaRN's mscale (so cos/sin keep their size); transformers ignores the key. seekling reads it as the runtimes."""
    r1_0528 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
               "attn_factor": 0.8782488562869419}
    _, factor = rope_frequencies(128, 1e6, r1_0528)
    assert factor == pytest.approx(1.0, abs=1e-6)
    _, plain = rope_frequencies(128, 1e6, {**r1_0528, "attn_factor": 1.0})
    assert plain == pytest.approx(0.1 * math.log(4.0) + 1)


def tiny_model(model_type: str) -> torch.nn.Module:
    """A random model of each family, built through the registry from the config.json transformers writes."""
    if model_type.startswith("deepseek"):
        extra = V2_CONFIGS["v2-lite-like"] if model_type == "deepseek_v2" else dict(
            model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
            q_lora_rank=16, n_group=2, topk_group=1, num_nextn_predict_layers=1)
        raw = ModelConfig(**{**V2_BASE, **extra}).to_hf_dict()
    else:
        config = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "llama": transformers.LlamaConfig}[model_type](**QWEN3)
        raw = config.to_dict()
    fam = family(raw["model_type"])
    torch.manual_seed(0)
    model = fam.build(fam.read_config(raw))
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_engine_greedy_equals_full_recompute(model_type):
    """Batched, chunked, paged decoding gives the tokens of recomputing the whole sequence at every step."""
    model = tiny_model(model_type)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 19, 11)]
    engine = Engine(model, block_size=4, max_num_batched_tokens=16)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        for _ in range(10):
            ids.append(int(logits_of(model, torch.tensor([ids]))[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):], model_type


def test_registry_refuses_what_it_does_not_know(tmp_path):
    with pytest.raises(ValueError, match="unsupported architecture: model_type='mistral'.*seekling reads deepseek_v3"):
        family("mistral", ["MistralForCausalLM"])
    assert {f.gguf_arch for f in FAMILIES.values()} == {"deepseek2", "qwen2", "qwen3", "llama"}
    assert FAMILIES["deepseek_v3"].mtp and not FAMILIES["deepseek_v2"].mtp
    assert FAMILIES["qwen2"].tool_format == "hermes" and FAMILIES["llama"].tool_format == "llama3"
    # the server picks the family's format when the checkpoint's template renders no tools (R1-0528's does not)
    formats = {t: tool_format(R1_0528_TEMPLATE, t)[0].name for t in FAMILIES}
    assert formats == {"deepseek_v3": "deepseek", "deepseek_v2": "deepseek", "qwen3": "deepseek", "qwen2": "hermes",
                       "llama": "llama3"}
