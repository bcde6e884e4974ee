"""Incremental detokenisation, stop strings and the reasoning split, as a stream of text deltas.

Three stages, each holding back only what it must:
1. `IncrementalDecoder`: byte-level BPE can split one UTF-8 character over several tokens; decoding
   a partial character yields U+FFFD. We decode the ids since a stable prefix (the usual
   prefix_offset / read_offset scheme of TGI and vLLM) and release text only when it does not end
   in U+FFFD, so a half character is never emitted.
2. `TextStream` stop strings: the text is cut where a stop string starts; a tail that could be the
   beginning of a stop string is held back until the next delta decides it.
3. The reasoning split: when the prompt opened `<think>`, text before `</think>` is reasoning and
   the rest is the answer (leading newlines stripped, and the newline before `</think>`). A completion may
   also open the block itself (DeepSeek-R1-0528's and Qwen3's generation prompts stop at the assistant
   tag): when its first non-blank text is `<think>` the same split applies; until that is decided a
   completion's first characters are held back only while they could still be `<think>`.
"""

from __future__ import annotations

from typing import Any

THINK_START, THINK_END = "<think>", "</think>"


class IncrementalDecoder:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        # A few prompt tokens as context, so a leading space or merge decodes as in the full text.
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_ids: list[int]) -> str:
        """New complete text after appending token_ids ('' while a character is still incomplete): one pair of
        decodes for the whole group."""
        if not token_ids:
            return ""
        self.ids.extend(token_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held (an incomplete character decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


def _held_tail(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the markers."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class TextStream:
    """Turns decoded text pieces into (reasoning, text) deltas, applying stop strings."""

    def __init__(self, stop: list[str], in_think: bool):
        self.stop = stop
        self.pending = ""  # decoded text not yet released past the stop-string check
        self.in_think = in_think
        self.may_open_think = not in_think  # the completion has not shown yet whether it opens <think>
        self.head = ""  # the completion's first text while that is undecided
        self.think_pending = ""  # released text not yet assigned to reasoning or answer
        # Leading newlines of the reasoning and of the answer are stripped until each starts.
        self.reasoning_started = False
        self.answer_started = not in_think
        self.stopped = False  # a stop string was found

    def push(self, piece: str, final: bool = False) -> tuple[str, str]:
        """Add decoded text; returns the (reasoning, text) that can be released now. `final` flushes."""
        if self.stopped:
            return "", ""
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            released, self.pending, self.stopped, final = self.pending[:cut], "", True, True
        else:
            hold = 0 if final else _held_tail(self.pending, self.stop)
            keep = len(self.pending) - hold
            released, self.pending = self.pending[:keep], self.pending[keep:]
        return self._split(released, final)

    def _split(self, released: str, final: bool) -> tuple[str, str]:
        if self.may_open_think:
            self.head += released
            lead = self.head.lstrip()
            if lead.startswith(THINK_START):
                released, self.in_think, self.answer_started = lead[len(THINK_START):], True, False
            elif THINK_START.startswith(lead) and not final:
                return "", ""  # "", "<", "<th"...: the next piece decides
            else:
                released = self.head
            self.may_open_think, self.head = False, ""
        reasoning = ""
        if self.in_think:
            self.think_pending += released
            end = self.think_pending.find(THINK_END)
            if end < 0:
                hold = 0 if final else _held_tail(self.think_pending, ["\n" + THINK_END, THINK_END])
                reasoning = self.think_pending[:len(self.think_pending) - hold]
                self.think_pending = self.think_pending[len(self.think_pending) - hold:]
                return self._reasoning(reasoning), ""
            reasoning = self.think_pending[:end]
            reasoning = self._reasoning(reasoning[:-1] if reasoning.endswith("\n") else reasoning)
            released = self.think_pending[end + len(THINK_END):]
            self.think_pending, self.in_think = "", False
        if not self.answer_started:
            released = released.lstrip("\n")
            self.answer_started = bool(released)
        return reasoning, released

    def _reasoning(self, text: str) -> str:
        if not self.reasoning_started:
            text = text.lstrip("\n")
            self.reasoning_started = bool(text)
        return text


def prompt_opens_think(prompt_text: str) -> bool:
    """The R1 generation prompt ends with `<think>\\n`: the completion starts inside the think block."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_START)


# Tokens that open a user's turn in the chat templates seekling renders (DeepSeek's, which the R1-Distill Qwen and
# Llama tokenizers share; Qwen's ChatML; Llama 3's header). A model that writes one has finished its answer and
# started imagining the user's: it stops there, as the exported Modelfile's `stop` says.
TURN_STARTS = ("<｜User｜>", "<|im_start|>", "<|start_header_id|>")


def turn_start_ids(tokenizer: Any) -> set[int]:
    """The ids of the TURN_STARTS that are single tokens of `tokenizer` (none without a tokenizer)."""
    if tokenizer is None:
        return set()
    found = set()
    for text in TURN_STARTS:
        ids = tokenizer.encode(text)
        if len(ids) == 1 and tokenizer.decode(ids) == text:
            found.add(ids[0])
    return found
