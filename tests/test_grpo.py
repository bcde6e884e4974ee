"""GRPO maths on hand-computed cases, and a short RL run that must raise the reward."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from seekling.train.grpo import group_advantages, kl_k3, policy_loss


# --- advantages -------------------------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(r, eps=0.0 + 1e-12)
    # group 0: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 * sqrt(3)
    s = 0.5 * math.sqrt(3)
    assert torch.allclose(adv[0], torch.tensor([s, -s, -s, s]), atol=1e-6)
    # zero-variance group: no signal at all
    assert torch.equal(adv[1], torch.zeros(4))
    # group 2: mean 0.75, std = sqrt((3 * 0.5625 + 5.0625) / 3) = 1.5
    assert torch.allclose(adv[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-6)


def test_group_advantages_dr_grpo_keeps_scale():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    adv = group_advantages(r, scale_std=False)
    assert torch.equal(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_groups, G"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))


# --- KL ---------------------------------------------------------------------------------------------------
def test_kl_k3_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -3.0])
    kl = kl_k3(logp, ref)
    d = ref - logp
    expected = torch.tensor([math.exp(x) - x - 1 for x in d.tolist()])
    assert torch.allclose(kl, expected)
    assert kl[0] == 0.0  # equal log-probs -> 0
    assert abs(kl[1].item() - (math.e - 2)) < 1e-6  # d = 1: e - 1 - 1
    # non-negative everywhere
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_k3(a, b) >= 0).all()


def test_kl_k3_is_an_unbiased_kl_estimate():
    # Sampling from p, mean of k3(log p, log q) -> KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    est = kl_k3(p.log()[x], q.log()[x]).mean().item()
    exact = float((p * (p / q).log()).sum())
    assert abs(est - exact) < 0.01


# --- clipping ---------------------------------------------------------------------------------------------
def _grad(logp_values, old, adv, **kw):
    logp = torch.tensor([logp_values], requires_grad=True)
    old_logp = torch.tensor([old])
    mask = torch.ones_like(old_logp)
    loss, stats = policy_loss(logp, old_logp, None, torch.tensor([adv]), mask, agg="token-mean", **kw)
    loss.backward()
    return logp.grad[0], stats


def test_clipping_zeroes_gradient_outside_the_trust_region():
    old = [0.0, 0.0, 0.0, 0.0]
    # ratios e^x: 1.5 (above 1.2), 1.1 (inside), 0.5 (below 0.8), 0.9 (inside)
    logp = [math.log(1.5), math.log(1.1), math.log(0.5), math.log(0.9)]
    # positive advantage: clipped only above 1 + eps; below 1 - eps the min keeps the unclipped term
    g, stats = _grad(logp, old, 1.0, clip_eps=0.2)
    ratios = torch.tensor([1.5, 1.1, 0.5, 0.9])
    assert g[0] == 0.0
    assert torch.allclose(g[1:], -ratios[1:] / 4, atol=1e-6)  # d(-r A)/dlogp = -r A, token-mean over 4
    assert stats["clip_frac"] == pytest.approx(0.25)
    # negative advantage: clipped only below 1 - eps
    g, stats = _grad(logp, old, -1.0, clip_eps=0.2)
    assert g[2] == 0.0
    assert torch.allclose(g[[0, 1, 3]], ratios[[0, 1, 3]] / 4, atol=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.25)


def test_clip_higher_widens_only_the_upper_bound():
    old = [0.0, 0.0]
    logp = [math.log(1.25), math.log(0.75)]
    g, stats = _grad(logp, old, 1.0, clip_eps=0.2, clip_eps_high=0.28)
    assert g[0] != 0.0 and stats["clip_frac"] == 0.0  # 1.25 < 1.28: still learning
    g, stats = _grad(logp, old, -1.0, clip_eps=0.2, clip_eps_high=0.28)
    assert g[1] == 0.0 and stats["clip_frac"] == pytest.approx(0.5)  # 0.75 < 0.8: clipped


def test_ratio_one_gives_the_policy_gradient():
    # On-policy (mu = 1): loss = -A, gradient = -A per token / count.
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), None, torch.tensor([2.0]), torch.ones(1, 2), agg="seq-mean")
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["kl"] == 0.0


# --- aggregation ------------------------------------------------------------------------------------------
def _agg_case():
    # Two completions, on-policy (ratio 1), so the per-token loss is -A on each unmasked token.
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    return logp, mask, adv


@pytest.mark.parametrize("agg,expected", [
    ("seq-mean", ((-1 * 2) / 2 + (2 * 4) / 4) / 2),  # (-1 + 2) / 2 = 0.5
    ("token-mean", (-1 * 2 + 2 * 4) / 6),  # 6 / 6 = 1.0
    ("dr-grpo", (-1 * 2 + 2 * 4) / (2 * 8)),  # sum / (B * max_len=8) = 0.375
])
def test_aggregations_hand_computed(agg, expected):
    logp, mask, adv = _agg_case()
    loss, _ = policy_loss(logp, logp, None, adv, mask, agg=agg, max_len=8)
    assert loss.item() == pytest.approx(expected)


def test_kl_penalty_added_per_token():
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[0.0, 1.0]])  # k3: 0 and e - 2
    loss, stats = policy_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 2), beta=0.5, agg="token-mean")
    assert loss.item() == pytest.approx(0.5 * (math.e - 2) / 2)
    assert stats["kl"] == pytest.approx((math.e - 2) / 2)


def test_masked_tokens_do_not_count():
    logp = torch.tensor([[0.0, 5.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert logp.grad[0, 1] == 0.0 and loss.item() == pytest.approx(-1.0)


def test_policy_loss_errors():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(z, z, None, torch.zeros(1), z, agg="mean")
    with pytest.raises(ValueError, match="reference"):
        policy_loss(z, z, None, torch.zeros(1), z, beta=0.1)


# --- RL runs on a tiny model ------------------------------------------------------------------------------
def _digit_share(prompt, completion, **kw):
    """Reward for the test runs: the share of digits in the completion (a 'style' a random model rarely has)."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # Tiny matmuls: one thread avoids thread hand-offs that cost more than the work on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from seekling.model import Transformer
    from seekling.model.config import ModelConfig
    from seekling.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("rl") / "base"
    tok = train_tokenizer(["hello world 123", "abc def 456 789", "What is 1 + 2? \\boxed{3}"] * 20, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                      kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    yield path
    torch.set_num_threads(threads)


def _cfg(**kw):
    from seekling.train.grpo import RLConfig

    base = dict(steps=30, prompts_per_step=4, group_size=8, max_new_tokens=8, lr=3e-3, min_lr_ratio=1.0,
                w_accuracy=0, w_format=0, w_custom=1.0, save_every=10, seed=0)
    return RLConfig(**{**base, **kw})


PROMPTS = [{"prompt": f"question {i}"} for i in range(8)]


def _log(summary):
    return [json.loads(line) for line in open(summary["log"])]


def test_short_rl_run_raises_reward(base_dir, tmp_path, device):
    from seekling.train.grpo import train_rl

    summary = train_rl(base_dir, tmp_path / "rl", tmp_path / "state", _cfg(device=device), prompts=PROMPTS,
                       reward_fn=_digit_share, log=lambda s: None)
    rows = _log(summary)
    assert len(rows) == 30 and summary["steps"] == 30
    first = sum(r["reward/custom_mean"] for r in rows[:5]) / 5
    last = sum(r["reward/custom_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    for key in ("kl", "clip_frac", "entropy", "len_mean", "len_max", "zero_var_frac", "t_rollout", "t_update", "lr"):
        assert key in rows[0]
    assert rows[0]["entropy"] > 0 and rows[0]["len_max"] <= 8
    assert (tmp_path / "rl" / "model.safetensors").exists() and (tmp_path / "rl" / "tokenizer.json").exists()


def test_resume_continues_exactly(base_dir, tmp_path):
    """6 steps, stop, resume to 10 == 10 steps straight (weights, optimizer, RNG and data cursor restored);
    mu = 2 with a reference model and token-mean exercises the off-policy ratio and the KL path."""
    from safetensors.torch import load_file

    from seekling.train.grpo import train_rl

    kw = dict(prompts_per_step=2, group_size=4, mu=2, beta=0.05, loss_agg="token-mean", micro_batch=3, save_every=3)
    quiet = lambda s: None
    train_rl(base_dir, tmp_path / "a", tmp_path / "sa", _cfg(steps=10, **kw), prompts=PROMPTS,
             reward_fn=_digit_share, log=quiet)
    train_rl(base_dir, tmp_path / "b", tmp_path / "sb", _cfg(steps=6, **kw), prompts=PROMPTS,
             reward_fn=_digit_share, log=quiet)
    summary = train_rl(base_dir, tmp_path / "b", tmp_path / "sb", _cfg(steps=10, **kw), prompts=PROMPTS,
                       reward_fn=_digit_share, log=quiet)
    rows = _log(summary)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert any(r["kl"] > 0 for r in rows) and any(r["clip_frac"] > 0 for r in rows)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(base_dir, tmp_path):
    """SIGTERM (a launcher, a scheduler) in step 2: the step finishes, the state is saved, the run stops; the
    resumed run (the trainer's scaffold: weights, optimizer, every RNG, the prompt cursor) ends where an
    uninterrupted one does."""
    import signal

    from safetensors.torch import load_file

    from seekling.train.grpo import train_rl
    from seekling.train.scaffold import saved_state

    calls = 0

    def reward_then_sigterm(prompt, completion, **kw):
        nonlocal calls
        calls += 1
        if calls == 9:  # the first reward of step 2 (2 prompts x G=4 per step)
            signal.raise_signal(signal.SIGTERM)
        return _digit_share(prompt, completion)

    kw = dict(steps=4, prompts_per_step=2, group_size=4, save_every=10)
    quiet = lambda s: None
    train_rl(base_dir, tmp_path / "a", tmp_path / "sa", _cfg(**kw), prompts=PROMPTS, reward_fn=_digit_share, log=quiet)
    prev = signal.getsignal(signal.SIGTERM)
    part = train_rl(base_dir, tmp_path / "b", tmp_path / "sb", _cfg(**kw), prompts=PROMPTS,
                    reward_fn=reward_then_sigterm, log=quiet)
    assert part["stop_reason"] == "interrupted" and part["steps"] == 2 and calls == 16  # step 2 was finished
    assert signal.getsignal(signal.SIGTERM) is prev and saved_state(tmp_path / "sb")["step"] == 2
    rest = train_rl(base_dir, tmp_path / "b", tmp_path / "sb", _cfg(**kw), prompts=PROMPTS, reward_fn=_digit_share,
                    log=quiet)
    assert rest["steps"] == 4 and [r["step"] for r in _log(rest)] == [1, 2, 3, 4]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_best_checkpoint_and_time_budget(base_dir, tmp_path):
    """The eval at step 0 is the best here (scores fall), so out_dir keeps the starting weights; the time
    budget stops the run early."""
    from safetensors.torch import load_file

    from seekling.train.grpo import train_rl

    scores = itertools.chain([0.9, 0.5, 0.1], itertools.repeat(0.0))
    summary = train_rl(base_dir, tmp_path / "rl", tmp_path / "state", _cfg(steps=1000, eval_every=1, time_budget_s=2.0),
                       prompts=PROMPTS, reward_fn=_digit_share, eval_fn=lambda m, t: next(scores), log=lambda s: None)
    assert summary["stop_reason"] == "time_budget" and 1 <= summary["steps"] < 1000
    assert summary["best_eval"] == 0.9
    start, out = load_file(base_dir / "model.safetensors"), load_file(tmp_path / "rl" / "model.safetensors")
    torch.testing.assert_close(start["lm_head.weight"], out["lm_head.weight"])


def test_dynamic_sampling_drops_zero_variance_groups(base_dir, tmp_path):
    from seekling.train.grpo import train_rl

    dead = lambda prompt, completion, **kw: 0.0 if prompt.startswith("dead") else _digit_share(prompt, completion)
    prompts = [{"prompt": "dead end"}, {"prompt": "live one"}]
    summary = train_rl(base_dir, tmp_path / "rl", tmp_path / "state",
                       _cfg(steps=2, prompts_per_step=2, dynamic_sampling=True, max_sampling_rounds=3),
                       prompts=prompts, reward_fn=dead, log=lambda s: None)
    for r in _log(summary):
        assert r["zero_var_frac"] >= 0.25  # at least one 'dead' group seen per step
        assert r["groups_used"] <= 2


def test_run_rl_on_tasks_from_the_command_line(base_dir, tmp_path):
    """The argparse entry point on a built-in task: accuracy and format rewards, r1-zero template, eval-n."""
    import argparse

    from seekling.train.grpo import add_rl_args, run_rl

    parser = argparse.ArgumentParser()
    add_rl_args(parser)
    args = parser.parse_args(["--policy", str(base_dir), "--out", str(tmp_path / "runs" / "rl"), "--tasks", "addition",
                              "--difficulty", "1", "--recipe", "r1-zero", "--steps", "2", "--prompts-per-step", "2",
                              "--group-size", "2", "--max-new-tokens", "4", "--eval-n", "2", "--no-scale-std"])
    summary = run_rl(args)
    rows = _log(summary)
    assert summary["log"] == str(tmp_path / "runs" / "train_state" / "rl" / "rl_log.jsonl")
    steps = [r for r in rows if "lr" in r]
    assert len(steps) == 2 and "accuracy" in steps[0] and "reward/format_mean" in steps[0]
    assert [r["step"] for r in rows if "eval" in r] == [0, 2]  # the starting policy and the last, in the log too
    assert summary["best_eval"] is not None and 0.0 <= summary["best_eval"] <= 1.0
    with pytest.raises(SystemExit, match="reward-fn"):
        run_rl(parser.parse_args(["--policy", str(base_dir), "--out", str(tmp_path / "x"), "--prompts", "p.jsonl"]))


def test_run_rl_on_your_own_prompts_and_reward(base_dir, tmp_path):
    """--prompts JSONL + --reward-fn file.py:function: the function gets the prompt, the completion and the
    row's other fields."""
    import argparse

    from seekling.train.grpo import add_rl_args, run_rl

    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Say a digit", "want": "7"},
        {"messages": [{"role": "user", "content": "Another"}], "want": "3"}]) + "\n")
    (tmp_path / "my_reward.py").write_text(
        "def reward(prompt, completion, want):\n"  # `want` is required: the row's fields must reach it
        "    return completion.count(want) / 8\n")
    parser = argparse.ArgumentParser()
    add_rl_args(parser)
    summary = run_rl(parser.parse_args([
        "--policy", str(base_dir), "--out", str(tmp_path / "rl"), "--prompts", str(tmp_path / "prompts.jsonl"),
        "--reward-fn", f"{tmp_path / 'my_reward.py'}:reward", "--steps", "2", "--prompts-per-step", "2",
        "--group-size", "2", "--max-new-tokens", "4"]))
    rows = _log(summary)
    assert len(rows) == 2 and "reward/custom_mean" in rows[0] and "reward/accuracy_mean" not in rows[0]
    assert (tmp_path / "rl" / "model.safetensors").exists()


