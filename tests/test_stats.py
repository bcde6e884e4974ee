"""The interval code on cases whose answer is known: binomial coverage, the analytic standard error, exact
small bootstraps, pairing, and the input checks."""

from __future__ import annotations

import numpy as np
import pytest

from seekling.stats import as_table, bootstrap_means, fmt, interval


def coverage(n_seeds: int, n_problems: int, seed_sd: float, sims: int, p: float = 0.5) -> float:
    """How often the 95% interval of simulated pass/fail tables holds the true mean p. Each seed has its
    own success rate p + N(0, seed_sd) (a replicate that trained better or worse), each problem a coin."""
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(sims):
        rates = np.clip(p + rng.normal(0, seed_sd, size=(n_seeds, 1)), 0, 1)
        table = (rng.random((n_seeds, n_problems)) < rates).astype(float)
        ci = interval(table, n_boot=1000, seed=i)
        hits += ci["lo"] <= p <= ci["hi"]
    return hits / sims


def test_one_seed_binomial_coverage_is_95_percent():
    assert 0.925 <= coverage(1, 100, 0.0, sims=400) <= 0.975  # +-1.1 points of simulation error at 400 sims


def test_several_seeds_without_seed_effect_are_not_optimistic():
    # within-seed resampling counts problem noise about twice: the interval is, if anything, conservative
    assert coverage(3, 100, 0.0, sims=200) >= 0.93


def test_bootstrap_standard_error_matches_the_binomial_formula():
    table = np.array([1.0] * 60 + [0.0] * 140)  # p = 0.3, P = 200
    se = bootstrap_means(table, n_boot=20000, seed=1).std()
    analytic = (0.3 * 0.7 / 200) ** 0.5  # the plug-in bootstrap's own variance is p(1-p)/P
    assert se == pytest.approx(analytic, rel=0.03)


def test_seed_level_resampling_on_an_exact_case():
    # two seeds, constant within: the bootstrap means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    means = bootstrap_means([[0.0] * 10, [1.0] * 10], n_boot=20000, seed=2)
    assert set(np.unique(means)) == {0.0, 0.5, 1.0}
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.02)
    ci = interval([[0.0] * 10, [1.0] * 10])
    assert (ci["mean"], ci["lo"], ci["hi"], ci["seeds"], ci["problems"]) == (0.5, 0.0, 1.0, 2, 10)


def test_paired_differences_cancel_problem_difficulty():
    rng = np.random.default_rng(0)
    hard = (rng.random((3, 300)) < 0.4).astype(float)
    assert interval(hard - hard) == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "seeds": 3, "problems": 300}
    better = hard.copy()
    better[:, :30] = 1.0  # the same problems plus 30 more solved: +10 points minus the ones already solved
    ci = interval(better - hard)
    assert 0 < ci["lo"] <= ci["mean"] <= ci["hi"] < 0.1
    # unpaired, the same gain is lost in the problems' spread
    unpaired = interval(better)["lo"] - interval(hard)["hi"]
    assert unpaired < ci["lo"]


def test_inputs_and_formatting():
    assert as_table([1, 0, 1]).shape == (1, 3)
    assert interval([1.0, 0.0, 1.0, 1.0], seed=3) == interval([[1.0, 0.0, 1.0, 1.0]], seed=3)
    for bad in ([], [[]], np.zeros((2, 2, 2))):
        with pytest.raises(ValueError, match="seeds, problems"):
            as_table(bad)
    ci = {"mean": 0.621, "lo": 0.57, "hi": 0.672}
    assert fmt(ci) == "62.1% [57.0, 67.2]"
    assert fmt({"mean": 0.123, "lo": -0.01, "hi": 0.2}, signed=True) == "+12.3 [-1.0, +20.0]"


def test_rl_curves_tell_a_rise_from_noise(tmp_path):
    """scripts/rl_curves.py on synthetic rl_log.jsonl files: accuracy that climbs 20 -> 60% over 100 steps is
    called rising, with the right windows; a flat noisy curve is not; the length's trend is judged apart."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(0)
    script = Path(__file__).resolve().parents[1] / "scripts" / "rl_curves.py"

    def run(acc_fn) -> dict:
        dirs = []
        for seed in range(3):
            d = tmp_path / f"{acc_fn.__name__}{seed}"
            d.mkdir()
            rows = [{"step": s, "accuracy": float(np.clip(acc_fn(s) + rng.normal(0, 0.05), 0, 1)),
                     "len_mean": 40 + rng.normal(0, 1)} for s in range(1, 101)]
            (d / "rl_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows + rows[-3:]))  # resumed: repeats
            dirs.append(str(d))
        out = tmp_path / f"{acc_fn.__name__}.json"
        done = subprocess.run([sys.executable, str(script), *dirs, "--window", "20", "--json", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(out.read_text())

    def climbing(s):
        return 0.2 + 0.4 * s / 100

    def flat(s):
        return 0.4

    up, level = run(climbing), run(flat)
    acc = up["metrics"]["accuracy"]
    assert [(w["from"], w["to"]) for w in acc["windows"]] == [(1, 20), (21, 40), (41, 60), (61, 80), (81, 100)]
    assert acc["rises"] and 0.28 < acc["last_minus_first"]["mean"] < 0.36  # 0.32 expected
    assert not level["metrics"]["accuracy"]["rises"] and not level["metrics"]["accuracy"]["falls"]
    assert not up["metrics"]["len_mean"]["rises"] and not up["metrics"]["len_mean"]["falls"]
