"""The server as an attacker and a demanding client try it (issue 20): one request cannot break the others, and
answers stay true at their limits. Each test names the breakage it proves fixed; docs/security.md maps threats to
these tests. Bystander requests run beside the bad ones where a bad request could reach them."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import pytest
from test_serve import CORPUS, LiveServer, ScriptedEngine, tiny_model

from seekling import cli
from seekling.data import write_shards
from seekling.engine import Engine, SamplingParams
from seekling.engine import grammar as grammar_mod
from seekling.engine.sampling import StructuredOutputsParams as S
from seekling.engine.step import ModelStep
from seekling.serve.security import HostCheckMiddleware
from seekling.serve.tools import FORMATS, tool_constraint
from seekling.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    train_tokenizer,
)

ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A context of 1024 positions (a prompt that renders tools is ~500 tokens of this narrow tokenizer)."""
    model = tiny_model(tokenizer)
    model.config.max_position_embeddings = 1024
    return model


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
    sample = ModelStep._sample

    def poisoned(self, logits, row_of, rng):  # the shared batch's draw
        if any(seq.params.seed == 666 for seq, _ in row_of):
            raise RuntimeError("Overflow when unpacking long long")  # what top_k=2**63 used to raise
        return sample(self, logits, row_of, rng)

    monkeypatch.setattr(ModelStep, "_sample", poisoned)
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


# ---------------------------------------------------------------------------------------------- 2. DNS rebinding


def test_2_a_rebinding_host_is_refused_on_a_keyless_loopback_server(tokenizer, tmp_path):
    """A page that rebinds its own name to 127.0.0.1 sends its name as Host: refused (403, nothing read); loopback
    names and --allowed-hosts are answered. Bound elsewhere, only --allowed-hosts (if any) restricts."""
    server = LiveServer(ScriptedEngine(tokenizer), data_dir=str(tmp_path / "a"))
    other = LiveServer(ScriptedEngine(tokenizer), data_dir=str(tmp_path / "b"), allowed_hosts=["chat.home.arpa"])
    try:
        cid = httpx.post(server.url + "/api/conversations", json={"title": "secret"}).json()["id"]
        port = server.url.rsplit(":", 1)[1]
        for path in ("/api/conversations", f"/api/conversations/{cid}", "/v1/models", "/", "/health"):
            r = httpx.get(server.url + path, headers={"Host": f"attacker.example:{port}"})
            assert r.status_code == 403 and "secret" not in r.text and cid not in r.text, (path, r.text)
            assert r.json()["error"]["code"] == "host_not_allowed"
        r = httpx.post(server.url + "/v1/messages", headers={"Host": "attacker.example"},
                       json={"model": "tiny", "max_tokens": 4, "messages": ASK})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"  # Anthropic's shape
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost", "127.0.0.2"):
            assert httpx.get(server.url + "/api/conversations", headers={"Host": host}).status_code == 200, host
        assert httpx.get(other.url + "/v1/models", headers={"Host": "chat.home.arpa:80"}).status_code == 200
        assert httpx.get(other.url + "/v1/models", headers={"Host": "attacker.example"}).status_code == 403
    finally:
        server.close()
        other.close()
    check = HostCheckMiddleware(None, "0.0.0.0", [])  # bound to every interface with no list: any Host
    assert check.permits("anything.example") and check.permits(None)
    check = HostCheckMiddleware(None, "0.0.0.0", ["gpu-box"])
    assert check.permits("gpu-box:8000") and check.permits("localhost") and not check.permits("evil.example")
    assert HostCheckMiddleware(None, "127.0.0.1", ["*"]).permits("evil.example")


# ---------------------------------------------------------------------------------------------- 3. stored values