def test_update_masks_truncated_completions(base_dir):
    """With mask_truncated, completions cut at max_new_tokens carry no gradient: a batch of only truncated
    ones leaves the weights unchanged, while the same batch unmasked moves them."""
    from seekling.model.load import load_pretrained
    from seekling.train.grpo import Completion, update_policy

    def run(mask_truncated):
        model = load_pretrained(base_dir)
        before = model.lm_head.weight.detach().clone()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        kept = [([5, 6, 7], [Completion([20, 21, 22], "", "length"), Completion([30, 31], "", "length")], [1.0, 0.0])]
        stats = update_policy(model, None, opt, kept, torch.tensor([1.0, -1.0]), _cfg(mask_truncated=mask_truncated), 0)
        return (model.lm_head.weight - before).abs().max().item(), stats

    moved, stats = run(mask_truncated=False)
    assert moved > 1e-4 and stats["entropy"] > 0 and stats["grad_norm"] > 0
    moved, stats = run(mask_truncated=True)
    assert moved == 0.0 and stats["grad_norm"] == 0.0


def test_prompt_streams_depend_only_on_the_cursor():
    from seekling.train.grpo import prompt_sampler, task_sampler

    draw = task_sampler(["addition", "word"], [1, 2], seed=0)
    whole = draw(0, 12)
    assert [s["prompt"] for s in whole[4:9]] == [s["prompt"] for s in draw(4, 5)]  # resume mid-stream
    assert [(s["problem"].task, s["problem"].difficulty) for s in whole[:4]] == [
        ("addition", 1), ("addition", 2), ("word", 1), ("word", 2)]
    with pytest.raises(ValueError, match="unknown tasks"):
        task_sampler(["nope"], None, 0)
    rows = [{"prompt": str(i)} for i in range(5)]
    got = [s["prompt"] for s in prompt_sampler(rows, seed=1)(0, 10)]
    assert sorted(got[:5]) == sorted(got[5:]) == ["0", "1", "2", "3", "4"]  # each epoch covers every prompt once
    assert got[:5] != got[5:]  # and is shuffled afresh


