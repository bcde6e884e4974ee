"""Tool calling per model family, without a server: the templates render tools as transformers renders them,
the parser reads back what the template writes (in pieces of any size), the constraint accepts exactly that
text, and thinking control does what pipeline.py says for forced-<think> templates."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from test_serve import ScriptedEngine
from test_tokenizer import R1_DISTILL_TEMPLATE
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from seekling.serve.pipeline import ChatOptions, Context, prepare_chat
from seekling.serve.security import Settings
from seekling.serve.tools import FORMATS, CallArgs, CallStart, Text, tool_call_format, tool_format
from seekling.tokenizer import (
    CHAT_TEMPLATE,
    EOS,
    LLAMA_TOOLS_TEMPLATE,
    QWEN_TOOLS_TEMPLATE,
    TOOL_CALLS_BEGIN,
    TOOL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {"type": "object"}}}]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": {"city": "Paris", "days": 2}}},
         {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two tools.", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
]
FAMILIES = [("deepseek", CHAT_TEMPLATE), ("hermes", QWEN_TOOLS_TEMPLATE), ("llama3", LLAMA_TOOLS_TEMPLATE)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(["Weather in Paris? It is sunny, 21 C."] * 30, vocab_size=320)


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def conversation(family: str) -> list[dict]:
    """Llama 3.1's format makes one call per turn."""
    if family != "llama3":
        return CONVERSATION
    return [*CONVERSATION[:2], {**CONVERSATION[2], "tool_calls": CALLS[:1]}, CONVERSATION[3]]


@pytest.mark.parametrize("family,template", FAMILIES)
def test_tool_templates_render_as_transformers_does(tok, hf, family, template):
    conv = conversation(family)
    for kwargs in ({}, {"thinking": False}):
        for upto in (2, len(conv)):
            ours = tok.apply_chat_template(conv[:upto], True, tools=TOOLS, chat_template=template, **kwargs)
            theirs = hf.apply_chat_template(conv[:upto], tools=TOOLS, chat_template=template, tokenize=False,
                                            add_generation_prompt=True, **kwargs)
            assert ours == theirs
    rendered = tok.apply_chat_template(conv, True, tools=TOOLS, chat_template=template)
    assert "Forecast" in rendered and "get_weather" in rendered and "Two tools." in rendered  # loop reasoning kept
    assert rendered.endswith("<｜Assistant｜><think>\n")
    # Without tools and tool messages the tool templates render plain chats exactly as the base layouts.
    plain = CONVERSATION[:2]
    base = CHAT_TEMPLATE if family == "deepseek" else R1_DISTILL_TEMPLATE
    assert tok.apply_chat_template(plain, True, chat_template=template) == tok.apply_chat_template(
        plain, True, chat_template=base)


