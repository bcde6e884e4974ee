"""`seekling export --format gguf`: every key and tensor of the GGUF, read back with the gguf package's
reader, against the checkpoint (no llama.cpp needed; tests/test_gguf_llamacpp.py runs the files)."""

import json
import math

import numpy as np
import pytest
import torch

from seekling.cli import main as cli
from seekling.export import export_gguf
from seekling.model import Transformer
from seekling.model.config import ModelConfig
from seekling.tasks import sample_problems
from seekling.tokenizer import SPLIT_PATTERN, load_tokenizer, render_chat, train_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
DEEPSEEK = {
    # no query compression, a dense first layer, an MTP layer (dropped), one expert group
    "v2lite-like": dict(q_lora_rank=None, first_k_dense_replace=1, num_nextn_predict_layers=1),
    # query compression, group-limited routing, YaRN, tied embeddings, a routed scale, no renormalisation
    "v3-like": dict(q_lora_rank=32, n_group=2, topk_group=1, rope_scaling=YARN, tie_word_embeddings=True,
                    routed_scaling_factor=2.5, norm_topk_prob=False, num_nextn_predict_layers=0),
}
DENSE_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [render_chat(p.messages()) for p in sample_problems("addition", 200, seed=0)]
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 320).save_pretrained(path)
    return path


