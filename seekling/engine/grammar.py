"""Constrained decoding with xgrammar: a request's `StructuredOutputsParams` -> a compiled grammar -> one
matcher per sequence, which gives the next-token mask the sampler applies.

xgrammar (MLC; the default backend of vLLM and SGLang) compiles JSON Schema, regex, EBNF and structural tags
against the tokenizer's vocabulary once, then answers each step's mask in microseconds (most tokens are
classified at compile time). Why xgrammar rather than llguidance: the server's contract for tool calls and
reasoning-first answers is written in xgrammar's structural-tag format (seekling/serve/tools.py), which it
compiles as it is; its matchers fork (n > 1) and roll back (speculative drafts). It is a dependency of seekling,
imported on the first constraint (it imports transformers: an engine never asked for a constraint pays nothing).

What a constraint covers is the contract in seekling/engine/sampling.py: the completion text exactly as the
engine decodes it (special tokens kept), from the first generated token; once the grammar is complete only a
stop token (every eos id of the engine, and the request's `stop_token_ids`) is allowed. The vocabulary is
therefore given to xgrammar as raw bytes, each token's bytes exactly as the engine's decoder writes them:
byte-level BPE pieces through GPT-2's byte-to-unicode map, added tokens (`<think>`, the tool-call markers) as
their text. Ids past the tokenizer's (the model's vocab_size may be padded) are never allowed.

The chat template's tokens (the tokenizer's added tokens: `<｜User｜>`, `</think>`, the tool-call markers...) are
given to xgrammar behind a control character (MARK), which JSON strings cannot hold: a JSON string is content the
user reads, so no constrained string ever holds one of them. The server's structural tags need some of them (the
tool-call markers, `</think>` after the reasoning): their begin/end strings are written with the same MARK, so
those places take exactly the added token, as the model was trained to write it.

Bounds (a server's, `Grammars.timeout_s`): a constraint is at most MAX_CONSTRAINT_BYTES of JSON, and a new one is
first compiled in a child process (forked from a preloaded server, so it starts in milliseconds) that is killed
past `timeout_s` seconds or when the caller says it is no longer wanted; only a constraint that compiled there in
time is compiled here. A compile cannot be interrupted in-process, so this keeps every compile bounded in time
and memory, a client that leaves stops its compile, and shutdown never waits for one. The forkserver (~275 MB: it
imports xgrammar, hence torch) starts with the first bounded compile, which waits for it (seconds, not counted
in the bound): a server that is never asked for a constraint does not pay for it.

Speculative decoding: `Matcher.fill` writes the masks of a verification's rows (the state after each draft
accepted so far) and rolls the drafts back; the matcher moves for good only in `accept`, over the tokens the
engine appends. A preempted sequence recomputes tokens it already accepted, so nothing is replayed.
"""

from __future__ import annotations

import functools
import importlib
import json
import multiprocessing
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import fields
from types import ModuleType
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from seekling.engine.sampling import StructuredOutputsParams

MISSING = ("constrained decoding (structured_outputs: response_format json, tool_choice required or named) needs "
           "xgrammar, a dependency of seekling: pip install xgrammar (or reinstall seekling)")
MARK = b"\x01"  # before an added token's bytes in the grammar's vocabulary (see the module's docstring)
MAX_CONSTRAINT_BYTES = 256_000  # of a constraint's JSON text (a tool list of 100 real tools is ~50 KB)


class CompileCancelled(Exception):
    """The caller no longer wants the grammar (its client left, or the server is stopping)."""
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:line: "; the rest is the message for the user.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


@functools.cache
def _xgrammar() -> ModuleType:
    """xgrammar, imported on first use (it imports transformers: ~1.5 s an unconstrained engine never pays)."""
    try:
        return importlib.import_module("xgrammar")
    except ImportError as e:
        raise ValueError(MISSING) from e


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: the character a byte-level BPE vocabulary writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


def _backend(tokenizer: Any) -> HFTokenizer:
    """The `tokenizers.Tokenizer` inside seekling's Tokenizer (or a transformers fast tokenizer)."""
    for name in ("tokenizer", "backend_tokenizer"):
        inner = getattr(tokenizer, name, None)
        if isinstance(inner, HFTokenizer):
            return inner
    raise ValueError("constrained decoding reads a Hugging Face `tokenizers` vocabulary; got "
                     f"{type(tokenizer).__name__}")


