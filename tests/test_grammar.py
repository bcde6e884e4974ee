"""Constrained decoding: seekling/engine/grammar.py (the vocabulary as xgrammar reads it, the compiled-grammar
cache, per-sequence matchers) and the engine's masked sampler on tiny random models: every constrained output
is valid (json_schema, json_object, choice, regex, the DeepSeek tool-call structural tag) in mixed batches,
with n > 1 forks, preemption and MTP speculative decoding, which keeps the constrained distribution
(chi-square); bad constraints are refused at add_request; unconstrained batches never touch a grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from test_engine import chi_square, prompts_of, tiny_model
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from seekling.engine import Engine, SamplingParams
from seekling.engine import grammar as grammar_mod
from seekling.engine.grammar import Grammars, token_bytes
from seekling.engine.sampling import StructuredOutputsParams as S
from seekling.serve.tools import FORMATS, DeepSeekParser, tool_constraint
from seekling.tokenizer import Tokenizer, train_tokenizer

pytest.importorskip("xgrammar")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
    "required": ["name", "age", "role"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", 'say "hi"\n']
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ['{"name": "Ada", "age": 36, "role": "user", "tags": ["x", "y"]} 123-ab'] * 20
    texts += ["The quick brown fox jumps over the lazy dog. Café crème 日本語."] * 20
    return train_tokenizer(texts, vocab_size=340)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=tok.vocab_size, seed=1)


def allowed(bitmask: torch.Tensor, row: int) -> set[int]:
    bits = (bitmask[row].unsqueeze(-1) >> torch.arange(32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def valid(constraint: S, text: str) -> bool:
    if constraint.json is not None:
        jsonschema.validate(json.loads(text), constraint.json)
        return True
    if constraint.json_object:
        return isinstance(json.loads(text), dict)
    if constraint.regex is not None:
        return re.fullmatch(constraint.regex, text) is not None
    return text in constraint.choice


# ---------------------------------------------------------------------------------------------- grammar.py


def test_token_bytes_are_what_the_engine_decodes(tok):
    """Every id's bytes, added and special tokens included, decode to the engine's text of that id, and the bytes
    of a text's tokens (multi-byte characters split over several) join into its UTF-8."""
    vocab = token_bytes(tok)
    assert len(vocab) == tok.vocab_size
    for i, b in enumerate(vocab):
        assert b.decode("utf-8", errors="replace") == tok.decode([i])
    text = "Café 日本語 <think> 😀</think>"
    assert b"".join(vocab[i] for i in tok.encode(text)) == text.encode()
    # A transformers fast tokenizer (its backend_tokenizer) reads the same.
    transformers = pytest.importorskip("transformers")
    assert token_bytes(transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer)) == vocab


def test_non_byte_level_tokenizers_and_missing_pieces_are_refused(tok, monkeypatch):
    meta = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    meta.pre_tokenizer, meta.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    with pytest.raises(ValueError, match="byte-level BPE"):
        token_bytes(Tokenizer(meta, None, None, "[UNK]"))
    with pytest.raises(ValueError, match="tokenizer"):
        Grammars(None, 300, [1]).compile(S(regex="a"))
    with pytest.raises(ValueError, match="vocab_size"):
        Grammars(tok, tok.vocab_size - 1, [1]).compile(S(regex="a"))

    def no_module(name):
        raise ImportError(name)

    monkeypatch.setattr(grammar_mod.importlib, "import_module", no_module)
    grammar_mod._xgrammar.cache_clear()  # as in a process where xgrammar was never imported
    try:
        with pytest.raises(ValueError, match="pip install xgrammar"):
            Grammars(tok, tok.vocab_size, [1]).compile(S(regex="a"))
    finally:
        grammar_mod._xgrammar.cache_clear()


