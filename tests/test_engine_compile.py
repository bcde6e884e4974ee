"""Engine(compile=True) for the Python step (native=False here; the models the C++ step does not run get it as
they are): plain decode steps of up to max_batch sequences run through torch.compile of the
model's own `infer` (engine/compiled.py). It must produce the eager forward's tokens alone and in batches,
return the same cache entries, survive in-place weight updates without recompiling, run the dense and int8
models too, and say what to do when compiling fails."""

from __future__ import annotations

import pytest
import torch

from seekling.engine import Engine, SamplingParams
from seekling.model import Transformer, make_batch
from seekling.model.config import preset
from seekling.model.dense import DenseConfig, DenseModel


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=300, num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=32, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # routing biases away from zero, so the balancing bias takes part in routing
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
# Mixed lengths, one shorter than a block and one spanning three: the block table grows mid-decode.
PROMPTS = [[5, 6, 7], list(range(10, 50)), list(range(60, 78))]


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny()


def greedy(engine: Engine, prompts=PROMPTS) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(prompts, GREEDY)]


def test_compiled_steps_match_the_eager_forward_and_return_the_same_entries(model):
    engine = Engine(model, max_num_seqs=2, compile=True, native=False)
    cpu = torch.device("cpu")
    a, b = [3, 1, 4], [6, 5]  # non-contiguous block tables
    with torch.inference_mode():
        prefill = make_batch([(list(range(20, 53)), 0, a), (list(range(60, 80)), 0, b)], 16, cpu)
        prefill.cache = engine.kv
        _, entries = model.infer(prefill)  # prompts of 33 and 20 tokens (three and two blocks)
        engine.step_module.backend.write(entries, prefill.slots, 0)
        for items in ([(7, 33, a)], [(8, 34, a), (9, 20, b)]):  # the batch-1 graph, then the batch graph
            batch = make_batch([([t], p, tb) for t, p, tb in items], 16, cpu)
            batch.cache = engine.kv
            want = model.infer(batch)
            got = engine.step_module.backend.compiled(batch)
            for w, g in zip(want, got, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_compiled_greedy_equals_eager_alone_and_in_batches(model):
    eager = greedy(Engine(model, max_num_seqs=4, native=False))
    assert greedy(Engine(model, max_num_seqs=1, compile=True, native=False)) == eager  # alone: the batch-1 graph
    few = Engine(model, max_num_seqs=4, compile=True, native=False)
    few.step_module.backend.compiled.max_batch = 2  # three sequences: prefill, first steps eager, then the batch graph
    # Staggered lengths: 3 decode together, then 2 (batch graph), then the longest alone (batch-1 graph).
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (10, 40, 20)]
    outs = [o.token_ids for o in few.generate(PROMPTS, params)]
    assert outs == [e[:len(o)] for e, o in zip(eager, outs, strict=True)] and len(outs[1]) == 40


def test_in_place_weight_updates_are_seen_without_recompiling(model):
    m = tiny(seed=3)
    engine = Engine(m, max_num_seqs=1, compile=True, native=False)
    greedy(engine, PROMPTS[:1])
    graphs = compiled_graphs()
    with torch.no_grad():  # what an optimizer step does between RL rollouts
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.add_(0.1)
    after = greedy(engine, PROMPTS)
    assert after == greedy(Engine(m, max_num_seqs=1, native=False))
    assert compiled_graphs() == graphs, "a weight update (or a longer block table) recompiled the graph"


def test_compiled_q_lora_and_speculative(model):
    m = tiny(seed=5, q_lora_rank=24)
    want = greedy(Engine(m, max_num_seqs=1, native=False))
    assert greedy(Engine(m, max_num_seqs=1, compile=True, native=False)) == want
    assert greedy(Engine(m, max_num_seqs=4, compile=True, native=False)) == want  # the batch graph
    # Speculative decoding verifies eagerly; steps without a draft may take the graph.
    assert greedy(Engine(m, max_num_seqs=1, compile=True, speculative=True, native=False)) == want


def test_compiled_group_limited_routing():
    m = tiny(seed=7, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    want = greedy(Engine(m, max_num_seqs=4, native=False))
    assert greedy(Engine(m, max_num_seqs=1, compile=True, native=False)) == want
    assert greedy(Engine(m, max_num_seqs=4, compile=True, native=False)) == want


def test_compiled_dense_and_int8_models():
    """The same `infer` of the other families and of int8 weights compiles (seekling's kernels are custom
    ops inductor calls) and gives the eager tokens."""
    torch.manual_seed(0)
    dense = DenseModel(DenseConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64, attention_bias=True))
    for p in dense.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    prompts = [[1, 2, 3], list(range(5, 30))]
    want = greedy(Engine(dense, max_num_seqs=2, native=False), prompts)
    assert greedy(Engine(dense, max_num_seqs=2, compile=True, native=False), prompts) == want
    int8 = Engine(tiny(seed=9), quantize="int8", max_num_seqs=2).model
    want = greedy(Engine(int8, max_num_seqs=2, native=False))
    assert greedy(Engine(int8, max_num_seqs=2, compile=True, native=False)) == want


def test_a_failing_compile_says_what_to_do(model, monkeypatch):
    from seekling.engine.compiled import CompiledDecode

    def broken(self, device):
        raise OSError("no working C++ compiler")

    monkeypatch.setattr(CompiledDecode, "_warm_up", broken)
    with pytest.raises(RuntimeError, match="run with compile=False"):
        Engine(model, compile=True, native=False)
