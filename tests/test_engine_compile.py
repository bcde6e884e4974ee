"""Engine(compile=True): a lone sequence's decode step runs as one torch.compile'd graph (engine/graph.py).
It must produce the eager runner's tokens, write the same latents, survive in-place weight updates without
recompiling, and refuse the models it does not handle."""

from __future__ import annotations

import pytest
import torch

from seekling.config import preset
from seekling.engine import Engine, SamplingParams
from seekling.engine.runner import make_batch
from seekling.model import Transformer
from seekling.model.dense import DenseConfig, DenseModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_compiled_step_matches_the_runner_and_writes_the_same_latents(model):
    eager, compiled = Engine(model, max_num_seqs=1), Engine(model, max_num_seqs=1, compile=True)
    table = [3, 1, 4]  # non-contiguous blocks
    prompt = list(range(20, 53))  # 33 tokens: positions 0..32 fill two blocks and start a third
    with torch.inference_mode():
        for e in (eager, compiled):
            e.runner.forward(make_batch([(prompt, 0, table)], 16, torch.device("cpu")))
        h_ref = eager.runner.forward(make_batch([([7], 33, table)], 16, torch.device("cpu")))
        h = compiled.compiled.step(7, 33, table)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    slot = 4 * 16 + 33 % 16
    torch.testing.assert_close(compiled.kv[:, 4, 1], eager.kv[:, 4, 1], atol=1e-5, rtol=1e-5)
    assert compiled.kv.view(compiled.kv.shape[0], -1, compiled.kv.shape[-1])[:, slot].abs().sum() > 0


def test_compiled_greedy_equals_eager_alone_and_mixed_with_batches(model):
    eager = greedy(Engine(model, max_num_seqs=4))
    assert greedy(Engine(model, max_num_seqs=1, compile=True)) == eager  # every step alone: compiled
    # Batched steps run eager; once the other two finish, the middle one decodes alone on the graph.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (10, 40, 20)]
    engine = Engine(model, max_num_seqs=4, compile=True)
    outs = [o.token_ids for o in engine.generate(PROMPTS, params)]
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
    # Speculative decoding verifies on the eager runner; steps without a draft may take the graph.
    assert greedy(Engine(m, max_num_seqs=1, compile=True, speculative=True)) == want


def test_compile_refuses_what_it_does_not_handle(model):
    with pytest.raises(ValueError, match="n_group"):
        Engine(tiny(n_routed_experts=8, n_group=2, topk_group=1), compile=True)
    with pytest.raises(ValueError, match="float32"):
        Engine(tiny().to(torch.bfloat16), compile=True)
    dense = DenseModel(DenseConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64))
    with pytest.raises(ValueError, match="compile"):
        Engine(dense, compile=True)