def test_compiled_once_per_constraint_and_errors_keep_xgrammars_message(tok):
    g = Grammars(tok, tok.vocab_size, [tok.eos_token_id], max_cached=2)
    a = g.compile(S(json=PERSON))
    assert g.compile(S(json=json.dumps(PERSON))) is a and g.num_compiled == 1  # the same schema, as JSON text
    reordered = dict(reversed(PERSON.items()))  # key order orders the output: another grammar
    g.compile(S(json=reordered))
    g.compile(S(regex=REGEX))  # evicts the least recently used (PERSON)
    assert g.num_compiled == 3 and g.compile(S(json=PERSON)) is not a and g.num_compiled == 4
    bad_tag = json.dumps({"type": "structural_tag", "format": {"type": "nope"}})
    for constraint, message in ((S(regex=r"(a)\1"), "Backreference is not supported"),
                                (S(grammar="root ::= foo"), 'Rule "foo" is not defined'),
                                (S(json={"type": "nope"}), 'Unsupported type "nope"'),
                                (S(json={"type": "string", "minLength": 5, "maxLength": 2}), "Lower bound is larger"),
                                (S(structural_tag=bad_tag), "nope")):
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            g.compile(constraint)
        assert not re.search(r"\.cc:\d+", str(e.value))  # xgrammar's source location is dropped


def test_matcher_fill_rolls_back_drafts_and_copies_are_independent(tok):
    V = tok.vocab_size + 5  # a model vocabulary padded past the tokenizer's
    eos = tok.eos_token_id
    g = Grammars(tok, V, [eos])
    ids = tok.encode("123-ab")
    m = g.matcher(S(regex=REGEX))
    step = g.matcher(S(regex=REGEX))
    masks = g.bitmask(len(ids) + 1)
    m.fill(masks, 0, ids)  # every row at once, as a verification of drafts fills them
    for j, t in enumerate(ids):
        one = g.bitmask(1)
        step.fill(one, 0)
        assert allowed(masks, j) == allowed(one, 0) and t in allowed(one, 0)
        assert not allowed(one, 0) & set(range(tok.vocab_size, V))  # padded ids: never
        assert not step.accept(t)
    assert allowed(masks, len(ids)) == {eos}  # complete: only the stop token
    assert step.accept(eos) and step.terminated
    # fill() left m where it was: it accepts the same tokens, and a copy moves on its own.
    again = g.bitmask(1)
    m.fill(again, 0)
    assert allowed(again, 0) == allowed(masks, 0)
    twin = m.copy()
    for t in ids:
        twin.accept(t)
    m.fill(again, 0)
    assert allowed(again, 0) == allowed(masks, 0)
    with pytest.raises(RuntimeError, match="does not allow"):
        m.accept(tok.encode("x")[0])
    # A request's stop_token_ids may end a completed constraint too.
    extra = g.matcher(S(regex=REGEX), stop_token_ids=[5])
    for t in ids:
        extra.accept(t)
    end = g.bitmask(1)
    extra.fill(end, 0)
    assert allowed(end, 0) == {eos, 5}


def accepts(g: Grammars, constraint: S, text: str) -> bool:
    """Whether the constraint takes `text` whole (then only the stop token)."""
    m = g.matcher(constraint)
    try:
        for t in g.tokenizer.encode(text):
            m.accept(t)
    except RuntimeError:
        return False
    end = g.bitmask(1)
    m.fill(end, 0)
    return allowed(end, 0) == set(g.stop_token_ids)


def test_json_rules_bounded_strings_and_whitespace(tok):
    """A string's length bound compiles through a pattern (xgrammar's own length path lets a raw tab through);
    JSON whitespace is at most one character in a row, in `json` and inside structural tags alike."""
    g = Grammars(tok, tok.vocab_size, [tok.eos_token_id])
    schema = {"type": "object", "properties": {"s": {"type": ["string", "null"], "maxLength": 3},
                                               "e": {"enum": [{"type": "string", "maxLength": 1}]}}}
    assert grammar_mod.lengths_as_patterns(schema)["properties"] == {
        "s": {"type": ["string", "null"], "pattern": "^.{0,3}$"}, "e": schema["properties"]["e"]}
    tag = S(structural_tag=json.dumps({"type": "structural_tag", "format": {
        "type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</a>"}}))
    for c, wrap in ((S(json=schema), "{}"), (tag, "<a>{}</a>")):
        assert accepts(g, c, wrap.format('{"s": "abc"}')) and accepts(g, c, wrap.format('{"s":null}'))
        assert not accepts(g, c, wrap.format('{"s": "a\tb"}')) and not accepts(g, c, wrap.format('{"s": "abcd"}'))
        assert accepts(g, c, wrap.format('{\n"s": "a"}')) and not accepts(g, c, wrap.format('{\n  "s": "a"}'))


