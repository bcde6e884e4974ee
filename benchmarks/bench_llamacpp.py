"""seekling vs llama.cpp on the same weights, side by side: decode and prefill tokens/s, greedy tokens, memory.

llama.cpp runs through llama-cpp-python (the `bench` extra; never at run time of the product), on GGUF files
made by llama.cpp's own `convert_hf_to_gguf.py` (not by `seekling export`), at the same thread count.
  - the speedrun model (DeepSeek-V3 MoE, --moe-model) and
  - a random dense Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate
    4864, vocab 151,936, tied embeddings), built here with a seed, and a synthetic byte-level BPE tokenizer of
    that vocabulary size (the converter reads one);
each at fp32 vs F32 and seekling int8 (`Engine(path, quantize="int8")`) vs Q8_0 (--precisions).
For each: batch-1 greedy decode, 8 concurrent sequences (seekling's continuous batching via
`engine.generate([8 prompts])` vs llama.cpp's batched decoding: one llama_batch carrying 8 sequence ids,
n_seq_max=8), prefill of a --prefill-tokens prompt; the greedy tokens compared sequence by sequence; resident
memory (VmRSS held after loading and a short generation, VmHWM peak), each side in its own fresh process.
llama.cpp runs with its own defaults (f16 KV cache, flash attention where it applies), as llama-cli, llama-server
and Ollama do; --llama-precision exact gives it seekling's arithmetic (fp32 cache, no flash attention, whose
CPU kernel rounds through f16: logits move by ~0.05 on the 0.5B model, and near-tied greedy tokens of random
weights flip; exact agrees with seekling to ~1e-5 relative). Every measurement runs in a fresh subprocess
(`--worker`), so neither side shares a process, a thread pool or an allocator with the other. Runs alternate
between the sides and the median of --repeats is kept; every repeat uses new prompts, so seekling's prefix cache
never serves one. Wall and CPU-time rates are both printed: on a shared machine CPU time is the steadier.

seekling is used only through its public API (Engine, SamplingParams, load_pretrained, ModelConfig).
The converter needs two things our checkpoints do not give it, both applied by a wrapper (CONVERT below):
the pre-tokenizer named ("qwen2": seekling's split regex is Qwen2's; the converter only recognises tokenizers
by a hash of known ones) and `attention.q_lora_rank` 0 when queries are not compressed (the converter leaves
the key out for `q_lora_rank: null` and llama.cpp's deepseek2 loader then refuses the file). The speedrun
model's config.json is re-saved through seekling.ModelConfig first, so it carries scoring_func/topk_method
(checkpoints written before those fields existed would otherwise convert to softmax routing).

Setup (once; building llama.cpp takes ~7 minutes on 2 cores):
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip wheel --no-deps llama-cpp-python==0.3.36 -w /work/cache/wheels
    pip install /work/cache/wheels/llama_cpp_python-0.3.36-*.whl sentencepiece gguf
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /work/cache/sdist   # the converter
    tar xzf /work/cache/sdist/llama_cpp_python-0.3.36.tar.gz -C /work/cache/sdist
Run:
    PYTHONPATH=. python benchmarks/bench_llamacpp.py --moe-model runs/sr1/rl --threads 1 2 \\
        --llama-cpp-src /work/cache/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Heavy imports (torch, seekling, llama_cpp) happen inside the functions that need them: a llama.cpp worker
# process must not load torch, or its resident memory would count torch's.

DENSE_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                   intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6)
# The shapes users run (random weights): Moonlight-16B-A3B's layers (DeepSeek-V3 architecture; 3 of its 27 layers,
# the first dense; a 32k vocabulary: 1.4B total, ~0.3B active) and Qwen3-0.6B (q/k norms, head_dim 128 over a
# hidden size of 1024: llama.cpp's qwen2 architecture cannot hold that, so it must be a Qwen3 checkpoint).
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "moonlight": dict(model_type="deepseek_v3", vocab_size=32000, hidden_size=2048, intermediate_size=11264,
                      moe_intermediate_size=1408, num_hidden_layers=3, num_attention_heads=16, n_routed_experts=64,
                      num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                      q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      routed_scaling_factor=2.446, norm_topk_prob=True, num_nextn_predict_layers=0,
                      max_position_embeddings=8192, rope_theta=50000.0, tie_word_embeddings=False),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True),
    # a 16B-total MoE whole (memory checks, not a benchmark row): DeepSeek-V2-Lite's shapes (27 layers, 64 experts
    # of 1408, 6 active + 2 shared, MLA 512, 102,400 vocabulary: 15.7B) in the DeepSeek-V3 architecture
    "v2-lite-16b": dict(model_type="deepseek_v3", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64,
                        num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, routed_scaling_factor=1.0, norm_topk_prob=False, num_nextn_predict_layers=0,
                        max_position_embeddings=163840, rope_theta=10000.0, tie_word_embeddings=False),
}
BLOCK = 16  # seekling's KV block size (Engine default)

# llama.cpp's converter with the two additions described in the module docstring.
CONVERT = r"""
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
from conversion import base, deepseek
known_pre = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known_pre(self, tokenizer)
    except NotImplementedError:  # not a tokenizer it has a hash for: ours splits as Qwen2 does
        return "qwen2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
