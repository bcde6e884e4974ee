"""Serving the DeepSeek-R1-Distill architectures (Qwen2 / Llama) with seekling's engine, API and chat app.

Tiny random checkpoints saved by transformers, with a tokenizer directory carrying the released
DeepSeek-R1-Distill chat template (its generation prompt ends in "<｜Assistant｜><think>\\n"), are checked
against transformers' own `generate` and `apply_chat_template`, and served through the live server to
the official openai client.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import openai
import pytest
import torch
from test_dense import _randomise

from seekling.engine import Engine, SamplingParams
from seekling.engine.detok import turn_start_ids
from seekling.model import DenseModel, load_pretrained
from seekling.serve.app import add_serve_args, load_engine
from seekling.serve.security import Settings
from seekling.tokenizer import BOS, EOS, THINK_END, load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))  # the sibling test modules' helpers, whatever the import mode
from test_serve import LiveServer  # noqa: E402
from test_tokenizer import R1_DISTILL_TEMPLATE  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
CORPUS = ["Let me think about it. The answer is 42, and 7 + 5 = 12. Hello world! What is 2 + 3?"] * 20
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
PROMPTS = [  # mixed lengths: chat prompts (ending inside <think>) and plain text
    QUESTION,
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! What is 7 + 5 = 12?"}],
    "The answer",
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"},
     {"role": "user", "content": "Let me think about it: 42?"}],
]


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory) -> Path:
    """The released tokenizer layout: tokenizer.json + tokenizer_config.json with R1-Distill's template."""
    path = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(CORPUS, vocab_size=300)
    (path / "tokenizer.json").write_text(tok.tokenizer.to_str())
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": True, "model_max_length": 16384, "chat_template": R1_DISTILL_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return path


def _checkpoint(path: Path, tok_files: Path, model, steer: bool = False):
    """Randomise with O(1) activations (the default init gives near-tied logits), save, add the tokenizer.
    steer: make the model close its think block early, so the greedy answer to QUESTION has both a
    reasoning part and an answer (lm_head's row of </think> becomes 1.1x that of the 3rd greedy token, so
    </think> wins where that token would have, not before)."""
    tok = load_tokenizer(tok_files)
    _randomise(model)
    with torch.no_grad():
        if steer:
            ids = torch.tensor([tok.apply_chat_template(QUESTION, tokenize=True)])
            third = model.generate(ids, do_sample=False, max_new_tokens=3)[0, -1]
            model.lm_head.weight[tok.think_end_id] = 1.1 * model.lm_head.weight[third]
    # several eos ids, as the released generation_config.json files may list
    model.generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.95, bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<｜User｜>")])
    model.save_pretrained(path)
    for f in tok_files.iterdir():
        shutil.copy(f, path / f.name)
    return path, model.eval()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tok_files):
    cfg = transformers.Qwen2Config(**TINY, vocab_size=300)
    return _checkpoint(tmp_path_factory.mktemp("qwen2"), tok_files, transformers.Qwen2ForCausalLM(cfg), steer=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tok_files):
    cfg = transformers.LlamaConfig(**TINY, vocab_size=300, rope_theta=50000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})  # shorter than the prompts: the scaling matters
    return _checkpoint(tmp_path_factory.mktemp("llama"), tok_files, transformers.LlamaForCausalLM(cfg))


@pytest.fixture(params=["qwen2", "llama"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


def hf_greedy(ref, prompt_ids: list[int], n: int, eos: list[int]) -> list[int]:
    out = ref.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                       pad_token_id=eos[0])
    return out[0, len(prompt_ids):].tolist()


def test_engine_greedy_matches_transformers_generate(checkpoint):
    path, ref = checkpoint
    # small blocks and a small token budget: several blocks per sequence and chunked prefills
    engine = Engine(path, block_size=4, max_num_batched_tokens=24)
    assert isinstance(engine.model, DenseModel) and engine.model.config.model_type == ref.config.model_type
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=14))
    lengths = {len(o.prompt_token_ids) for o in outs}
    assert len(lengths) == len(PROMPTS) and max(lengths) > 24  # mixed lengths, one longer than a chunk
    eos = ref.generation_config.eos_token_id
    for o in outs:
        expected = hf_greedy(ref, o.prompt_token_ids, 14, eos)
        assert o.token_ids == expected
        assert o.finish_reason == ("stop" if expected[-1] in eos else "length")

    # A cache too small for all four at once: preemption and recomputation give the same tokens; n=2
    # greedy samples fork the prefilled prompt (shared and copied K/V blocks) and agree with each other.
    tight = Engine(path, block_size=4, cache_blocks=24)
    again = tight.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=14, n=2))
    assert tight.stats()["num_preemptions"] > 0
    for o, a in zip(outs, again, strict=True):
        assert [c.token_ids for c in a.outputs] == [o.token_ids, o.token_ids]


