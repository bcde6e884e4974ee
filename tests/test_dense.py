"""The dense (qwen2 / llama) decoder and loader against transformers' own models."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from seekling.model import make_batch
from seekling.model.load import load_pretrained

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def _randomise(model: torch.nn.Module) -> None:
    # transformers' init (std 0.02) gives near-zero logits that hide mistakes; use O(1) activations
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15 if "embed" not in name else 1.0)


def _save(model, path, **kw):
    _randomise(model)
    model.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95,
                                                            eos_token_id=[2, 5], bos_token_id=1)
    model.save_pretrained(path, **kw)
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama with Llama-3.1 rope scaling (orig context 32 < test lengths) and attention/MLP biases."""
    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=50000.0)
    return path, _save(transformers.LlamaForCausalLM(cfg), path)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2 with tied embeddings, saved in shards with an index."""
    path = tmp_path_factory.mktemp("qwen2")
    cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=10000.0)
    model = _save(transformers.Qwen2ForCausalLM(cfg), path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    return path, model


@pytest.fixture(params=["llama", "qwen2"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


def test_logits_match_transformers_fp32(checkpoint):
    path, ref = checkpoint
    model = load_pretrained(path, dtype="float32")
    ids = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == (2, 80, 128)
    assert theirs.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert model.config.model_type == ref.config.model_type
    assert model.num_parameters() == ref.num_parameters()


def test_position_ids_match_transformers(llama):
    path, ref = llama
    model = load_pretrained(path, dtype="float32")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(100, 120)[None]  # beyond the original context: exercises the llama3 scaling
    with torch.no_grad():
        diff = (model(ids, pos) - ref(ids, position_ids=pos).logits).abs().max().item()
    assert diff <= 1e-4


def test_released_config_format(llama, tmp_path):
    """The released R1-distill configs predate transformers 5: rope_theta + rope_scaling, torch_dtype."""
    path, ref = llama
    old = tmp_path / "old"
    shutil.copytree(path, old)
    config = json.loads((old / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope, "torch_dtype": config.pop("dtype")}
    (old / "config.json").write_text(json.dumps(config))
    model = load_pretrained(old)
    assert model.config.rope_theta == 50000.0 and model.config.rope_scaling["factor"] == 8.0
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4


class PagedCache:
    """The model's inference forward on a paged cache, as the engine drives it (blocks of 4 slots)."""

    def __init__(self, model, blocks: int = 64):
        model.prepare()
        self.model = model
        self.kv = torch.zeros(model.num_cache_layers(False), blocks, 4, *model.cache_entry_shape())
        self.next_block = 0
        self.tables: list[list[int]] = []

    def new_sequence(self, blocks: int) -> int:
        self.tables.append(list(range(self.next_block, self.next_block + blocks))[::-1])  # not contiguous
        self.next_block += blocks
        return len(self.tables) - 1

    def step(self, items: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """items: (sequence, new token ids, position of the first) -> logits of every new token, packed."""
        batch = make_batch([(ids, start, self.tables[s]) for s, ids, start in items], 4, torch.device("cpu"))
        batch.cache = self.kv
        hidden, entries = self.model.infer(batch)
        L = entries.shape[0]
        self.kv.view(L, -1, *self.kv.shape[3:]).index_copy_(1, batch.slots, entries)
        return self.model.logits(hidden)


def test_incremental_decode_equals_full_forward(checkpoint):
    """Prefill then one token a step through the paged inference forward, against the full forward."""
    path, _ = checkpoint
    model = load_pretrained(path, dtype="float32")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = PagedCache(model)
        s = cache.new_sequence(10)
        steps = [cache.step([(s, ids[0, :24].tolist(), 0)])]
        for t in range(24, 40):
            steps.append(cache.step([(s, [int(ids[0, t])], t)]))
    assert (torch.cat(steps) - full[0]).abs().max().item() <= 1e-4


def test_ragged_batch_decode_equals_single_sequences(llama):
    """Two sequences of different prompt lengths prefilled together (regrouped per sequence), then decoded
    together at their own positions."""
    path, _ = llama
    model = load_pretrained(path, dtype="float32")
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in (30, 17)]
    prompt_lens, new = [12, 7], 10
    with torch.no_grad():
        refs = [model(s[None])[0] for s in seqs]
        cache = PagedCache(model)
        ids = [cache.new_sequence(8) for _ in seqs]
        logits = cache.step([(i, s[:n].tolist(), 0) for i, s, n in zip(ids, seqs, prompt_lens, strict=True)])
        ends = [prompt_lens[0] - 1, sum(prompt_lens) - 1]
        for b, n in enumerate(prompt_lens):
            assert (logits[ends[b]] - refs[b][n - 1]).abs().max() <= 1e-4
        for i in range(new):
            step = cache.step([(j, [int(s[n + i])], n + i) for j, s, n in zip(ids, seqs, prompt_lens, strict=True)])
            for b, n in enumerate(prompt_lens):
                assert (step[b] - refs[b][n + i]).abs().max() <= 1e-4