def token_bytes(tokenizer: Any) -> list[bytes]:
    """Every id's bytes as the engine decodes it, special tokens kept (b"" for an id without a token)."""
    hf = _backend(tokenizer)
    if not isinstance(hf.decoder, decoders.ByteLevel):
        raise ValueError("constrained decoding supports byte-level BPE tokenizers (seekling's, Qwen2's, Llama 3's); "
                         f"this one decodes with {type(hf.decoder).__name__}")
    added = {i: t.content.encode() for i, t in hf.get_added_tokens_decoder().items()}
    size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
    to_byte = byte_decoder()
    out = []
    for i in range(size):
        piece = hf.id_to_token(i)
        out.append(added[i] if i in added else bytes(to_byte[c] for c in piece) if piece is not None else b"")
    return out


def grammar_vocab(tokenizer: Any, stop_token_ids: Sequence[int]) -> tuple[list[bytes], list[str]]:
    """The vocabulary as xgrammar reads it (token_bytes, each added token but the stop ones behind MARK) and the
    added tokens' texts (longest first), which structural tags write behind MARK where they need one. The other
    tokens holding MARK's byte (the byte token itself) become b"", which xgrammar never allows: MARK then comes
    only with an added token, so a marked place cannot be spelled out with plain tokens instead."""
    vocab = token_bytes(tokenizer)
    added = _backend(tokenizer).get_added_tokens_decoder()
    stops = set(stop_token_ids)
    for i, piece in enumerate(vocab):
        if i in added:
            vocab[i] = piece if i in stops else MARK + piece
        elif MARK in piece:
            vocab[i] = b""
    texts = sorted({t.content for i, t in added.items() if i not in stops and t.content}, key=len, reverse=True)
    return vocab, texts


def _key(constraint: StructuredOutputsParams) -> tuple[str, str]:
    """The cache key: which field is set, and its value as JSON text (key order kept: it orders the output)."""
    f = next(f.name for f in fields(constraint) if getattr(constraint, f.name) not in (None, False))
    return f, json.dumps(getattr(constraint, f), ensure_ascii=False)


class Matcher:
    """One sequence's place in its grammar (an xgrammar GrammarMatcher) and the mask of its next token."""

    def __init__(self, matcher: Any, width: int, mask: torch.Tensor | None = None):
        self._m = matcher
        self._width = width
        self._mask = mask  # [1, width] the next-token mask at the current state, once filled

    def accept(self, token: int) -> bool:
        """Advance over an appended token; True when that completed the constraint (a stop token accepted)."""
        if not self._m.accept_token(token):
            raise RuntimeError(f"token {token} was sampled although the grammar does not allow it")
        self._mask = None
        return self._m.is_terminated()

    @property
    def terminated(self) -> bool:
        return self._m.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int, drafts: Sequence[int] = ()) -> None:
        """Write into bitmask[row + j] the mask after drafts[:j], j = 0..len(drafts) (the rows that verify
        speculative drafts), and leave the state as it was. Rows after a refused or stopping draft stay
        all-allowed: the draft is rejected (its probability is 0) or ends the sequence, so they are unused."""
        if self._mask is None:
            self._mask = torch.empty(1, self._width, dtype=torch.int32)
            self._m.fill_next_token_bitmask(self._mask, 0)
        bitmask[row] = self._mask[0]
        accepted = 0
        for j, d in enumerate(drafts):
            if not self._m.accept_token(d):
                break
            accepted += 1
            if self._m.is_terminated():
                break
            self._m.fill_next_token_bitmask(bitmask, row + j + 1)
        if accepted:
            self._m.rollback(accepted)

    def copy(self) -> Matcher:
        """An independent matcher at the same state (a fork of the request's samples, n > 1)."""
        return Matcher(self._m.fork(), self._width, self._mask)