def test_3_values_that_parse_but_cannot_be_held_are_refused_before_anything_is_written(tokenizer, tmp_path):
    server = LiveServer(ScriptedEngine(tokenizer), data_dir=str(tmp_path))
    deep: dict = {"type": "string"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"a": deep}}
    fifty: dict = {"type": "string"}
    for _ in range(50):
        fifty = {"type": "object", "properties": {"a": fifty}}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": "\ud800"}'}}
    bodies = [
        ("/api/conversations", '{"settings": {"t": 1e999}}'),
        ("/api/conversations", '{"settings": {"t": -1' + "0" * 400 + '.5}}'),
        ("/api/conversations", '{"title": "\\udc00"}'),
        ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": ASK, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number", "maximum": 1e300}}}}
            ).replace("1e+300", "1e999")),
        ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [
            *ASK, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1",
                                                             "content": "ok"}]})),
        ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": ASK, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": deep}}})),
        ("/v1/messages", json.dumps({"model": "tiny", "max_tokens": 4, "messages": ASK,
                                     "tools": [{"name": "f", "input_schema": deep}]})),
    ]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for path, body in bodies:
                r = http.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, (path, body[:80], r.text)
                assert r.headers.get("connection") != "close"  # (a 500 used to drop the keep-alive connection)
                assert "error" in r.json()
            assert http.get("/api/conversations").json() == {"data": []}  # no row was written
            assert server.app.state.worker.in_flight() == 0 and not server.app.state.worker.engine.prompts
            ok = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 8,
                                                         "response_format": {"type": "json_schema", "json_schema": {
                                                             "name": "x", "schema": fifty}}})
            assert ok.status_code == 200, ok.text  # 50 levels are within the bound
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------- 4. the event loop


def test_4_health_answers_while_a_big_request_is_being_prepared(tokenizer, tmp_path, monkeypatch):
    """Rendering and tokenizing run off the event loop: while one request's prompt is being rendered (held here
    until /health has answered, so a render on the loop would deadlock and time out), /health answers."""
    engine = ScriptedEngine(tokenizer)
    server = LiveServer(engine, data_dir=str(tmp_path))
    rendering, answered = threading.Event(), threading.Event()
    render = tokenizer.apply_chat_template

    def slow_render(*args, **kwargs):
        if kwargs.get("tools"):
            rendering.set()
            answered.wait(20)
        return render(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", slow_render)
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 7000,
                                               "parameters": {"type": "object"}}} for i in range(128)]
    result: dict = {}

    def big() -> None:
        result["r"] = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                                 json={"model": "tiny", "messages": ASK, "tools": tools, "max_tokens": 4})

    try:
        sender = threading.Thread(target=big)
        sender.start()
        assert rendering.wait(20)
        assert httpx.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
        assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 200
        answered.set()
        sender.join(60)
        assert result["r"].status_code == 400 and "over the limit" in result["r"].json()["error"]["message"]
    finally:
        answered.set()
        server.close()


# ---------------------------------------------------------------------------------------------- 5. grammar compiles


def any_of(n: int) -> dict:
    """A schema whose grammar compiles in time superlinear in n (1000: ~3 s, 2000: ~10 s on a 300-token vocab)."""
    return {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                      for i in range(n)]}


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def probes() -> list:
    return [p for p in multiprocessing.active_children() if p.name == "seekling-grammar-probe"]