def test_stops_on_any_of_the_checkpoints_eos_ids(qwen2, tmp_path):
    path, ref = qwen2
    prompt = load_tokenizer(path).apply_chat_template(PROMPTS[1], tokenize=True)
    free = hf_greedy(ref, prompt, 8, [-1])
    stop_at = free[4]  # a second eos id the model produces greedily
    shutil.copytree(path, tmp_path / "m")
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"][0], stop_at]
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(gen))
    engine = Engine(tmp_path / "m")
    assert engine.eos_token_ids == set(gen["eos_token_id"]) | turn_start_ids(engine.tokenizer)  # (+ <｜User｜>)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.token_ids == hf_greedy(ref, prompt, 8, gen["eos_token_id"]) == free[:free.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    ignored = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_chat_template_renders_as_transformers(qwen2):
    path, _ = qwen2
    ours, theirs = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    for messages in [p for p in PROMPTS if isinstance(p, list)]:
        for gen_prompt in (True, False):
            text = theirs.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
            assert ours.apply_chat_template(messages, gen_prompt) == text
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert ours.apply_chat_template(messages, tokenize=True) == list(ids)
    rendered = ours.apply_chat_template(PROMPTS[3])
    assert rendered.startswith(BOS) and rendered.endswith("<｜Assistant｜><think>\n") and "hm" not in rendered


def test_reasoning_split_starts_inside_think(qwen2):
    path, _ = qwen2
    engine = Engine(path)
    tok = engine.tokenizer
    out = engine.generate(QUESTION, SamplingParams(temperature=0, max_tokens=10))[0]
    assert tok.think_end_id in out.token_ids  # the steered checkpoint closes its think block
    # the completion starts inside <think>: all before </think> is reasoning, the rest the answer
    # (an eos id that stops the sequence is not part of the text)
    full = tok.decode(out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids)
    reasoning, answer = full.split(THINK_END, 1)
    assert out.reasoning == reasoning.strip("\n") and out.text == answer.lstrip("\n")
    assert out.reasoning and out.text


def test_served_through_the_openai_client(qwen2, tmp_path):
    path, _ = qwen2
    engine = Engine(path, max_num_seqs=8)
    ref = engine.generate(QUESTION, SamplingParams(temperature=0, max_tokens=10))[0]
    assert ref.reasoning and ref.text
    server = LiveServer(engine, model=str(path), model_name=None, data_dir=str(tmp_path / "data"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == [path.name]  # the directory's name by default
        r = client.chat.completions.create(model=path.name, messages=QUESTION, temperature=0, max_tokens=10)
        msg = r.choices[0].message
        assert msg.content == ref.text and msg.model_extra["reasoning_content"] == ref.reasoning
        assert r.usage.completion_tokens == len(ref.token_ids)
        chunks = list(client.chat.completions.create(model=path.name, messages=QUESTION, temperature=0,
                                                     max_tokens=10, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == ref.text
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == ref.reasoning
        # Without temperature/top_p the request samples with generation_config.json's 0.6 / 0.95.
        assert engine.generation_defaults == {"temperature": 0.6, "top_p": 0.95}
        seeded = client.chat.completions.create(model=path.name, messages=QUESTION, max_tokens=12, seed=3)
        expect = engine.generate(QUESTION, SamplingParams(temperature=0.6, top_p=0.95, max_tokens=12, seed=3))[0]
        hot = engine.generate(QUESTION, SamplingParams(temperature=1.0, max_tokens=12, seed=3))[0]
        got = seeded.choices[0].message
        assert (got.model_extra["reasoning_content"], got.content) == (expect.reasoning, expect.text)
        assert expect.token_ids != hot.token_ids  # the defaults made a difference
    finally:
        server.close()


def test_load_options_and_refusals(qwen2):
    path, _ = qwen2
    with pytest.raises(MemoryError, match=r"needs .* max_memory_gb=1e-06"):
        Engine(path, max_memory_gb=1e-6)
    with pytest.raises(ValueError, match="MTP"):
        Engine(path, speculative=True)
    with pytest.raises(ValueError, match="quantize"):
        Engine(path, quantize="int3")
    # bytes/token = layers x 2 (K, V) x kv heads x head_dim x dtype size
    fp32 = Engine(path, cache_blocks=8)
    assert fp32.stats()["cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert fp32.kv.shape == (2, 8, 16, 2, 2, 16) and fp32.kv.dtype == torch.float32
    bf16 = Engine(path, dtype="bf16", cache_blocks=8)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.kv.dtype == torch.bfloat16
    assert bf16.stats()["cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert len(bf16.generate("The answer", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
               .token_ids) == 5


def test_int8_engine_matches_the_quantized_model_and_serve_flags(qwen2):
    """`serve --quantize int8` streams the checkpoint into int8 weights; its greedy tokens equal those of the
    same model quantised in memory, recomputed from the whole sequence at every step (no incremental cache)."""
    path, _ = qwen2
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--model", str(path), "--dtype", "float32", "--quantize", "int8"])
    engine = load_engine(Settings(model=args.model), args.dtype, args.quantize)
    assert engine.model.quantized == "int8" and engine.model.model.layers[0].mlp.up_proj.weight.is_meta
    prompt = engine.tokenizer.apply_chat_template(QUESTION, tokenize=True)
    got = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].token_ids
    quantized = Engine(load_pretrained(path, dtype="float32"), quantize="int8").model
    ids = list(prompt)
    for _ in range(10):  # a fresh engine each time: the whole sequence is prefilled, nothing reused
        step = Engine(quantized, max_num_seqs=1, block_size=4).generate([ids], SamplingParams(temperature=0,
                                                                                             max_tokens=1))
        ids.append(step[0].token_ids[0])
    assert got == ids[len(prompt):]
