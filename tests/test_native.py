"""The C++ inference step (seekling/model/native.cpp) against the Python forward it must equal: logits, hidden
states and cache writes of prefill and decode over a paged cache, the MTP module, the router against `route()` for
every variant it accepts, the sampler's distribution against the logits processor, greedy decoding at several batch
sizes against a full recompute, and the fallbacks (models and configs it does not run, no compiler)."""

from __future__ import annotations

import pytest
import torch

from seekling.engine import Engine, SamplingParams
from seekling.engine.sampling import probs_from_logits
from seekling.model import Transformer, make_batch
from seekling.model.config import preset
from seekling.model.moe import route
from seekling.model.native import METHODS, SCORING, NativeModel, load_native, routing_of, unsupported

VOCAB = 300


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=VOCAB, num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=32, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # routing biases away from zero, so the balancing bias takes part in routing
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
    model.prepare()
    return model


CONFIGS = {
    "plain": {},
    "q_lora": dict(q_lora_rank=24),
    "group_limited": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                          routed_scaling_factor=2.5),
    "unnormalised": dict(norm_topk_prob=False, n_shared_experts=2),
    "v2_greedy": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, num_nextn_predict_layers=0),
    "v2_group_limited": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             num_experts_per_tok=3, norm_topk_prob=False),
    "yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "mscale": 0.707, "mscale_all_dim": 0.707}),
}


def cache_for(model: Transformer, blocks: int = 24, block_size: int = 4) -> torch.Tensor:
    c = model.config
    return torch.zeros(c.num_hidden_layers + 1, blocks, block_size, c.kv_lora_rank + c.qk_rope_head_dim)


def python_step(model: Transformer, kv: torch.Tensor, items: list) -> torch.Tensor:
    """The Python forward of `items` on kv, writing its cache entries as the engine does; -> hidden [N, h]."""
    batch = make_batch(items, kv.shape[2], torch.device("cpu"))
    batch.cache = kv
    hidden, entries = model.infer(batch)
    L = entries.shape[0]
    kv[:L].view(L, -1, kv.shape[-1]).index_copy_(1, batch.slots, entries)
    return hidden


def flat(items: list) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    tokens, pos, seq = [], [], []
    for b, (new, start, _) in enumerate(items):
        tokens += new
        pos += range(start, start + len(new))
        seq += [b] * len(new)
    return tokens, pos, seq, [t for _, _, t in items]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_mtp_equal_the_python_forward_on_a_paged_cache(name):
    model = tiny(1, **CONFIGS[name])
    ours, theirs = cache_for(model), cache_for(model)
    native = NativeModel(model, ours).impl
    g = torch.Generator().manual_seed(0)
    a, b = [7, 2, 11, 5], [3, 9, 1]  # non-contiguous block tables
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (13, 6)]
    steps = [[(prompts[0], 0, a), (prompts[1], 0, b)],  # prefill of two sequences (mixed lengths)
             [([41], 13, a), ([42, 43], 6, b)],  # a decode and a two-token verify
             [([44], 14, a)]]  # a lone decode
    with torch.inference_mode():
        for items in steps:
            want = python_step(model, theirs, items)
            tokens, pos, seq, tables = flat(items)
            logits, hidden = native.forward(tokens, pos, seq, tables, list(range(len(tokens))))
            torch.testing.assert_close(hidden, want, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(logits, model.logits(want), atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)  # the same latents in the same slots
        if not len(model.mtp_layers):
            return
        # the MTP module over the first prompt's positions (token i + 1 beside hidden state i)
        nxt = prompts[0][1:] + [41]
        hidden = python_step(model, theirs.clone(), [(prompts[0], 0, a)])
        batch = make_batch([(nxt, 0, a)], 4, torch.device("cpu"), last_only=True)
        batch.cache = theirs
        h, _ = model.infer_mtp(batch, hidden)
        got = native.mtp(nxt, list(range(13)), [0] * 13, [a], hidden.contiguous(), [12])
        torch.testing.assert_close(got, model.logits(h), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("routing", [
    dict(scoring="sigmoid", method="noaux_tc", n_group=1, topk_group=1, top_k=2, norm=True, scale=1.0),
    dict(scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2, top_k=3, norm=True, scale=2.5),
    dict(scoring="sigmoid", method="noaux_tc", n_group=8, topk_group=3, top_k=6, norm=False, scale=1.0),
    dict(scoring="softmax", method="greedy", n_group=1, topk_group=1, top_k=6, norm=False, scale=1.0),
    dict(scoring="softmax", method="greedy", n_group=4, topk_group=2, top_k=4, norm=True, scale=16.0),
    dict(scoring="softmax", method="group_limited_greedy", n_group=8, topk_group=3, top_k=6, norm=False, scale=1.0),
    dict(scoring="sigmoid", method="group_limited_greedy", n_group=2, topk_group=1, top_k=4, norm=True, scale=2.0)])
def test_router_equals_route(routing):
    """Every variant of moe.route() the C++ router accepts gives the same experts and weights."""
    torch.manual_seed(0)
    E = 64
    logits = torch.randn(200, E) * 2
    bias = torch.randn(E) * 0.1 if routing["method"] == "noaux_tc" else None
    spec = [E, routing["top_k"], routing["n_group"], routing["topk_group"], float(routing["norm"]), routing["scale"],
            SCORING[routing["scoring"]], METHODS[routing["method"]]]
    w, ids = load_native().route(logits, bias, [float(x) for x in spec])
    want_w, want_ids, _ = route(logits, routing["top_k"], routing["scoring"], routing["method"], bias,
                                routing["n_group"], routing["topk_group"], routing["norm"], routing["scale"])
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)


def test_router_numbers_come_from_the_gate():
    model = tiny(2, **CONFIGS["group_limited"])
    gate = model.moe_layers()[0].gate
    assert routing_of(gate) == [8.0, 3.0, 4.0, 2.0, 1.0, 2.5, 0.0, 0.0]


def sampler_frequencies(params: SamplingParams, logits: torch.Tensor, draws: int) -> torch.Tensor:
    p = [params.temperature, float(params.top_k), params.top_p, params.min_p]
    rows = logits.expand(draws, -1).contiguous()
    tokens, _ = load_native().sample_rows(rows, [p] * draws, list(range(1, draws + 1)))  # independent states
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).float() / draws


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.1),
                                dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05)])