set_params = deepseek.DeepseekV2Model.set_gguf_parameters
def set_gguf_parameters(self):
    set_params(self)
    if self.hparams.get("q_lora_rank") is None:
        self.gguf_writer.add_q_lora_rank(0)
deepseek.DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


# ----------------------------------------------------------------------------- preparing the models


def convert(llama_cpp_src: Path, model_dir: Path, out: Path, outtype: str) -> Path:
    if not out.exists():
        subprocess.run([sys.executable, "-c", CONVERT, str(llama_cpp_src), str(model_dir), "--outfile", str(out),
                        "--outtype", outtype], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


# --precisions: (row label, seekling's side: quantize= or "gguf" (it reads llama.cpp's file), llama.cpp's file)
PRECISIONS = {"fp32": ("fp32 / F32", None, "F32"), "int8": ("int8 / Q8_0", "int8", "Q8_0"),
              "int4": ("int4 / Q4_K_M", "int4", "Q4_K_M"), "gguf": ("Q4_K_M file", "gguf", "Q4_K_M")}
LLAMA_FTYPES = {"Q4_K_M": 15}  # llama_ftype of the files made by llama.cpp's quantiser (not its converter)


def gguf_for(llama_cpp_src: Path, model_dir: Path, work: Path, tag: str, kind: str) -> Path:
    """llama.cpp's file of a model: F32 / Q8_0 from its converter, Q4_K_M from its quantiser (on the F32 file;
    `llama_model_quantize`, what llama-quantize runs). Kept in `work` between runs."""
    if kind not in LLAMA_FTYPES:
        return convert(llama_cpp_src, model_dir, work / f"{tag}-{kind}.gguf", kind.lower())
    out = work / f"{tag}-{kind}.gguf"
    if not out.exists():
        import llama_cpp

        source = convert(llama_cpp_src, model_dir, work / f"{tag}-F32.gguf", "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[kind]
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed for {model_dir}")
        tmp.rename(out)
    return out


def gguf_bytes_per_token(path: Path) -> float:
    """Weight bytes llama.cpp reads a decode token: every tensor but the token embedding (one row; all of it
    when it is the tied output), routed experts at top-k of n."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = next((f for name, f in reader.fields.items() if name.endswith(".expert_used_count")), None)
    count = next((f for name, f in reader.fields.items() if name.endswith(".expert_count")), None)
    share = float(field.parts[-1][0]) / float(count.parts[-1][0]) if field and count else 1.0
    names = {t.name for t in reader.tensors}
    total = 0.0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes) * (share if "_exps" in t.name else 1.0)
    return total


def stream_rate(threads: int) -> float:
    """GB/s this machine streams from DRAM (a 1 GB torch.sum, best of 3): what a decode step can read."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(times) / 1e9


def prepare_moe(src: Path, work: Path) -> Path:
    """A copy of the speedrun model whose config.json carries DeepSeek's routing fields."""
    import seekling

    dst = work / "moe"
    if not (dst / "model.safetensors").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        seekling.ModelConfig.load(src).save(dst)
    return dst


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE with exactly vocab_size tokens, built without training: the 256 byte symbols, every
    pair of them, then (pair, byte) triples, plus the R1 chat tokens and Qwen's <|endoftext|> (transformers'
    Qwen2 tokenizer, which the converter loads, adds that one when it is missing)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from seekling.tokenizer import (
        ASSISTANT,
        BOS,
        CHAT_TEMPLATE,
        EOS,
        SPLIT_PATTERN,
        THINK_END,
        THINK_START,
        USER,
        Tokenizer,
    )

    special, added = [BOS, EOS, USER, ASSISTANT, "<|endoftext|>"], [THINK_START, THINK_END]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges = []
    n_merges = vocab_size - len(alphabet) - len(special) - len(added)
    pairs = ((a, b) for a in alphabet for b in alphabet)
    triples = ((a + b, c) for a in alphabet for b in alphabet for c in alphabet)
    for left, right in (*pairs, *triples):
        if len(merges) == n_merges:
            break
        merges.append((left, right))
        vocab[left + right] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    assert tok.get_vocab_size() == vocab_size
    return Tokenizer(tok, CHAT_TEMPLATE, BOS, EOS, EOS)


def prepare_dense(work: Path, seed: int) -> Path:
    """A random Qwen2 of Qwen2.5-0.5B's shape in the Hugging Face layout, weights N(0, 0.05) (wide enough
    that greedy paths depend on them), norms 1."""
    import torch

    from seekling.atomic import save_safetensors, write_text

    dst = work / f"qwen2-0.5b-seed{seed}"
    if (dst / "model.safetensors").exists():
        return dst
    s = DENSE_SHAPE
    h, f, hd = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    tensors = {"model.embed_tokens.weight": rand(s["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for L in range(s["num_hidden_layers"]):
        p = f"model.layers.{L}."
        tensors |= {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                    p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.q_proj.bias": rand(h),
                    p + "self_attn.k_proj.weight": rand(kv, h), p + "self_attn.k_proj.bias": rand(kv),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.v_proj.bias": rand(kv),
                    p + "self_attn.o_proj.weight": rand(h, h), p + "mlp.gate_proj.weight": rand(f, h),
                    p + "mlp.up_proj.weight": rand(f, h), p + "mlp.down_proj.weight": rand(h, f)}
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 0,
              "eos_token_id": 1, **s}
    tokenizer = synthetic_tokenizer(s["vocab_size"])
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dst)
    write_text(dst / "config.json", json.dumps(config, indent=2))
    write_text(dst / "generation_config.json", json.dumps({"eos_token_id": 1, "do_sample": False}))
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


def prepare_shape(work: Path, name: str, seed: int, std: float = 0.05) -> Path:
    """A random model of one of REAL_SHAPES in the Hugging Face layout, stored in bf16 as releases are: weights
    N(0, std), norms 1, routing biases 0; a synthetic tokenizer of its vocabulary size."""
    import torch

    import seekling
    from seekling.atomic import write_text
    from seekling.model.families import family

    dst = work / f"{name}-seed{seed}"
    if (dst / "model.safetensors").exists():
        return dst
    shape = dict(REAL_SHAPES[name])
    if shape["model_type"] == "deepseek_v3":
        shape.pop("model_type")
        config = seekling.ModelConfig(**shape)
        with torch.device("meta"):
            names = seekling.model.Transformer(config).state_dict()
    else:
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[shape["model_type"]]
        config = {"architectures": [arch], "hidden_act": "silu", "rms_norm_eps": 1e-6,
                  "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, **shape}
        f = family(shape["model_type"])
        with torch.device("meta"):
            names = f.build(f.read_config(config)).state_dict()
    g = torch.Generator().manual_seed(seed)
    names = {k: t for k, t in names.items() if not (k == "lm_head.weight" and shape.get("tie_word_embeddings"))}

    def value(key: str, t: torch.Tensor) -> torch.Tensor:
        if key.endswith("e_score_correction_bias"):
            return torch.zeros(t.shape)
        if key.endswith("norm.weight"):
            return torch.ones(t.shape, dtype=torch.bfloat16)
        return (torch.randn(t.shape, generator=g) * std).bfloat16()

    dst.mkdir(parents=True, exist_ok=True)
    synthetic_tokenizer(shape["vocab_size"]).save_pretrained(dst)
    if isinstance(config, dict):
        write_text(dst / "config.json", json.dumps(config, indent=2))
    else:
        config.save(dst)
    write_text(dst / "generation_config.json", json.dumps({"eos_token_id": 1, "do_sample": False}))
    dtypes = {k: "F32" if k.endswith("e_score_correction_bias") else "BF16" for k in names}
    write_safetensors_streamed(dst / "model.safetensors", {k: (dtypes[k], tuple(t.shape)) for k, t in names.items()},
                               lambda k: value(k, names[k]))
    return dst


def write_safetensors_streamed(path: Path, specs: dict[str, tuple[str, tuple[int, ...]]], make: Any) -> None:
    """A safetensors file written one tensor at a time (`make(name)` in the order of `specs`): a 16B-parameter
    checkpoint never sits in memory whole. Atomic (temp file + rename)."""
    import struct

    from seekling.atomic import atomic_path

    sizes = {"BF16": 2, "F32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        n = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in specs:
            f.write(make(name).contiguous().view(-1).view(torch_uint8()).numpy().tobytes())


def torch_uint8() -> Any:
    import torch

    return torch.uint8


def chat_prompts(model_dir: Path, n: int, seed: int) -> list[list[int]]:
    """n distinct held-out task questions, rendered with the model's chat template."""
    import seekling
    from seekling.tasks import TASKS, sample_problems

    tok = seekling.load_tokenizer(str(model_dir))
    per_task = [sample_problems(name, n, split="test", seed=seed) for name in sorted(TASKS)]
    problems = [p for group in zip(*per_task, strict=True) for p in group]  # the task families in turn
    return [tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=True)
            for p in problems[:n]]


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(300, vocab) for _ in range(length)] for _ in range(n)]


# ----------------------------------------------------------------------------- the two sides (worker processes)


Clock = tuple[float, float]  # (wall, CPU) seconds: CPU time is the steadier figure on a shared machine


def now() -> Clock:
    return time.perf_counter(), time.process_time()


def since(t0: Clock) -> Clock:
    t1 = now()
    return t1[0] - t0[0], t1[1] - t0[1]


def memory_now() -> dict[str, float]:
    """VmRSS (held) and VmHWM (peak) of this process, in GB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[v].split()[0]) * 1024 / 1e9 for k, v in (("held_gb", "VmRSS"), ("peak_gb", "VmHWM"))}


def seekling_bytes_per_token(model: Any) -> float:
    """Weight bytes seekling reads a decode token: every tensor the prepared model holds (each storage once),
    less the embedding (one row) when it is not the head, routed experts at top-k of n."""
    import torch

    from seekling.model.moe import MoE

    def storages(obj: Any) -> dict[int, int]:
        if isinstance(obj, torch.Tensor):
            return {} if obj.is_meta else {obj.untyped_storage().data_ptr(): obj.untyped_storage().nbytes()}
        if hasattr(obj, "__dataclass_fields__"):
            return {k: v for x in vars(obj).values() for k, v in storages(x).items()}
        if isinstance(obj, list):
            return {k: v for x in obj for k, v in storages(x).items()}
        return {}

    seen: dict[int, float] = {}
    routed = {id(w) for m in model.modules() if isinstance(m, MoE) for w in (m.w13, m.w2)}
    for m in model.modules():
        share = m.top_k / m.n_experts if isinstance(m, MoE) else 1.0
        for name, value in list(vars(m).items()) + list(m._parameters.items()):
            if name == "embed_w" and value is not model.head_w:
                continue
            for ptr, n in storages(value).items():  # a module's stack before its experts' views of it
                seen.setdefault(ptr, n * (share if id(value) in routed else 1.0))
    embed = model.model.embed_tokens.weight
    if not embed.is_meta and model.lm_head.weight is not embed:
        seen.pop(embed.untyped_storage().data_ptr(), None)
    return sum(seen.values())


class Seekling:
    def __init__(self, spec: dict[str, Any]):
        import torch

        import seekling

        torch.set_num_threads(spec["threads"])
        self.seekling = seekling
        kwargs = {"quantize": spec["quantize"]} if spec["quantize"] else {}
        if spec["compile"]:
            kwargs["compile"] = True
        # the same token capacity as llama.cpp's context (the default cache would be 256 MiB)
        blocks = spec["n_seq"] * math.ceil(spec["n_ctx"] / BLOCK)
        self.engine = seekling.Engine(spec["model"], max_num_seqs=spec["n_seq"], cache_blocks=blocks, **kwargs)
        self.bytes_per_token = seekling_bytes_per_token(self.engine.model)

    def params(self, n: int) -> Any:
        return self.seekling.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    def decode1(self, prompt: list[int], n: int) -> tuple[list[int], Clock]:
        """Greedy tokens and the decode time after the first token (prefill excluded)."""
        tokens: list[int] = []
        first = None
        for delta in self.engine.stream(prompt, self.params(n)):
            first = first or now()
            tokens += delta.token_ids
        return tokens, since(first)

    def generate(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], Clock]:
        t0 = now()
        outs = self.engine.generate(prompts, self.params(n))
        return [o.token_ids for o in outs], since(t0)


class LlamaCpp:
    """llama.cpp's own loop through llama-cpp-python's low-level API: one llama_batch per step carrying a token
    of every sequence (seq ids 0..B-1), llama.cpp's greedy sampler."""

    def __init__(self, spec: dict[str, Any]):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self._quiet = L.llama_log_callback(lambda level, text, data: None)  # keep a reference: C holds it
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        self.model = L.llama_model_load_from_file(spec["model"].encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec['model']}")
        self.threads, self.n_ctx, self.ctx, self.n_seq = spec["threads"], spec["n_ctx"], None, 0
        self.exact = spec["llama_precision"] == "exact"
        self.sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())

    def context(self, n_seq: int, n_batch: int) -> Any:
        """A context for n_seq sequences of n_ctx tokens each (rebuilt when the batch size changes)."""
        L = self.L
        if self.ctx is not None and self.n_seq == n_seq:
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
            return self.ctx
        if self.ctx is not None:
            L.llama_free(self.ctx)
        p = L.llama_context_default_params()
        p.n_ctx, p.n_seq_max = self.n_ctx * n_seq, n_seq
        p.n_batch = p.n_ubatch = max(n_batch, 512)
        p.n_threads = p.n_threads_batch = self.threads
        if self.exact:
            p.type_k = p.type_v = L.GGML_TYPE_F32
            p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx, self.n_seq = L.llama_init_from_model(self.model, p), n_seq
        return self.ctx

    def step(self, ctx: Any, batch: Any, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        if self.L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def run(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], Clock, Clock]:
        """Greedy tokens, prefill time (all prompts in one batch) and decode time (n - 1 batched steps)."""
        L = self.L
        total = sum(map(len, prompts))
        ctx = self.context(len(prompts), total)
        batch = L.llama_batch_init(max(total, len(prompts)), 0, 1)
        try:
            t0 = now()
            entries = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
            self.step(ctx, batch, entries)
            last = [i for i, e in enumerate(entries) if e[3]]
            out = [[L.llama_sampler_sample(self.sampler, ctx, idx)] for idx in last]
            prefill, t1 = since(t0), now()
            for k in range(n - 1):
                step = [(o[-1], len(p) + k, s, True) for s, (p, o) in enumerate(zip(prompts, out, strict=True))]
                self.step(ctx, batch, step)
                for s, o in enumerate(out):
                    o.append(L.llama_sampler_sample(self.sampler, ctx, s))
            return out, prefill, since(t1)
        finally:
            L.llama_batch_free(batch)

    def decode1(self, prompt: list[int], n: int) -> tuple[list[int], Clock]:
        out, _, decode = self.run([prompt], n)
        return out[0], decode

    def generate(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], Clock]:
        out, prefill, decode = self.run(prompts, n)
        return out, (prefill[0] + decode[0], prefill[1] + decode[1])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One side on one model: 'memory' (load + a short generation, then VmRSS/VmHWM) or 'speed'."""
    side = Seekling(spec) if spec["side"] == "seekling" else LlamaCpp(spec)
    n = spec["new_tokens"]
    if spec["mode"] == "memory":
        side.decode1(spec["warmup"], 16)
        return memory_now()
    side.generate([spec["warmup"]], 4)  # warm-up: kernels, allocator, thread pool
    result: dict[str, Any] = {"tokens1": [], "tokens_batch": []}
    if hasattr(side, "bytes_per_token"):
        result["bytes_per_token"] = [side.bytes_per_token]

    def rate(key: str, count: int, clock: Clock) -> None:  # tokens/s by wall and by CPU time
        result.setdefault(key, []).append(count / clock[0])
        result.setdefault(key + "_cpu", []).append(count / clock[1])

    for r in range(spec["repeats"]):
        tokens, clock = side.decode1(spec["prompts1"][r], n)
        rate("decode1", n - 1, clock)
        result["tokens1"].append(tokens)
        outs, clock = side.generate(spec["prompts_batch"][r], n)
        rate("batch", len(outs) * n, clock)
        result["tokens_batch"].append(outs)
        _, clock = side.generate([spec["prompts_prefill"][r]], 1)
        rate("prefill", len(spec["prompts_prefill"][r]), clock)
    return result


def run_worker(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, __file__, "--worker", f.name], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    Path(f.name).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['side']} worker failed on {spec['model']}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- comparing


def divergence(a: list[int], b: list[int]) -> int | None:
    """First position where two token lists differ (None: identical)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def compare(ours: list[list[int]], theirs: list[list[int]], eos: set[int]) -> dict[str, Any]:
    firsts = [divergence(a, b) for a, b in zip(ours, theirs, strict=True)]
    # through eos: the part a stopping generation returns (the runs ignore eos to time a fixed length)
    through_eos = [f is None or any(t in eos for t in a[:f]) for a, f in zip(ours, firsts, strict=True)]
    diverged = [f for f in firsts if f is not None]
    return {"sequences": len(ours), "identical": firsts.count(None), "identical_through_eos": sum(through_eos),
            "first_divergence": min(diverged) if diverged else None}


