"""int8 and int4 weights and seekling's CPU kernels (seekling/model/quant.py, kernels.cpp): the kernels against
the torch reference, the error bounds that follow from the quantisation, batch invariance, GGUF tensor types
against gguf's own dequantisation, and what a quantised model holds in memory."""

from __future__ import annotations

import pytest
import torch

from seekling.engine import Engine, SamplingParams
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.model.load import load_pretrained
from seekling.model.quant import (
    GGML_TYPES,
    QBLOCK,
    TILE,
    Int4Weight,
    Int8Weight,
    concat,
    from_ggml,
    int4_fit,
    linear,
    load_kernels,
    quantize,
    quantize_stack,
    reference_product,
)

SHAPES = [(1, 48, 64), (1, 37, 70), (3, 50, 24), (4, 64, 96), (5, 64, 1000), (9, 33, 96)]  # (M, O, K)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not load_kernels():
        pytest.skip("seekling's CPU kernels could not be built here (no C++ compiler?)")


@pytest.mark.parametrize("M,O,K", SHAPES)
def test_kernels_equal_the_torch_reference(M, O, K):
    torch.manual_seed(M * O + K)
    w, x = torch.randn(O, K), torch.randn(M, K) * torch.rand(M, 1) * 3
    torch.testing.assert_close(torch.ops.seekling.f32_linear(x, w), x @ w.T, atol=1e-4, rtol=1e-5)
    q = quantize(w)
    tiles, blocks = -(-O // TILE), -(-K // QBLOCK)
    assert q.q.shape == (tiles, blocks, TILE, QBLOCK) and q.q.dtype == torch.int8 and q.shape == (O, K)
    assert q.scale.shape == (tiles, blocks, TILE) and q.scale.dtype == torch.float16
    # the same integer products; only the order of the fp32 block sums differs
    torch.testing.assert_close(torch.ops.seekling.int8_linear(x, q.q, q.scale, O), reference_product(x, q),
                               atol=1e-4, rtol=1e-4)
    q4 = quantize(w, "int4")
    assert q4.q.shape == (O, -(-K // 64), 32) and q4.codes.shape[-1] % 8 == 0 and q4.shape == (O, K)
    torch.testing.assert_close(linear(x, q4), reference_product(x, q4), atol=1e-4, rtol=1e-4)


def _weight_steps(q: Int8Weight) -> torch.Tensor:
    """Each weight's quantisation step (its block's scale), [out, in]."""
    steps = q.scale.float().transpose(-2, -1).repeat_interleave(QBLOCK, dim=-1)  # [tiles, TILE, blocks * 32]
    return steps.reshape(-1, steps.shape[-1])[:q.shape[0], :q.shape[1]]


def _int8_error_bound(x: torch.Tensor, w: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """Worst case |int8(x) - x @ w^T| per output: W x - Wq xq = (W - Wq) x + Wq (x - xq), where each weight is
    off by at most half its block's step and each activation by at most half its block's step."""
    k = w.shape[1]
    blocks = torch.nn.functional.pad(x, (0, -k % QBLOCK)).view(x.shape[0], -1, QBLOCK)
    x_step = (blocks.abs().amax(-1, keepdim=True) / 127).expand_as(blocks).reshape(x.shape[0], -1)[:, :k]
    deq = q.dequantize()
    return x.abs() @ (_weight_steps(q) / 2).T + (x_step / 2) @ deq.abs().T + 1e-5


@pytest.mark.parametrize("M,O,K", SHAPES)
def test_int8_error_bound(M, O, K):
    torch.manual_seed(K)
    w, x = torch.randn(O, K), torch.randn(M, K) + 0.5 * torch.randn(M, 1)
    q = quantize(w)
    # each weight within half its block's step (the step is the stored fp16 scale; values rounded against it)
    assert ((q.dequantize() - w).abs() <= _weight_steps(q) / 2 * 1.001 + 1e-7).all()
    y, ref = linear(x, q), x @ w.T
    assert ((y - ref).abs() <= _int8_error_bound(x, w, q)).all()
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()  # typical error ~1% of the largest output


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_rows_are_batch_invariant(kind):
    """Each row of x is quantised on its own (per block of 32): a row's result is bitwise the same alone
    and in any company, so prefill rows equal decode rows and continuous batching changes nothing."""
    torch.manual_seed(1)
    q = quantize(torch.randn(96, 256), kind)
    x = torch.randn(12, 256) * torch.rand(12, 1) * 4 + torch.randn(12, 1)
    full = linear(x, q)
    for seed in range(8):
        others = torch.randn(7, 256, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        assert torch.equal(linear(torch.cat([others[:seed % 7], x[3:4], others]), q)[seed % 7], full[3])
    assert torch.equal(torch.cat([linear(row[None], q) for row in x]), full)
    assert linear(x[None, :4].expand(2, 4, 256), q).shape == (2, 4, 96)  # leading dims are kept


def test_embedding_rows_stacked_views_and_chunks():
    torch.manual_seed(2)
    w = torch.randn(6, 38, 24)  # six stacked experts, 38 rows: the last tile of each is padded
    stacked = quantize(w)
    flat = [quantize(w[e]) for e in range(6)]
    assert torch.equal(stacked[4].dequantize(), flat[4].dequantize())
    assert stacked[4].q.data_ptr() == stacked.q[4].data_ptr()  # a view, not a copy
    ids = torch.tensor([[3, 0], [37, 3]])
    torch.testing.assert_close(flat[2].rows(ids), flat[2].dequantize()[ids])
    whole = quantize(w[0, :36])  # quantised in chunks of whole tiles (the streaming loader's embedding)
    assert torch.equal(concat([quantize(w[0, :16]), quantize(w[0, 16:36])]).q, whole.q)


def test_int4_is_as_close_as_ggml_4_bit_types():
    """int4's groups (fitted scale and min, 8-bit codes) against gguf's Q4_0 and Q4_1 quantisers at the same
    group size, on Gaussian and heavy-tailed weights; and the C++ fit against its torch reference."""
    from gguf.quants import GGMLQuantizationType, dequantize
    from gguf.quants import quantize as gguf_quantize

    torch.manual_seed(3)
    for w in (torch.randn(64, 512), torch.distributions.StudentT(4.0).sample((64, 512)) * 0.02):
        err = lambda v, w=w: ((v - w) ** 2).mean() / (w ** 2).mean()
        ours = err(quantize(w, "int4").dequantize())
        for t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            theirs = err(torch.from_numpy(dequantize(gguf_quantize(w.numpy(), t), t)).view_as(w))
            assert ours < 0.9 * theirs, (t.name, ours, theirs)
    groups = torch.randn(4096, 32) * torch.rand(4096, 1)
    fits = [int4_fit(groups), torch.ops.seekling.int4_fit(groups)]  # torch reference, C++

    def fit_error(scale, low):
        q = torch.round((groups + low[:, None]) / scale[:, None]).clamp(0, 15)
        return ((q * scale[:, None] - low[:, None] - groups) ** 2).mean()

    reference, cpp = (fit_error(*f) for f in fits)
    assert abs(cpp - reference) < 1e-3 * reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_row_quantisers_equal_the_torch_ones(dtype, monkeypatch):
    """The loader's one-pass C++ quantisers give bitwise the weights of the torch code (the reference, and the
    path without the kernels), from fp32 and bf16 rows, including padded widths (int4 given the same group
    fits: the search itself is compared in test_int4_is_as_close_as_ggml_4_bit_types)."""
    from seekling.model import kernels, quant

    torch.manual_seed(6)
    w = (torch.randn(37, 200) * torch.rand(37, 1)).to(dtype)
    fast = quantize(w, "int8")
    monkeypatch.setattr(kernels, "loaded", lambda: None)  # the torch code
    slow = quantize(w, "int8")
    assert torch.equal(fast.q, slow.q) and torch.equal(fast.scale, slow.scale)
    groups = torch.nn.functional.pad(w.float(), (0, -200 % 64)).view(-1, 32)
    scale, low = torch.ops.seekling.int4_fit(groups)
    torch_pieces = quant._int4_rows(w, scale.view(37, -1), low.view(37, -1))
    for a, b in zip(torch.ops.seekling.quantize_int4_rows(w), torch_pieces, strict=True):
        assert torch.equal(a, b)


def _ggml_data(name: str, rows: int, k: int, rng) -> numpy.ndarray:  # noqa: F821
    """Valid random data of a GGUF type: quantised by gguf's own quantiser where it has one, else random
    bytes with sane fp16 scales (any bit pattern of a K-quant's codes is a valid tensor)."""
    import numpy as np
    from gguf.quants import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    t = GGMLQuantizationType[name]
    x = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
    if name == "F32":
        return x
    if name not in ("Q4_K", "Q5_K", "Q6_K"):
        return gguf_quantize(x, t)
    _, block, size = next(v for v in GGML_TYPES.values() if v[0] == name)
    b = rng.integers(0, 256, size=(rows * k // block, size), dtype=np.uint8)
    half = lambda n: rng.uniform(1e-3, 2e-2, size=(b.shape[0], n)).astype(np.float16).view(np.uint8)
    if name == "Q6_K":
        b[:, -2:] = half(1)
    else:
        b[:, :4] = half(2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("name", [v[0] for v in GGML_TYPES.values()])
def test_from_ggml_matches_gguf(name):
    """Every GGUF tensor type seekling reads, against gguf's own dequantisation: F32/F16/BF16, Q8_0, Q5_0 and
    Q4_K exactly; Q4_0/Q4_1 within their re-coded scales; Q5_1/Q5_K/Q6_K within int8's half step per block.
    Stacked experts ([E, out, in]) stay stacked, and the kernel computes the same product as the reference."""
    import numpy as np
    from gguf.quants import GGMLQuantizationType, dequantize

    rng = np.random.default_rng(sum(map(ord, name)))
    shape = (2, 6, 512)
    data = _ggml_data(name, 12, 512, rng)
    ref = torch.from_numpy(dequantize(data, GGMLQuantizationType[name]).astype(np.float32)).view(shape)
    w = from_ggml(data, GGMLQuantizationType[name].value, shape)
    got = w if isinstance(w, torch.Tensor) else w.dequantize()
    assert got.shape == shape
    if name in ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_K"):
        assert torch.equal(got, ref)
    elif name in ("Q4_0", "Q4_1"):
        assert isinstance(w, Int4Weight)
        # each group's scale and min re-coded in 8 bits under its super-block's (d, dmin): at most half a code
        # step each, over at most 15 steps of q, plus the values re-rounded on the coded grid
        d, dmin = w.dm.float().unbind(-1)  # [2, 6, supers]
        bound = (15 * d / 2 + dmin / 2).repeat_interleave(256, dim=-1)[..., :512] + 1e-6
        assert ((got - ref).abs() <= bound).all()
    else:
        assert isinstance(w, Int8Weight)
        blocks = ref.view(2, 6, -1, 32).abs().amax(-1, keepdim=True)
        assert ((got - ref).view(2, 6, -1, 32).abs() <= blocks / 254 * 1.002 + 1e-6).all()
    if not isinstance(w, torch.Tensor):
        x = torch.randn(3, 512)
        torch.testing.assert_close(linear(x, w[1]), reference_product(x, w[1]), atol=1e-3, rtol=1e-4)
    if not isinstance(w, torch.Tensor):
        with pytest.raises(ValueError, match="not whole"):
            from_ggml(data, GGMLQuantizationType[name].value, (12 * 512 // 16, 16))


def test_from_ggml_refuses_what_it_cannot_read():
    import numpy as np

    with pytest.raises(ValueError, match="type 16 is not one seekling reads"):
        from_ggml(np.zeros(66, np.uint8), 16, (1, 256))  # IQ2_XXS
    with pytest.raises(ValueError, match="bytes, expected"):
        from_ggml(np.zeros(30, np.uint8), 8, (1, 32))


def test_quantize_parts_and_stacks_equal_the_whole():
    """A fused projection quantised from its parts (no float concatenation) and experts quantised one at a time
    into a stack give the weights of quantising the concatenated / stacked tensor."""
    torch.manual_seed(4)
    parts = [torch.randn(12, 96), torch.randn(20, 96)]
    for kind in ("int8", "int4"):
        whole, split = quantize(torch.cat(parts), kind), quantize(parts, kind)
        assert torch.equal(whole.dequantize(), split.dequantize())
        stack = quantize_stack([parts, [p * 2 for p in parts]], kind)
        assert torch.equal(stack[1].dequantize(), quantize([p * 2 for p in parts], kind).dequantize())
        assert torch.equal(concat([quantize(parts[0], kind), quantize(parts[1], kind)]).dequantize(),
                           whole.dequantize())


def test_without_a_compiler_the_fbgemm_path_runs(monkeypatch, caplog, tmp_path):
    """A failed kernel build (no C++ compiler) is logged as such, and quantised weights then run on torch's
    fbgemm int8 path: close to the exact product, and an int4 model's greedy tokens are those of its exact
    (torch reference) product."""
    import logging

    import torch.utils.cpp_extension

    from seekling.model import kernels

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setitem(kernels._state, "loaded", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.INFO, logger="seekling.kernels"):
        assert load_kernels() is False
    assert "matmul path: torch's own ops" in caplog.text and "command not found" in caplog.text
    torch.manual_seed(5)
    x = torch.randn(3, 200)
    for kind in ("int8", "int4"):
        w = quantize(torch.randn(100, 200), kind)
        ref = reference_product(x, w)
        assert (linear(x, w) - ref).abs().max() < 0.03 * ref.abs().max()  # 7-bit per-tensor activations
    tiny_moe().save_pretrained(tmp_path)
    prompts = [torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 12)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = Engine(tmp_path, quantize="int4")
    fallback = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    monkeypatch.setitem(kernels._state, "loaded", None)  # the exact product, dequantised per call
    exact = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    assert [t[:2] for t in fallback] == [t[:2] for t in exact]  # 7-bit activations: near-ties later on


def tiny_moe(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=256, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=32, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, q_lora_rank=32)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # O(1) activations: the default init's near-zero logits would hide errors
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.2 if "embed" not in name else 1.0)
    return model


@pytest.mark.parametrize("kind,bytes_per_weight,agreement", [("int8", 0.4, 0.85), ("int4", 0.33, 0.6)])
def test_quantized_deepseek_model_tracks_fp32_and_frees_its_float_weights(tmp_path, kind, bytes_per_weight,
                                                                          agreement):
    """The MoE model in int8 / int4 (streamed from its checkpoint): what it holds, and its greedy tokens against
    fp32, teacher-forced on fp32's own greedy continuation."""
    model = tiny_moe()
    model.save_pretrained(tmp_path)
    prompts = [torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 20)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    fp32 = Engine(tmp_path, max_num_seqs=2).generate(prompts, params)
    int8 = Engine(tmp_path, quantize=kind, max_num_seqs=2)
    m = int8.model
    float_left = [n for n, p in m.named_parameters() if not p.is_meta and p.dim() == 2]
    kept = ("self_attn.kv_b_proj.weight", "mlp.gate.weight")  # read by per-head einsums / routers: float
    assert float_left == [f"model.layers.{i}.{k}" for i in range(3) for k in kept if not (i == 0 and k == kept[1])]
    held = sum(t.numel() * t.element_size() for t in m.state_dict().values() if not t.is_meta)
    weights = [w for mod in m.modules() for w in vars(mod).values() if isinstance(w, Int8Weight | Int4Weight)]
    assert {type(w) for w in weights} == ({Int8Weight} if kind == "int8" else {Int4Weight, Int8Weight})
    assert isinstance(m.head_w, Int8Weight)  # the head stays at 8 bits under int4
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for w in weights
                for t in vars(w).values() if isinstance(t, torch.Tensor)}
    quantized_bytes = sum(storages.values())  # each storage once (an expert's weights are views of its stack)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    # ~1 byte (int8) / ~0.6 byte (int4) a weight, + the float leftovers, the int8 head and the padding of
    # a tiny model (rows of 32 and 64 values: int4 pads them to whole super-blocks of codes)
    assert held + quantized_bytes < bytes_per_weight * fp32_bytes
    # in-memory quantisation gives the same weights as the streamed load
    same = Engine(tiny_moe(), quantize=kind).model
    assert torch.equal(same.model.layers[1].mlp.w13.dequantize(), m.model.layers[1].mlp.w13.dequantize())
    got = int8.generate(prompts, params)
    seqs = [o.prompt_token_ids + o.outputs[0].token_ids for o in fp32]
    agree = []
    for s, p in zip(seqs, prompts, strict=True):
        with torch.inference_mode():
            teacher = Engine(m, max_num_seqs=1).generate([s[:k] for k in range(len(p), len(s))],
                                                         SamplingParams(temperature=0, max_tokens=1))
        agree += [t.token_ids[0] == s[k] for t, k in zip(teacher, range(len(p), len(s)), strict=True)]
    assert sum(agree) / len(agree) >= agreement, sum(agree) / len(agree)
    assert all(g.outputs[0].token_ids[:1] == f.outputs[0].token_ids[:1] for g, f in zip(got, fp32, strict=True))
    with pytest.raises(ValueError, match=f"quantised to {kind} for inference"):
        m.save_pretrained(tmp_path / "again")


def test_int8_dense_load_is_streamed_and_holds_one_copy(tmp_path):
    """A tied Qwen2: the embedding and the output head are one int8 tensor, quantised in row chunks."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=200, tie_word_embeddings=True)
    ref = transformers.Qwen2ForCausalLM(cfg)
    ref.save_pretrained(tmp_path)
    m = load_pretrained(tmp_path, quantize="int8")
    assert m.quantized == "int8" and m.embed_w is m.head_w and isinstance(m.head_w, Int8Weight)
    assert all(p.is_meta for n, p in m.named_parameters() if n.endswith("proj.weight") or "embed" in n)
    torch.testing.assert_close(m.head_w.dequantize(), ref.model.embed_tokens.weight, atol=m.head_w.scale.max().item(),
                               rtol=0)
    with pytest.raises(ValueError, match="already quantised to int8"):
        m.prepare("int4")


def test_an_eager_engine_never_imports_the_compiler_stack(tmp_path):
    """Loading builds on the meta device, where normal_, arange and empty_like run through torch._refs, whose
    first use imports torch._dynamo (sympy, triton): ~150 MB resident, a quarter of a 0.5B int8 model's.
    Neither the load (fp32 and int8, MoE and dense) nor generating may pull it in; compile=True is the one
    path that needs it. Run in a fresh interpreter: this one has imported it already."""
    import subprocess
    import sys

    tiny_moe().save_pretrained(tmp_path / "moe")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=200, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    code = (
        "import sys, seekling\n"
        "for d in sys.argv[1:]:\n"
        "    for q in (None, 'int8'):\n"
        "        e = seekling.Engine(d, quantize=q, max_num_seqs=2)\n"
        "        e.generate([[1, 2, 3], [4, 5]], seekling.SamplingParams(max_tokens=4, ignore_eos=True))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor', 'sympy')))[:5])\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "moe"), str(tmp_path / "dense")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
