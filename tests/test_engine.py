"""Engine tests on tiny random models: parity with full-recompute greedy decoding, continuous batching,
preemption, the latent cache, seeded sampling, stops, the reasoning split, n > 1 forks, the server
API and MTP speculative decoding (greedy parity and a distribution test)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from seekling.engine import Engine, SamplingParams
from seekling.engine.detok import IncrementalDecoder, TextStream
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.tokenizer import train_tokenizer


def tiny_model(vocab_size: int = 300, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=vocab_size, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=32, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, **kw)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model(q_lora_rank=24)


@pytest.fixture(scope="module")
def tok():
    texts = ["The quick brown fox jumps over the lazy dog. 123 + 456 = 579."] * 20
    texts += ["Café crème, naïve façade. Σ = 42. 日本語のテキスト。"] * 20
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def text_model(tok) -> Transformer:
    return tiny_model(vocab_size=tok.vocab_size, seed=1)


def reference_greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def prompts_of(lengths: list[int], vocab: int = 300, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


GREEDY_KW = dict(temperature=0, max_tokens=10, ignore_eos=True)
GREEDY = SamplingParams(**GREEDY_KW)


def test_greedy_matches_full_recompute_mixed_lengths_and_chunked_prefill(model):
    prompts = prompts_of([3, 9, 17, 30, 1])
    # A small token budget forces chunked prefill of the long prompts across steps and blocks.
    engine = Engine(model, max_num_seqs=8, max_num_batched_tokens=12, block_size=4, cache_blocks=64)
    outs = engine.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == reference_greedy(model, p, 10)
        assert o.finish_reason == "length"
    assert engine.stats()["cache_blocks_used"] == 0  # everything returned to the pool


def test_sequences_join_mid_flight(model):
    prompts = prompts_of([5, 12, 7], seed=1)
    engine = Engine(model, max_num_seqs=4, block_size=4, cache_blocks=64)
    tokens: dict[str, list[int]] = {}
    ids = [engine.add_request(prompts[0], GREEDY)]
    steps = 0
    while engine.has_unfinished() or len(ids) < 3:
        if steps in (3, 6) and len(ids) < 3:  # new requests arrive while the first ones decode
            ids.append(engine.add_request(prompts[len(ids)], GREEDY))
        for rid, d in engine.step():
            tokens.setdefault(rid, []).extend(d.token_ids)
        steps += 1
    for rid, p in zip(ids, prompts, strict=True):
        assert tokens[rid] == reference_greedy(model, p, 10)


@pytest.mark.parametrize("speculative", [False, True])
def test_preemption_with_tiny_cache_keeps_greedy_output(model, speculative):
    prompts = prompts_of([10, 11, 12, 13], seed=2)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    # 56 slots for 4 x 25 tokens
    engine = Engine(model, max_num_seqs=4, block_size=4, cache_blocks=14, speculative=speculative)
    outs = engine.generate(prompts, params)
    assert engine.stats()["num_preemptions"] > 0
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == reference_greedy(model, p, 14)


def test_weights_updated_in_place_are_picked_up(tmp_path, tok):
    """RL samples with the engine between optimizer steps: in-place weight changes must take effect."""
    model = tiny_model(vocab_size=tok.vocab_size, seed=4)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = Engine(str(tmp_path))  # loads weights and tokenizer from the directory
    prompt = tok.encode("The quick brown")
    before = engine.generate([prompt], GREEDY)[0]
    assert before.token_ids == reference_greedy(model, prompt, 10) and before.text
    model.train()
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.model.train()
    after = engine.generate([prompt], GREEDY)[0]
    assert engine.model.training  # the engine restores the caller's mode
    engine.model.eval()
    assert after.token_ids == reference_greedy(engine.model, prompt, 10) != before.token_ids


def test_prefix_cache_reuses_blocks_of_a_finished_request(model):
    shared = prompts_of([21], seed=8)[0]
    a, b = shared + [5, 6, 7, 8], shared + [9]
    engine = Engine(model, block_size=4, cache_blocks=32)
    out_a = engine.generate([a], GREEDY)[0]
    out_b = engine.generate([b], GREEDY)[0]
    assert engine.stats()["prefix_cache_hit_tokens"] == 20  # the 5 full blocks of the common prefix
    assert (out_a.num_cached_tokens, out_b.num_cached_tokens) == (0, 20)  # per request, for `usage`
    assert out_a.token_ids == reference_greedy(model, a, 10)
    assert out_b.token_ids == reference_greedy(model, b, 10)
    again = engine.generate([a], GREEDY)[0]  # the whole prompt is cached but for its last token
    assert again.token_ids == out_a.token_ids
    assert engine.stats()["prefix_cache_hit_tokens"] == 20 + 24
    assert again.num_cached_tokens == 24


def test_request_that_can_never_fit_is_rejected(model):
    engine = Engine(model, block_size=4, cache_blocks=4)
    with pytest.raises(ValueError, match="can never fit"):
        engine.add_request(list(range(2, 12)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="context"):
        Engine(model).add_request([5] * 300)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text without a tokenizer")


def test_cache_holds_only_the_latent(model):
    cfg = model.config
    for spec, layers in ((False, cfg.num_hidden_layers), (True, cfg.num_hidden_layers + 1)):
        engine = Engine(model, cache_blocks=8, block_size=16, speculative=spec)
        per_token = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        assert engine.cache_bytes_per_token == per_token
        assert engine.kv.numel() * engine.kv.element_size() == per_token * 8 * 16
    # The latent is what the naive MLA would expand into per-head keys and values.
    expanded = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    latent = Engine(model, cache_blocks=8).cache_bytes_per_token
    assert expanded / latent == 4 * (16 + 8 + 16) / (32 + 8)  # heads x (qk + v) vs latent + rope


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    p = prompts_of([6])[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = Engine(model).generate([p], params)[0].token_ids
    others = prompts_of([4, 9, 15], seed=7)
    crowd = Engine(model, block_size=4).generate(
        others[:2] + [p] + others[2:], [SamplingParams(temperature=1.0, max_tokens=5)] * 2 + [params]
        + [SamplingParams(temperature=0.7, max_tokens=20)])[2].token_ids
    assert alone == crowd
    other_seed = Engine(model).generate([p], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12,
                                                            seed=99, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_n_samples_share_the_prefill_and_match_single_runs(model):
    p = prompts_of([11])[0]
    engine = Engine(model, block_size=4, cache_blocks=64)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=10, ignore_eos=True)
    out = engine.generate([p], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for i, o in enumerate(out.outputs):  # sample i uses seed + i
        single = Engine(model).generate([p], SamplingParams(temperature=1.0, max_tokens=8, seed=10 + i,
                                                            ignore_eos=True))[0]
        assert o.token_ids == single.token_ids
    assert engine.stats()["cache_blocks_used"] == 0


def test_speculative_with_forks_keeps_greedy_output(model):
    p = prompts_of([9], seed=4)[0]
    out = Engine(model, block_size=4, speculative=True).generate([p], SamplingParams(n=3, **GREEDY_KW))[0]
    assert [o.token_ids for o in out.outputs] == [reference_greedy(model, p, 10)] * 3


def test_stop_token_ids_max_tokens_and_eos(model):
    p = prompts_of([8])[0]
    full = reference_greedy(model, p, 10)
    stop_at = full[4]
    out = Engine(model).generate([p], SamplingParams(temperature=0, max_tokens=10,
                                                     stop_token_ids=[stop_at]))[0]
    assert out.token_ids == full[:full.index(stop_at) + 1] and out.finish_reason == "stop"
    out = Engine(model).generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.token_ids == full[:3] and out.finish_reason == "length"
    model.config.eos_token_id, eos = full[2], model.config.eos_token_id
    try:
        out = Engine(model).generate([p], SamplingParams(temperature=0, max_tokens=10))[0]
    finally:
        model.config.eos_token_id = eos
    assert out.token_ids == full[:full.index(full[2]) + 1] and out.finish_reason == "stop"


def test_penalties_in_the_engine_match_a_reference_loop(model):
    p = prompts_of([6], seed=6)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3,
                            presence_penalty=-1.5, frequency_penalty=0.2)  # < 0: encourage repeats
    out = Engine(model).generate([p], params)[0].token_ids
    ids, ref = list(p), []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids])).logits[0, -1]
            for t in set(ids):  # HF: positive logits divided, negative multiplied
                logits[t] = logits[t] / 1.3 if logits[t] > 0 else logits[t] * 1.3
            for t in set(ref):  # OpenAI: over the generated tokens
                logits[t] -= -1.5 + 0.2 * ref.count(t)
            ref.append(int(logits.argmax()))
            ids.append(ref[-1])
    assert out == ref
    assert out != reference_greedy(model, p, 12)  # the penalties did change something


def test_logprobs_are_those_of_the_model(model):
    p = prompts_of([5])[0]
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True)
    out = Engine(model).generate([p], params)[0]
    ids = p + out.token_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    for i, (t, lp) in enumerate(zip(out.token_ids, out.outputs[0].logprobs, strict=True)):
        row = ref[len(p) - 1 + i]
        assert next(iter(lp)) == t and lp[t] == pytest.approx(float(row[t]), abs=1e-4)
        assert set(row.topk(2).indices.tolist()) <= set(lp)


def test_stop_string_spanning_deltas(text_model, tok):
    prompt = "The quick brown"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = Engine(text_model, tok).generate([prompt], params)[0]
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # A stop string from the end of one token's text into the next one's.
    k = next(i for i in range(3, len(pieces) - 1)
             if len(pieces[i]) >= 2 and len(pieces[i + 1]) > len(pieces[i]))
    cut = len(pieces[k])
    stop = full.text[cut - 1:cut + 1]
    first = full.text.find(stop)
    deltas = list(Engine(text_model, tok).stream(prompt, SamplingParams(temperature=0, max_tokens=24,
                                                                        ignore_eos=True, stop=[stop])))
    text = "".join(d.text for d in deltas)
    assert text == full.text[:first]
    assert deltas[-1].finish_reason == "stop"
    assert all(d.reasoning == "" for d in deltas)  # a plain completion: everything is text


def test_utf8_is_never_split(tok):
    text = "naïve 日本語 😀 Σ"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the multi-byte characters are spread over several tokens
    dec = IncrementalDecoder(tok, [])
    pieces = [dec.add([t]) for t in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert "" in pieces  # some token ended mid-character and was held back


def push_all(stream: TextStream, pieces: list[str]) -> tuple[str, str]:
    reasoning = text = ""
    for i, piece in enumerate(pieces):
        r, t = stream.push(piece, final=i == len(pieces) - 1)
        reasoning, text = reasoning + r, text + t
    return reasoning, text


def test_reasoning_split_cases():
    pieces = ["Let me", " add.\n</th", "ink>\n\n", "42", ""]
    assert push_all(TextStream([], True), pieces) == ("Let me add.", "42")
    assert push_all(TextStream([], True), ["\nstill", " thinking", ""]) == ("still thinking", "")
    assert push_all(TextStream([], False), ["\n4", "2 </think> x", ""]) == ("", "\n42 </think> x")
    # A stop string inside the reasoning ends the whole completion.
    assert push_all(TextStream(["STOP"], True), ["ab", "cST", "OPdef", ""]) == ("abc", "")
    # Held text that turns out not to be the marker is released.
    s = TextStream([], True)
    assert s.push("a</t") == ("a", "") and s.push("x") == ("</tx", "")


def test_chat_prompt_reasoning_goes_to_reasoning(text_model, tok):
    messages = [{"role": "user", "content": "What is 123 + 456?"}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = Engine(text_model, tok).generate([messages], params)[0]
    assert tok.apply_chat_template(messages).endswith("<think>\n")
    decoded = tok.decode(out.token_ids)
    assert "</think>" not in decoded  # a random model does not close think: everything is reasoning
    assert out.text == "" and out.reasoning == decoded.lstrip("\n") and out.finish_reason == "length"


def test_server_api_threads_and_abort(model):
    engine = Engine(model, max_num_seqs=4)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids: list[str] = []
    threads = [threading.Thread(target=lambda p=p: ids.append(engine.add_request(p, long)))
               for p in prompts_of([4, 6, 8])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 3 and engine.stats()["waiting"] == 3
    finished: dict[str, str] = {}
    for _ in range(3):
        engine.step()
    assert engine.stats()["running"] == 3
    engine.abort(ids[1])
    while engine.has_unfinished():
        for rid, d in engine.step():
            if d.finish_reason:
                finished[rid] = d.finish_reason
        if ids[1] in finished and len(finished) == 1:
            engine.abort(ids[0])
            engine.abort("no-such-request")
    assert finished == {ids[1]: "abort", ids[0]: "abort", ids[2]: "length"}
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([3, 4], long, request_id="x")
        engine.add_request([3, 4], long, request_id="x")


def test_requests_added_while_a_background_loop_steps(model):
    engine = Engine(model, block_size=4)
    tokens: dict[str, list[int]] = {}
    done = threading.Event()

    def loop() -> None:  # what a server's engine thread does
        while not done.is_set():
            for rid, d in engine.step():
                tokens.setdefault(rid, []).extend(d.token_ids)
            if not engine.has_unfinished():
                time.sleep(0.001)

    worker = threading.Thread(target=loop)
    worker.start()
    prompts = prompts_of([5, 8, 3, 12], seed=9)
    ids = []
    for p in prompts:
        ids.append(engine.add_request(p, GREEDY))
        time.sleep(0.005)
    deadline = time.time() + 30
    while engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.005)
    done.set()
    worker.join()
    for rid, p in zip(ids, prompts, strict=True):
        assert tokens[rid] == reference_greedy(model, p, 10)


@pytest.mark.parametrize("speculative", [False, True])
def test_a_failing_request_fails_alone(model, monkeypatch, speculative):
    """Faults that belong to one request, at each place one can strike (its admission, its row of the shared
    batch, its tokens mid-answer), end that request with finish_reason "error"; the bystanders in the same steps
    (greedy, seeded, n=2) give exactly what they give alone."""
    engine = Engine(model, max_num_seqs=8, block_size=4, speculative=speculative)
    prompts = prompts_of([5, 7, 9, 4, 6])
    seeded = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    nan_row = SamplingParams(temperature=1.0, max_tokens=10)
    nan_row.repetition_penalty = float("nan")  # (past the checks) its probabilities are NaN: the batch's draw fails
    bad_seed = SamplingParams(seed=1)
    bad_seed.seed = "x"  # fails when its sequence is made, inside step()
    ids = {name: engine.add_request(p, params) for name, p, params in (
        ("greedy", prompts[0], GREEDY), ("seeded", prompts[1], seeded), ("nan_row", prompts[2], nan_row),
        ("bad_seed", prompts[3], bad_seed), ("mid_answer", prompts[4], GREEDY), ("greedy2", prompts[1], GREEDY))}
    append = engine.scheduler._append

    def second_delivery_fails(seq, tokens, logprobs):  # (tokens come one step, or k decode steps, at a time)
        if seq.request_id == ids["mid_answer"] and len(seq.output_ids) >= 1:
            raise RuntimeError("a detokenizer fault")
        return append(seq, tokens, logprobs)

    monkeypatch.setattr(engine.scheduler, "_append", second_delivery_fails)
    tokens: dict[tuple[str, int], list[int]] = {}
    finish: dict[tuple[str, int], tuple[str, str | None]] = {}
    while engine.has_unfinished():
        for rid, d in engine.step():
            tokens.setdefault((rid, d.index), []).extend(d.token_ids)
            if d.finish_reason:
                finish[rid, d.index] = d.finish_reason, d.error
    name = {rid: n for n, rid in ids.items()}
    errors = {name[rid]: err for (rid, _), (reason, err) in finish.items() if reason == "error"}
    assert set(errors) == {"nan_row", "bad_seed", "mid_answer"}
    assert "TypeError" in errors["bad_seed"] and "detokenizer fault" in errors["mid_answer"]
    assert len(tokens[ids["mid_answer"], 0]) == 1  # it had answered before its fault
    assert tokens[ids["greedy"], 0] == reference_greedy(model, prompts[0], 10)
    assert tokens[ids["greedy2"], 0] == reference_greedy(model, prompts[1], 10)
    alone = Engine(model, block_size=4, speculative=speculative).generate([prompts[1]], seeded)[0]
    assert [tokens[ids["seeded"], i] for i in range(2)] == [o.token_ids for o in alone.outputs]
    assert engine.stats()["cache_blocks_used"] == 0 and not engine.scheduler.requests and not engine._live


def test_closing_a_stream_aborts_its_request(model):
    engine = Engine(model)
    stream = engine.stream(prompts_of([5])[0], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    first = next(stream)
    assert len(first.token_ids) == 1 and engine.stats()["running"] == 1
    stream.close()
    assert not engine.has_unfinished() and engine.stats()["cache_blocks_used"] == 0


@pytest.mark.parametrize("budget", [4096, 8])  # 8: chunked prefills, and drafts dropped for lack of budget
def test_speculative_greedy_equals_plain_greedy(model, budget):
    prompts = prompts_of([4, 13, 25], seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = Engine(model, block_size=4).generate(prompts, params)
    engine = Engine(model, block_size=4, speculative=True, max_num_batched_tokens=budget)
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert [o.token_ids for o in plain][0] == reference_greedy(model, prompts[0], 16)
    st = engine.stats()
    assert st["spec_drafted"] > 0 and 0 <= st["spec_acceptance_rate"] <= 1


def chi_square(law: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of the counts against the law, and its 99.9% quantile under that law."""
    N = counts.sum()
    keep = law * N >= 5  # the usual validity rule; the rare cells are pooled
    expected, observed = law[keep] * N, counts[keep]
    if not keep.all():
        expected = torch.cat([expected, (law[~keep] * N).sum().unsqueeze(0)])
        observed = torch.cat([observed, counts[~keep].sum().unsqueeze(0)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(expected) - 1
    # Wilson-Hilferty 99.9% quantile of chi-square(df): df(1 - 2/(9df) + 3.09 sqrt(2/(9df)))^3
    return chi2, df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3


def test_speculative_sampling_keeps_the_target_distribution():
    """Empirical joint law of the first two sampled tokens vs the exact one from the model (chi-square).
    The second token goes through MTP draft + verification; a random MTP module drafts badly, so
    both acceptance and residual resampling are exercised."""
    V = 6
    model = tiny_model(vocab_size=V, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # unequal distributions, still every cell reachable
    prompt = [2, 3, 4]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2 = model(torch.tensor([prompt + [t] for t in range(V)])).logits[:, -1].softmax(-1)
    joint = (p1[:, None] * p2).flatten()
    engine = Engine(model, max_num_seqs=64, speculative=True)
    # max_tokens=3 so the second token is drafted (no draft is made for a sequence's last token).
    params = [SamplingParams(n=64, temperature=1.0, max_tokens=3, ignore_eos=True, seed=64 * i)
              for i in range(40)]
    counts = torch.zeros(V * V)
    for out in engine.generate([prompt] * 40, params):
        for o in out.outputs:
            counts[o.token_ids[0] * V + o.token_ids[1]] += 1
    chi2, limit = chi_square(joint, counts)
    assert chi2 < limit, (chi2, limit)
    rate = engine.stats()["spec_acceptance_rate"]
    assert 0.05 < rate < 0.95  # both branches of the accept test were taken


def prepared(model: Transformer) -> Engine:
    """An engine whose model is prepared for inference (fused views, stacked experts)."""
    return Engine(model, cache_blocks=16, block_size=4, speculative=len(model.mtp_layers) > 0)


@pytest.mark.parametrize("kw", [dict(), dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=False)])
def test_prepared_moe_equals_the_training_forward(kw):
    """The MoE's inference forward (stacked expert weights; one token's k experts by index, one sort and a
    loop over experts beyond; group-limited routing) against MoE.forward, also after the balancing bias
    moved in place (and skewed the routing)."""
    model = tiny_model(seed=6, n_routed_experts=8, num_experts_per_tok=2, **kw)
    prepared(model)
    layer = model.main_layers[1]
    bias = layer.mlp.gate.e_score_correction_bias
    torch.manual_seed(0)
    skewed = torch.zeros(8)
    skewed[0] = 10.0  # every token picks expert 0
    with torch.inference_mode():
        for shift in (torch.zeros(8), torch.randn(8) * 0.5, skewed):
            with torch.no_grad():  # a balancing step between rollouts: the routing must follow it
                bias.add_(shift)
            for n in (1, 2, 3, 5, 40, 300):
                x = layer.post_attention_layernorm(torch.randn(n, model.config.hidden_size))
                torch.testing.assert_close(layer.mlp.infer(x), layer.mlp(x), atol=1e-5, rtol=1e-5)


def test_inference_forward_and_mtp_equal_the_training_forward():
    """Prefill through the model's inference forward (absorbed MLA on the paged latent cache) and the MTP
    module on a last_only batch, against the model's own (training) forward and mtp_logits."""
    from seekling.model import make_batch

    model = tiny_model(seed=7)
    engine = prepared(model)
    ids = prompts_of([11], seed=5)[0]
    table = [0, 1, 2]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        batch = make_batch([(ids, 0, table)], 4, cpu)
        batch.cache = engine.kv
        hidden, latents = model.infer(batch)
        ref = model(torch.tensor([ids]))
        torch.testing.assert_close(hidden, ref.hidden_states[0], atol=1e-5, rtol=1e-5)
        assert latents.shape == (model.config.num_hidden_layers, len(ids), *model.cache_entry_shape())
        # MTP at position i takes h_i and the token at i + 1: feed positions 0..9, draft from the last.
        mtp = make_batch([(ids[1:], 0, table)], 4, cpu, last_only=True)
        mtp.cache = engine.kv
        h, _ = model.infer_mtp(mtp, hidden[:-1])
        logits, _ = model.mtp_logits(ref.hidden_states[:, :-1], torch.tensor([ids[1:]]),
                                     torch.arange(len(ids) - 1)[None])
        torch.testing.assert_close(model.logits(h)[0], logits[0, -1], atol=1e-4, rtol=1e-4)
