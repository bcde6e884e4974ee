import json
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from seekling.tasks import corpus_text
from seekling.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    THINK_END,
    THINK_START,
    USER,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

EXTRA = ["Héllo wörld, naïve café — 日本語のテキスト 🙂🚀 ünïcödé", "Be concise. Show your work.", "x" * 40]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Be concise."}, {"role": "user", "content": "What is 7 * 8?"}],
    [  # multi-turn with earlier reasoning (dropped), a training sample at the end (kept)
        {"role": "system", "content": "Be concise."},
        {"role": "system", "content": "Show your work."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "\\boxed{4}", "reasoning_content": "2+2=4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\n\\boxed{6}"},
        {"role": "user", "content": "And 5 + 5? 日本 🙂"},
        {"role": "assistant", "content": "\\boxed{10}", "reasoning_content": "5+5=10"},
    ],
    [  # reasoning under transformers' alias name, and content=None (dropped like a missing key)
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "thinking": "say hi"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],  # no reasoning at all
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(list(corpus_text(150, seed=0)) + EXTRA * 3, vocab_size=1024)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf(saved):
    return AutoTokenizer.from_pretrained(str(saved))


def test_chat_template_renders_the_r1_format(tok):
    text = tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=False)
    assert text == (
        f"{BOS}Be concise.\n\nShow your work.{USER}What is 2 + 2?{ASSISTANT}\\boxed{{4}}{EOS}"
        f"{USER}And 3 + 3?{ASSISTANT}\\boxed{{6}}{EOS}"
        f"{USER}And 5 + 5? 日本 🙂{ASSISTANT}<think>\n5+5=10\n</think>\n\n\\boxed{{10}}{EOS}"
    )
    prompt = tok.apply_chat_template(CONVERSATIONS[1])
    assert prompt == f"{BOS}Be concise.{USER}What is 7 * 8?{ASSISTANT}<think>\n"
    assert tok.apply_chat_template(CONVERSATIONS[4], add_generation_prompt=False).endswith(
        f"{ASSISTANT}<think>\n\n</think>\n\nHello!{EOS}")
    assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=True) == tok.encode(
        tok.apply_chat_template(CONVERSATIONS[0]))
    with pytest.raises(jinja2.TemplateError, match="unsupported chat role"):
        tok.apply_chat_template([{"role": "bot", "content": "42"}])
    with pytest.raises(jinja2.TemplateError, match="must follow an assistant message with tool_calls"):
        tok.apply_chat_template([{"role": "tool", "content": "42"}])
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])


def test_transformers_loads_it_and_renders_identically(tok, hf):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                   tok.pad_token_id)
    assert len(hf) == tok.vocab_size
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            ours = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
            theirs = hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                            tokenize=False)
            assert ours == theirs
            theirs_ids = hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, return_dict=False)
            assert tok.apply_chat_template(conversation, add_generation_prompt, tokenize=True) == theirs_ids
    for text in EXTRA + [f"{BOS}x{THINK_START}12{THINK_END}{EOS}"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == hf.decode(
            tok.encode(text), skip_special_tokens=True)


def test_jinja_environment_matches_transformers(tok, hf):
    # The globals and filters transformers gives templates, and its trim_blocks/lstrip_blocks rules.
    template = (
        "{% for m in messages %}\n    {{ m | tojson }}|{{ m['content'] | tojson(indent=1) }}\n{% endfor %}"
        "{{ strftime_now('%Y') }}{% if add_generation_prompt %}GEN{% endif %}{{ bos_token }}"
    )
    conversation = [{"role": "user", "content": "<b>é \"q\"</b>", "reasoning": "r"}]
    custom = Tokenizer(tok.tokenizer, template, tok.bos_token, tok.eos_token)
    expected = hf.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                      add_generation_prompt=True)
    assert custom.apply_chat_template(conversation) == expected
    assert '"reasoning_content": "r"' in expected and "<b>é" in expected  # no HTML escaping, aliasing done


def test_round_trip_and_special_tokens(tok):
    for text in EXTRA + ["What is 487 + 56?\n\n  tabs\tand spaces  ", ""]:
        assert tok.decode(tok.encode(text)) == text
    for token in (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END):
        ids = tok.encode(token)
        assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(token)
        assert tok.id_to_token(ids[0]) == token
        assert tok.encode(f"a{token}b")[1] == ids[0]  # recognised inside text
    assert tok.think_start_id == tok.convert_tokens_to_ids(THINK_START) is not None
    assert tok.think_end_id == tok.convert_tokens_to_ids(THINK_END) is not None
    assert tok.pad_token_id == tok.eos_token_id and tok.bos_token_id != tok.eos_token_id
    assert not {tok.bos_token_id, tok.eos_token_id} & set(tok.encode("hi"))  # no automatic bos/eos
    assert BOS not in tok.decode(tok.encode(f"{BOS}hi{EOS}"), skip_special_tokens=True)
    thought = tok.encode(f"{BOS}{THINK_START}x{THINK_END}")
    assert tok.decode(thought, skip_special_tokens=True) == "<think>x</think>"
    assert 256 < tok.vocab_size <= 1024
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_digits_are_single_tokens(tok):
    ids = tok.encode("1234567890 + 98765 = 1333332655")
    digit_tokens = [t for t in (tok.id_to_token(i) for i in ids) if any(c.isdigit() for c in t)]
    assert len(digit_tokens) == 25 and all(len(t) == 1 for t in digit_tokens)
    assert "".join(digit_tokens) == "1234567890987651333332655"


