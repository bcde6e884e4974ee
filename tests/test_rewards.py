"""Rewards: format (R1 chat and R1-Zero), accuracy through the task verifier, overlong penalty, a user's
reward function loaded from module:function, JSONL prompts, and the weighted combination."""

from __future__ import annotations

import json

import pytest

from seekling.train.rewards import (
    answer_text,
    compute_rewards,
    format_reward,
    load_prompts_jsonl,
    load_reward_fn,
    overlong_penalty,
    split_completion,
)


@pytest.mark.parametrize("completion,ok", [
    ("3 + 4 = 7\n</think>\n\n7", True),
    ("reasoning</think>\n\nThe answer is 7.", True),
    ("no closing tag, answer 7", False),
    ("reasoning</think>\n\n   ", False),  # empty answer
    ("\n</think>\n\n7", False),  # empty reasoning
    ("a</think>b</think>c", False),  # two closings
    ("<think>again</think>\n\n7", False),  # the prompt already opened the think block
])
def test_format_r1(completion, ok):
    assert format_reward(completion, "r1") == (1.0 if ok else 0.0)


@pytest.mark.parametrize("completion,ok", [
    ("<think> 3 + 4 is 7 </think> <answer> 7 </answer>", True),
    ("<think>x</think>\n<answer>7</answer>\n", True),
    ("<think>x</think> 7", False),
    ("<answer>7</answer>", False),
    ("<think>x</think><answer> </answer>", False),
    ("<think>x</think><answer>7</answer> trailing", False),
])
def test_format_r1_zero(completion, ok):
    assert format_reward(completion, "r1-zero") == (1.0 if ok else 0.0)


def test_format_checks_the_answer_shape():
    is_int = lambda s: s.lstrip("-").isdigit()
    assert format_reward("r</think>\n\n42", "r1", is_int) == 1.0
    assert format_reward("r</think>\n\nforty-two", "r1", is_int) == 0.0


def test_answer_text_and_split():
    assert answer_text("r</think>\n\n 42 ") == "42"
    assert answer_text("unclosed 42") is None
    assert answer_text("<think>r</think><answer>42</answer>", "r1-zero") == "42"
    assert split_completion("why</think>\n\n42") == ("why", "42")
    with pytest.raises(ValueError, match="template"):
        split_completion("x", "chatml")


def test_overlong_penalty_dapo():
    # max 100, cache 20: free up to 80, then linear to -1 at 100, -1 beyond
    assert overlong_penalty(50, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(130, 100, 20) == -1.0
    with pytest.raises(ValueError, match="cache"):
        overlong_penalty(10, 100, 0)


def test_custom_reward_from_file_and_module(tmp_path, monkeypatch):
    src = "def reward(prompt, completion, target, **kw):\n    return float(target in completion)\n"
    (tmp_path / "my_reward.py").write_text(src)
    fn = load_reward_fn(f"{tmp_path / 'my_reward.py'}:reward")
    assert fn("p", "abc", target="b") == 1.0 and fn("p", "abc", target="z") == 0.0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("my_reward:reward")("p", "xyz", target="y") == 1.0
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("my_reward")
    with pytest.raises(ValueError, match="not a callable"):
        load_reward_fn("my_reward:nope")
    with pytest.raises(FileNotFoundError):
        load_reward_fn(f"{tmp_path / 'missing.py'}:reward")


def test_prompts_jsonl(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "Say hi", "target": "hi"}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Say yo"}], "target": "yo"}) + "\n")
    rows = load_prompts_jsonl(p)
    assert rows[0] == {"prompt": "Say hi", "target": "hi"} and rows[1]["target"] == "yo"
    p.write_text(json.dumps({"target": "x"}) + "\n")
    with pytest.raises(ValueError, match="prompt' or 'messages"):
        load_prompts_jsonl(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_prompts_jsonl(p)


def test_compute_rewards_weighted_sum_with_custom_fn():
    samples = [{"prompt": "Say hi", "target": "hi"}, {"messages": [{"role": "user", "content": "x"}], "target": "yo"}]
    completions = ["ok</think>\n\nhi", "no think block yo"]
    seen = []

    def fn(prompt, completion, target):
        seen.append(prompt)
        return 1.0 if target in completion else 0.0

    r = compute_rewards(samples, completions, n_tokens=[5, 95], weights={"custom": 1.0, "format": 0.5,
                        "overlong": 1.0}, custom_fn=fn, max_tokens=100, overlong_cache=10)
    assert r["custom"] == [1.0, 1.0] and r["format"] == [1.0, 0.0]
    assert r["overlong"] == [0.0, pytest.approx(-0.5)]
    assert r["total"] == [pytest.approx(1.5), pytest.approx(0.5)]
    assert seen == ["Say hi", [{"role": "user", "content": "x"}]]
    with pytest.raises(ValueError, match="unknown reward"):
        compute_rewards(samples, completions, [1, 1], {"style": 1.0})
    with pytest.raises(ValueError, match="needs a reward function"):
        compute_rewards(samples, completions, [1, 1], {"custom": 1.0})
    with pytest.raises(TypeError, match="expected a float"):
        compute_rewards(samples, completions, [1, 1], {"custom": 1.0}, custom_fn=lambda p, c, **k: "1")


def test_accuracy_through_the_task_verifier():
    from seekling.tasks import format_answer, sample_problems
    from seekling.train.rewards import accuracy_reward

    p = sample_problems("addition", 1, "test", 1, seed=3)[0]
    right, wrong = format_answer(p.answer), format_answer(str(int(p.answer) + 1))
    assert accuracy_reward(p, f"adding</think>\n\n{right}") == 1.0
    assert accuracy_reward(p, f"adding</think>\n\n{wrong}") == 0.0
    assert accuracy_reward(p, f"never closed {right}") == 0.0  # the answer must come after the think block
    # R1-Zero: the <answer> tags delimit the answer, with or without \boxed{}
    assert accuracy_reward(p, f"<think>x</think> <answer>{p.answer}</answer>", "r1-zero") == 1.0
    assert accuracy_reward(p, f"<think>x</think> <answer>{right}</answer>", "r1-zero") == 1.0
    assert accuracy_reward(p, f"<think>x</think> <answer>{int(p.answer) + 1}</answer>", "r1-zero") == 0.0
    rewards = compute_rewards([{"problem": p}] * 2, [f"a</think>\n\n{right}", f"a</think>\n\n{p.answer}"], [3, 3],
                              {"accuracy": 1.0, "format": 0.1}, answer_ok=lambda a: "\\boxed{" in a)
    assert rewards["accuracy"] == [1.0, 0.0] and rewards["format"] == [1.0, 0.0]
    assert rewards["total"] == [pytest.approx(1.1), 0.0]
