"""The exported GGUF in llama.cpp (llama-cpp-python, the `bench` extra): the same greedy tokens as seekling on
a trained DeepSeek-V3 model and on dense ones, the same logits on random models that exercise every
export path (DeepSeek-V3 and V2, Qwen2, Qwen3, Llama), and llama.cpp's tokenizer splitting chat text as ours
does; and the other way, llama.cpp's own Q8_0 file of the trained model read by seekling gives llama.cpp's greedy
tokens (with LLAMA_CPP_CONVERTER set, see tests/test_gguf_in.py). Skipped without llama_cpp."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import seekling
from seekling.export import export_gguf
from seekling.model import Transformer
from seekling.model.config import ModelConfig
from seekling.tasks import sample_problems
from seekling.tokenizer import load_tokenizer, render_chat, train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))  # the sibling test modules' helpers, whatever the import mode
from test_gguf_in import CONVERTER, convert_with_llama_cpp  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")

# a trained speedrun model, when this machine has one (else a small model is trained here)
TRAINED = [Path(p) for p in (os.environ.get("SEEKLING_TRAINED_MODEL"), "/work/runs/sr1/rl") if p]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def llama(path: Path, exact: bool = True) -> "llama_cpp.Llama":
    """llama.cpp with seekling's arithmetic (fp32 KV cache, no flash attention: logits agree to ~1e-5
    relative), or with llama-cli's defaults (f16 cache, flash attention, whose CPU kernel rounds through f16:
    ~1e-3 relative)."""
    f32 = llama_cpp.GGML_TYPE_F32
    kw = {"type_k": f32, "type_v": f32, "flash_attn": False} if exact else {"flash_attn": True}
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, logits_all=True,
                           verbose=False, **kw)


def llama_greedy(llm, prompt: list[int], n: int, eos: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < n and (not out or out[-1] != eos):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def seekling_logits(path: Path, ids: list[int]) -> np.ndarray:
    model = seekling.load_pretrained(path)
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return getattr(out, "logits", out)[0].numpy()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [render_chat(p.messages()) for task in ("addition", "word") for p in sample_problems(task, 300, seed=0)]
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 400).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, tokenizer_dir) -> Path:
    existing = next((p for p in TRAINED if (p / "config.json").exists() and (p / "tokenizer.json").exists()), None)
    if existing:
        return existing
    # no speedrun model here: ~15 s of pretraining on the task text gives confident greedy predictions
    tok = load_tokenizer(tokenizer_dir)
    texts = [render_chat(p.messages()) for task in ("addition", "word") for p in sample_problems(task, 400, seed=1)]
    ids = torch.tensor([(tok.encode(t) + [tok.eos_token_id] * 64)[:64] for t in texts])
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        batch = ids[torch.randint(0, len(ids), (8,))]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_expert_bias()
    path = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_trained_deepseek_v3_gives_the_same_greedy_tokens(trained_model, tmp_path):
    export_gguf(trained_model, tmp_path / "m.gguf")
    tok = seekling.load_tokenizer(str(trained_model))
    llm = llama(tmp_path / "m.gguf", exact=False)  # as llama-cli runs it by default
    questions = [p.question for task in ("addition", "countdown", "multiplication", "word")
                 for p in sample_problems(task, 2, split="test", seed=3)]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    prompts = [tok.encode(t) for t in texts]
    # llama.cpp's own tokenizer (pre-tokenizer, merges, special tokens) splits the chat text as ours does
    assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == prompts
    engine = seekling.Engine(str(trained_model))
    ours = engine.generate(prompts, seekling.SamplingParams(temperature=0.0, max_tokens=48))
    theirs = [llama_greedy(llm, p, 48, tok.eos_token_id) for p in prompts]
    assert [o.token_ids for o in ours] == theirs
    assert sum(len(t) for t in theirs) > 8 * 10  # real completions, not an immediate eos


@pytest.mark.parametrize("variant", ["no-q-lora", "q-lora-groups-yarn-tied", "deepseek-v2-lite-like"])
def test_random_deepseek_v3_gives_the_same_logits(variant, tmp_path, tokenizer_dir):
    """Wide random weights and a routing bias, so every export path (k_b/v_b split, stacked experts, router,
    groups, routed scale, YaRN past its original context, tied output; DeepSeek-V2's softmax greedy routing)
    shows in the logits."""
    extra = {"no-q-lora": dict(q_lora_rank=None),
             "q-lora-groups-yarn-tied": dict(q_lora_rank=32, n_group=2, topk_group=1, rope_scaling=YARN,
                                             tie_word_embeddings=True, routed_scaling_factor=2.5,
                                             norm_topk_prob=False),
             "deepseek-v2-lite-like": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                                           q_lora_rank=None, norm_topk_prob=False, rope_scaling=YARN)}[variant]
    tok = load_tokenizer(tokenizer_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=3, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                      kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      num_nextn_predict_layers=1, **extra)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if "norm" in name else 0.3) + (1.0 if "norm" in name else 0.0))
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    ids = torch.randint(7, tok.vocab_size, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, got = seekling_logits(tmp_path / "m", ids), llama_logits(llama(tmp_path / "m.gguf"), ids)
    assert np.abs(got - ref).max() <= 3e-5 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_dense_gives_the_same_greedy_tokens_and_logits(arch, tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=512)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=32))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, attention_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}, rope_theta=50000.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 1.0 if "embed" in name else 0.15)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    llm = llama(tmp_path / "m.gguf")
    ids = torch.randint(7, tok.vocab_size, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, got = seekling_logits(tmp_path / "m", ids), llama_logits(llm, ids)
    assert np.abs(got - ref).max() <= 3e-5 * np.abs(ref).max()
    prompts = [ids[i:i + 12] for i in range(0, 48, 12)]
    engine = seekling.Engine(str(tmp_path / "m"))
    ours = engine.generate(prompts, seekling.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in ours] == [llama_greedy(llm, p, 24, eos=-1) for p in prompts]


@pytest.mark.skipif(not CONVERTER, reason="set LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py")
def test_llama_cpps_q8_0_file_read_by_seekling_gives_llama_cpps_greedy_tokens(tmp_path):
    """llama.cpp's own converter writes a speedrun model as Q8_0; seekling reads that file (tokenizer, template
    and weights, into int8) and decodes greedily the tokens llama.cpp decodes from it, on at least 7 of 8
    prompts (its Q8_0 blocks become int8 rows here, so a near-tie may go the other way). A speedrun's model, not
    the stand-in the other tests train: that one's 120 steps leave near-ties that Q8_0's own rounding flips
    (the fp32 checkpoint itself agrees with llama.cpp's Q8_0 run on 6 of 8)."""
    trained_model = next((p for p in TRAINED if (p / "config.json").exists() and (p / "tokenizer.json").exists()),
                         None)
    if trained_model is None:
        pytest.skip("no speedrun model: set SEEKLING_TRAINED_MODEL to a run's rl/ directory")
    path = convert_with_llama_cpp(trained_model, tmp_path / "q8_0.gguf", "q8_0")
    tok = seekling.load_tokenizer(str(path))
    questions = [p.question for task in ("addition", "countdown", "multiplication", "word")
                 for p in sample_problems(task, 2, split="test", seed=3)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in questions]
    assert prompts == [load_tokenizer(trained_model).apply_chat_template([{"role": "user", "content": q}],
                                                                         tokenize=True) for q in questions]
    llm = llama(path, exact=False)  # as llama-cli runs it
    theirs = [llama_greedy(llm, p, 48, tok.eos_token_id) for p in prompts]
    engine = seekling.Engine(str(path))
    assert engine.model.quantized == "int8"
    ours = engine.generate(prompts, seekling.SamplingParams(temperature=0.0, max_tokens=48))
    same = [o.token_ids == t for o, t in zip(ours, theirs, strict=True)]
    print(f"llama.cpp's Q8_0 file: seekling's greedy tokens equal llama.cpp's on {sum(same)} of {len(same)} prompts")
    assert sum(same) >= 7
    assert sum(len(t) for t in theirs) > 8 * 10  # real completions, not an immediate eos
