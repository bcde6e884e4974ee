"""95% intervals for results that depend on a training seed and on which problems were drawn.

A held-out score here is a table `scores[s, p]`: seed s (a whole SFT/RL replicate from one base), problem p
(the same held-out problems for every seed). Both are samples of what we want to speak about — another
seed, other problems — so the interval comes from a two-level (hierarchical) bootstrap: draw S seeds with
replacement, then, within each drawn seed, P problems with replacement; the statistic is the mean of the
resampled table. A difference between two stages is the interval of the difference table (e.g.
`rl[s, p] - sft[s, p]`, or `rl[s, p] - base[p]` for the one shared base), which keeps each problem paired
with itself, so problem difficulty cancels.

    ci = interval(rl_scores - sft_scores)          # {"mean": .., "lo": .., "hi": .., "seeds": S, "problems": P}
    fmt(ci)                                         # "+12.3 [+6.1, +18.0]" (points)

Known behaviour (tests/test_stats.py measures it): with one seed it is the ordinary percentile bootstrap
over problems (95% coverage on a binomial); with several seeds the within-seed resampling counts problem
noise about twice (conservative when problem noise dominates), while resampling only S seeds understates
the seed-to-seed variance by (S - 1)/S (optimistic when seeds dominate and S is 3). Say the seed count
beside every interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVEL = 0.95


def as_table(scores: Sequence[Sequence[float]] | Sequence[float] | np.ndarray) -> np.ndarray:
    """scores as a float [S, P] table: a flat list is one seed's problems."""
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim == 1:
        table = table[None]
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"scores must be [seeds, problems] with at least one of each, got shape {table.shape}")
    return table


def bootstrap_means(scores: np.ndarray, n_boot: int = 4000, seed: int = 0, chunk: int = 500) -> np.ndarray:
    """n_boot two-level bootstrap replicates of the mean of an [S, P] table (seeds, then problems within)."""
    table = as_table(scores)
    S, P = table.shape
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):  # chunks keep the [B, S, P] index array small
        b = min(chunk, n_boot - start)
        seeds = rng.integers(0, S, size=(b, S))
        problems = rng.integers(0, P, size=(b, S, P))
        out[start:start + b] = table[seeds[..., None], problems].mean(axis=(1, 2))
    return out


def interval(scores: Sequence | np.ndarray, level: float = LEVEL, n_boot: int = 4000, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap interval of a [seeds, problems] table (a flat list: one seed)."""
    table = as_table(scores)
    means = bootstrap_means(table, n_boot, seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(table.mean()), "lo": float(lo), "hi": float(hi),
            "seeds": int(table.shape[0]), "problems": int(table.shape[1])}


def fmt(ci: dict, signed: bool = False) -> str:
    """An interval of fractions in points: '62.1% [57.0, 67.2]', or signed for differences."""
    if signed:
        return f"{100 * ci['mean']:+.1f} [{100 * ci['lo']:+.1f}, {100 * ci['hi']:+.1f}]"
    return f"{100 * ci['mean']:.1f}% [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]"
