"""The server: the official openai client against a live uvicorn server on 127.0.0.1."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from seekling.engine import Engine, SamplingParams
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.serve.app import add_serve_args, create_app
from seekling.serve.security import Settings
from seekling.tokenizer import ASSISTANT, USER, train_tokenizer

CORPUS = ["Let me think about it. The answer is 42, and 7 + 5 = 12. Hello world!"] * 40


class LiveServer:
    """create_app(engine, settings) served by uvicorn on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, engine, **settings):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.settings = Settings(**{"model_name": "tiny", "keepalive_s": 0.2, **settings})
        self.app = create_app(engine, self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Delta:
    index: int
    text: str
    reasoning: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


def last_user(prompt: str) -> str:
    """The last user message of a prompt rendered with seekling's template."""
    return prompt.rsplit(USER, 1)[-1].split(ASSISTANT, 1)[0]


class ScriptedEngine:
    """The engine interface with a known script per prompt, for what a real model can't be made to do on cue:
    hold requests in the queue (at most `max_num_seqs` run, one word each per step, `step_delay` apart), and
    record aborts. The answer to a chat is: reasoning "Let me think about <last message>." then the text
    "The answer is <its length>."."""

    def __init__(self, tokenizer, max_num_seqs: int = 64, step_delay: float = 0.0):
        self.tokenizer, self.max_num_seqs, self.step_delay = tokenizer, max_num_seqs, step_delay
        self.lock = threading.Lock()
        self.waiting: deque[str] = deque()
        self.running: dict[str, dict] = {}
        self.requests: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.prompts: list[str] = []  # as the server rendered them
        self.params: list = []  # their SamplingParams

    @staticmethod
    def script(prompt: str) -> tuple[list[str], list[str]]:
        last = last_user(prompt)
        return ["Let", " me", " think", " about", f" {last}."], ["The", " answer", " is", f" {len(last)}."]

    def compile_constraint(self, constraint, cancelled=None) -> None:  # the script ignores constraints
        pass

    def add_request(self, prompt, params, request_id=None, prompt_ids=None) -> str:
        request_id = request_id or uuid.uuid4().hex
        self.prompts.append(prompt)
        self.params.append(params)
        reasoning, text = self.script(prompt)
        pieces = [("reasoning", w) for w in reasoning] + [("text", w) for w in text]
        with self.lock:
            self.requests[request_id] = {"pieces": pieces, "params": params, "pos": [0] * params.n}
            self.waiting.append(request_id)
        return request_id

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.append(request_id)
            self.running.pop(request_id, None)
            if request_id in self.waiting:
                self.waiting.remove(request_id)

    def has_unfinished(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.running)

    def stats(self) -> dict:
        with self.lock:
            return {
                "running": len(self.running),
                "waiting": len(self.waiting),
                "cache_usage": len(self.running) / self.max_num_seqs,
            }

    def step(self) -> list[tuple[str, Delta]]:
        time.sleep(self.step_delay)
        out = []
        with self.lock:
            while self.waiting and len(self.running) < self.max_num_seqs:
                rid = self.waiting.popleft()
                self.running[rid] = self.requests[rid]
            for rid, req in list(self.running.items()):
                params, pieces = req["params"], req["pieces"]
                for i, pos in enumerate(req["pos"]):
                    if pos < 0:
                        continue
                    kind, word = pieces[pos]
                    ids = self.tokenizer.encode(word)
                    done_len = pos + 1 >= params.max_tokens
                    finish = "stop" if pos + 1 == len(pieces) else ("length" if done_len else None)
                    logprobs = [{t: -0.25, (t + 1) % 100: -1.5} for t in ids] if params.logprobs is not None else None
                    out.append(
                        (
                            rid,
                            Delta(
                                i,
                                word if kind == "text" else "",
                                word if kind == "reasoning" else "",
                                ids,
                                finish,
                                logprobs,
                            ),
                        )
                    )
                    req["pos"][i] = -1 if finish else pos + 1
                if all(p < 0 for p in req["pos"]):
                    del self.running[rid]
        return out


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def tiny_model(tokenizer) -> Transformer:
    """A tiny random seekling model. Its `</think>` logit is boosted so that greedy answers have both a
    (short) reasoning part and an answer part, as a trained R1-style model's do (the seed is one for which
    the test prompts' greedy answers have both)."""
    torch.manual_seed(6)
    cfg = preset(
        "tiny",
        vocab_size=tokenizer.vocab_size,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.think_end_id] *= 2
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def engine(model, tokenizer):
    return Engine(model, tokenizer, max_num_seqs=32)


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """Answers from a separate engine, computed alone: what every server answer must equal."""
    ref = Engine(model, tokenizer, max_num_seqs=32)
    return lambda prompts, **kw: ref.generate(prompts, SamplingParams(**{"temperature": 0, "max_tokens": 24, **kw}))


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(engine, **settings) -> LiveServer:
        servers.append(LiveServer(engine, data_dir=str(tmp_path / f"data{len(servers)}"), **settings))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def client(server: LiveServer, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def assert_error(resp: httpx.Response, status: int, type_: str | None = None, param: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if type_ is not None:
        assert err["type"] == type_
    if param is not None:
        assert err["param"] == param
    return err


# ---------------------------------------------------------------------------------------------- tests


def chat(server, question: str, **kw):
    return client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": question}],
        **{"temperature": 0, "max_tokens": 24, **kw},
    )


def test_chat_non_stream_reasoning_and_usage(tokenizer, engine, reference, make_server):
    server = make_server(engine)
    r = chat(server, "hi there")
    ref = reference([[{"role": "user", "content": "hi there"}]])[0]
    msg = r.choices[0].message
    assert msg.content == ref.text and msg.model_extra["reasoning_content"] == ref.reasoning
    assert ref.text and ref.reasoning  # both parts present, so the split is really tested
    assert r.choices[0].finish_reason == ref.finish_reason and r.object == "chat.completion" and r.model == "tiny"
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == len(prompt_ids) + len(ref.token_ids)
    # Reasoning tokens: those decoded before the answer began (the think block).
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens


def test_chat_stream_deltas_usage_and_length(engine, reference, make_server):
    server = make_server(engine)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc"}]
    stream = client(server).chat.completions.create(
        model="tiny",
        messages=messages,
        stream=True,
        temperature=0,
        max_tokens=24,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = reference([messages])[0]
    assert (reasoning, content) == (ref.reasoning, ref.text)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert len({c.id for c in chunks}) == 1
    # max_completion_tokens cuts the answer ("length"); n seeded samples, each as if generated alone.
    r = chat(server, "abc", max_tokens=None, max_completion_tokens=3, n=2, temperature=1.0, seed=7)
    refs = reference([[{"role": "user", "content": "abc"}]], max_tokens=3, n=2, temperature=1.0, seed=7)[0]
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 6
    assert [c.message.model_extra["reasoning_content"] or "" for c in r.choices] == [o.reasoning for o in refs.outputs]
    # stop strings are honoured (one that first occurs inside the answer, not in the reasoning).
    stop = next(ref.text[i:i + 3] for i in range(1, len(ref.text) - 3)
                if ref.text[i:i + 3] not in f"{ref.reasoning}</think>{ref.text[:i + 2]}"
                and "\n" not in ref.text[i:i + 3])
    r = client(server).chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=24, stop=[stop]
    )
    assert r.choices[0].message.content == ref.text[: ref.text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs_and_completions(tokenizer, engine, reference, make_server):
    server = make_server(engine)
    r = chat(server, "x", logprobs=True, top_logprobs=2)
    ref = reference([[{"role": "user", "content": "x"}]], logprobs=2)[0]
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(ref.token_ids)
    for entry, tid, cands in zip(content, ref.token_ids, ref.outputs[0].logprobs, strict=True):
        assert entry.token == tokenizer.decode([tid]) and entry.logprob == pytest.approx(cands[tid], abs=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy: the top one
    c = client(server).completions.create(model="tiny", prompt="hello", max_tokens=16, temperature=0, logprobs=1)
    ref = reference(["hello"], max_tokens=16)[0]
    assert c.choices[0].text == ref.reasoning + ref.text and c.choices[0].finish_reason == ref.finish_reason
    assert c.usage.prompt_tokens == len(tokenizer.encode("hello")) and c.usage.completion_tokens == 16
    assert len(c.choices[0].logprobs.tokens) == 16
    streamed = "".join(
        ch.choices[0].text
        for ch in client(server).completions.create(
            model="tiny", prompt="hello", stream=True, max_tokens=16, temperature=0
        )
    )
    assert streamed == c.choices[0].text
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_error_shapes(engine, reference, make_server):
    server = make_server(engine, max_body_bytes=2000, max_messages=3, max_prompt_tokens=40, max_tokens_cap=64)
    url, msgs = server.url + "/v1/chat/completions", [{"role": "user", "content": "hi"}]
    post = lambda body, **kw: httpx.post(url, json=body, **kw)
    assert_error(
        post({"model": "tiny", "messages": msgs, "temperature": 5}),
        400,
        "invalid_request_error",
        "temperature",
    )
    assert_error(post({"model": "tiny", "messages": msgs, "top_p": 0}), 400, param="top_p")
    assert_error(post({"model": "tiny", "messages": msgs, "n": 0}), 400, param="n")
    assert_error(post({"model": "tiny", "messages": msgs, "max_tokens": 65}), 400, param="max_tokens")
    assert_error(post({"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}), 400, param="messages.0.role")
    assert_error(post({"model": "tiny", "messages": msgs * 4}), 400, param="messages")  # max_messages
    assert_error(
        post({"model": "tiny", "messages": [{"role": "user", "content": "hello " * 40}]}),
        400,
        param="messages",
    )  # max_prompt_tokens
    assert_error(post({"model": "tiny", "messages": []}), 400, param="messages")
    assert assert_error(post({"model": "nope", "messages": msgs}), 404, param="model")["code"] == "model_not_found"
    assert_error(httpx.get(server.url + "/v1/nowhere"), 404)
    assert_error(post({"model": "tiny", "messages": [{"role": "user", "content": "x" * 3000}]}), 413)
    assert_error(post({"model": "tiny"}), 422, param="messages")
    assert_error(post({"model": "tiny", "messages": msgs, "temperature": "hot"}), 422, param="temperature")
    assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    # A chunked body (no Content-Length) over the cap is refused too.
    assert_error(httpx.post(url, content=iter([b"x" * 1500, b"y" * 1500])), 413)
    # The openai client maps these to its exception classes.
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="tiny", messages=msgs, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="other", messages=msgs)
    # None of the bad requests reached the engine, and the server still answers.
    assert engine.stats()["generated_tokens"] == 0
    r = chat(server, "hi")
    assert r.choices[0].message.content == reference([msgs])[0].text


def test_auth_hashed_keys(engine, make_server, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nsecond-key-456\n")
    server = make_server(engine, api_key=["first-key-123"], api_key_file=str(key_file))
    msgs = [{"role": "user", "content": "hi"}]
    for key in ("first-key-123", "second-key-456"):
        assert client(server, key).chat.completions.create(model="tiny", messages=msgs, max_tokens=4).usage
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key-000").chat.completions.create(model="tiny", messages=msgs)
    for path in ("/v1/models", "/metrics", "/api/conversations"):
        err = assert_error(httpx.get(server.url + path), 401, "authentication_error")
        assert err["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200
    # Only sha256 hashes are kept: the plain keys appear nowhere in the app's state.
    assert {k.decode() for k in server.app.state.key_hashes} == {
        hashlib.sha256(k).hexdigest() for k in (b"first-key-123", b"second-key-456")
    }


def test_rate_limit_per_key(engine, make_server):
    server = make_server(engine, api_key=["key-aaaaaaaa", "key-bbbbbbbb"], rate_limit=3)
    for _ in range(3):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer key-aaaaaaaa"}).status_code == 200
    resp = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer key-aaaaaaaa"})
    err = assert_error(resp, 429, "rate_limit_error")
    assert err["code"] == "rate_limit_exceeded" and 1 <= int(resp.headers["retry-after"]) <= 20
    # Another key has its own bucket.
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer key-bbbbbbbb"}).status_code == 200
    with pytest.raises(openai.RateLimitError):
        client(server, "key-aaaaaaaa").models.list()


def test_queue_full_keepalive_and_disconnect(tokenizer, make_server):
    engine = ScriptedEngine(tokenizer, max_num_seqs=1, step_delay=0.05)
    server = make_server(engine, max_queue=1, keepalive_s=0.1)
    url = server.url + "/v1/chat/completions"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "q" * 2000}],
        "stream": True,
        "max_tokens": 2000,
    }
    engine.script = lambda prompt: ([" r"] * 500, [" t"])  # a long answer keeps the single slot busy
    with httpx.Client(timeout=10) as http, http.stream("POST", url, json=body) as first:
        lines = (ln for ln in first.iter_lines() if ln)
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert "reasoning_content" in json.loads(next(lines)[6:])["choices"][0]["delta"]  # running now
        with http.stream("POST", url, json=body) as second:  # waits behind the first
            waiting = (ln for ln in second.iter_lines() if ln)
            seen = [next(waiting) for _ in range(4)]
            assert seen.count(": keep-alive") >= 1, seen
            full = httpx.post(url, json=body)
            assert assert_error(full, 429, "rate_limit_error")["code"] == "queue_full"
            assert full.headers["retry-after"] == "1"
        # The waiting client hung up: its request is aborted before it ever ran.
        deadline = time.monotonic() + 5
        while len(engine.aborted) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(engine.aborted) == 1 and engine.stats()["waiting"] == 0
    # The running client hung up mid-answer: aborted too, and its slot (cache) is free.
    deadline = time.monotonic() + 5
    while (len(engine.aborted) < 2 or engine.stats()["running"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(engine.aborted) == 2 and engine.stats() == {"running": 0, "waiting": 0, "cache_usage": 0.0}
    assert server.app.state.worker.in_flight() == 0


def test_history_isolation_per_key(engine, make_server):
    server = make_server(engine, api_key=["alice-key-1", "bob-key-22"])
    alice = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer alice-key-1"})
    bob = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer bob-key-22"})
    conv = {
        "title": "Sums",
        "system": "be brief",
        "settings": {"temperature": 0.6},
        "messages": [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2", "reasoning": "one and one", "thought_s": 0.5},
        ],
    }
    created = alice.post("/api/conversations", json=conv)
    assert created.status_code == 201
    cid = created.json()["id"]
    got = alice.get(f"/api/conversations/{cid}").json()
    assert {k: got[k] for k in conv} == conv
    assert [c["id"] for c in alice.get("/api/conversations").json()["data"]] == [cid]
    assert bob.get("/api/conversations").json()["data"] == []
    assert_error(bob.get(f"/api/conversations/{cid}"), 404)
    assert_error(bob.put(f"/api/conversations/{cid}", json={"title": "mine"}), 404)
    assert_error(bob.delete(f"/api/conversations/{cid}"), 404)
    assert_error(alice.post("/api/conversations", json={"messages": [{"role": "bot", "content": "x"}]}), 400)
    assert_error(alice.post("/api/conversations", json={"messages": [{"role": "user"}]}), 422)
    upd = alice.put(f"/api/conversations/{cid}", json={"title": "Sums!", "messages": conv["messages"][:1]}).json()
    assert upd["title"] == "Sums!" and upd["messages"] == conv["messages"][:1] and upd["system"] == "be brief"
    # The owner column holds the key's sha256, never the key.
    db = sqlite3.connect(os.path.join(server.settings.data_dir, "history.sqlite3"))
    assert db.execute("SELECT owner FROM conversations").fetchall() == [(hashlib.sha256(b"alice-key-1").hexdigest(),)]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert alice.delete(f"/api/conversations/{cid}").json() == {"id": cid, "deleted": True}
    assert_error(alice.get(f"/api/conversations/{cid}"), 404)


def test_concurrent_clients_get_their_own_answers(engine, reference, make_server):
    server = make_server(engine)
    questions = [f"question number {i}" for i in range(32)]
    # Seeded sampling: each client's answer is distinct and known (its seed's draws depend on nothing else).
    refs = [reference([[{"role": "user", "content": q}]], temperature=1.0, seed=i)[0] for i, q in enumerate(questions)]

    def ask(i):
        kw = {
            "model": "tiny",
            "messages": [{"role": "user", "content": questions[i]}],
            "temperature": 1.0,
            "seed": i,
            "max_tokens": 24,
        }
        if i % 2:  # half stream, half don't
            chunks = list(client(server).chat.completions.create(stream=True, **kw))
            return (
                "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks),
                "".join(c.choices[0].delta.content or "" for c in chunks),
            )
        m = client(server).chat.completions.create(**kw).choices[0].message
        return m.model_extra["reasoning_content"] or "", m.content

    def bad(_):  # bad requests interleaved with the good ones must not disturb them
        return httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": "nope"}).status_code

    with ThreadPoolExecutor(32) as pool:
        bad_codes = pool.map(bad, range(8))
        answers = list(pool.map(ask, range(32)))
    assert answers == [(r.reasoning, r.text) for r in refs]
    assert len(set(answers)) > 16  # distinct answers, so a mix-up between clients would show
    assert set(bad_codes) == {422}


def test_metrics(tokenizer, engine, make_server):
    server = make_server(engine)
    usages = [chat(server, "m").usage for _ in range(2)]
    httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny"})
    resp = httpx.get(server.url + "/metrics")
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(resp.text) for s in family.samples}
    route = ("route", "/v1/chat/completions")
    assert samples["seekling_requests_total", (("method", "POST"), route, ("status", "200"))] == 2
    assert samples["seekling_requests_total", (("method", "POST"), route, ("status", "422"))] == 1
    prompt = len(tokenizer.apply_chat_template([{"role": "user", "content": "m"}], tokenize=True))
    assert samples["seekling_prompt_tokens_total", ()] == 2 * prompt
    assert samples["seekling_completion_tokens_total", ()] == sum(u.completion_tokens for u in usages)
    # The second request found the first one's prompt in the prefix cache (whole blocks of it).
    assert samples["seekling_prompt_cached_tokens_total", ()] == sum(u.prompt_tokens_details.cached_tokens
                                                                       for u in usages)
    assert samples["seekling_request_duration_seconds_count", (route,)] == 3
    assert samples["seekling_request_duration_seconds_bucket", (("le", "+Inf"), route)] == 3
    for gauge in ("queue_depth", "running", "waiting", "cache_usage"):
        assert samples[f"seekling_{gauge}", ()] == 0


def test_settings_from_flags_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SEEKLING_RATE_LIMIT", "30")
    monkeypatch.setenv("SEEKLING_API_KEY", "env-key-111,env-key-222")
    monkeypatch.setenv("SEEKLING_LOG_REQUESTS", "true")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--model", "runs/x/rl", "--port", "9001", "--cors-origin", "http://a.test"])
    settings = Settings.from_env(**{k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__})
    assert (settings.model, settings.port, settings.host, settings.rate_limit) == ("runs/x/rl", 9001, "127.0.0.1", 30)
    assert settings.api_key == ["env-key-111", "env-key-222"] and settings.log_requests is True
    assert settings.cors_origin == ["http://a.test"] and settings.data_dir == str(tmp_path / "seekling")
    assert parser.parse_args(["--model", "m", "--api-key", "flag-key-1"]).api_key == ["flag-key-1"]