def test_encode_sft_masks_exactly_the_assistant_turn(tok):
    conversation = CONVERSATIONS[2]
    ids, mask = tok.encode_sft(conversation)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    start = mask.index(1)
    assert mask == [0] * start + [1] * (len(ids) - start)
    assert tok.decode(ids[:start]) == tok.apply_chat_template(conversation[:-1], add_generation_prompt=True)
    assert tok.decode(ids[start:]) == f"5+5=10\n</think>\n\n\\boxed{{10}}{EOS}"
    assert ids[start - 2: start] == [tok.think_start_id] + tok.encode("\n")  # the prompt ends "<think>\n"
    assert ids[-1] == tok.eos_token_id
    assert ids == tok.apply_chat_template(conversation, add_generation_prompt=False, tokenize=True)
    # empty reasoning: "\n\n" would merge across the boundary, so the prompt is encoded on its own
    ids, mask = tok.encode_sft(CONVERSATIONS[4])
    start = mask.index(1)
    assert ids[:start] == tok.apply_chat_template(CONVERSATIONS[4][:-1], tokenize=True)
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATIONS[4], add_generation_prompt=False)
    assert tok.decode(ids[start:]) == f"\n</think>\n\nHello!{EOS}"
    with pytest.raises(ValueError, match="assistant"):
        tok.encode_sft(CONVERSATIONS[0])


def test_save_load_round_trip(tok, saved, hf, tmp_path):
    loaded = load_tokenizer(saved)
    assert loaded.tokenizer.to_str() == tok.tokenizer.to_str()
    assert (loaded.chat_template, loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tok.chat_template, BOS, EOS, EOS)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 4096
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    # a directory written by transformers (chat_template.jinja, AddedToken dicts) loads the same
    hf.save_pretrained(tmp_path / "hf")
    from_hf = load_tokenizer(tmp_path / "hf")
    for conversation in CONVERSATIONS:
        assert from_hf.apply_chat_template(conversation) == tok.apply_chat_template(conversation)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": BOS, "lstrip": False, "special": True}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path / "hf").bos_token_id == tok.bos_token_id


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_unknown_special_token_is_an_error(tok):
    with pytest.raises(ValueError, match="not in the tokenizer"):
        Tokenizer(tok.tokenizer, bos_token="<nope>")


# DeepSeek-R1-Distill-Llama's chat template (tokenizer_config.json of the released checkpoints), split for
# line length only; it exercises namespace(), `is none`, tojson and R1's stripping of earlier reasoning.
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['arguments']"
    " if tool['function']['arguments'] is string else tool['function']['arguments'] | tojson) + '\\n' + '```'"
    " + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n'"
    " + '```json' + '\\n' + (tool['function']['arguments'] if tool['function']['arguments'] is string"
    " else tool['function']['arguments'] | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def test_loads_an_r1_distill_style_directory(tok, tmp_path):
    # The released layout: a foreign chat template, AddedToken dicts for bos/eos, a different tokenizer_class.
    (tmp_path / "tokenizer.json").write_text(tok.tokenizer.to_str())
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,
                       "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS), "eos_token": added(EOS),
              "pad_token": added(EOS), "tokenizer_class": "PreTrainedTokenizerFast", "legacy": True,
              "model_max_length": 16384, "chat_template": R1_DISTILL_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.model_max_length == 16384 and ours.bos_token_id == theirs.bos_token_id
    # (transformers drops content=None keys, which R1's tool-call branch cannot render, so no tool calls here)
    tool_turns = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Looking."},
                  {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"}]
    for conversation in CONVERSATIONS[:3] + CONVERSATIONS[4:] + [tool_turns]:
        for add_generation_prompt in (True, False):
            expected = theirs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
            assert ours.apply_chat_template(conversation, add_generation_prompt) == expected
    assert "old thoughts" not in ours.apply_chat_template(CONVERSATIONS[2])
    assert ours.apply_chat_template(tool_turns).endswith(
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>warm"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_namespace_rejects_underscore_attributes(tok):
    sneaky = Tokenizer(tok.tokenizer, "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}{{ ns.a }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        sneaky.apply_chat_template(CONVERSATIONS[0])