def run_case(case: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both sides of one (model, precision, threads) case: speed rounds alternate sides, memory last."""
    common = {k: case[k] for k in ("prompts1", "prompts_batch", "prompts_prefill", "warmup", "n_ctx")}
    common |= {"threads": case["threads"], "new_tokens": args.new_tokens, "compile": args.compile,
               "llama_precision": args.llama_precision}
    ours = {"model": str(case["gguf"]), "quantize": None} if case["quantize"] == "gguf" else \
        {"model": str(case["seekling"]), "quantize": case["quantize"]}
    sides = {"seekling": ours, "llama.cpp": {"model": str(case["gguf"]), "quantize": None}}
    speed: dict[str, dict[str, Any]] = {}
    for r in range(args.repeats):  # alternate, so load from other processes hits both sides alike
        for side, extra in sides.items():
            spec = {**common, **extra, "side": side, "mode": "speed", "repeats": 1, "n_seq": args.batch,
                    **{k: common[k][r:r + 1] for k in ("prompts1", "prompts_batch", "prompts_prefill")}}
            got = run_worker(spec, work)
            acc = speed.setdefault(side, {k: [] for k in got})
            for k, v in got.items():
                acc[k] += v
    tokens = {side: s["tokens1"] + [t for ts in s["tokens_batch"] for t in ts] for side, s in speed.items()}
    out = {"name": case["name"], "precision": case["precision"], "threads": case["threads"],
           "tokens": compare(tokens["seekling"], tokens["llama.cpp"], case["eos"])}
    for side, s in speed.items():
        out[side] = {k: statistics.median(v) for k, v in s.items() if not k.startswith("tokens")}
    out["llama.cpp"]["bytes_per_token"] = gguf_bytes_per_token(Path(case["gguf"]))
    for side in out["seekling"], out["llama.cpp"]:
        side["decode1_gbs"] = side["bytes_per_token"] * side["decode1"] / 1e9
    if not args.skip_memory:
        for side, extra in sides.items():
            spec = {**common, **extra, "side": side, "mode": "memory", "n_seq": 1}
            out[side] |= run_worker(spec, work)
    return out


def build_cases(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    src = args.llama_cpp_src
    n_prompts = args.repeats * (1 + args.batch)
    cases = []
    models = []
    if args.moe_model:
        moe = prepare_moe(Path(args.moe_model), work)
        config = json.loads((moe / "config.json").read_text())
        prompts = chat_prompts(moe, n_prompts + 1, seed=args.seed)
        prefill = random_prompts(args.repeats, args.prefill_tokens, config["vocab_size"], args.seed)
        models.append(("speedrun MoE", "moe", moe, {config["eos_token_id"]}, prompts, prefill))
    if not args.skip_dense:
        vocab = DENSE_SHAPE["vocab_size"]
        prompts = random_prompts(n_prompts + 1, args.dense_prompt_tokens, vocab, args.seed)
        prefill = random_prompts(args.repeats, args.prefill_tokens, vocab, args.seed + 1)
        models.append(("Qwen2 0.5B-shape (random)", "dense", prepare_dense(work, args.seed), {1}, prompts, prefill))
    for shape in args.shapes:
        vocab = REAL_SHAPES[shape]["vocab_size"]
        prompts = random_prompts(n_prompts + 1, args.dense_prompt_tokens, vocab, args.seed)
        prefill = random_prompts(args.repeats, args.prefill_tokens, vocab, args.seed + 1)
        models.append((f"{shape} shape (random)", shape, prepare_shape(work, shape, args.seed), {1}, prompts, prefill))
    for name, tag, directory, eos, prompts, prefill in models:
        for precision, quantize, kind in (PRECISIONS[p] for p in args.precisions):
            gguf_file = gguf_for(src, directory, work, tag, kind)
            for threads in args.threads:
                cases.append(dict(name=name, precision=precision, seekling=directory, gguf=gguf_file,
                                  quantize=quantize, threads=threads, eos=eos, **split_prompts(prompts, prefill, args)))
    return cases


def split_prompts(prompts: list[list[int]], prefill: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Per repeat: one batch-1 prompt and `batch` others (all distinct), a prefill prompt; plus a warm-up one."""
    b, n = args.batch, args.repeats
    longest = max(map(len, prompts + prefill))
    return {"warmup": prompts[-1], "prompts1": prompts[:n],
            "prompts_batch": [prompts[n + r * b:n + (r + 1) * b] for r in range(n)], "prompts_prefill": prefill,
            "n_ctx": BLOCK * math.ceil((longest + args.new_tokens + 16) / BLOCK)}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{'model':27s} {'precision':12s} {'thr':>3s} {'measure':16s} {'seekling':>10s} {'llama.cpp':>10s} "
          f"{'ratio':>6s} {'by CPU time':>22s}")
    for r in results:
        ours, theirs = r["seekling"], r["llama.cpp"]
        rows = [("decode b=1 tok/s", "decode1"), ("b=1 weights GB/s", "decode1_gbs"),
                (f"total b={args.batch} tok/s", "batch"), (f"prefill {args.prefill_tokens} tok/s", "prefill"),
                ("held GB", "held_gb"), ("peak GB", "peak_gb"), ("MB read a token", "bytes_per_token")]
        for label, key in rows:
            if key not in ours:
                continue
            a, b = ours.get(key + "_cpu"), theirs.get(key + "_cpu")
            cpu = f"{a:8.1f} {b:8.1f} {a / b:4.2f}x" if a else ""
            scale = 1e-6 if key == "bytes_per_token" else 1.0
            print(f"{r['name']:27s} {r['precision']:12s} {r['threads']:3d} {label:16s} {ours[key] * scale:10.2f} "
                  f"{theirs[key] * scale:10.2f} {ours[key] / theirs[key]:5.2f}x {cpu:>22s}")
        t = r["tokens"]
        print(f"{'':27s} greedy tokens: {t['identical']}/{t['sequences']} sequences identical over {args.new_tokens} "
              f"tokens, {t['identical_through_eos']}/{t['sequences']} through eos, first divergence at "
              f"{t['first_divergence']}")
    print("(ratio = seekling / llama.cpp: above 1 is faster for tokens/s, more memory for GB; median of the repeats)")