# ---------------------------------------------------------------------------------------------- the engine


def test_every_kind_holds_in_a_mixed_batch_and_free_rows_are_untouched(model, tok):
    """Constrained rows of every kind, greedy and seeded, in one batch with unconstrained ones; the unconstrained
    outputs are those each gives alone (no mask leaks across rows)."""
    constraints = [S(json=PERSON), S(json=PERSON), S(json_object=True), S(choice=CHOICES), S(regex=REGEX)]
    free = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3)]
    # (A random model rarely closes a free string: json_object samples at 0.5, where it does within the budget.)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=200, structured_outputs=c)
              for i, (c, t) in enumerate(zip(constraints, [0, 1.0, 0.5, 1.0, 0], strict=True))]
    prompts = ["The quick brown", '{"name":', "Café", "The lazy dog", "123 +", "fox", "dog"]
    engine = Engine(model, tok, block_size=4)
    outs = engine.generate(prompts, params + free)
    for c, o in zip(constraints, outs[:5], strict=True):
        assert o.finish_reason == "stop" and o.token_ids[-1] in engine.eos_token_ids, (c, o.text)  # (eos, <｜User｜>)
        assert valid(c, o.text), (c, o.text)
    for p, prompt, o in zip(free, prompts[5:], outs[5:], strict=True):
        assert o.token_ids == Engine(model, tok).generate([prompt], p)[0].token_ids
    assert engine.grammars.num_compiled == 4 and engine.stats()["cache_blocks_used"] == 0


def test_deepseek_tool_call_tag_gives_calls_valid_for_their_schema(model, tok):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    engine = Engine(model, tok)
    for parallel, seed in ((False, 0), (True, 2), (True, 4)):  # (seeds whose answers end within max_tokens)
        c = tool_constraint(FORMATS["deepseek"], TOOLS, parallel, reasoning=False)
        out = engine.generate(["Weather in Paris?"], SamplingParams(temperature=1.0, seed=seed, max_tokens=150,
                                                                    structured_outputs=c))[0]
        assert out.finish_reason == "stop", out.text
        parser = DeepSeekParser(parallel)
        events = parser.push(out.text) + parser.push("", final=True)
        starts = [e for e in events if type(e).__name__ == "CallStart"]
        assert starts and (parallel or len(starts) == 1)
        assert not [e for e in events if type(e).__name__ == "Text"]  # nothing but calls
        for s in starts:
            args = "".join(e.text for e in events if type(e).__name__ == "CallArgs" and e.index == s.index)
            jsonschema.validate(json.loads(args), schemas[s.name])


def test_n_samples_are_each_valid_and_match_their_seeds(model, tok):
    c = S(json=PERSON)
    params = SamplingParams(n=3, temperature=1.0, seed=20, max_tokens=80, structured_outputs=c)
    out = Engine(model, tok, block_size=4).generate(["The quick brown"], params)[0]
    for i, o in enumerate(out.outputs):  # the forks copy the parent's matcher; sample i uses seed + i
        assert o.finish_reason == "stop" and valid(c, o.text)
        single = SamplingParams(temperature=1.0, seed=20 + i, max_tokens=80, structured_outputs=c)
        assert Engine(model, tok).generate(["The quick brown"], single)[0].token_ids == o.token_ids


@pytest.mark.parametrize("budget", [4096, 8])  # 8: chunked prefills, and drafts dropped for lack of budget
def test_speculative_constrained_greedy_equals_plain(model, tok, budget):
    prompts = ["The quick brown", "Café crème", '{"age":']
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=c)
              for c in (S(json=PERSON), S(regex=REGEX), S(choice=CHOICES))]
    plain = Engine(model, tok, block_size=4).generate(prompts, params)
    engine = Engine(model, tok, block_size=4, speculative=True, max_num_batched_tokens=budget)
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert all(o.finish_reason == "stop" for o in spec) and engine.stats()["spec_drafted"] > 0