class Grammars:
    """An engine's constraints: the xgrammar vocabulary of its tokenizer (built on the first constraint) and an
    LRU of compiled grammars, so a constraint that repeats (a server's tool list, a schema) compiles once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_cached: int = 128,
                 threads: int | None = None, timeout_s: float | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_cached = max_cached
        self.threads = threads
        self.timeout_s = timeout_s  # None: compile in-process, unbounded (a library user's own constraints)
        self.max_bytes = MAX_CONSTRAINT_BYTES
        self.num_compiled = 0  # grammars compiled (cache misses)
        self._compiler: Any = None
        self._vocab: list[bytes] = []
        self._specials: re.Pattern | None = None  # the added tokens' texts, to mark in structural tags
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()  # add_request runs on the server's threads

    @property
    def width(self) -> int:
        """Int32 words per bitmask row."""
        return -(-self.vocab_size // 32)

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                self._compiler = self._build_compiler()
            return self._compiler

    def _build_compiler(self) -> Any:
        _xgrammar()  # (a clear error first when it is missing)
        if self.tokenizer is None:
            raise ValueError("constrained decoding needs the engine's tokenizer (Engine(model, tokenizer))")
        vocab, specials = grammar_vocab(self.tokenizer, self.stop_token_ids)
        if len(vocab) > self.vocab_size:
            raise ValueError(f"the tokenizer has {len(vocab)} ids but the model's vocab_size is {self.vocab_size}")
        if any(not 0 <= t < self.vocab_size for t in self.stop_token_ids):
            raise ValueError(f"eos ids {self.stop_token_ids} are not all in the model's vocabulary")
        self._vocab = vocab
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        return _new_compiler(vocab, self.vocab_size, self.stop_token_ids, self.threads or torch.get_num_threads())

    def compile(self, constraint: StructuredOutputsParams, cancelled: Callable[[], bool] | None = None) -> Any:
        """The compiled grammar (an xgrammar CompiledGrammar); ValueError with xgrammar's reason if it fails, or
        when it is past the bounds (size; with `timeout_s`, time: see the module's docstring). `cancelled()`
        turning true stops a bounded compile (CompileCancelled)."""
        compiler = self._get_compiler()
        key = _key(constraint)
        if len(key[1]) > self.max_bytes:
            raise ValueError(f"the {key[0]} constraint is {len(key[1])} bytes of JSON, over the limit of "
                             f"{self.max_bytes}")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        marked = self._marked(constraint)
        try:  # outside the lock: a long compile holds up no other request
            if self.timeout_s is None:
                compiled = _compile(compiler, marked)
            else:  # probed, then compiled, on a daemon thread: the caller can leave, and exit never waits for it
                def probed() -> Any:
                    self._probe(marked, cancelled)
                    return _compile(compiler, marked)

                compiled = _in_daemon(probed, cancelled)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"the {key[0]} constraint does not compile: {_LOCATION.sub('', str(e)).strip()}") from e
        with self._lock:
            self.num_compiled += 1
            self._cache[key] = compiled
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return compiled

    def _marked(self, constraint: StructuredOutputsParams) -> StructuredOutputsParams:
        """The constraint with MARK before the added tokens' texts in its structural tag's strings."""
        if constraint.structural_tag is None or self._specials is None:
            return constraint
        mark = MARK.decode()
        tag = _mark_strings(json.loads(constraint.structural_tag), lambda s: self._specials.sub(
            lambda m: mark + m.group(0), s))
        return StructuredOutputsParams(structural_tag=json.dumps(tag, ensure_ascii=False))

    def _probe(self, constraint: StructuredOutputsParams, cancelled: Callable[[], bool] | None) -> None:
        """Compile `constraint` in a child process first: ValueError when it fails there or takes more than
        `timeout_s` (from the moment the child is ready), CompileCancelled when `cancelled()` turns true."""
        context = _process_context()
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_probe_compile, daemon=True, name="seekling-grammar-probe", args=(
            sender, self._vocab, self.vocab_size, self.stop_token_ids, self.threads or 1, constraint))
        child.start()
        sender.close()
        deadline = None
        try:
            while True:
                if cancelled is not None and cancelled():
                    raise CompileCancelled("the grammar is no longer wanted")
                if deadline is not None and time.monotonic() > deadline:
                    raise ValueError(f"it takes more than {self.timeout_s:g} s to compile (the server's bound)")
                if not receiver.poll(0.05):
                    continue
                try:
                    kind, message = receiver.recv()
                except EOFError:  # the child died: killed for memory, most likely
                    raise ValueError("the grammar compiler ran out of memory") from None
                if kind == "ready":
                    deadline = time.monotonic() + self.timeout_s
                elif kind == "error":
                    raise ValueError(message)
                else:
                    return
        finally:
            if child.is_alive():
                child.kill()
            child.join()
            receiver.close()

    def matcher(self, constraint: StructuredOutputsParams, stop_token_ids: list[int] | None = None) -> Matcher:
        """A fresh matcher; a request's own `stop_token_ids` may end it too, besides the engine's eos ids."""
        xgr = _xgrammar()
        stops = sorted(set(self.stop_token_ids) | set(stop_token_ids)) if stop_token_ids else None
        return Matcher(xgr.GrammarMatcher(self.compile(constraint), override_stop_tokens=stops), self.width)

    def bitmask(self, rows: int) -> torch.Tensor:
        """[rows, width] int32, every token allowed."""
        return torch.full((rows, self.width), -1, dtype=torch.int32)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set the logits of the tokens each listed row's mask forbids to -inf, in place."""
        _xgrammar().apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def _new_compiler(vocab: list[bytes], vocab_size: int, stop_token_ids: list[int], threads: int) -> Any:
    xgr = _xgrammar()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    return xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)  # our cache is the one


