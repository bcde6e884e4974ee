"""The logits processor and sampler: penalties as HF/vLLM/OpenAI define them, temperature, top-k,
top-p, min-p, greedy, per-request generators; SamplingParams validation."""

from __future__ import annotations

import pytest
import torch

from seekling.engine.sampling import (
    SamplingParams,
    apply_penalties,
    probs_from_logits,
    sample,
    token_logprobs,
)


def test_repetition_penalty_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 1]], [[3]])
    # Seen tokens (0, 1 in the prompt, 3 in the output): positive / 2, negative * 2; others untouched.
    assert out.tolist() == [[1.0, -4.0, 1.0, -2.0, 0.5]]


def test_presence_and_frequency_penalties_count_only_the_output():
    logits = torch.zeros(1, 4)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [p], [[1, 1, 1]], [[2, 2, 2, 0]])
    # token 0: 0.5 + 0.25; token 2: 0.5 + 3 * 0.25; token 1 (prompt only): nothing.
    assert out.tolist() == [[-0.75, 0.0, -1.25, 0.0]]


def test_temperature_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    probs = lambda **kw: probs_from_logits(logits, [SamplingParams(**kw)], [[]], [[]])[0]
    assert torch.allclose(probs(), torch.tensor([0.5, 0.25, 0.15, 0.1]))
    t2 = torch.tensor([0.5, 0.25, 0.15, 0.1]) ** 0.5
    assert torch.allclose(probs(temperature=2.0), t2 / t2.sum())
    assert torch.allclose(probs(top_k=2), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5 + 0.25 reaches it -> keep the first two.
    assert torch.allclose(probs(top_p=0.7), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    assert torch.allclose(probs(top_p=0.5), torch.tensor([1.0, 0, 0, 0]))
    # min_p=0.3: keep p >= 0.3 * 0.5 = 0.15.
    assert torch.allclose(probs(min_p=0.3), torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9)
    assert probs(temperature=0).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_rows_are_processed_independently():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1)]
    probs = probs_from_logits(logits, params, [[], []], [[], []])
    assert probs.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


def test_seeded_rows_do_not_depend_on_the_batch():
    probs = torch.full((3, 50), 1 / 50)
    a = sample(probs[:1], [torch.Generator().manual_seed(7)])
    b = sample(probs, [None, torch.Generator().manual_seed(7), None])
    assert a[0] == b[1]
    draws = [int(sample(probs[:1], [torch.Generator().manual_seed(s)])[0]) for s in range(20)]
    assert len(set(draws)) > 5  # different seeds, different draws


def test_sampling_frequencies():
    probs = torch.tensor([[0.7, 0.2, 0.1]]).expand(4000, 3)
    counts = torch.bincount(sample(probs, [None] * 4000), minlength=3) / 4000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_logprobs_chosen_first_then_top_k():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    lp = token_logprobs(logits, torch.tensor([0]), 2)[0]
    assert list(lp) == [0, 1, 2]
    assert lp[1] == pytest.approx(torch.log(torch.tensor(0.6)).item())


@pytest.mark.parametrize("kw, message", [
    (dict(n=0), "n must be"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-5), "top_k"), (dict(min_p=2), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"), (dict(seed="x"), "seed"),
])
def test_invalid_params_raise_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_stop_accepts_a_string():
    assert SamplingParams(stop="END").stop_list == ["END"]


def test_plain_greedy_is_greedy_without_penalties():
    assert SamplingParams(temperature=0).plain_greedy
    assert not SamplingParams(temperature=0.5).plain_greedy
    for kw in (dict(repetition_penalty=1.1), dict(presence_penalty=0.5), dict(frequency_penalty=-0.5)):
        assert SamplingParams(temperature=0, **kw).greedy and not SamplingParams(temperature=0, **kw).plain_greedy