@pytest.mark.parametrize("speculative", [False, True])
def test_preemption_does_not_replay_the_matcher(model, tok, speculative):
    prompts = prompts_of([10, 11, 12, 13], vocab=tok.vocab_size, seed=2)
    params = SamplingParams(temperature=0, max_tokens=30, structured_outputs=S(json=PERSON))
    roomy = Engine(model, tok, block_size=4, speculative=speculative).generate(prompts, params)
    engine = Engine(model, tok, max_num_seqs=4, block_size=4, cache_blocks=14, speculative=speculative)
    tight = engine.generate(prompts, params)
    assert engine.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_a_completed_constraint_stops_even_with_ignore_eos(model, tok):
    out = Engine(model, tok).generate(["fox"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                              structured_outputs=S(regex=REGEX)))[0]
    assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text) and out.token_ids[-1] in (
        tok.eos_token_id, tok.encode("<｜User｜>")[0])  # (every stop token may end a completed constraint)


def test_bad_constraints_are_refused_at_add_request(model, tok):
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="regex constraint does not compile: .*Lookahead is not supported"):
        engine.add_request("fox", SamplingParams(structured_outputs=S(regex="(?=a)a")))
    with pytest.raises(ValueError, match="needs the engine's tokenizer"):
        Engine(model).add_request([5, 6], SamplingParams(structured_outputs=S(regex="a")))
    assert not engine.has_unfinished()  # nothing was queued
    assert engine.generate(["fox"], SamplingParams(max_tokens=20, structured_outputs=S(choice=["no"])))[0].text == "no"


def test_unconstrained_batches_never_touch_a_grammar(model, tok, monkeypatch):
    def boom(*args):
        raise AssertionError("a mask was built for an unconstrained batch")

    monkeypatch.setattr(Grammars, "bitmask", boom)
    for spec in (False, True):
        engine = Engine(model, tok, speculative=spec)
        engine.generate(["fox", "dog"], [SamplingParams(temperature=0, max_tokens=6),
                                         SamplingParams(temperature=1.0, max_tokens=6)])
        assert engine.grammars._compiler is None  # not even the vocabulary was read


def test_speculative_sampling_keeps_the_constrained_distribution():
    """The joint law of the first two tokens under a regex `[a-d][b-f]` (then only eos), sampled with MTP
    speculation (the second token is drafted from the masked MTP distribution and verified with the matcher
    advanced over the draft), against the exact masked, renormalised law of the model (chi-square)."""
    letters = "abcdef"
    hf = HFTokenizer(models.BPE({c: i for i, c in enumerate(letters)}, []))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.add_special_tokens([AddedToken("<eos>", special=True)])
    tok = Tokenizer(hf, None, None, "<eos>")
    V, eos = 8, 6  # the model's vocabulary is padded past the tokenizer's 7 ids
    model = tiny_model(vocab_size=V, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(6)
    prompt = [2, 3, 4]
    first, second = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4, 5])  # [a-d], [b-f]
    with torch.no_grad():
        logits1 = model(torch.tensor([prompt])).logits[0, -1]
        logits2 = model(torch.tensor([prompt + [t] for t in first.tolist()])).logits[:, -1]
    p1 = logits1[first].softmax(-1)
    p2 = logits2[:, second].softmax(-1)
    joint = (p1[:, None] * p2).flatten()
    assert logits1[first].softmax(-1).max() < 0.9  # the masked law is not degenerate
    engine = Engine(model, tok, max_num_seqs=64, speculative=True)
    c = S(regex="[a-d][b-f]")
    params = [SamplingParams(n=64, temperature=1.0, max_tokens=3, seed=64 * i, structured_outputs=c)
              for i in range(40)]
    counts = torch.zeros(len(first) * len(second))
    for out in engine.generate([prompt] * 40, params):
        for o in out.outputs:
            assert o.token_ids[2] == eos and o.finish_reason == "stop"
            counts[o.token_ids[0] * len(second) + second.tolist().index(o.token_ids[1])] += 1
    chi2, limit = chi_square(joint, counts)
    assert chi2 < limit, (chi2, limit)
    assert 0.05 < engine.stats()["spec_acceptance_rate"] < 0.95