@pytest.mark.parametrize("family,template", FAMILIES)
def test_parser_reads_back_what_the_template_writes(tok, family, template):
    """The final assistant turn, rendered by the family's template, is a model's answer: parsed back in random
    pieces it gives the same calls; the family's constraint accepts it and refuses a wrong argument."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    calls = conversation(family)[2]["tool_calls"]
    conv = [*CONVERSATION[:2], {"role": "assistant", "content": "", "tool_calls": calls}]
    rendered = tok.apply_chat_template(conv, False, tools=TOOLS, chat_template=template)
    answer = rendered.split("</think>\n\n")[-1].removesuffix(EOS)
    expected = [(c["function"]["name"], json.loads(c["function"]["arguments"]) if isinstance(
        c["function"]["arguments"], str) else c["function"]["arguments"]) for c in calls]
    fmt = FORMATS[family]
    for seed in range(10):
        rng, parser, events, i = random.Random(seed), fmt.parser(), [], 0
        while i < len(answer):
            j = i + rng.randint(1, 9)
            events += parser.push(answer[i:j])
            i = j
        events += parser.push("", final=True)
        assert "".join(e.text for e in events if isinstance(e, Text)).strip() == ""
        names = [e.name for e in events if isinstance(e, CallStart)]
        args = ["".join(e.text for e in events if isinstance(e, CallArgs) and e.index == k) for k in range(len(names))]
        assert list(zip(names, map(json.loads, args), strict=True)) == expected
    tag = json.dumps({"type": "structural_tag", "format": tool_call_format(fmt, TOOLS, parallel=family != "llama3")})
    grammar = xgr.Grammar.from_structural_tag(tag)
    assert _is_grammar_accept_string(grammar, answer)
    assert not _is_grammar_accept_string(grammar, answer.replace('"Paris"', "42"))


def test_format_follows_the_checkpoint(tok):
    # A template that renders tools is used as it is, its format read from its markers; one that does not
    # (the released R1-Distill template) gets seekling's template for the model family.
    assert tool_format(CHAT_TEMPLATE, "deepseek_v3") == (FORMATS["deepseek"], CHAT_TEMPLATE)
    assert tool_format(QWEN_TOOLS_TEMPLATE, "llama") == (FORMATS["hermes"], QWEN_TOOLS_TEMPLATE)
    assert tool_format(R1_DISTILL_TEMPLATE, "qwen2") == (FORMATS["hermes"], QWEN_TOOLS_TEMPLATE)
    assert tool_format(R1_DISTILL_TEMPLATE, "llama") == (FORMATS["llama3"], LLAMA_TOOLS_TEMPLATE)
    assert tool_format(R1_DISTILL_TEMPLATE, "deepseek_v3") == (FORMATS["deepseek"], CHAT_TEMPLATE)


LEGACY_TEMPLATE = (  # seekling's template before tools (tokenizer_config.json of the 619-token checkpoints)
    "{%- set ns = namespace(system='') -%}{%- for message in messages -%}{%- if message['role'] == '"
    "system' -%}{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -"
    '%}{%- endif -%}{%- endfor -%}{{- bos_token + ns.system -}}{%- for message in messages -%}{%- if'
    " message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}{%- elif message['role'] ="
    "= 'assistant' -%}{%- set content = message['content'] | default('', true) -%}{%- set reasoning "
    "= message['reasoning_content'] | default('', true) -%}{%- if '</think>' in content -%}{%- if no"
    "t reasoning -%}{%- set reasoning = content.split('</think>')[0].replace('<think>', '') -%}{%- e"
    "ndif -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}{%- if loop.last -%}{{-"
    " '<｜Assistant｜><think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + e"
    "os_token -}}{%- else -%}{{- '<｜Assistant｜>' + content.lstrip('\\n') + eos_token -}}{%- endif -%}"
    "{%- elif message['role'] != 'system' -%}{{- raise_exception('unsupported chat role: ' + message"
    "['role']) -}}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<｜Assistant｜><thin"
    "k>\\n' -}}{%- endif -%}"
)


def test_older_tokenizers_get_the_tool_template(tmp_path):
    """A speedrun tokenizer (619 tokens) carries the first version of seekling's template and no tool tokens:
    it loads with the current template, which renders its conversations as before, and the tool tokens are
    plain text that round-trips."""
    tok = train_tokenizer(["hello world"] * 20, vocab_size=300)
    old = Tokenizer(tok.tokenizer, LEGACY_TEMPLATE)
    old.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    for conv in (CONVERSATION[:2], [*CONVERSATION[:2], {"role": "assistant", "content": "ok", "reasoning": "r"}]):
        for gen in (True, False):
            assert loaded.apply_chat_template(conv, gen) == old.apply_chat_template(conv, gen)
    assert len(tok.encode(TOOL_CALLS_BEGIN)) == 1  # a newly trained tokenizer has it as one special token
    data = json.loads(tok.tokenizer.to_str())  # the same tokenizer without the tool tokens, as older ones are
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in TOOL_TOKENS]
    older = Tokenizer(HFTokenizer.from_str(json.dumps(data)))
    assert older.vocab_size == tok.vocab_size - len(TOOL_TOKENS) and len(older.encode(TOOL_CALLS_BEGIN)) > 5
    text = older.apply_chat_template(CONVERSATION, True, tools=TOOLS)
    assert older.decode(older.encode(text)) == text and TOOL_CALLS_BEGIN in text


def test_thinking_off_per_template(tok):
    """Seekling's template ends the prompt in `<｜Assistant｜></think>` (DeepSeek-V3.1's); the released R1-Distill
    template opens <think> whatever it is told, so the server closes the block empty, as Qwen3 does."""
    seekling_ctx = Context(ScriptedEngine(tok), Settings(), None, "m", None)
    r1 = Tokenizer(tok.tokenizer, R1_DISTILL_TEMPLATE)
    distill = ScriptedEngine(r1)
    distill.config = SimpleNamespace(model_type="qwen2")
    distill_ctx = Context(distill, Settings(), None, "m", None)
    ask = CONVERSATION[:2]
    for opts in (ChatOptions(thinking=False), ChatOptions(reasoning_effort="none")):
        assert prepare_chat(seekling_ctx, ask, opts).prompt.endswith("<｜User｜>Weather in Paris, and the time?"
                                                                      "<｜Assistant｜></think>")
        assert prepare_chat(distill_ctx, ask, opts).prompt.endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    with_tools = prepare_chat(distill_ctx, ask, ChatOptions(tools=TOOLS, thinking=False))
    assert "<tools>" in with_tools.prompt and with_tools.prompt.endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    assert with_tools.parser is FORMATS["hermes"] and with_tools.structured is None
    on = prepare_chat(distill_ctx, ask, ChatOptions(reasoning_effort="high"))
    assert on.prompt.endswith("<｜Assistant｜><think>\n") and on.prompt == r1.apply_chat_template(ask)
    required = prepare_chat(distill_ctx, ask, ChatOptions(tools=TOOLS, tool_choice="required"))
    tag = json.loads(required.structured.structural_tag)["format"]
    assert tag["elements"][0]["end"] == "</think>"  # the model reasons first, then must call
