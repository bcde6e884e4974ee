"""DeepSeek-R1-0528-Qwen3-8B's chat format: seekling's R1_0528_TEMPLATE renders every conversation as the release's
own template does, and a completion that opens its own <think> block is split into reasoning and answer."""

from __future__ import annotations

import json
import random

import pytest
import torch

from seekling.engine import Engine, SamplingParams
from seekling.engine.detok import TextStream
from seekling.model.families import FAMILIES
from seekling.tokenizer import BOS, EOS, R1_0528_TEMPLATE, THINK_END, THINK_START, render_chat, train_tokenizer

transformers = pytest.importorskip("transformers")

# The chat_template of deepseek-ai/DeepSeek-R1-0528-Qwen3-8B's tokenizer_config.json, as published (one line
# there; split here only to fit the page). Test data: seekling's template is written separately.
R1_0528_RELEASE_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='',"
    " is_first_sp=true, is_last_user=false) %}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{% set content = message['content'] %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}"
    "{{'<｜User｜>' + content + '<｜Assistant｜>'}}{%- endif %}{%- if message['role'] == 'assistant' %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{% endif %}{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and"
    " message['tool_calls'] is not none %}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}"
    "{%- set ns.is_output_first = true %}{%- for tool in message['tool_calls'] %}"
    "{%- if not ns.is_first %}{%- if content is none %}"
    "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' +"
    " tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```'"
    " + '<｜tool▁call▁end｜>'}}{%- else %}"
    "{{content + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' +"
    " tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```'"
    " + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' +"
    " '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or"
    " message['tool_calls'] is none)%}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + content + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    "{% endif %}"
)
SPECIAL = {"bos_token": BOS, "eos_token": EOS}


def call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "system", "content": ""},
     {"role": "system", "content": "Show work."}, {"role": "user", "content": "Hi 🙂"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"},
     {"role": "user", "content": "And?"}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "", "tool_calls": [call("get_weather", '{"city": "Paris"}'),
                                                         call("get_time", "{}")]},
     {"role": "tool", "content": "18C"}, {"role": "tool", "content": "noon"},
     {"role": "assistant", "content": "It is 18C at noon."}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "Let me look.", "tool_calls": [call("get_weather", '{"city": "Oslo"}')]},
     {"role": "tool", "content": "-3C"}],  # ends in tool outputs: no generation prompt
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],  # ends with the assistant
]


def random_conversation(rng: random.Random) -> list[dict]:
    """Any order of roles the release template accepts, with reasoning in content and calls now and then."""
    messages = [{"role": "system", "content": rng.choice(["", "S1", "Be kind.\n"])} for _ in range(rng.randrange(3))]
    for _ in range(rng.randrange(1, 7)):
        role = rng.choice(["user", "assistant", "assistant", "tool"])
        text = rng.choice(["x", "", "two\nlines", "<think>\nr\n</think>\n\nans", "a</think>b</think>c"])
        message = {"role": role, "content": text}
        if role == "assistant" and rng.random() < 0.4:
            message["tool_calls"] = [call(f"f{i}", json.dumps({"n": i})) for i in range(rng.randrange(1, 3))]
        messages.append(message)
    return messages


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_as_the_release(generation_prompt):
    rng = random.Random(0)
    conversations = CONVERSATIONS + [random_conversation(rng) for _ in range(300)]
    for messages in conversations:
        want = render_chat(messages, generation_prompt, R1_0528_RELEASE_TEMPLATE, **SPECIAL)
        assert render_chat(messages, generation_prompt, R1_0528_TEMPLATE, **SPECIAL) == want, messages
    assert FAMILIES["qwen3"].chat_template == R1_0528_TEMPLATE


def test_transformers_renders_the_release_as_we_do(tmp_path):
    """The release's text through transformers' own apply_chat_template (not just our Jinja environment)."""
    tok = train_tokenizer(["Hi there. What is 2 + 2?"] * 10, vocab_size=300)
    tok.chat_template = R1_0528_RELEASE_TEMPLATE
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert render_chat(messages, True, R1_0528_TEMPLATE, **SPECIAL) == want
    prompt = render_chat(CONVERSATIONS[0], True, R1_0528_TEMPLATE, **SPECIAL)
    assert prompt.endswith("<｜User｜>What is 2 + 2?<｜Assistant｜>")  # the model opens <think> itself
    no_think = render_chat(CONVERSATIONS[0], True, R1_0528_TEMPLATE, thinking=False, **SPECIAL)
    assert no_think == prompt + "<think>\n\n</think>\n\n"


def test_a_completion_that_opens_think_is_split():
    stream = TextStream([], in_think=False)
    pieces = ["\n<th", "ink>\nstep one", "\nstep two\n</th", "ink>\n\nThe answer", " is 4."]
    got = [stream.push(p) for p in pieces] + [stream.push("", final=True)]
    assert "".join(r for r, _ in got) == "step one\nstep two" and "".join(t for _, t in got) == "The answer is 4."
    plain = TextStream([], in_think=False)
    assert plain.push("<b>bold") == ("", "<b>bold") and plain.push(" <think>") == ("", " <think>")


def test_qwen3_engine_reasoning_from_a_self_opened_think(tmp_path):
    tok = train_tokenizer(["Let me think. The answer is 42, and 7 + 5 = 12. Hello world!"] * 20, vocab_size=300)
    tok.chat_template = R1_0528_TEMPLATE
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompt = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hello world!"}], tokenize=True)])
    with torch.no_grad():  # steer: <think> where the first greedy token was, </think> where the fourth then is
        first = model.generate(prompt, do_sample=False, max_new_tokens=1)[0, -1]
        model.lm_head.weight[tok.think_start_id] = 1.02 * model.lm_head.weight[first]
        then = model.generate(prompt, do_sample=False, max_new_tokens=6)[0, prompt.shape[1]:]
        assert then[0] == tok.think_start_id
        model.lm_head.weight[tok.think_end_id] = 1.02 * model.lm_head.weight[then[3]]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    out = Engine(str(tmp_path)).generate([{"role": "user", "content": "Hello world!"}],
                                         SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert out.token_ids[0] == tok.think_start_id and tok.think_end_id in out.token_ids
    reasoning, answer = tok.decode(out.token_ids).split(THINK_END, 1)
    assert out.reasoning == reasoning.removeprefix(THINK_START).strip("\n") and out.text == answer.lstrip("\n")
    assert out.reasoning