def test_5_grammar_compiles_are_bounded_in_size_and_time_and_stop_when_the_client_leaves(live):
    engine, server = live
    engine.grammars.timeout_s = 0.5
    url = server.url + "/v1/chat/completions"
    body = {"model": "tiny", "messages": ASK, "max_tokens": 8, "temperature": 0}
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200}
                                            for i in range(1200)}}  # ~300 KB of schema
    r = httpx.post(url, json={**body, "response_format": json_format(big)}, timeout=30)
    assert r.status_code == 400 and "bytes of JSON" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="over the limit"):  # (the engine's own bound, for structural tags too)
        engine.compile_constraint(S(json=big))
    r = httpx.post(url, json={**body, "response_format": json_format(any_of(1000))}, timeout=60)
    assert r.status_code == 400 and "takes more than 0.5 s to compile" in r.json()["error"]["message"], r.text
    assert not probes() and engine.grammars.num_compiled == 0  # killed, and never compiled here
    small = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = httpx.post(url, json={**body, "max_tokens": 32, "response_format": json_format(small)}, timeout=60)
    assert r.status_code == 200 and engine.grammars.num_compiled == 1
    # A client that leaves while its grammar compiles: the compile is killed within a moment.
    engine.grammars.timeout_s = 120
    payload = json.dumps({**body, "response_format": json_format(any_of(2000))}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        deadline = time.monotonic() + 30
        while not probes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probes()
    deadline = time.monotonic() + 10
    while probes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not probes() and engine.grammars.num_compiled == 1
    assert httpx.get(server.url + "/health").status_code == 200


def model_dir(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_5_sigterm_stops_the_server_in_seconds_while_a_grammar_compiles(model, tokenizer, tmp_path):
    """`seekling serve` with a compile in flight (it would take ~10 s, bound 120 s) and a stream open: SIGTERM ends
    the process within a few seconds (it used to wait for background tasks for minutes)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "seekling.cli", "serve", "--model", model_dir(
        model, tokenizer, tmp_path / "m"), "--port", str(port), "--data-dir", str(tmp_path / "data"),
        "--grammar-timeout-s", "120", "--shutdown-timeout-s", "1"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        payload = json.dumps({"model": "m", "messages": ASK, "max_tokens": 8,
                              "response_format": json_format(any_of(2000))}).encode()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                           f"\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
            time.sleep(3)  # (the request is in its compile: probe started, or the probe server starting)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            proc.wait(timeout=60)
            stopped = time.monotonic() - t0
        assert stopped < 15, (stopped, proc.stdout.read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------- 6. truthful finishes


def scripted_server(tokenizer, tmp_path, answer: str, reasoning: str = "Let me see."):
    engine = ScriptedEngine(tokenizer)
    engine.script = lambda prompt: (pieces(reasoning), pieces(answer))
    return engine, LiveServer(engine, data_dir=str(tmp_path))


def pieces(text: str, size: int = 5) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def deepseek_call(name: str, args: dict) -> str:
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{json.dumps(args)}\n```{TOOL_CALL_END}"


TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}} for n in ("get_weather", "get_time")]


def test_6_a_tool_call_cut_by_max_tokens_says_length_and_is_not_presented_as_a_call(tokenizer, tmp_path):
    first, second = deepseek_call("get_weather", {"city": "Paris"}), deepseek_call("get_time", {"city": "Oslo"})
    answer = TOOL_CALLS_BEGIN + first + "\n" + second + TOOL_CALLS_END
    cut_at = answer.index('"Oslo"') + 3  # inside the second call's arguments
    reasoning_pieces = len(pieces("Let me see."))
    max_tokens = reasoning_pieces + -(-cut_at // 5)  # (the scripted engine writes one 5-character piece a step)
    engine, server = scripted_server(tokenizer, tmp_path, answer)
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": max_tokens}
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json=body).json()["choices"][0]
        assert r["finish_reason"] == "length"
        assert [c["function"]["name"] for c in r["message"]["tool_calls"]] == ["get_weather"]  # the one that ended
        assert json.loads(r["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        assert r["message"]["content"].startswith(TOOL_CALL_BEGIN + "function" + TOOL_SEP + "get_time")  # kept as text
        assert '{"city": "Os' in r["message"]["content"]
        finishes = [json.loads(ln[6:])["choices"][0]["finish_reason"] for ln in httpx.post(
            server.url + "/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
            if ln.startswith("data: {")]
        assert finishes[-1] == "length" and "tool_calls" not in finishes
        m = httpx.post(server.url + "/v1/messages", json={"model": "tiny", "max_tokens": max_tokens, "messages": ASK,
                                                          "tools": [{"name": t["function"]["name"], "input_schema": t[
                                                              "function"]["parameters"]} for t in TOOLS]}).json()
        assert m["stop_reason"] == "max_tokens"
        assert [b["name"] for b in m["content"] if b["type"] == "tool_use"] == ["get_weather"]
        # Cut inside the only call: no call at all. The whole answer: tool_calls.
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": reasoning_pieces + 8}).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["choices"][0]["message"].get("tool_calls") is None
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 500}).json()
        assert r["choices"][0]["finish_reason"] == "tool_calls" and len(r["choices"][0]["message"]["tool_calls"]) == 2
    finally:
        server.close()


def test_6_required_and_json_cut_by_max_tokens_say_length_on_a_real_model(live):
    engine, server = live
    off = {"thinking": {"type": "disabled"}}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 6, **off}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"].get("tool_calls") is None, choice
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ASK, "max_tokens": 3, **off,
        "response_format": json_format({"type": "object", "properties": {"a": {"type": "string"}}})}).json()
    assert r["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------- 7. special tokens


def test_7_constrained_strings_never_hold_the_templates_tokens_and_plain_answers_stop_at_user(model, tokenizer):
    engine = Engine(model, tokenizer)
    added = set(tokenizer.tokenizer.get_added_tokens_decoder())
    specials = added - engine.eos_token_ids
    bias = dict.fromkeys(specials, 12.0)  # the model now all but always wants one of them
    schema = {"type": "object", "properties": {"note": {"type": "string"}, "who": {"type": "string"}},
              "required": ["note", "who"]}
    outs = engine.generate(["hi"] * 4, [SamplingParams(temperature=0.8, seed=s, max_tokens=60, logit_bias=bias,
                                                       structured_outputs=S(json=schema)) for s in range(4)])
    for o in outs:
        assert not set(o.token_ids) & specials, o.text
        if o.finish_reason == "stop":
            json.loads(o.text)
    # The structural tags still take the markers as the single tokens the model was trained on.
    tag = tool_constraint(FORMATS["deepseek"], TOOLS, False, reasoning=False)
    out = engine.generate(["hi"], SamplingParams(temperature=0, max_tokens=80, structured_outputs=tag))[0]
    assert out.token_ids[:2] == tokenizer.encode(TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN)
    # A plain answer that writes <｜User｜> has ended: it stops there, without it.
    user = tokenizer.encode("<｜User｜>")[0]
    out = engine.generate(["hi"], SamplingParams(temperature=0, max_tokens=20, logit_bias={user: 50.0}))[0]
    assert out.finish_reason == "stop" and out.token_ids == [user] and out.text == "" and out.reasoning == ""


# ---------------------------------------------------------------------------------------------- 8. the context


def test_8_prompt_plus_max_tokens_past_the_context_is_a_400_with_both_numbers(live, tokenizer):
    engine, server = live
    context = engine.max_model_len  # 1024
    words = next(n for n in range(1100, 300, -1) if len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi " * n}], True, tokenize=True, thinking=False)) <= context - 1)
    long = [{"role": "user", "content": "hi " * words}]
    prompt = len(tokenizer.apply_chat_template(long, True, tokenize=True, thinking=False))
    off = {"thinking": {"type": "disabled"}}
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": long, "max_tokens": 2048,
                                                              **off})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert f"maximum context length is {context} tokens" in message and f"({prompt} in the messages, 2048 in" in message
    r = httpx.post(server.url + "/v1/messages", json={"model": "tiny", "messages": long, "max_tokens": 2048})
    assert r.status_code == 400 and f"{context} tokens" in r.json()["error"]["message"]
    # Without max_tokens the answer gets the room that is left.
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": long, **off}).json()
    assert r["usage"]["completion_tokens"] <= context - prompt
    # The prompt cap is the context's (minus one token to answer), in refusals, the OpenAPI limits and /v1/models.
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": "hi " * 1200}]})
    assert f"over the limit of {context - 1} (the model's context is {context})" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/openapi.json").json()["info"]["x-limits"]["max_prompt_tokens"] == context - 1
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"] == context


# ---------------------------------------------------------------------------------------------- 9. Anthropic


def test_9_anthropic_thinks_only_when_asked_and_end_turn_carries_a_text_block(live, tokenizer, tmp_path):
    engine, server = live
    ac = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=60)
    m = ac.messages.create(model="tiny", max_tokens=24, messages=ASK, extra_body={"temperature": 0})
    assert m.content[0].type == "text" and all(b.type != "thinking" for b in m.content)
    m = ac.messages.create(model="tiny", max_tokens=24, messages=ASK, extra_body={"temperature": 0},
                           thinking={"type": "enabled", "budget_tokens": 16})
    assert m.content[0].type == "thinking" and m.content[0].thinking
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        ac.messages.create(model="tiny", max_tokens=24, messages=ASK, thinking={"type": "enabled", "budget_tokens": 24})
    # An answer with no text (the model ended at once) still carries the text block end_turn implies.
    scripted, quiet = scripted_server(tokenizer, tmp_path, "", reasoning="")
    scripted.script = lambda prompt: ([], [""])  # one empty piece, then stop
    try:
        qc = anthropic.Anthropic(base_url=quiet.url, api_key="none", max_retries=0, timeout=60)
        m = qc.messages.create(model="tiny", max_tokens=24, messages=ASK)
        assert m.stop_reason == "end_turn" and [(b.type, b.text) for b in m.content] == [("text", "")]
        with qc.messages.stream(model="tiny", max_tokens=24, messages=ASK) as s:
            final = s.get_final_message()
        assert final.stop_reason == "end_turn" and [(b.type, b.text) for b in final.content] == [("text", "")]
    finally:
        quiet.close()


# ---------------------------------------------------------------------------------------------- 10. startup


def test_10_a_bad_model_directory_is_one_line_exit_2_and_nothing_created(model, tokenizer, tmp_path, capsys):
    good = model_dir(model, tokenizer, tmp_path / "good")

    def broken(name: str, change) -> str:
        path = tmp_path / name
        shutil.copytree(good, path)
        change(path)
        return str(path)

    def config(**fields):
        def change(path):
            cfg = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**cfg, **fields}))
        return change

    def truncate(path):
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) // 2])

    cases = {
        "truncated": (truncate, "truncated"),
        "string": (config(hidden_size="64"), "hidden_size must be an integer, got '64'"),
        "null": (config(num_hidden_layers=None), "num_hidden_layers must be an integer, got None"),
        "no_tokenizer": (lambda p: (p / "tokenizer.json").unlink(), "no tokenizer.json"),
        "bad_tokenizer": (lambda p: (p / "tokenizer.json").write_text('{"broken":'), "is not a tokenizer"),
    }
    for name, (change, says) in cases.items():
        path, data = broken(name, change), tmp_path / f"data_{name}"
        with pytest.raises(SystemExit) as exit_:
            cli.main(["serve", "--model", path, "--data-dir", str(data), "--port", "9"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, (name, err)
        assert says in err and (path in err or name == "no_tokenizer" and str(path) in err), (name, err)
        assert not data.exists(), name  # the history database was not created


# ---------------------------------------------------------------------------------------------- 11. disk full

FULL_DISK = """
import json, os, sys
from seekling import cli
mnt, data, tok = sys.argv[1:4]
def pretrain(steps):
    try:
        cli.main(["pretrain", "--data", data, "--tokenizer", tok, "--preset", "tiny", "--out", mnt + "/run/model",
                  "--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "1", "--steps", str(steps)])
    except SystemExit as e:
        return e.code
    return 0
first = pretrain(1)
ckpts = mnt + "/run/train_state/model/checkpoints"
latest = open(ckpts + "/latest").read()
used = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(mnt + "/run") for f in fs)
st = os.statvfs(mnt)
with open(mnt + "/filler", "wb") as f:  # room for the model and a third of a checkpoint
    f.write(bytes(max(0, st.f_bavail * st.f_frsize - used // 3)))
second = pretrain(3)
print(json.dumps({"codes": [first, second], "latest": [latest, open(ckpts + "/latest").read()],
                  "folders": sorted(os.listdir(ckpts)), "temps": [f for r, _, fs in os.walk(mnt + "/run")
                                                                  for f in fs if f.endswith(".tmp")]}))
"""


@pytest.mark.slow
def test_11_a_save_on_a_full_disk_says_so_removes_the_partial_checkpoint_and_keeps_latest(tokenizer, tmp_path):
    """A real full disk: a 128 MB tmpfs in a user+mount namespace (`unshare -rm`), filled after a first good save."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to make a small file system in")
    tokenizer.save_pretrained(tmp_path / "tok")
    write_shards((tokenizer.encode(t) for t in CORPUS * 5), tmp_path / "data", eos_id=tokenizer.eos_token_id,
                 vocab_size=tokenizer.vocab_size)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=128m tmpfs {mnt} && "
                           f"{sys.executable} {script} {mnt} {tmp_path / 'data'} {tmp_path / 'tok'}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    error = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert result["codes"] == [0, 2] and len(error) == 1, proc.stderr[-3000:]
    assert error[0].startswith("seekling pretrain: error: no space left on ") and "checkpoints/step-" in error[0]
    assert result["latest"][0] == result["latest"][1] and result["folders"] == ["latest", result["latest"][0]]
    assert result["temps"] == []


# ---------------------------------------------------------------------------------------------- 12. core install


def test_12_structured_outputs_are_in_the_core_install():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("xgrammar") for d in project["dependencies"])
    assert "structured" not in project.get("optional-dependencies", {})
    assert "seekling[structured]" not in (root / "README.md").read_text()
    assert "pip install xgrammar" in grammar_mod.MISSING
