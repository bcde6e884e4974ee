"""The official openai and anthropic clients against a live server: tools, structured outputs, thinking control,
cached prompt tokens, bad input, the OpenAPI document.

A random tiny model does not call tools on its own, so the tool tests run on `ScriptedEngine`, whose output is
the exact wire text a model of the family would write (split into small pieces, so streaming parsers see
every boundary): the server's parsing, wire formats and prompts are tested for real. Thinking, cached tokens
and structured outputs run on the real engine.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from test_serve import CORPUS, LiveServer, ScriptedEngine, client, last_user, tiny_model

from seekling.engine import Engine
from seekling.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_SEP,
    train_tokenizer,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def deepseek_calls(*calls: tuple[str, dict]) -> str:
    """The tool-call text of DeepSeek-V3/R1's format, as seekling's template renders it."""
    body = "\n".join(f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{json.dumps(args)}\n```{TOOL_CALL_END}"
                     for name, args in calls)
    return TOOL_CALLS_BEGIN + body + TOOL_CALLS_END


def pieces(text: str, size: int = 5) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def scripted(tokenizer, tmp_path):
    engine = ScriptedEngine(tokenizer)
    server = LiveServer(engine, data_dir=str(tmp_path), api_key=["client-key-1"])
    yield engine, server
    server.close()


def say(engine: ScriptedEngine, answer: str, reasoning: str = "I will look it up.") -> None:
    engine.script = lambda prompt: (pieces(reasoning), pieces(answer))


# ---------------------------------------------------------------------------------------------- openai: tools


def test_openai_tool_round_trip(scripted):
    engine, server = scripted
    oa = client(server, "client-key-1")
    say(engine, deepseek_calls(("get_weather", {"city": "Paris", "unit": "C"})))
    r = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "I will look it up."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    # The tools were rendered into the prompt (seekling's template: a tool list after the system prompt).
    assert "### get_weather\nDescription: Weather now" in engine.prompts[-1]

    # The tool's answer goes back with the call (and its reasoning, DeepSeek's rule within a tool loop).
    say(engine, "It is 21 C in Paris.", reasoning="The tool says 21.")
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r = oa.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=200)
    assert r.choices[0].message.content == "It is 21 C in Paris." and r.choices[0].finish_reason == "stop"
    prompt = engine.prompts[-1]
    assert prompt.endswith(f"{TOOL_OUTPUTS_BEGIN}{TOOL_OUTPUT_BEGIN}{{\"temp\": 21}}{TOOL_OUTPUT_END}"
                           f"{TOOL_OUTPUTS_END}<｜Assistant｜><think>\n")
    assert "<think>\nI will look it up.\n</think>\n\n" + TOOL_CALLS_BEGIN in prompt
    # After the next user message the loop is over: that reasoning is dropped, the call stays.
    history += [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "And Lyon?"}]
    oa.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=200)
    assert "I will look it up." not in engine.prompts[-1] and TOOL_CALLS_BEGIN in engine.prompts[-1]
    # A tool message must answer a call of the assistant message before it.
    bad = ASK + [history[1], {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="answers no tool call"):
        oa.chat.completions.create(model="tiny", messages=bad, tools=TOOLS)


def test_openai_streamed_tool_calls_reassemble(scripted):
    engine, server = scripted
    oa = client(server, "client-key-1")
    say(engine, "Checking both." + deepseek_calls(("get_weather", {"city": "Paris"}), ("get_time", {"city": "Oslo"})))
    chunks = list(oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True, max_tokens=300))
    arg_chunks = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()
                  if tc.function.arguments]
    assert len(arg_chunks) > 4  # the arguments really streamed, piece by piece
    # No text of the tool-call syntax leaked into the content; the finish reason says tool_calls.
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking both."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # The client's own stream helper reassembles the calls from the deltas.
    with oa.chat.completions.stream(model="tiny", messages=ASK, tools=TOOLS, max_tokens=300) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Oslo"})]
    assert len({c.id for c in calls}) == 2 and final.choices[0].message.content == "Checking both."
    # parallel_tool_calls=false keeps the first call only.
    r = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    # tool_choice "none": no tools in the prompt, and the same text is just text.
    r = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and TOOL_CALLS_BEGIN in r.choices[0].message.content
    assert "## Tools" not in engine.prompts[-1]


def test_openai_named_and_required_tool_choice_constraints(scripted):
    """A named or required tool choice reaches the engine as a structural tag (the contract with constrained
    decoding): xgrammar compiles it, it accepts the call the template's format prescribes and refuses others."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    engine, server = scripted
    oa = client(server, "client-key-1")
    answer = deepseek_calls(("get_time", {"city": "Oslo"}))
    say(engine, answer)
    r = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    grammar = xgr.Grammar.from_structural_tag(engine.params[-1].structured_outputs.structural_tag)
    completion = "I will look it up.\n</think>\n\n" + answer  # what the engine generates after <think>\n
    assert _is_grammar_accept_string(grammar, completion)
    assert not _is_grammar_accept_string(grammar, completion.replace("get_time", "get_weather"))
    assert not _is_grammar_accept_string(grammar, "I will look it up.\n</think>\n\nIt is noon.")

    oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required")
    grammar = xgr.Grammar.from_structural_tag(engine.params[-1].structured_outputs.structural_tag)
    two = deepseek_calls(("get_weather", {"city": "Paris", "unit": "F"}), ("get_time", {}))
    assert _is_grammar_accept_string(grammar, "Hmm.\n</think>\n\n" + two)
    assert not _is_grammar_accept_string(grammar, "Hmm.\n</think>\n\n" + deepseek_calls(("get_weather", {"unit": "C"})))
    # Thinking off: the constraint starts at the first token.
    oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                               extra_body={"thinking": {"type": "disabled"}})
    grammar = xgr.Grammar.from_structural_tag(engine.params[-1].structured_outputs.structural_tag)
    assert _is_grammar_accept_string(grammar, two) and not _is_grammar_accept_string(grammar, "x</think>\n\n" + two)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="not a valid JSON Schema"):
        oa.chat.completions.create(model="tiny", messages=ASK, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}])


