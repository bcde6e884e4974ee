"""The DeepSeek-V3 model: parity with transformers both ways, balancing, MTP, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import seekling
from seekling.model import Transformer
from seekling.model.config import ModelConfig, preset

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            max_position_embeddings=256, routed_scaling_factor=2.5, num_nextn_predict_layers=1)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "no-q-lora": dict(q_lora_rank=None),
    "q-lora-groups": dict(q_lora_rank=24, n_group=4, topk_group=2),
    "dense-first-2-yarn": dict(q_lora_rank=None, first_k_dense_replace=2, rope_scaling=YARN, n_group=2,
                               topk_group=1, norm_topk_prob=False),
    "yarn-q-lora": dict(q_lora_rank=16, rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def hf_config(cfg: ModelConfig):
    return transformers.DeepseekV3Config(**cfg.to_hf_dict())


def randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, including norms and the routing bias, so parity means something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if is_norm else 0.3) + (1.0 if is_norm else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_checkpoint_loads_in_seekling_and_back(name, tmp_path):
    cfg = ModelConfig(**{**BASE, **CONFIGS[name]})
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = seekling.load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert (ref - got).abs().max().item() <= 1e-4

    # and the other way: a seekling checkpoint (with its MTP layer) loads in transformers
    ours.save_pretrained(tmp_path / "ours")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (hf2(ids).logits - got).abs().max().item() <= 1e-4


def test_seekling_trained_checkpoint_loads_in_transformers(tmp_path):
    cfg = ModelConfig(**{**BASE, **CONFIGS["q-lora-groups"]})
    torch.manual_seed(0)
    model = Transformer(cfg)
    randomize(model)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "deepseek_v3" and written["n_group"] == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 33))
    model.eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-4


def test_aux_free_balancing_reduces_skew():
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=64, hidden_size=32, num_hidden_layers=2, n_routed_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_attention_heads=2,
                 num_nextn_predict_layers=0, bias_update_speed=2e-3)
    model = Transformer(cfg).train()
    moe = model.moe_layers()[0]
    with torch.no_grad():  # a skewed router: experts 0 and 1 win nearly every token
        moe.gate.weight.normal_(0, 0.2)
        moe.gate.weight[:2] += 0.15
    x = torch.randn(512, 32) + 0.5  # tokens share a direction the favoured experts align with

    def skew() -> float:
        moe.load.zero_()
        moe(x.unsqueeze(0))
        load = moe.load.clone()
        moe.load.zero_()
        return (load.max() / load.mean()).item()

    before = skew()
    for _ in range(300):  # bias rule alone: no gradient, no balance loss
        moe(x.unsqueeze(0))
        moe.update_bias()
    after = skew()
    assert before > 3.5
    assert after < 1.3 and after < before / 2.5, (before, after)
    assert not moe.gate.e_score_correction_bias.requires_grad


def test_bias_gets_no_gradient_and_selection_uses_it():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "q_lora_rank": None})
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()
    gate = model.moe_layers()[0].gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.e_score_correction_bias.grad is None
    # a large bias on expert 5 forces it into every token's top-k, yet its gate weight is unbiased
    with torch.no_grad():
        gate.e_score_correction_bias[5] = 10.0
    w, idx, scores = gate(torch.randn(7, cfg.hidden_size))
    assert (idx == 5).any(-1).all()
    assert torch.all(w.sum(-1) - cfg.routed_scaling_factor < 1e-5)


def test_sequence_balance_loss_is_reported():
    cfg = ModelConfig(**{**BASE, "q_lora_rank": None, "seq_aux_alpha": 1e-2})
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    assert out.balance_loss is not None and out.balance_loss.item() > 0
    torch.testing.assert_close(out.loss, out.ce_loss + cfg.mtp_loss_weight * out.mtp_loss + out.balance_loss)


def test_mtp_learns_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "q_lora_rank": None, "num_nextn_predict_layers": 2, "vocab_size": 32})
    model = Transformer(cfg).train()
    # a learnable sequence: counting mod 32 from a random start
    start = torch.randint(0, 32, (8, 1))
    ids = (start + torch.arange(24)) % 32
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(50):
        out = model(ids, labels=ids)
        first = first if first is not None else out.mtp_loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_expert_bias()
    assert out.mtp_loss.item() < first / 3, (first, out.mtp_loss.item())
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = seekling.load_pretrained(tmp_path)
    model.eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        h = model(ids).hidden_states
        pos = torch.arange(23).unsqueeze(0)
        a, _ = model.mtp_logits(h[:, :-1], ids[:, 1:], pos)
        b, _ = loaded.mtp_logits(h[:, :-1], ids[:, 1:], pos)
    assert torch.equal(a, b)
    # the trained MTP head predicts t+2 on the counting sequence
    assert (a.argmax(-1)[:, :-1] == ids[:, 2:]).float().mean() > 0.9


def test_bad_checkpoints_fail_clearly(tmp_path):
    cfg = ModelConfig(**{**BASE, "q_lora_rank": None})
    Transformer(cfg).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        seekling.load_pretrained(tmp_path / "nope")
    raw = json.loads((tmp_path / "config.json").read_text())
    bad = dict(raw, kv_lora_rank=8)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="has shape"):
        seekling.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, num_hidden_layers=4)))
    with pytest.raises(ValueError, match="unexpected tensors|missing tensors"):
        seekling.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.experts.3.up_proj.weight'\]"):
        seekling.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, model_type="gpt2")))
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gpt2'"):
        seekling.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported ModelConfig"):
        ModelConfig(**{**BASE, "n_group": 3})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        seekling.load_pretrained(tmp_path)


def test_presets_count_parameters():
    assert 600e9 < preset("deepseek-v3").num_parameters(include_mtp=False) < 700e9
    assert 30e9 < preset("deepseek-v3").num_parameters(include_mtp=False, active=True) < 45e9
    assert 14e9 < preset("deepseek-v2-lite").num_parameters() < 17e9
    small = preset("small")
    assert 25e6 <= small.num_parameters() <= 50e6
    tiny = preset("tiny", vocab_size=2048)
    assert Transformer(tiny).num_parameters() == tiny.num_parameters()