@functools.cache
def _process_context() -> Any:
    """Children forked from a server process that has imported xgrammar once (its start costs seconds, on the first
    probe; each child then starts in milliseconds, and is safe to fork: that server runs no threads)."""
    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:  # (no forkserver on Windows)
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload(["seekling.engine.grammar", "xgrammar"])
    return context


def _in_daemon(fn: Callable[[], Any], cancelled: Callable[[], bool] | None) -> Any:
    """fn() on a daemon thread; CompileCancelled as soon as `cancelled()` turns true (fn goes on alone)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="seekling-grammar").start()
    while not done.wait(0.05):
        if cancelled is not None and cancelled():
            raise CompileCancelled("the grammar is no longer wanted")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _probe_compile(conn: Any, vocab: list[bytes], vocab_size: int, stop_token_ids: list[int], threads: int,
                   constraint: StructuredOutputsParams) -> None:
    """A probe child: build the compiler, say "ready", compile, say "ok" or ("error", why)."""
    try:
        compiler = _new_compiler(vocab, vocab_size, stop_token_ids, threads)
        conn.send(("ready", None))
        _compile(compiler, constraint)
        conn.send(("ok", None))
    except Exception as e:
        conn.send(("error", _LOCATION.sub("", str(e)).strip()))
    finally:
        conn.close()


def _mark_strings(node: Any, mark: Callable[[str], str]) -> Any:
    """A structural tag with `mark` applied to the strings it matches literally (tag begin/end, const strings,
    separators); JSON schemas inside are left alone."""
    if isinstance(node, list):
        return [_mark_strings(v, mark) for v in node]
    if not isinstance(node, dict) or node.get("type") == "json_schema":
        return node
    literal = {"begin", "end", "separator"} | ({"value"} if node.get("type") == "const_string" else set())
    return {k: mark(v) if k in literal and isinstance(v, str) else _mark_strings(v, mark) for k, v in node.items()}


# JSON's whitespace, wherever the engine constrains JSON: at most one whitespace character in a row. A weak model
# otherwise can loop on spaces and newlines until max_tokens; one character still lets it write `{"a": 1}`.
WHITESPACE = 1


def _compile(compiler: Any, c: StructuredOutputsParams) -> Any:
    """Each field as the contract says."""
    if c.json is not None or c.json_object:
        schema = lengths_as_patterns(c.json) if c.json is not None else {"type": "object"}
        return compiler.compile_json_schema(json.dumps(schema), max_whitespace_cnt=WHITESPACE)
    if c.regex is not None:
        return compiler.compile_regex(c.regex)
    if c.choice is not None:  # JSON string literals are valid EBNF ones (same escapes)
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in c.choice))
    if c.grammar is not None:
        return compiler.compile_grammar(c.grammar)
    tag = json.dumps(_tag_schemas(json.loads(c.structural_tag)))
    return compiler.compile_grammar(_xgrammar().Grammar.from_structural_tag(tag))


def _tag_schemas(node: Any) -> Any:
    """A structural tag whose JSON contents follow the same rules as `json` (`lengths_as_patterns`, WHITESPACE
    unless the tag sets its own)."""
    if isinstance(node, list):
        return [_tag_schemas(v) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema":
        return {"max_whitespace_cnt": WHITESPACE, **node, "json_schema": lengths_as_patterns(node.get("json_schema"))}
    return {k: _tag_schemas(v) for k, v in node.items()}


_VALUES = {"enum", "const", "default", "examples"}  # keywords whose values are data, not schemas


def lengths_as_patterns(node: Any) -> Any:
    """A copy of a JSON Schema with every string's minLength/maxLength written as the equivalent pattern.
    xgrammar (0.2.9) compiles a length bound to a repetition of a class that excludes only the quote, the
    backslash, CR and LF: raw control characters get through (a tab in a string is invalid JSON) and no escape
    can be written (mlc-ai/xgrammar#800). Its `pattern` path is JSON-aware. Drop this once xgrammar fixes the bug."""
    if isinstance(node, list):
        return [lengths_as_patterns(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in _VALUES else lengths_as_patterns(v) for k, v in node.items()}
    kind = out.get("type")
    string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    if string and ("minLength" in out or "maxLength" in out) and "pattern" not in out and "format" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^.{{{low},{high}}}$"
    return out