# ---------------------------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    """The real engine on a tiny random model, small cache blocks so that a short prompt shares whole ones. Its
    context is 1024 positions (the weights do not depend on it): a prompt that renders the tools is ~600 tokens of
    this narrow tokenizer."""
    model = tiny_model(tokenizer)
    model.config.max_position_embeddings = 1024
    engine = Engine(model, tokenizer, max_num_seqs=8, block_size=4)
    server = LiveServer(engine, data_dir=str(tmp_path_factory.mktemp("live")))
    yield engine, server
    server.close()


def test_thinking_disabled_gives_no_reasoning(live):
    engine, server = live
    oa = client(server)
    for extra in ({"extra_body": {"thinking": {"type": "disabled"}}}, {"reasoning_effort": "none"}):
        r = oa.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=12, **extra)
        assert r.choices[0].message.model_extra["reasoning_content"] is None and r.choices[0].message.content
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
    r = oa.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=12,
                                   extra_body={"thinking": {"type": "enabled"}})
    assert r.choices[0].message.model_extra["reasoning_content"]


def test_repeated_long_prompt_reports_cached_tokens(live):
    engine, server = live
    messages = [{"role": "user", "content": "Hello world! " * 12}]
    first, second = (client(server).chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                            max_tokens=4) for _ in range(2))
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 40
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Whole cache blocks of the prompt came from the prefix cache, all but the last (partial or re-run) one.
    assert cached % 4 == 0 and first.usage.prompt_tokens - 4 <= cached < first.usage.prompt_tokens
    extra = second.usage.model_extra
    assert extra["prompt_cache_hit_tokens"] == cached
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == second.usage.prompt_tokens


def test_json_schema_response_validates(live):
    engine, server = live
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    r = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "2 + 2? Answer in JSON."}], temperature=0,
        max_tokens=48, response_format={"type": "json_schema",
                                        "json_schema": {"name": "sum", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"  # the constraint completed (not cut by max_tokens)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # A valid JSON Schema that no string satisfies: the engine's grammar compiler refuses it, the server says 400.
    empty = {"type": "string", "minLength": 5, "maxLength": 2}
    with pytest.raises(openai.BadRequestError, match="does not compile"):
        client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": empty}})


def test_a_slow_grammar_compile_holds_up_no_other_request(live, monkeypatch):
    """A new grammar can take seconds to compile; it runs off the event loop and outside the engine's lock, so a
    plain request sent meanwhile is answered before the constrained one."""
    import threading
    import time

    engine, server = live
    compile_ = engine.grammars.compile
    started = threading.Event()

    def slow(constraint, cancelled=None):
        started.set()
        time.sleep(2.0)
        return compile_(constraint, cancelled)

    monkeypatch.setattr(engine.grammars, "compile", slow)  # what both the server and add_request call
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    done = {}

    def constrained():
        client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "n?"}], temperature=0, max_tokens=16,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
        done["constrained"] = time.monotonic()

    worker = threading.Thread(target=constrained)
    worker.start()
    assert started.wait(10)
    t0 = time.monotonic()
    r = client(server).chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=4)
    plain = time.monotonic()
    worker.join(30)
    assert r.choices[0].message.content is not None and "constrained" in done
    assert plain - t0 < 1.5 and plain < done["constrained"]


def test_required_tool_call_validates_on_a_real_model(live):
    engine, server = live
    r = client(server).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                               temperature=0, max_tokens=96,
                                               extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].finish_reason == "tool_calls"
    (call, *_) = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER if call.function.name == "get_weather"
                        else TOOLS[1]["function"]["parameters"])


def test_nan_and_infinity_are_rejected(live):
    engine, server = live
    url = server.url + "/v1/chat/completions"
    for body in ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                 '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",'
                 ' "function": {"name": "f", "parameters": {"maximum": Infinity}}}]}'):
        resp = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "not JSON" in resp.json()["error"]["message"]
    with pytest.raises(ValueError, match="not JSON compliant"):  # (the openai client refuses to send one)
        client(server).chat.completions.create(model="tiny", messages=ASK, temperature=float("nan"))
    resp = httpx.post(server.url + "/v1/messages", content='{"model": "tiny", "max_tokens": -Infinity}',
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["type"] == "error"


# ---------------------------------------------------------------------------------------------- anthropic


def messages_client(server: LiveServer, key: str = "client-key-1") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=30)


def test_anthropic_messages_and_stream(scripted):
    engine, server = scripted
    ac = messages_client(server)
    m = ac.messages.create(model="tiny", max_tokens=100, system="Be brief.",
                           messages=[{"role": "user", "content": "hello there"}])
    reasoning, answer = engine.script(engine.prompts[-1])
    assert [b.type for b in m.content] == ["thinking", "text"] and m.stop_reason == "end_turn"
    assert m.content[0].thinking == "".join(reasoning) and m.content[1].text == "".join(answer)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 0 and m.usage.output_tokens > 0
    assert engine.prompts[-1].startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>hello there")
    with ac.messages.stream(model="tiny", max_tokens=100, messages=[{"role": "user", "content": "hello there"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "".join(answer) and [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "".join(reasoning) and final.stop_reason == "end_turn"
    # max_tokens cuts the answer; thinking disabled renders the V3.1 generation prompt.
    m = ac.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "x"}],
                           thinking={"type": "disabled"})
    assert m.stop_reason == "max_tokens" and engine.prompts[-1].endswith("<｜Assistant｜></think>")


def test_anthropic_tool_use_round_trip(scripted):
    engine, server = scripted
    ac = messages_client(server)
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    say(engine, "Let me check." + deepseek_calls(("get_weather", {"city": "Paris"})))
    m = ac.messages.create(model="tiny", max_tokens=300, tools=tools, messages=ASK)
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    use = m.content[2]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    with ac.messages.stream(model="tiny", max_tokens=300, tools=tools, messages=ASK) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris"} and final.stop_reason == "tool_use"

    say(engine, "Sunny, 21 C.")
    m = ac.messages.create(model="tiny", max_tokens=300, tools=tools, messages=ASK + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C, sunny"}]}])
    assert m.content[-1].text == "Sunny, 21 C." and m.stop_reason == "end_turn"
    prompt = engine.prompts[-1]
    assert f"{TOOL_OUTPUTS_BEGIN}{TOOL_OUTPUT_BEGIN}21 C, sunny{TOOL_OUTPUT_END}{TOOL_OUTPUTS_END}" in prompt
    assert "Let me check." + TOOL_CALLS_BEGIN in prompt and last_user(prompt) == ASK[0]["content"]
    # tool_choice "any" -> required: the engine gets the structural tag.
    ac.messages.create(model="tiny", max_tokens=300, tools=tools, messages=ASK, tool_choice={"type": "any"})
    assert json.loads(engine.params[-1].structured_outputs.structural_tag)["type"] == "structural_tag"


def test_anthropic_auth_and_error_shape(scripted):
    engine, server = scripted
    with pytest.raises(anthropic.AuthenticationError):
        messages_client(server, "wrong-key-0").messages.create(model="tiny", max_tokens=5, messages=ASK)
    url = server.url + "/v1/messages"
    resp = httpx.post(url, json={"model": "tiny", "messages": ASK})  # no key, no max_tokens
    assert resp.status_code == 401 and resp.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": resp.json()["error"]["message"]}}
    bearer = {"Authorization": "Bearer client-key-1"}  # the same key, OpenAI's way, works here too
    resp = httpx.post(url, json={"model": "tiny", "messages": ASK}, headers=bearer)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in resp.json()["error"]["message"]
    resp = httpx.post(url, json={"model": "other", "max_tokens": 5, "messages": ASK}, headers=bearer)
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    resp = httpx.post(url, json={"model": "tiny", "max_tokens": 5, "messages": ASK},
                      headers={"x-api-key": "client-key-1"})
    assert resp.status_code == 200 and resp.json()["type"] == "message"
    resp = httpx.post(url, content=b"x" * 1_100_000, headers=bearer)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "request_too_large"


# ---------------------------------------------------------------------------------------------- the spec


def test_openapi_document_states_the_limits(scripted):
    engine, server = scripted
    assert httpx.get(server.url + "/openapi.json").status_code == 401  # behind the key
    doc = httpx.get(server.url + "/openapi.json", headers={"x-api-key": "client-key-1"}).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/models"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    s = server.settings
    assert chat["messages"]["maxItems"] == s.max_messages and chat["messages"]["minItems"] == 1
    assert chat["model"]["enum"] == ["tiny"] and chat["n"]["maximum"] == s.max_n
    assert {"maximum": s.max_tokens_cap, "minimum": 1}.items() <= chat["max_tokens"]["anyOf"][0].items()
    assert doc["info"]["x-limits"]["max_body_bytes"] == s.max_body_bytes
    # What the schema allows at its bounds is accepted, one step past them is refused with a 4xx.
    headers, url = {"x-api-key": "client-key-1"}, server.url + "/v1/chat/completions"
    ok = {"model": "tiny", "messages": ASK, "max_tokens": s.max_tokens_cap, "n": s.max_n, "temperature": 2,
          "top_p": 1, "stop": ["a", "b", "c", "d"]}
    assert httpx.post(url, json=ok, headers=headers).status_code == 200
    for field, value in (("max_tokens", s.max_tokens_cap + 1), ("n", s.max_n + 1), ("temperature", 2.01),
                         ("top_p", 0), ("stop", ["a"] * 5), ("model", "other")):
        assert 400 <= httpx.post(url, json={**ok, field: value}, headers=headers).status_code < 500, field