def test_bf16_load(qwen2):
    path, ref = qwen2
    model = load_pretrained(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie survives the meta load
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(ids).float()
        fp32 = ref(ids).logits
    scale = fp32.abs().max()
    assert (ours - fp32).abs().max() <= 0.05 * scale  # bf16 rounding only
    assert (ours.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.8


def test_auto_dtype_and_generation_defaults(qwen2):
    model = load_pretrained(qwen2[0])  # auto: fp32 on CPU when it fits
    assert model.model.norm.weight.dtype == torch.float32
    assert model.generation_defaults == {"temperature": 0.6, "top_p": 0.95}
    assert model.eos_token_ids == [2, 5]


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture(llama, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(llama[0], path)
    _edit_config(path, model_type="mistral")
    with pytest.raises(ValueError, match="unsupported architecture: model_type='mistral'"):
        load_pretrained(path)
    _edit_config(path, model_type="qwen2", quantization_config={"quant_method": "awq"})
    with pytest.raises(ValueError, match="quantized checkpoint \\(awq\\)"):
        load_pretrained(path)


def test_missing_shard_file(qwen2, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(qwen2[0], path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_pretrained(path)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path)


def test_misshaped_and_missing_tensor(llama, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(llama[0], path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(16, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name} has shape \[16, 64\].*expected \[32, 64\]"):
        load_pretrained(path)
    del tensors[name]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=name):
        load_pretrained(path)


def test_memory_refusal(llama, tmp_path):
    path, ref = llama
    fp32_mb = ref.num_parameters() * 4 / 1e6
    with pytest.raises(MemoryError, match=rf"needs {fp32_mb:.2f} MB in float32, 0\.00 MB available "
                                          r"\(capped by max_memory_gb=1e-06\); no precision fits"):
        load_pretrained(path, dtype="float32", max_memory_gb=1e-6)
    # planned from the headers: a cap between the int4 and int8 sizes suggests int4, and int4 then loads
    with pytest.raises(MemoryError, match=r"in float32.*; --dtype bfloat16 would fit"):
        load_pretrained(path, dtype="float32", max_memory_gb=fp32_mb * 0.6 / 1e3)
    with pytest.raises(MemoryError, match=r"in int8.*; --quantize int4 would fit \(weights in float32 "):
        load_pretrained(path, quantize="int8", max_memory_gb=fp32_mb * 0.24 / 1e3)
    assert load_pretrained(path, quantize="int4", max_memory_gb=fp32_mb * 0.24 / 1e3).quantized == "int4"
    # a bf16 checkpoint under a cap that fits bf16 (2 bytes/param) but not fp32: auto picks bf16
    bf16 = tmp_path / "bf16"
    shutil.copytree(path, bf16)
    tensors = {k: v.bfloat16() for k, v in load_file(bf16 / "model.safetensors").items()}
    save_file(tensors, bf16 / "model.safetensors")
    _edit_config(bf16, dtype="bfloat16")
    cap_gb = fp32_mb / 2 * 1.01 / 1e3
    assert load_pretrained(bf16, max_memory_gb=cap_gb).model.norm.weight.dtype == torch.bfloat16
    assert load_pretrained(bf16).model.norm.weight.dtype == torch.float32  # fp32 fits without the cap
    with pytest.raises(MemoryError, match="in float32"):
        load_pretrained(bf16, dtype="float32", max_memory_gb=cap_gb)
