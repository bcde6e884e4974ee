"""Tool calling in each model family's own wire format, and the constraints that make outputs valid.

A family's format (DeepSeek-V3/R1's tokens, Qwen2.5's <tool_call> JSON, Llama 3.1's bare JSON; which one is the
family's `tool_format` in seekling/model/families/) is rendered into the prompt by its chat template
(seekling/tokenizer.py) and parsed back here into OpenAI tool calls. The
parser is incremental: it takes the answer text as it streams and releases plain text at once, except a tail
that may be the start of a tool call, which it holds until the next piece decides it. The same parser reads
a whole answer (non-streamed requests), so both paths give the same calls.

`tool_choice` required / a named function and `response_format` become a `StructuredOutputsParams` for the
engine (see seekling/engine/sampling.py for the contract): an xgrammar structural tag that covers the whole
completion, beginning with the reasoning block when the prompt opened one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from seekling.engine.detok import THINK_END
from seekling.engine.sampling import StructuredOutputsParams
from seekling.model.families import family
from seekling.tokenizer import (
    CHAT_TEMPLATE,
    LLAMA_TOOLS_TEMPLATE,
    QWEN_TOOLS_TEMPLATE,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
)

# ---------------------------------------------------------------------------------------------- events


@dataclass
class Text:
    text: str


@dataclass
class CallStart:
    index: int  # the call's position among this answer's calls (OpenAI's tool_calls[].index)
    id: str
    name: str


@dataclass
class CallArgs:
    index: int
    text: str  # a piece of the arguments' JSON text, as the model wrote it


Event = Text | CallStart | CallArgs


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def held_tail(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------------------------- parsers


class ToolParser:
    """Answer text in, events out. `push(piece)` returns what can be released now; `push("", final=True)` at
    the end releases everything held. With `parallel=False` only the first call is kept."""

    marker = ""  # text that opens the tool-call part of an answer

    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self.buf = ""  # text not yet released
        self.in_calls = False
        self.calls = 0  # calls started so far

    def cut_call(self) -> tuple[int, str] | None:
        """After the final push: the call whose arguments never ended (the answer was cut inside it), as (its
        index, the text that opened it), or None. Only formats that release a call before it ends can have one."""
        return None

    def push(self, piece: str, final: bool = False) -> list[Event]:
        self.buf += piece
        out: list[Event] = []
        while True:
            if not self.in_calls:
                at = self.buf.find(self.marker)
                if at < 0:
                    keep = 0 if final else held_tail(self.buf, self.marker)
                    self._text(out, self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                self._text(out, self.buf[:at])
                self.buf, self.in_calls = self.buf[at:], True
            progressed = self._calls(out, final)
            if not progressed:
                return out

    def _text(self, out: list[Event], text: str) -> None:
        if text:
            out.append(Text(text))

    def _start(self, out: list[Event], name: str) -> bool:
        """Open a call; False when a call after the first is to be dropped (parallel_tool_calls=false)."""
        if self.calls and not self.parallel:
            return False
        out.append(CallStart(self.calls, new_call_id(), name))
        self.calls += 1
        return True

    def _calls(self, out: list[Event], final: bool) -> bool:
        """Consume what it can of `buf`, which starts inside the tool-call part; True if it moved on."""
        raise NotImplementedError


class DeepSeekParser(ToolParser):
    """`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>`
    (calls separated by "\\n") `<｜tool▁calls▁end｜>`. Arguments stream as they come."""

    marker = TOOL_CALLS_BEGIN
    ARGS_END = "\n```" + TOOL_CALL_END
    HEADER = re.compile(r"(\w+)" + re.escape(TOOL_SEP) + r"([^\n]{1,256})\n```json\n")

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self.state = "begin"  # begin -> between -> header -> args -> between ... -> done
        self.keep = True  # the current call is reported (not a dropped extra one)
        self.header = ""  # the text that opened the current call

    def cut_call(self) -> tuple[int, str] | None:
        return (self.calls - 1, self.header) if self.state == "args" and self.keep else None

    def _calls(self, out: list[Event], final: bool) -> bool:
        if self.state == "begin":
            self.buf, self.state = self.buf[len(TOOL_CALLS_BEGIN):], "between"
            return True
        if self.state == "between":
            rest = self.buf.lstrip("\n")
            for token, state in ((TOOL_CALL_BEGIN, "header"), (TOOL_CALLS_END, "done")):
                if rest.startswith(token):
                    self.buf, self.state = rest[len(token):], state
                    return True
            if not final and any(t.startswith(rest) for t in (TOOL_CALL_BEGIN, TOOL_CALLS_END)):
                return False  # still arriving
            self.buf, self.state = rest, "done"  # anything else ends the tool-call part; the rest is text
            return True
        if self.state == "header":
            m = self.HEADER.match(self.buf)
            if m is None:
                if final or len(self.buf) > 300 or ("\n" in self.buf and not self._header_prefix()):
                    self._text(out, TOOL_CALL_BEGIN + self.buf)  # not a call after all: give the text back
                    self.buf, self.state = "", "done"
                    return True
                return False
            self.keep = self._start(out, m.group(2))
            self.header = TOOL_CALL_BEGIN + m.group(0)
            self.buf, self.state = self.buf[m.end():], "args"
            return True
        if self.state == "args":
            at = self.buf.find(self.ARGS_END)
            cut = at if at >= 0 else len(self.buf) - (0 if final else held_tail(self.buf, self.ARGS_END))
            if cut and self.keep:
                out.append(CallArgs(self.calls - 1, self.buf[:cut]))
            if at < 0:
                self.buf = self.buf[cut:]
                return False
            self.buf, self.state = self.buf[at + len(self.ARGS_END):], "between"
            return True
        # done: whatever follows the tool calls is plain text
        self._text(out, self.buf)
        self.buf = ""
        return False

    def _header_prefix(self) -> bool:
        """The buffer could still become a header: one line of type<sep>name, then the ```json fence."""
        first, _, rest = self.buf.partition("\n")
        return TOOL_SEP in first and "```json\n".startswith(rest[:8])