def test_update_skips_zero_advantage_rows_with_the_same_result(base_dir):
    """Completions with advantage 0 (a group whose rewards are all equal) add nothing to the GRPO loss without a KL
    term, so update_policy leaves them out of the forward and backward: the update equals the one computed over
    every completion in one batch, by hand. (The MoE routing bias, a balancing heuristic outside the gradient,
    counts the tokens of the forwards that ran.)"""
    from seekling.model.load import load_pretrained
    from seekling.train.grpo import Completion, completion_logprobs, policy_loss, update_policy

    kept = [([5, 6, 7], [Completion([20, 21, 22], "", "stop"), Completion([30, 31], "", "stop")], [1.0, 0.0]),
            ([8, 9], [Completion([40, 41], "", "stop"), Completion([50], "", "stop")], [1.0, 1.0])]
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    cfg = _cfg(micro_batch=1, lr=1e-2, grad_clip=0.0)
    model = load_pretrained(base_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    update_policy(model, None, opt, kept, adv, cfg, 0)

    ref = load_pretrained(base_dir)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    rows = [(p, c) for p, g, _ in kept for c in g]
    width = max(len(p) + len(c.token_ids) for p, c in rows)
    ids = torch.tensor([p + c.token_ids + [0] * (width - len(p) - len(c.token_ids)) for p, c in rows])
    start = min(len(p) for p, _ in rows)
    pos = torch.arange(start, width)[None]
    mask = ((pos >= torch.tensor([len(p) for p, _ in rows])[:, None])
            & (pos < torch.tensor([len(p) + len(c.token_ids) for p, c in rows])[:, None])).float()
    logp, _ = completion_logprobs(ref, ids, start)
    policy_loss(logp, logp.detach(), None, adv, mask, agg="seq-mean")[0].backward()
    ref_opt.step()
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        if not n.endswith("e_score_correction_bias"):
            torch.testing.assert_close(a, b, msg=n)
