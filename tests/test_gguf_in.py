"""GGUF in: a GGUF file (seekling's own export, written with the gguf package) read back by seekling for each
family gives the checkpoint's logits, its tokenizer and chat template; `ollama:NAME[:TAG]` resolves through a
manifest to the blob; an architecture or tensor type seekling does not read is one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_families import QWEN3, V2_BASE, V2_CONFIGS, randomize

import seekling
from seekling.cli import main as cli
from seekling.engine import Engine, SamplingParams
from seekling.export import export_gguf
from seekling.model import make_batch
from seekling.model.config import ModelConfig
from seekling.model.families import family_of
from seekling.model.model import Transformer
from seekling.sources import read_gguf_header, resolve_model
from seekling.tasks import sample_problems
from seekling.tokenizer import load_tokenizer, render_chat, train_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# R1-0528-Qwen3-8B's YaRN (its attn_factor cancels mscale), over 16 positions so that the tests pass it
R1_0528_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                "attn_factor": 0.8782488562869419}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [render_chat(p.messages()) for p in sample_problems("addition", 200, seed=0)]
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 320).save_pretrained(path)
    return path


def checkpoint(path, tokenizer_dir, kind: str):
    """A random checkpoint of one family with a vocabulary of the tokenizer's size (plus unused rows)."""
    vocab = load_tokenizer(tokenizer_dir).vocab_size + 5
    if kind in ("deepseek_v2", "deepseek_v3"):
        extra = V2_CONFIGS["v2-lite-like"] if kind == "deepseek_v2" else dict(
            model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
            q_lora_rank=16, n_group=2, topk_group=1, num_nextn_predict_layers=1, tie_word_embeddings=True)
        # llama.cpp reads V2's group-free YaRN exactly; the qk dims a multiple of Q8_0's block of 32
        model = Transformer(ModelConfig(**{**V2_BASE, **extra, "vocab_size": vocab, "hidden_size": 64,
                                           "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32,
                                           "kv_lora_rank": 32, "moe_intermediate_size": 32, "num_attention_heads": 2,
                                           "intermediate_size": 96}))
    else:
        shape = {**QWEN3, "vocab_size": vocab, "head_dim": 32}
        config = {"qwen3": transformers.Qwen3Config(**shape),
                  "qwen3-yarn": transformers.Qwen3Config(**shape, rope_scaling=R1_0528_YARN),
                  "qwen2": transformers.Qwen2Config(**shape, tie_word_embeddings=True),
                  "llama": transformers.LlamaConfig(**shape, attention_bias=True, rope_scaling=LLAMA3_ROPE)}[kind]
        model = getattr(transformers, type(config).__name__.removesuffix("Config") + "ForCausalLM")(config)
    randomize(model)
    model.save_pretrained(path)
    load_tokenizer(tokenizer_dir).save_pretrained(path)
    return path


KINDS = ["deepseek_v2", "deepseek_v3", "llama", "qwen2", "qwen3", "qwen3-yarn"]


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_round_trip_gives_the_checkpoints_logits(kind, tmp_path, tokenizer_dir):
    path = checkpoint(tmp_path / "m", tokenizer_dir, kind)
    export_gguf(path, tmp_path / "m.gguf")
    ref, got = seekling.load_pretrained(path), seekling.load_pretrained(tmp_path / "m.gguf")
    assert family_of(got).model_type == kind.removesuffix("-yarn") and got.quantized is None  # F32 loads in float
    if kind.startswith("deepseek"):
        assert got.config.topk_method == ref.config.topk_method and got.config.rope_scaling == ref.config.rope_scaling
    ids = torch.randint(0, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids), got(ids)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()


def prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits of every position through the inference forward (int8 models have no other)."""
    model.prepare()
    blocks = len(ids) // 4 + 1
    batch = make_batch([(ids, 0, list(range(blocks)))], 4, torch.device("cpu"))
    batch.cache = torch.zeros(model.num_cache_layers(False), blocks, 4, *model.cache_entry_shape())
    with torch.no_grad():
        hidden, _ = model.infer(batch)
        return model.logits(hidden)


@pytest.mark.parametrize("kind", ["qwen3", "deepseek_v2", "llama"])
def test_q8_0_gguf_loads_in_int8_about_as_close_to_fp32_as_int8(kind, tmp_path, tokenizer_dir):
    """A Q8_0 GGUF keeps 8 bits (its blocks repacked into int8 weights exactly): teacher-forced against the fp32
    checkpoint, its logits are about as close as the checkpoint quantised to int8 (Q8_0's rounding is added to
    int8's; random models with O(1) activations amplify both, a routed MoE the most)."""
    path = checkpoint(tmp_path / "m", tokenizer_dir, kind)
    export_gguf(path, tmp_path / "m.gguf", outtype="q8_0")
    engine = Engine(str(tmp_path / "m.gguf"), block_size=4)
    assert engine.model.quantized == "gguf" and engine.tokenizer is not None  # each tensor keeps its type's bits
    ids = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    fp32 = prefill_logits(seekling.load_pretrained(path), ids)
    errors = {}
    for name, model in (("int8", seekling.load_pretrained(path, quantize="int8")), ("gguf", engine.model)):
        logits = prefill_logits(model, ids)
        errors[name] = ((logits - fp32).pow(2).mean().sqrt() / fp32.pow(2).mean().sqrt()).item()
        assert (logits.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.7, name
    assert errors["gguf"] <= 2 * errors["int8"] + 0.02, errors
    first = engine.generate([ids], SamplingParams(temperature=0, max_tokens=1))[0].token_ids
    assert first == [int(prefill_logits(engine.model, ids)[-1].argmax())]


def test_tokenizer_and_template_come_from_the_file(tmp_path, tokenizer_dir):
    path = checkpoint(tmp_path / "m", tokenizer_dir, "qwen3")
    export_gguf(path, tmp_path / "m.gguf")
    ours, theirs = load_tokenizer(tmp_path / "m.gguf"), load_tokenizer(path)
    assert ours.chat_template == theirs.chat_template
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    texts = [theirs.apply_chat_template(CHAT), "Héllo wörld 12345 + 678 = ?\n\n  spaces", "<think>\nx</think>\n\n"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == text
    ids = ours.encode(texts[0])
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    engine = Engine(str(tmp_path / "m.gguf"))
    assert engine.tokenizer.eos_token_id == theirs.eos_token_id and theirs.eos_token_id in engine.eos_token_ids


def fake_ollama(root, blob_source, name="library/deepseek-r1", tag="8b"):
    """Ollama's layout: a manifest naming the model layer by digest, the blob under blobs/sha256-<hex>."""
    digest = hashlib.sha256(blob_source.read_bytes()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(blob_source, root / "blobs" / f"sha256-{digest}")
    manifest = {"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1}]}
    where = root / "manifests" / "registry.ollama.ai" / name / tag
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(json.dumps(manifest))
    return root / "blobs" / f"sha256-{digest}"


def test_ollama_names_resolve_to_the_blob(tmp_path, tokenizer_dir, monkeypatch, capsys):
    path = checkpoint(tmp_path / "m", tokenizer_dir, "qwen3")
    export_gguf(path, tmp_path / "m.gguf")
    models = tmp_path / "ollama"
    blob = fake_ollama(models, tmp_path / "m.gguf")
    fake_ollama(models, tmp_path / "m.gguf", name="someone/tiny", tag="latest")
    monkeypatch.setenv("OLLAMA_MODELS", str(models))
    assert resolve_model("ollama:deepseek-r1:8b") == blob
    assert resolve_model("ollama:someone/tiny") == blob  # the tag defaults to latest
    assert resolve_model("ollama:registry.ollama.ai/library/deepseek-r1:8b") == blob
    engine = Engine("ollama:deepseek-r1:8b")
    out = engine.generate(CHAT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == Engine(str(path)).generate(CHAT, SamplingParams(temperature=0, max_tokens=4,
                                                                            ignore_eos=True))[0].token_ids
    with pytest.raises(FileNotFoundError, match=r"'deepseek-r1:70b' not found .*pulled: deepseek-r1:8b, "
                                                r"registry.ollama.ai/someone/tiny:latest"):
        resolve_model("ollama:deepseek-r1:70b")
    with pytest.raises(ValueError, match="not an Ollama model name"):
        resolve_model("ollama:../../etc:x")
    blob.unlink()
    with pytest.raises(FileNotFoundError, match="blob .* is missing"):
        resolve_model("ollama:deepseek-r1:8b")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli(["sample", "--model", "ollama:nothing:here", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert err.startswith("seekling sample: error: Ollama model") and err.count("\n") == 1  # no traceback


def write_gguf(path, arch: str, tensors: dict[str, np.ndarray], raw_dtype=None):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    for name, data in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_what_seekling_does_not_read_is_one_clear_line(tmp_path, capsys):
    capsys.readouterr()
    write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'; seekling reads deepseek2, qwen2"):
        seekling.load_pretrained(tmp_path / "gpt2.gguf")
    write_gguf(tmp_path / "i8.gguf", "qwen3", {"token_embd.weight": np.zeros((8, 32), np.int8)},
               gguf.GGMLQuantizationType.I8)
    with pytest.raises(ValueError, match="holds tensors of type I8; seekling reads F32, F16, BF16, Q8_0, Q4_0"):
        seekling.load_pretrained(tmp_path / "i8.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    for bad in ("gpt2.gguf", "i8.gguf", "junk.gguf"):
        with pytest.raises(SystemExit):
            cli(["sample", "--model", str(tmp_path / bad), "--max-tokens", "2"])
        err = capsys.readouterr().err
        assert err.startswith("seekling sample: error:") and err.count("\n") == 1, err


# llama.cpp's own converter (vendor/llama.cpp/convert_hf_to_gguf.py in llama-cpp-python's sdist: `pip download
# --no-binary :all: --no-deps llama-cpp-python` and unpack it; it needs sentencepiece), when a path names it
CONVERTER = os.environ.get("LLAMA_CPP_CONVERTER")
needs_converter = pytest.mark.skipif(not CONVERTER,
                                     reason="set LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py")


def convert_with_llama_cpp(model_dir, out, outtype: str = "f32"):
    """Run llama.cpp's converter on a checkpoint with two gaps closed: it is told that seekling's tokenizer splits
    text as Qwen2's (it knows pre-tokenizers by a hash of their output, and has none for a newly trained one),
    and it writes attention.q_lora_rank 0 when queries are not compressed (it leaves the key out, and then
    llama.cpp's own loader refuses the file unless it has V2-Lite's 27 layers). Tensors and quantisation are
    the converter's own."""
    script = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(Path(CONVERTER).parent)!r}, {str(Path(CONVERTER).parent / 'gguf-py')!r}]\n"
        "from conversion.base import TextModel\n"
        "from conversion.deepseek import DeepseekV2Model\n"
        "TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        "keys = DeepseekV2Model.set_gguf_parameters\n"
        "def with_q_lora_rank(self):\n"
        "    keys(self)\n"
        "    if self.hparams.get('q_lora_rank') is None:\n"
        "        self.gguf_writer.add_q_lora_rank(0)\n"
        "DeepseekV2Model.set_gguf_parameters = with_q_lora_rank\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(model_dir)!r}, '--outfile', {str(out)!r},"
        f" '--outtype', {outtype!r}]\n"
        f"runpy.run_path({CONVERTER!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@needs_converter
@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpps_own_conversion_reads_back(kind, tmp_path, tokenizer_dir):
    """The file llama.cpp's converter writes (its names, q/k permutation, kv_b split, expert stacks, keys) gives
    the checkpoint's logits in seekling, and its tokenizer splits chat text as the checkpoint's."""
    path = checkpoint(tmp_path / "m", tokenizer_dir, kind)
    gguf_path = convert_with_llama_cpp(path, tmp_path / "m.gguf")
    ref, got = seekling.load_pretrained(path), seekling.load_pretrained(gguf_path)
    assert family_of(got).model_type == kind.removesuffix("-yarn")
    ids = torch.randint(0, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids), got(ids)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()
    text = load_tokenizer(path).apply_chat_template(CHAT)
    assert load_tokenizer(gguf_path).encode(text) == load_tokenizer(path).encode(text)


def test_header_reader_agrees_with_gguf_and_refuses_a_truncated_file(tmp_path):
    """seekling's one-pass header reader (gguf's GGUFReader takes a Python object per array element: ~40 s over a
    150k-token vocabulary) gives GGUFReader's metadata for every value type."""
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "qwen3")
    writer.add_bool("a.bool", True)
    writer.add_uint32("a.u32", 7)
    writer.add_int64("a.i64", -3)
    writer.add_float32("a.f32", 0.1)
    writer.add_float64("a.f64", 1e-300)
    writer.add_string("a.str", "héllo <｜User｜>")
    writer.add_array("a.strings", ["x", "", "ü y"])
    writer.add_array("a.ints", [1, 2, 3])
    writer.add_array("a.floats", [0.5, -1.25])
    writer.add_array("a.bools", [True, False])
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    want = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    metadata, tensors, start = read_gguf_header(tmp_path / "m.gguf")
    assert metadata == want and [t.name for t in tensors] == ["token_embd.weight"]
    assert start + tensors[0].offset == reader.tensors[0].data_offset
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:100])
    with pytest.raises(ValueError, match="header ends early"):
        read_gguf_header(tmp_path / "cut.gguf")
    (tmp_path / "short.gguf").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        seekling.load_pretrained(tmp_path / "short.gguf")