def machine() -> dict[str, Any]:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    try:
        from importlib.metadata import version

        llama_version = version("llama_cpp_python")
    except Exception:
        llama_version = "?"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": model, "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "llama_cpp_python": llama_version}


def finish(json_path: Path | None, info: dict[str, Any], results: Any) -> None:
    """The closing line of a benchmark (the load it ended at) and, when asked, its figures as JSON."""
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if json_path:
        from seekling.atomic import write_text

        write_text(json_path, json.dumps({"machine": info, "results": results}, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--moe-model", help="a speedrun model directory (e.g. runs/sr1/rl); none: skip the MoE rows")
    ap.add_argument("--skip-dense", action="store_true", help="skip the 0.5B-shaped Qwen2 rows")
    ap.add_argument("--shapes", nargs="*", choices=sorted(REAL_SHAPES), default=[],
                    help="random models of the shapes users run: Moonlight-16B-A3B's layers, Qwen3-0.6B's")
    ap.add_argument("--skip-memory", action="store_true", help="skip the resident-memory processes")
    ap.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                    help="llama.cpp source tree with convert_hf_to_gguf.py (the sdist's vendor/llama.cpp); "
                         "default $LLAMA_CPP_SRC")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to run (default 1)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="concurrent sequences of the batched rows")
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--dense-prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="the median of this many runs per side")
    ap.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "int8"],
                    help="seekling fp32 vs llama.cpp F32, int8 (Engine(quantize='int8')) vs Q8_0, int4 vs Q4_K_M, "
                         "gguf: seekling reading llama.cpp's Q4_K_M file (Engine('file.gguf')) vs llama.cpp on it")
    ap.add_argument("--compile", action="store_true", help="Engine(compile=True)")
    ap.add_argument("--llama-precision", choices=("default", "exact"), default="default",
                    help="llama.cpp's own defaults (f16 KV cache, flash attention), or exact: fp32 cache and no "
                         "flash attention, seekling's arithmetic (for token parity)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/seekling-bench-llamacpp"),
                    help="where the built models and GGUF files are kept between runs")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    if args.llama_cpp_src is None or not (args.llama_cpp_src / "convert_hf_to_gguf.py").exists():
        ap.error("--llama-cpp-src must be a llama.cpp tree with convert_hf_to_gguf.py (see the setup above)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["stream_gbs"] = {t: stream_rate(t) for t in args.threads}
    print(f"{info['date']}  {info['cpu']} ({info['cores']} cores)  load average {info['load_average'][0]:.2f}  "
          f"torch {info['torch']}  llama-cpp-python {info['llama_cpp_python']}  DRAM stream (torch.sum of 1 GB) "
          + ", ".join(f"{v:.1f} GB/s at {t} thread{'s' if t > 1 else ''}" for t, v in info["stream_gbs"].items()))
    print(f"greedy, {args.new_tokens} new tokens, median of {args.repeats}; seekling Engine"
          f"{'(compile=True)' if args.compile else ''} vs llama.cpp on GGUFs from its own converter, "
          f"llama.cpp precision: {args.llama_precision}")
    results = [run_case(case, args, args.workdir) for case in build_cases(args, args.workdir)]
    info["load_average_end"] = os.getloadavg()
    report(results, args)
    print(f"load average at the end {info['load_average_end'][0]:.2f}")
    if args.json:
        from seekling.atomic import write_text

        figures = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "results": results}
        write_text(args.json, json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