class JSONCallsParser(ToolParser):
    """Calls as JSON objects `{"name": ..., key: {...}}` (key: "arguments" for Qwen, "parameters" for Llama),
    each released whole once it is complete."""

    args_key = "arguments"

    def _emit(self, out: list[Event], raw: str) -> bool:
        """One call from its JSON text; False (nothing emitted) when it is not a call."""
        try:
            obj = json.loads(raw)
        except ValueError:
            return False
        args = obj.get(self.args_key, obj.get("arguments")) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            return False
        if self._start(out, obj["name"]):
            out.append(CallArgs(self.calls - 1, json.dumps(args, ensure_ascii=False)))
        return True


class HermesParser(JSONCallsParser):
    """Qwen2.5's `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, calls separated by "\n"."""

    marker = "<tool_call>"
    END = "</tool_call>"

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self.after_call = False  # whitespace after a call is a separator, not text

    def _calls(self, out: list[Event], final: bool) -> bool:
        rest = self.buf.lstrip() if self.after_call else self.buf
        if not rest.startswith(self.marker):
            if not final and self.marker.startswith(rest):
                return False  # undecided: the next call may be arriving
            self.in_calls = self.after_call = False  # plain text follows
            return True
        end = rest.find(self.END)
        if end < 0:
            if final:  # an unterminated call is given back as text
                self._text(out, rest)
                self.buf = ""
            return False
        if not self._emit(out, rest[len(self.marker):end]):
            self._text(out, rest[:end + len(self.END)])
        self.buf, self.after_call = rest[end + len(self.END):], True
        return True


class Llama3Parser(JSONCallsParser):
    """Llama 3.1's JSON calling: the whole answer is `{"name": ..., "parameters": {...}}` (one call); an answer
    that starts with "{" is held to the end, then read as a call or given back as text."""

    args_key = "parameters"
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self.decided = False  # the answer's start showed it is plain text, or the call was read

    def push(self, piece: str, final: bool = False) -> list[Event]:
        if self.decided:
            return [Text(piece)] if piece else []
        self.buf += piece
        head = self.buf.lstrip()
        if head.startswith(self.PYTHON_TAG):
            head = head[len(self.PYTHON_TAG):].lstrip()
        maybe_call = not head or head.startswith("{") or self.PYTHON_TAG.startswith(head)
        if maybe_call and not final:
            return []
        out: list[Event] = []
        if not (head and self._emit(out, head)):
            self._text(out, self.buf)
        self.buf, self.decided = "", True
        return out