def deepseek_checkpoint(path, tokenizer_dir, **overrides):
    tok = load_tokenizer(tokenizer_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size + 13, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=3, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                      kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval()


def dense_checkpoint(path, tokenizer_dir, arch):
    tok = load_tokenizer(tokenizer_dir)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**DENSE_SHAPE, vocab_size=tok.vocab_size, tie_word_embeddings=True,
                                       rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**DENSE_SHAPE, vocab_size=tok.vocab_size, attention_bias=True,
                                       rope_theta=500000.0, rope_scaling={
                                           "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9,
                                                            eos_token_id=tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval()


def read(path):
    reader = gguf.GGUFReader(path)
    keys = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return keys, tensors


def values(t) -> np.ndarray:
    """A tensor's data in numpy (PyTorch) order, dequantised."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))


def check_tensor(tensors, name, expected: torch.Tensor, qtype=T.F32):
    t = tensors.pop(name)
    ref = expected.detach().float().numpy()
    assert [int(n) for n in t.shape] == list(reversed(ref.shape)), name  # ggml's ne order
    assert t.tensor_type == qtype, name
    got = values(t)
    if qtype == T.F32:
        assert np.array_equal(got, ref), name
    else:  # Q8_0: a scale d = max|x|/127 per 32 values; error <= d/2 + 127 * (fp16 rounding of d <= d/2048)
        step = np.abs(ref.reshape(-1, 32)).max(1, keepdims=True) / 127
        assert (np.abs(got.reshape(-1, 32) - ref.reshape(-1, 32)) <= 0.563 * step + 1e-9).all(), name


def check_tokenizer(keys, tokenizer_dir, vocab_size):
    tok = load_tokenizer(tokenizer_dir)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    by_id = {i: s for s, i in tok.tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    user_defined = {a["id"] for a in spec["added_tokens"] if not a["special"]}
    assert keys.pop("tokenizer.ggml.model") == "gpt2"
    assert keys.pop("tokenizer.ggml.pre") == "qwen2" and spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {
        "Regex": SPLIT_PATTERN}
    assert keys.pop("tokenizer.ggml.tokens") == [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    assert keys.pop("tokenizer.ggml.token_type") == [
        5 if i not in by_id else 3 if i in special else 4 if i in user_defined else 1 for i in range(vocab_size)]
    assert keys.pop("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                 for m in spec["model"]["merges"]]
    assert keys.pop("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert keys.pop("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert keys.pop("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert keys.pop("tokenizer.ggml.add_bos_token") is False and keys.pop("tokenizer.ggml.add_eos_token") is False
    assert keys.pop("tokenizer.chat_template") == tok.chat_template


def check_general(keys, name, file_type, temperature, top_p):
    assert keys.pop("general.type") == "model" and keys.pop("general.name") == name
    assert keys.pop("general.file_type") == file_type and keys.pop("general.quantization_version") == 2
    assert keys.pop("general.sampling.temp") == pytest.approx(temperature)
    assert keys.pop("general.sampling.top_p") == pytest.approx(top_p)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("variant", sorted(DEEPSEEK))
def test_deepseek_v3_gguf_matches_the_checkpoint(variant, outtype, tmp_path, tokenizer_dir):
    model = deepseek_checkpoint(tmp_path / "m", tokenizer_dir, **DEEPSEEK[variant])
    cfg: ModelConfig = model.config
    export_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", outtype=outtype)
    keys, tensors = read(tmp_path / "out" / "m.gguf")

    assert keys.pop("general.architecture") == "deepseek2"
    check_general(keys, "m", 0 if outtype == "f32" else 7, 0.6, 0.95)
    check_tokenizer(keys, tokenizer_dir, cfg.vocab_size)
    yarn = {} if cfg.rope_scaling is None else {
        "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 64,
        "rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
        "rope.scaling.yarn_log_multiplier": pytest.approx(0.0707)}
    expected = {
        "context_length": 2048, "embedding_length": 64, "feed_forward_length": 96, "block_count": 3,
        "vocab_size": cfg.vocab_size, "attention.head_count": 2, "attention.head_count_kv": 1,
        "attention.layer_norm_rms_epsilon": pytest.approx(1e-6), "attention.q_lora_rank": cfg.q_lora_rank or 0,
        "attention.kv_lora_rank": 32, "attention.key_length": 32 + 16, "attention.value_length": 32,
        "attention.key_length_mla": 32 + 16, "attention.value_length_mla": 32, "rope.dimension_count": 16,
        "rope.freq_base": 10000.0, "leading_dense_block_count": 1, "expert_count": 4, "expert_used_count": 2,
        "expert_shared_count": 1, "expert_feed_forward_length": 32, "expert_group_count": cfg.n_group,
        "expert_group_used_count": cfg.topk_group, "expert_gating_func": 2,  # sigmoid
        "expert_weights_norm": cfg.norm_topk_prob, "expert_weights_scale": cfg.routed_scaling_factor, **yarn}
    assert {k.removeprefix("deepseek2."): v for k, v in keys.items()} == expected

    q8 = T.F32 if outtype == "f32" else T.Q8_0
    sd = model.state_dict()
    check_tensor(tensors, "token_embd.weight", sd["model.embed_tokens.weight"], q8)
    check_tensor(tensors, "output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        check_tensor(tensors, "output.weight", sd["lm_head.weight"], q8)
    H, nope, v, r = 2, 32, 32, 32
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        check_tensor(tensors, f"blk.{L}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        check_tensor(tensors, f"blk.{L}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        if cfg.q_lora_rank is None:
            check_tensor(tensors, f"blk.{L}.attn_q.weight", sd[p + "self_attn.q_proj.weight"], q8)
        else:
            check_tensor(tensors, f"blk.{L}.attn_q_a.weight", sd[p + "self_attn.q_a_proj.weight"], q8)
            check_tensor(tensors, f"blk.{L}.attn_q_a_norm.weight", sd[p + "self_attn.q_a_layernorm.weight"])
            check_tensor(tensors, f"blk.{L}.attn_q_b.weight", sd[p + "self_attn.q_b_proj.weight"], q8)
        check_tensor(tensors, f"blk.{L}.attn_kv_a_mqa.weight", sd[p + "self_attn.kv_a_proj_with_mqa.weight"], q8)
        check_tensor(tensors, f"blk.{L}.attn_kv_a_norm.weight", sd[p + "self_attn.kv_a_layernorm.weight"])
        kv_b = sd[p + "self_attn.kv_b_proj.weight"]  # rows: head 0 (nope, v), head 1 (nope, v)
        k_b = torch.stack([kv_b[h * (nope + v):h * (nope + v) + nope].T for h in range(H)])  # [H, r, nope]
        v_b = torch.stack([kv_b[h * (nope + v) + nope:(h + 1) * (nope + v)] for h in range(H)])  # [H, v, r]
        assert k_b.shape == (H, r, nope) and v_b.shape == (H, v, r)
        check_tensor(tensors, f"blk.{L}.attn_k_b.weight", k_b, q8)
        check_tensor(tensors, f"blk.{L}.attn_v_b.weight", v_b, q8)
        check_tensor(tensors, f"blk.{L}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], q8)
        if L < cfg.first_k_dense_replace:
            for x in ("gate", "up", "down"):
                check_tensor(tensors, f"blk.{L}.ffn_{x}.weight", sd[p + f"mlp.{x}_proj.weight"], q8)
            continue
        check_tensor(tensors, f"blk.{L}.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])  # the router stays F32
        check_tensor(tensors, f"blk.{L}.exp_probs_b.bias", sd[p + "mlp.gate.e_score_correction_bias"])
        for x in ("gate", "up", "down"):
            experts = torch.stack([sd[p + f"mlp.experts.{e}.{x}_proj.weight"] for e in range(4)])
            check_tensor(tensors, f"blk.{L}.ffn_{x}_exps.weight", experts, q8)
            check_tensor(tensors, f"blk.{L}.ffn_{x}_shexp.weight", sd[p + f"mlp.shared_experts.{x}_proj.weight"], q8)
    assert not tensors  # nothing else: the MTP layer is left out, as llama.cpp's converter does

    head, template, params = (tmp_path / "out" / "Modelfile").read_text().split('"""')
    assert head == "FROM ./m.gguf\nTEMPLATE "
    # the R1 format: bos + system, user turns, answers closed by eos, the prompt opening the think block
    assert template.startswith("<｜begin▁of▁sentence｜>{{ if .System }}{{ .System }}{{ end }}")
    assert "<｜User｜>{{ .Content }}" in template and "<｜Assistant｜><think>\n{{ end }}" in template
    assert params.splitlines() == ["", 'PARAMETER stop "<｜end▁of▁sentence｜>"', 'PARAMETER stop "<｜User｜>"',
                                   "PARAMETER temperature 0.6", "PARAMETER top_p 0.95"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_dense_gguf_matches_the_checkpoint(arch, tmp_path, tokenizer_dir):
    model = dense_checkpoint(tmp_path / "m", tokenizer_dir, arch)
    cli(["export", "--model", str(tmp_path / "m"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    keys, tensors = read(tmp_path / "m.gguf")
    vocab = model.config.vocab_size
    assert keys.pop("general.architecture") == arch
    check_general(keys, "m", 0, 0.7, 0.9)
    check_tokenizer(keys, tokenizer_dir, vocab)
    expected = {"context_length": 512, "embedding_length": 64, "feed_forward_length": 96, "block_count": 2,
                "vocab_size": vocab, "attention.head_count": 4, "attention.head_count_kv": 2,
                "attention.key_length": 16, "attention.value_length": 16,
                "attention.layer_norm_rms_epsilon": pytest.approx(1e-6), "rope.dimension_count": 16,
                "rope.freq_base": 1e6 if arch == "qwen2" else 500000.0}
    assert {k.removeprefix(f"{arch}."): v for k, v in keys.items()} == expected

    sd = model.state_dict()
    check_tensor(tensors, "token_embd.weight", sd["model.embed_tokens.weight"])
    check_tensor(tensors, "output_norm.weight", sd["model.norm.weight"])
    if arch == "llama":
        check_tensor(tensors, "output.weight", sd["lm_head.weight"])
        # llama3 scaling as per-frequency divisors (Llama-3.1's formula): 1 for wavelengths under 64/4, 8 over
        # 64/1, interpolated between
        wavelen = 2 * math.pi * 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
        smooth = (64 / wavelen - 1) / (4 - 1)
        factors = torch.where(wavelen < 16, 1.0, torch.where(wavelen > 64, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
        assert factors[0] == 1 and 1 < factors[1] < 8 and factors[-1] == 8  # a frequency in each band
        t = tensors.pop("rope_freqs.weight")
        assert t.tensor_type == T.F32 and np.allclose(values(t), factors.numpy(), rtol=1e-6)

    def interleaved(w, heads):  # GGML's rope pairs (x0, x1), (x2, x3): row 2i <- row i, 2i+1 <- i + d/2
        d = w.shape[0] // heads
        order = [h * d + (i // 2 if i % 2 == 0 else d // 2 + i // 2) for h in range(heads) for i in range(d)]
        return w[order]

    for L in range(2):
        p = f"model.layers.{L}."
        check_tensor(tensors, f"blk.{L}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        check_tensor(tensors, f"blk.{L}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for x, heads in (("q", 4), ("k", 2), ("v", None)):
            for part in ("weight", "bias"):
                w = sd[p + f"self_attn.{x}_proj.{part}"]
                check_tensor(tensors, f"blk.{L}.attn_{x}.{part}", interleaved(w, heads) if arch == "llama" and heads
                             else w)
        check_tensor(tensors, f"blk.{L}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        if arch == "llama":
            check_tensor(tensors, f"blk.{L}.attn_output.bias", sd[p + "self_attn.o_proj.bias"])
        for x in ("gate", "up", "down"):
            check_tensor(tensors, f"blk.{L}.ffn_{x}.weight", sd[p + f"mlp.{x}_proj.weight"])
    assert not tensors


def test_export_refuses_what_llama_cpp_cannot_run(tmp_path, tokenizer_dir):
    deepseek_checkpoint(tmp_path / "m", tokenizer_dir, rope_scaling={**YARN, "mscale": 1.0})
    with pytest.raises(ValueError, match="cannot reproduce this YaRN"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(SystemExit):
        cli(["export", "--model", str(tmp_path / "m"), "--format", "gguf", "--out", str(tmp_path / "x.gguf"),
             "--shard-gb", "1"])
