"""Engine(compile=True): plain decode steps of up to max_batch sequences run as one torch.compile'd graph
(engine/graph.py). It must produce the eager runner's tokens alone and in batches, write the same latents,
survive in-place weight updates without recompiling, and refuse the models it does not handle."""

from __future__ import annotations

import pytest
import torch

from seekling.config import preset
from seekling.engine import Engine, SamplingParams
from seekling.engine.runner import make_batch
from seekling.model import Transformer
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


def test_compiled_steps_match_the_runner_and_write_the_same_latents(model):
    eager, compiled = Engine(model, max_num_seqs=2), Engine(model, max_num_seqs=2, compile=True)
    cpu = torch.device("cpu")
    a, b = [3, 1, 4], [6, 5]  # non-contiguous block tables
    with torch.inference_mode():
        for e in (eager, compiled):  # prompts of 33 and 20 tokens (three and two blocks)
            e.runner.forward(make_batch([(list(range(20, 53)), 0, a), (list(range(60, 80)), 0, b)], 16, cpu))
        for items in ([(7, 33, a)], [(8, 34, a), (9, 20, b)]):  # the batch-1 graph, then the batch graph
            want = eager.runner.forward(make_batch([([t], p, tb) for t, p, tb in items], 16, cpu))
            torch.testing.assert_close(compiled.compiled.step(items), want, atol=1e-5, rtol=1e-5)
    # The latents written (block 0 holds the warm-up's scratch writes, in no sequence's table).
    torch.testing.assert_close(compiled.kv[:, 1:], eager.kv[:, 1:], atol=1e-5, rtol=1e-5)
    assert eager.kv[:, 4, 2].abs().sum() > 0 and eager.kv[:, 5, 4].abs().sum() > 0  # positions 34 and 20


def test_compiled_greedy_equals_eager_alone_and_in_batches(model):
    eager = greedy(Engine(model, max_num_seqs=4))
    assert greedy(Engine(model, max_num_seqs=1, compile=True)) == eager  # every step alone: batch-1 graph
    few = Engine(model, max_num_seqs=4, compile=True)
    few.compiled.max_batch = 2  # three sequences: prefill and the first steps eager, then the batch graph
    # Staggered lengths: 3 decode together, then 2 (batch graph), then the longest alone (batch-1 graph).
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (10, 40, 20)]
    outs = [o.token_ids for o in few.generate(PROMPTS, params)]
    assert outs == [e[:len(o)] for e, o in zip(eager, outs, strict=True)] and len(outs[1]) == 40


def test_in_place_weight_updates_are_seen_without_recompiling(model):
    m = tiny(seed=3)
    engine = Engine(m, max_num_seqs=1, compile=True)
    greedy(engine, PROMPTS[:1])
    graphs = compiled_graphs()
    with torch.no_grad():  # what an optimizer step does between RL rollouts
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.add_(0.1)
    after = greedy(engine, PROMPTS)
    assert after == greedy(Engine(m, max_num_seqs=1))
    assert compiled_graphs() == graphs, "a weight update (or a longer block table) recompiled the graph"


def test_compiled_q_lora_and_speculative(model):
    m = tiny(seed=5, q_lora_rank=24)
    want = greedy(Engine(m, max_num_seqs=1))
    assert greedy(Engine(m, max_num_seqs=1, compile=True)) == want
    assert greedy(Engine(m, max_num_seqs=4, compile=True)) == want  # the batch graph
    # Speculative decoding verifies on the eager runner; steps without a draft may take the graph.
    assert greedy(Engine(m, max_num_seqs=1, compile=True, speculative=True)) == want


def test_compiled_group_limited_routing():
    m = tiny(seed=7, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    want = greedy(Engine(m, max_num_seqs=4))
    assert greedy(Engine(m, max_num_seqs=1, compile=True)) == want
    assert greedy(Engine(m, max_num_seqs=4, compile=True)) == want


def test_compile_refuses_what_it_does_not_handle(model):
    with pytest.raises(ValueError, match="float32"):
        Engine(tiny().to(torch.bfloat16), compile=True)
    dense = DenseModel(DenseConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64))
    with pytest.raises(ValueError, match="compile"):
        Engine(dense, compile=True)


def test_a_failing_compile_says_what_to_do(model, monkeypatch):
    from seekling.engine.graph import CompiledDecode

    def broken(self):
        raise OSError("no working C++ compiler")

    monkeypatch.setattr(CompiledDecode, "warm_up", broken)
    with pytest.raises(RuntimeError, match="run with compile=False"):
        Engine(model, compile=True)