# ---------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ToolFormat:
    name: str
    parser: type[ToolParser]
    template: str  # seekling's template in this format, used when the checkpoint's own renders no tools


FORMATS = {
    "deepseek": ToolFormat("deepseek", DeepSeekParser, CHAT_TEMPLATE),
    "hermes": ToolFormat("hermes", HermesParser, QWEN_TOOLS_TEMPLATE),
    "llama3": ToolFormat("llama3", Llama3Parser, LLAMA_TOOLS_TEMPLATE),
}


def tool_format(chat_template: str | None, model_type: str | None) -> tuple[ToolFormat, str]:
    """The tool format and the template that renders tools: the checkpoint's own when it renders `tools` (its
    format read from its markers), else the format its family calls tools in (seekling/model/families/; a
    server without a model config is taken for seekling's own, DeepSeek-V3) with seekling's template for it."""
    if chat_template and re.search(r"\btools\b", chat_template):
        for marker, name in ((TOOL_CALLS_BEGIN, "deepseek"), ("<tool_call>", "hermes"), ('"parameters"', "llama3")):
            if marker in chat_template:
                return FORMATS[name], chat_template
    fmt = FORMATS[family(model_type or "deepseek_v3").tool_format]
    return fmt, fmt.template


# ---------------------------------------------------------------------------------------------- constraints


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _reasoning_first(answer: dict) -> dict:
    """The completion when the prompt opened a think block: free reasoning up to `</think>`, the blank line the
    template puts after it, then the answer."""
    reasoning = {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": THINK_END}
    return {"type": "sequence", "elements": [reasoning, {"type": "const_string", "value": "\n\n"}, answer]}


def _structural_tag(answer: dict, reasoning: bool) -> StructuredOutputsParams:
    fmt = _reasoning_first(answer) if reasoning else answer
    return StructuredOutputsParams(structural_tag=json.dumps({"type": "structural_tag", "format": fmt}))


def tool_call_format(fmt: ToolFormat, tools: list[dict], parallel: bool) -> dict:
    """The xgrammar format of an answer that is one or more calls (exactly one when `parallel` is false, or
    with Llama's format) of the given tools, with JSON arguments valid for each tool's parameters schema.
    The text it covers is exactly what the family's template renders for an assistant turn's tool calls."""
    def call_tag(begin: str, schema: dict, end: str) -> dict:
        return {"type": "tag", "begin": begin, "content": {"type": "json_schema", "json_schema": schema}, "end": end}

    def several(tags: list[dict]) -> dict:
        return {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                "stop_after_first": not parallel}

    names = [t["function"]["name"] for t in tools]
    if fmt.name == "deepseek":
        tags = [call_tag(f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{n}\n```json\n", _parameters(t), DeepSeekParser.ARGS_END)
                for n, t in zip(names, tools, strict=True)]
        return {"type": "tag", "begin": TOOL_CALLS_BEGIN, "content": several(tags), "end": TOOL_CALLS_END}
    key = "parameters" if fmt.name == "llama3" else "arguments"
    schemas = [{"type": "object", "properties": {"name": {"const": n}, key: _parameters(t)},
                "required": ["name", key], "additionalProperties": False} for n, t in zip(names, tools, strict=True)]
    if fmt.name == "llama3":
        return {"type": "json_schema", "json_schema": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}}
    return several([call_tag("<tool_call>\n", s, "\n</tool_call>") for s in schemas])


def tool_constraint(fmt: ToolFormat, tools: list[dict], parallel: bool, reasoning: bool) -> StructuredOutputsParams:
    """For tool_choice "required" (all tools) or a named function (`tools` = that one, parallel false)."""
    return _structural_tag(tool_call_format(fmt, tools, parallel), reasoning)


def json_constraint(schema: dict | None, reasoning: bool) -> StructuredOutputsParams:
    """response_format json_schema (`schema`) or json_object (None): the answer is one JSON value."""
    if not reasoning:
        return StructuredOutputsParams(json=schema) if schema is not None else StructuredOutputsParams(json_object=True)
    return _structural_tag({"type": "json_schema", "json_schema": schema if schema is not None else {"type": "object"}},
                           True)