def test_sampler_draws_the_processors_distribution(kw):
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    params = SamplingParams(**kw)
    want = probs_from_logits(logits, [params], [[]], [[]])[0]
    got = sampler_frequencies(params, logits, 40_000)
    assert (got[want == 0] == 0).all()  # never a truncated token
    assert (got - want).abs().sum() / 2 < 0.02  # total variation


def test_greedy_sampler_is_the_argmax_and_seeds_are_reproducible():
    logits = torch.randn(6, 50)
    tokens, _ = load_native().sample_rows(logits, [[0.0, -1.0, 1.0, 0.0]] * 6, [0] * 6)
    assert tokens == logits.argmax(-1).tolist()
    a = load_native().sample_rows(logits, [[1.0, -1.0, 1.0, 0.0]] * 6, [7] * 6)
    assert a == load_native().sample_rows(logits, [[1.0, -1.0, 1.0, 0.0]] * 6, [7] * 6)


def reference_greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_multi_step_greedy_equals_a_full_recompute(batch):
    model = tiny(3, q_lora_rank=24)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 20, (batch,), generator=g)]
    engine = Engine(model, max_num_seqs=batch, block_size=4, num_scheduler_steps=5)
    assert engine.stats()["native"]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == [reference_greedy(model, p, 12) for p in prompts]


def test_what_the_native_step_does_not_run_takes_the_python_step(monkeypatch):
    model = tiny(4)
    assert unsupported(model) is None
    int8 = Engine(tiny(4), quantize="int8")
    assert not int8.stats()["native"] and "int8" in unsupported(int8.model)
    gate = model.moe_layers()[0].gate
    monkeypatch.setattr(gate, "topk_method", "a_new_method", raising=False)  # a variant the C++ router lacks
    assert "a_new_method" in unsupported(model)
    assert not Engine(model).stats()["native"]
    with pytest.raises(ValueError, match="native=True"):
        Engine(model, native=True)


def test_without_a_compiler_the_engine_runs_the_python_step(monkeypatch):
    import seekling.engine.step as step

    model = tiny(5)
    want = Engine(model).generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    monkeypatch.setattr(step, "load_native", lambda: None)
    engine = Engine(model)
    assert not engine.stats()["native"] and engine.step_module.num_steps == 1
    got = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert got[0].token_ids == want[0].token_ids


def test_token_ids_only_and_prompts_are_not_retokenised(monkeypatch):
    """detokenize=False gives the tokens without text (RL decodes its completions itself); a prompt of token
    ids reaches the model as it is (the server tokenises once), only its tail decoded for the think check."""
    from seekling.tokenizer import train_tokenizer

    tok = train_tokenizer(["The quick brown fox jumps over the lazy dog. 123 + 456 = 579."] * 20, vocab_size=300)
    model = tiny(6)
    engine = Engine(model, tok)
    ids = tok.encode("The quick brown fox")
    want = engine.generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    monkeypatch.setattr(tok, "encode", lambda *a, **k: pytest.fail("a token-id prompt was tokenised again"))
    got = engine.generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False))[0]
    assert got.token_ids == want.token_ids and got.text == "" and want.text
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
