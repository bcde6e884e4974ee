"""Tokenizer: byte-level BPE (Hugging Face `tokenizers`) plus the DeepSeek-R1 chat template.

One class serves our own trained tokenizers and the released ones (DeepSeek-R1-Distill Qwen2/Llama,
R1-0528-Qwen3):
a tokenizer directory is `tokenizer.json` + `tokenizer_config.json` (bos/eos, `chat_template`) or a
`chat_template.jinja` file, exactly what transformers reads and writes. The chat template is rendered
the way transformers renders it (sandboxed Jinja, same globals and filters, same message clean-up),
so `AutoTokenizer.from_pretrained(dir).apply_chat_template(...)` and ours give the same text and ids.
A GGUF file (or `ollama:NAME`) brings its tokenizer in its metadata (tokenizer.ggml.*: the byte-level BPE
vocabulary, merges, token types, the pre-tokenizer's name, special token ids and the chat template), read
into the same class (`tokenizer_from_gguf`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from seekling.atomic import write_text
from seekling.sources import is_gguf, read_gguf_header, resolve_model

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

# Qwen2's pre-tokenizer split: `\p{N}` takes one digit at a time, so every number tokenises digit by digit
# (what makes column arithmetic learnable) and BPE merges can never glue digits together.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizers by their GGUF name (tokenizer.ggml.pre): the regexes it splits text with, one after
# another (src/llama-vocab.cpp), as a tokenizer.json Sequence of Splits writes them.
PRE_TOKENIZERS: dict[str, list[str]] = {
    "qwen2": [SPLIT_PATTERN],
    "deepseek-r1-qwen": [SPLIT_PATTERN],
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "gpt-2": [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
    "deepseek-llm": [
        r"[\r\n]",
        r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ],
    "deepseek-v3": [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
}
# llama.cpp's token types (tokenizer.ggml.token_type): control tokens are special, user-defined ones added
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4

# DeepSeek-V3/R1's tool tokens. Newly trained tokenizers have them as special tokens; in older ones (the
# 619-token speedrun tokenizers) they are plain text that BPE splits, and every template and parser here
# works on the text either way.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_TOKENS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUTS_BEGIN,
               TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]

# Pieces shared by the three templates below (Jinja source, joined into each). Template variables beyond
# transformers' own: `thinking` (DeepSeek-V3.1's name) or `enable_thinking` (Qwen3's), default true.
_PREAMBLE = r"""
{%- if thinking is not defined -%}
  {%- set thinking = enable_thinking if enable_thinking is defined else true -%}
{%- endif -%}
{%- set ns = namespace(system='', last_user=-1, prev='', user_prefix='') -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- set ns.system = ns.system + ('\n\n' if ns.system else '') + message['content'] -%}
  {%- elif message['role'] == 'user' -%}
    {%- set ns.last_user = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
"""
# An assistant turn's content and reasoning (`reasoning_content`, or a think block inside `content`), and
# whether its think block is rendered: for the final message (a training sample), and, DeepSeek's rule for
# tool loops, for a turn that called tools after the last user message. Earlier reasoning is dropped.
_ASSISTANT = r"""
    {%- set content = message['content'] | default('', true) -%}
    {%- set reasoning = message['reasoning_content'] | default('', true) -%}
    {%- if '</think>' in content -%}
      {%- if not reasoning -%}{%- set reasoning = content.split('</think>')[0].replace('<think>', '') -%}{%- endif -%}
      {%- set content = content.split('</think>')[-1] -%}
    {%- endif -%}
    {%- set calls = message['tool_calls'] | default([], true) -%}
    {%- set keep = loop.last or (calls and loop.index0 > ns.last_user) -%}
"""
_TOOL_ORDER = r"""
  {%- if message['role'] == 'tool' and ns.prev not in ('calls', 'tool') -%}
    {{- raise_exception('a tool message must follow an assistant message with tool_calls') -}}
  {%- endif -%}
"""
_ARGS = "(call['function']['arguments'] if call['function']['arguments'] is string else " \
        "call['function']['arguments'] | tojson)"

# seekling's template: DeepSeek-R1's chat format with DeepSeek-V3/R1's tool-call and tool-output tokens.
# System prompts are joined and put right after bos, followed by the tool list when tools are given.
# Every assistant turn starts with <｜Assistant｜> (R1's omits it after tool outputs: one rule is easier for a
# small model). With thinking off the generation prompt ends in `<｜Assistant｜></think>`, as DeepSeek-V3.1's.
CHAT_TEMPLATE = _PREAMBLE + r"""
{%- if tools -%}
  {%- set ns.system = ns.system + ('\n\n' if ns.system else '')
      + '## Tools\nYou have access to the following tools:\n' -%}
  {%- for tool in tools -%}
    {%- set f = tool['function'] if tool['function'] is defined else tool -%}
    {%- set ns.system = ns.system + '\n### ' + f['name'] + '\nDescription: ' + (f['description'] | default('', true))
        + '\n\nParameters: ' + (f['parameters'] | default({}, true) | tojson) + '\n' -%}
  {%- endfor -%}
  {%- set ns.system = ns.system + '\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n'
      + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_name\n```json\narguments\n```'
      + '<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n\nwhere tool_name is one of the tools above and arguments is a '
      + 'JSON object valid for its Parameters schema. Several calls go one after another, separated by a newline.' -%}
{%- endif -%}
{{- bos_token + ns.system -}}
{%- for message in messages -%}""" + _TOOL_ORDER + r"""
  {%- if message['role'] == 'user' -%}
    {{- '<｜User｜>' + message['content'] -}}
  {%- elif message['role'] == 'assistant' -%}""" + _ASSISTANT + r"""
    {{- '<｜Assistant｜>' -}}
    {%- if keep -%}
      {{- ('<think>\n' + reasoning.strip('\n') + '\n</think>\n\n') if thinking else '</think>' -}}
    {%- endif -%}
    {{- content.lstrip('\n') -}}
    {%- if calls -%}
      {{- '<｜tool▁calls▁begin｜>' -}}
      {%- for call in calls -%}
        {{- ('\n' if not loop.first else '') + '<｜tool▁call▁begin｜>' + (call['type'] | default('function', true))
            + '<｜tool▁sep｜>' + call['function']['name'] + '\n```json\n' + """ + _ARGS + r"""
            + '\n```<｜tool▁call▁end｜>' -}}
      {%- endfor -%}
      {{- '<｜tool▁calls▁end｜>' -}}
    {%- endif -%}
    {{- eos_token -}}
  {%- elif message['role'] == 'tool' -%}
    {{- ('<｜tool▁outputs▁begin｜>' if ns.prev != 'tool' else '\n') + '<｜tool▁output▁begin｜>' + message['content']
        + '<｜tool▁output▁end｜>' -}}
    {%- if loop.nextitem is not defined or loop.nextitem['role'] != 'tool' -%}
      {{- '<｜tool▁outputs▁end｜>' -}}
    {%- endif -%}
  {%- elif message['role'] != 'system' -%}
    {{- raise_exception('unsupported chat role: ' + message['role']) -}}
  {%- endif -%}
  {%- set ns.prev = 'calls' if (message['role'] == 'assistant' and calls) else message['role'] -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' + ('<think>\n' if thinking else '</think>') -}}{%- endif -%}
"""

# The R1-Distill layout (the released checkpoints' template: bos, system, <｜User｜>, <｜Assistant｜>, a generation
# prompt that opens <think>) with the base model family's tool format, used when a Qwen2 or Llama checkpoint's
# own template does not render `tools`. With thinking off the think block is closed empty, as Qwen3 does.
_DISTILL_TURNS = r"""
{{- bos_token + ns.system -}}
{%- for message in messages -%}""" + _TOOL_ORDER + r"""
  {%- if message['role'] == 'user' -%}
    {{- '<｜User｜>' + ns.user_prefix + message['content'] -}}
    {%- set ns.user_prefix = '' -%}
  {%- elif message['role'] == 'assistant' -%}""" + _ASSISTANT + r"""
    {{- '<｜Assistant｜>' + (('<think>\n' + reasoning.strip('\n') + '\n</think>\n\n') if keep else '') -}}
    {{- render_turn(content.lstrip('\n'), calls) + eos_token -}}
  {%- elif message['role'] == 'tool' -%}{{- render_output(message['content'], ns.prev != 'tool') -}}
  {%- elif message['role'] != 'system' -%}
    {{- raise_exception('unsupported chat role: ' + message['role']) -}}
  {%- endif -%}
  {%- set ns.prev = 'calls' if (message['role'] == 'assistant' and calls) else message['role'] -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\n' + ('' if thinking else '\n</think>\n\n') -}}{%- endif -%}
"""

# Qwen2.5's tool format (its template's words): tools listed in the system prompt inside <tools></tools>,
# each call a `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, results as <tool_response> in a
# user turn.
QWEN_TOOLS_TEMPLATE = _PREAMBLE + r"""
{%- if tools -%}
  {%- set ns.system = ns.system + ('\n\n' if ns.system else '') + '# Tools\n\nYou may call one or more functions to '
      + 'assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML '
      + 'tags:\n<tools>' -%}
  {%- for tool in tools -%}{%- set ns.system = ns.system + '\n' + (tool | tojson) -%}{%- endfor -%}
  {%- set ns.system = ns.system + '\n</tools>\n\nFor each function call, return a json object with function name and '
      + 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
      + '<args-json-object>}\n</tool_call>' -%}
{%- endif -%}
{%- macro render_turn(content, calls) -%}
  {{- content -}}
  {%- for call in calls -%}
    {{- ('\n' if content or not loop.first else '') + '<tool_call>\n{"name": "' + call['function']['name']
        + '", "arguments": ' + """ + _ARGS + r""" + '}\n</tool_call>' -}}
  {%- endfor -%}
{%- endmacro -%}
{%- macro render_output(text, first) -%}
  {{- ('<｜User｜>' if first else '\n') + '<tool_response>\n' + text + '\n</tool_response>' -}}
{%- endmacro -%}
""" + _DISTILL_TURNS

# Llama 3.1's JSON tool calling (its template's words; tools in the first user message): a call is the whole
# answer, `{"name": ..., "parameters": {...}}`, one call per turn; a result comes back as the next user turn.
LLAMA_TOOLS_TEMPLATE = _PREAMBLE + r"""
{%- if tools -%}
  {%- set ns.user_prefix = 'Given the following functions, please respond with a JSON for a function call with its '
      + 'proper arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, '
      + '"parameters": dictionary of argument name and its value}.Do not use variables.\n\n' -%}
  {%- for tool in tools -%}
    {%- set ns.user_prefix = ns.user_prefix + (tool | tojson(indent=4)) + '\n\n' -%}
  {%- endfor -%}
{%- endif -%}
{%- macro render_turn(content, calls) -%}
  {%- if calls | length > 1 -%}{{- raise_exception('Llama 3.1 tool calling makes one call per turn') -}}{%- endif -%}
  {%- for call in calls -%}
    {{- '{"name": "' + call['function']['name'] + '", "parameters": ' + """ + _ARGS + r""" + '}' -}}
  {%- else -%}{{- content -}}
  {%- endfor -%}
{%- endmacro -%}
{%- macro render_output(text, first) -%}
  {{- '<｜User｜>' + text -}}
{%- endmacro -%}
""" + _DISTILL_TURNS

# DeepSeek-R1-0528's chat format, as the tokenizer_config.json of DeepSeek-R1-0528-Qwen3-8B renders it (Ollama's
# deepseek-r1:8b carries the same template in its GGUF): system prompts joined by blank lines after bos; every user
# turn is followed by <｜Assistant｜> at once, so the generation prompt adds it only after other turns (never after
# tool outputs, which the model continues); earlier reasoning is cut from assistant turns (text after the last
# </think>); tool calls and outputs in DeepSeek's tokens. The generation prompt does not open <think>: the model
# writes it. Beyond the release (which ignores both), tool arguments may be a dict, and thinking=False (or
# enable_thinking=False) closes an empty think block after the generation prompt.
R1_0528_TEMPLATE = r"""
{%- set ns = namespace(system='', first_system=true, last_user=false, in_outputs=false, first_output=true) -%}
{%- for message in messages if message['role'] == 'system' -%}
  {%- set ns.system = ns.system + ('' if ns.first_system else '\n\n') + message['content'] -%}
  {%- set ns.first_system = false -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- for message in messages -%}
  {%- set content = message['content'] -%}
  {%- if message['role'] == 'user' -%}
    {%- set ns.in_outputs = false -%}{%- set ns.last_user = true -%}
    {{- '<｜User｜>' + content + '<｜Assistant｜>' -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}
    {{- '<｜tool▁outputs▁end｜>' if ns.in_outputs else '' -}}
    {%- set ns.in_outputs = false -%}{%- set ns.last_user = false -%}
    {%- if message['tool_calls'] is defined and message['tool_calls'] is not none -%}
      {%- set ns.first_output = true -%}
      {%- for call in message['tool_calls'] -%}
        {{- ((content if content is not none else '') + '<｜tool▁calls▁begin｜>' if loop.first else '\n')
            + '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] + '\n```json\n'
            + """ + _ARGS + r""" + '\n```<｜tool▁call▁end｜>' -}}
      {%- endfor -%}
      {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}
    {%- else -%}
      {{- content + '<｜end▁of▁sentence｜>' -}}
    {%- endif -%}
  {%- elif message['role'] == 'tool' -%}
    {{- ('<｜tool▁outputs▁begin｜>' if ns.first_output else '\n') + '<｜tool▁output▁begin｜>' + content
        + '<｜tool▁output▁end｜>' -}}
    {%- set ns.in_outputs = true -%}{%- set ns.last_user = false -%}{%- set ns.first_output = false -%}
  {%- endif -%}
{%- endfor -%}
{{- '<｜tool▁outputs▁end｜>' if ns.in_outputs else '' -}}
{%- if add_generation_prompt and not ns.in_outputs -%}
  {{- '' if ns.last_user else '<｜Assistant｜>' -}}
  {%- if (thinking is defined and thinking is false) or (enable_thinking is defined and enable_thinking is false) -%}
    {{- '<think>\n\n</think>\n\n' -}}
  {%- endif -%}
{%- endif -%}
"""

# sha256 of earlier versions of CHAT_TEMPLATE that checkpoints carry in tokenizer_config.json: loading one
# upgrades it to the current template, which renders every conversation they could render the same way.
_LEGACY_TEMPLATES = {"bfb65ead43ecece776c6ce6a5d0e8e10a3fc31552415c34909d3fd6f3245d410"}

# Names a message's reasoning may come under; transformers copies them all to `reasoning_content`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@lru_cache
def _compile_template(source: str) -> jinja2.Template:
    """The Jinja environment transformers builds in `utils/chat_template_utils.py` (minus its
    `{% generation %}` tracker, which no template we render needs)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        # As in transformers: no underscore attributes on a namespace, a route to Python internals.
        def __setitem__(self, name: str, value: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    return env.from_string(source)


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers' message clean-up: drop None-valued keys, alias reasoning fields."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                template: str = CHAT_TEMPLATE, tools: list[dict[str, Any]] | None = None,
                **variables: Any) -> str:
    """Render chat messages with a Jinja chat template, as transformers does. `tools` are OpenAI tool
    definitions; `variables` are the other template variables: the special tokens transformers passes from
    the tokenizer (bos_token, eos_token, pad_token...; they default to DeepSeek-R1's, so the corpus can be
    rendered before any tokenizer exists) and template switches such as `thinking` (transformers passes
    extra keyword arguments of apply_chat_template the same way)."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    variables = {"bos_token": BOS, "eos_token": EOS, "documents": None, **variables}
    return _compile_template(template).render(
        messages=_clean_messages(messages), tools=tools or None,
        add_generation_prompt=add_generation_prompt, **variables,
    )


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read special token {value!r} from tokenizer_config.json")


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special tokens and chat template."""

    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = CHAT_TEMPLATE,
                 bos_token: str | None = BOS, eos_token: str | None = EOS, pad_token: str | None = None,
                 model_max_length: int = 4096):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.model_max_length = model_max_length
        for token in (bos_token, eos_token, self.pad_token):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")

    # --- ids -----------------------------------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.tokenizer.token_to_id(tokens)
        return [self.tokenizer.token_to_id(t) for t in tokens]

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def think_start_id(self) -> int | None:
        return self._id(THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self._id(THINK_END)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # --- text <-> ids --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no bos/eos added, but special-token strings inside the text are matched."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, *, tools: list[dict[str, Any]] | None = None,
                            chat_template: str | None = None, **template_kwargs: Any) -> str | list[int]:
        """transformers' apply_chat_template: `tools` and any extra keyword (e.g. `thinking=False`) reach the
        template as variables; `chat_template` renders with another template than the tokenizer's."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template")
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                     ("pad_token", self.pad_token)) if v is not None}
        text = render_chat(messages, add_generation_prompt, template, tools, **special, **template_kwargs)
        return self.encode(text) if tokenize else text

    def encode_sft(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Ids of a training conversation and a loss mask that is 1 exactly on the final assistant turn's
        tokens (reasoning, </think>, answer, eos) and 0 on the prompt, which is the generation prompt the
        model sees at inference and so already ends with "<think>\n"."""
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("encode_sft needs a conversation that ends with an assistant message")
        prompt = self.apply_chat_template(messages[:-1], add_generation_prompt=True)
        full = self.apply_chat_template(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        prompt_ids, full_ids = self.encode(prompt), self.encode(full)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            # A BPE merge crossed the prompt/answer boundary (e.g. empty reasoning: "\n\n" is one piece).
            # At inference the prompt is encoded alone and the model continues it, so train on that split.
            full_ids = prompt_ids + self.encode(full[len(prompt):])
        mask = [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))
        return full_ids, mask

    # --- files ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (atomically) in the layout transformers loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        write_text(directory / "tokenizer.json", self.tokenizer.to_str())
        write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load any Hugging Face tokenizer directory (ours, or a released DeepSeek-R1-Distill one), or the tokenizer
    of a GGUF file or `ollama:NAME[:TAG]`."""
    directory = resolve_model(directory)
    if is_gguf(directory):
        return tokenizer_from_gguf(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory} (only tokenizer.json tokenizers load)")
    config_file = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{config_file} is not JSON: {e}") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # the old named-templates form: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():  # transformers >= 4.43 saves the template here, and prefers it
        template = jinja_file.read_text(encoding="utf-8")
    if template is not None and hashlib.sha256(template.encode()).hexdigest() in _LEGACY_TEMPLATES:
        template = CHAT_TEMPLATE
    try:
        backend = HFTokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # (tokenizers raises a bare Exception for a file it cannot read)
        raise ValueError(f"{tokenizer_file} is not a tokenizer: {e}") from e
    return Tokenizer(
        backend,
        chat_template=template,
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        pad_token=_token_content(config.get("pad_token")),
        model_max_length=int(config.get("model_max_length", 4096)),
    )


def bundled_tokenizer(source: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer that comes with a model (its directory's tokenizer.json, or a GGUF's metadata), if any."""
    path = resolve_model(source)
    if is_gguf(path) or (path / "tokenizer.json").is_file():
        return load_tokenizer(path)
    return None


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
    """A GGUF file's byte-level BPE tokenizer (tokenizer.ggml.model "gpt2", what llama.cpp's converter writes for
    every family seekling reads): the vocabulary and merges, the pre-tokenizer llama.cpp names in
    tokenizer.ggml.pre, control tokens as special tokens and user-defined ones as added tokens (both matched
    whole in text), bos / eos / padding and the chat template."""
    path = Path(path)
    meta = read_gguf_header(path)[0]
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{path.name}: tokenizer.ggml.model {kind!r} is not supported (seekling reads byte-level "
                         "BPE tokenizers, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path.name}: pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    # Llama 3's BPE takes a whole pre-token found in the vocabulary before merging (llama.cpp's ignore_merges)
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 ignore_merges=pre in ("llama-bpe", "llama3")))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == GGUF_CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == GGUF_USER_DEFINED])
    special = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos", "padding")
               if f"tokenizer.ggml.{k}_token_id" in meta}
    return Tokenizer(tok, meta.get("tokenizer.chat_template"), special.get("bos"), special.get("eos"),
                     special.get("padding"), model_max_length=2**31 - 1)


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 4096) -> Tokenizer:
    """Train a byte-level BPE on `texts` with single-digit pre-tokens and DeepSeek-R1's special tokens.
    `vocab_size` counts everything (256 byte tokens, merges, special and added tokens) and is an upper
    bound: a narrow corpus (like the task corpus, ~530 tokens) runs out of merges sooner, so size the
    model's embedding from the returned `tok.vocab_size`."""
    special = [BOS, EOS, USER, ASSISTANT]
    added = [THINK_START, THINK_END]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    least = len(alphabet) + len(special) + len(added) + len(TOOL_TOKENS)
    if vocab_size < least:
        raise ValueError(f"vocab_size must be at least {least}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added) - len(TOOL_TOKENS), special_tokens=special, initial_alphabet=alphabet,
        min_frequency=2, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Special tokens are control tokens (skipped by decode(skip_special_tokens=True)); the think tags are
    # plain added tokens, as in the R1-Distill tokenizers, so decoded text keeps them for reasoning splitting.
    # The tool tokens come last, so the ids of everything else are those a tokenizer without them had.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOOL_TOKENS])
    return Tokenizer(tok, CHAT_TEMPLATE, BOS, EOS, EOS, model_max_length)
