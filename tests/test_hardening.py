"""The server as an attacker and a demanding client try it (issue 20): one request cannot break the others, and
answers stay true at their limits. Each test names the breakage it proves fixed; docs/security.md maps threats to
these tests. Bystander requests run beside the bad ones where a bad request could reach them."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from test_serve import CORPUS, LiveServer, tiny_model

from seekling.engine import Engine, SamplingParams
from seekling.engine import engine as engine_mod
from seekling.tokenizer import train_tokenizer

ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def live(model, tokenizer, tmp_path):
    engine = Engine(model, tokenizer, max_num_seqs=16, block_size=4)
    server = LiveServer(engine, data_dir=str(tmp_path / "data"))
    yield engine, server
    server.close()


def stream_chat(url: str, body: dict, out: dict, key: str) -> None:
    """Read one streamed chat answer into out[key]: (reasoning + content, finish reason, error or None)."""
    text, finish, error = "", None, None
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/chat/completions",
                                                       json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]
                continue
            for c in chunk["choices"]:
                text += (c["delta"].get("reasoning_content") or "") + (c["delta"].get("content") or "")
                finish = c["finish_reason"] or finish
    out[key] = (text, finish, error)


# ---------------------------------------------------------------------------------------------- 1. the shared batch


def test_1_a_poisoned_request_fails_alone_and_bystander_streams_finish(live, model, tokenizer, monkeypatch):
    """A fault inside the engine's step that belongs to one request (here: its draw from the shared batch raises)
    ends that request with an error; three streams in flight in the same steps finish with their exact answers."""
    engine, server = live
    sample = engine_mod.sample

    def poisoned(probs, generators):
        if any(g is not None and g.initial_seed() == 666 for g in generators):
            raise RuntimeError("Overflow when unpacking long long")  # what top_k=2**63 used to raise
        return sample(probs, generators)

    monkeypatch.setattr(engine_mod, "sample", poisoned)
    questions = ["first question", "second one", "the third"]
    ref = Engine(model, tokenizer).generate([[{"role": "user", "content": q}] for q in questions],
                                            SamplingParams(temperature=0, max_tokens=40))
    out: dict = {}
    streams = [threading.Thread(target=stream_chat, args=(server.url, {
        "model": "tiny", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 40}, out, q))
        for q in questions]
    for t in streams:
        t.start()
    bad = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ASK, "temperature": 1.0, "seed": 666, "max_tokens": 40})
    poisoned_stream: dict = {}
    stream_chat(server.url, {"model": "tiny", "messages": ASK, "temperature": 1.0, "seed": 666, "max_tokens": 40},
                poisoned_stream, "bad")
    for t in streams:
        t.join(60)
    assert bad.status_code == 500 and "Overflow" in bad.json()["error"]["message"]
    assert poisoned_stream["bad"][2]["type"] == "server_error"
    for q, r in zip(questions, ref, strict=True):
        assert out[q] == (r.reasoning + r.text, r.finish_reason, None)
    assert engine.stats()["cache_blocks_used"] == 0 and server.app.state.worker.in_flight() == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages"])
def test_1_top_k_and_seed_out_of_range_are_refused_on_every_api(live, path):
    engine, server = live
    body = {"model": "tiny", "max_tokens": 4, **({"prompt": "hi"} if path == "/v1/completions" else {"messages": ASK})}
    for field, value in (("top_k", 9223372036854775808), ("top_k", -2), ("seed", 2**64), ("top_k", 1.5)):
        if path == "/v1/messages" and field == "seed":
            continue
        r = httpx.post(server.url + path, json={**body, field: value})
        assert 400 <= r.status_code < 500, (field, value, r.text)
    # top_k past the vocabulary is clamped to it: the same answer as no top-k
    greedy = {**body, "temperature": 0, "max_tokens": 8}
    plain = httpx.post(server.url + path, json=greedy).json()
    wide = httpx.post(server.url + path, json={**greedy, "top_k": 2**31 - 1}).json()
    pick = (lambda r: r["content"]) if path == "/v1/messages" else (lambda r: r["choices"])
    assert pick(plain) == pick(wide)
    if path == "/v1/completions":  # logit_bias: OpenAI's range, token ids of the vocabulary, and it applies
        for bias in ({"5": 101}, {"300": 1}, {"x": 1}, {"5": float("1e308") * 10}):
            r = httpx.post(server.url + path, content=json.dumps({**greedy, "logit_bias": bias}),
                           headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (bias, r.text)
        forced = httpx.post(server.url + path, json={**greedy, "logit_bias": {"65": 100}}).json()
        assert forced["choices"][0]["text"] == engine.tokenizer.decode([65] * 8)
    assert engine.stats()["running"] == 0
