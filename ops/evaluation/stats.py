"""How sure a comparison of eval runs is: intervals per task, and paired bootstrap over examples.

Every run of a comparison scored the same examples, so differences are measured pairwise: a bootstrap
replicate draws each task's examples with replacement once and scores every run on that same draw. The
average is the mean over tasks of each task's mean score (every task weighs the same, as in the tables).

    recovered = (run - compressed) / (dense - compressed)

gets its percentile interval from the same replicates; it is reported only when dense and compressed differ
at the 95% level (otherwise the ratio divides noise by noise: 3.0 or -7.0 mean nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
REPLICATES = 2000
PerExample = Mapping[str, Mapping[str, float]]  # task -> example id -> score (acc or exact match)


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def above_chance(scores: Sequence[float], chance: float) -> bool:
    """The run's accuracy is above `chance` at the 95% level (Wilson lower bound above it)."""
    return wilson(sum(scores), len(scores))[0] > chance


def aligned(runs: Sequence[PerExample], tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """task -> (R, N) scores of the examples every run scored, in a fixed (sorted id) order."""
    out = {}
    for task in tasks:
        ids = sorted(set.intersection(*(set(r.get(task, {})) for r in runs)))
        if ids:
            out[task] = np.array([[r[task][i] for i in ids] for r in runs], dtype=np.float64)
    return out


def bootstrap_averages(scores: Mapping[str, np.ndarray], replicates: int = REPLICATES,
                       seed: int = 0) -> np.ndarray:
    """(replicates, R): each run's average over tasks on paired resamples of every task's examples."""
    rng = np.random.default_rng(seed)
    total = None
    for task_scores in scores.values():  # (R, N)
        n = task_scores.shape[1]
        draws = rng.integers(0, n, size=(replicates, n))  # (reps, N), the same draw for every run
        means = task_scores[:, draws].mean(-1).T  # (reps, R)
        total = means if total is None else total + means
    return total / len(scores)


@dataclass(frozen=True)
class Estimate:
    value: float | None  # on the full data; None where undefined
    low: float | None  # 95% percentile interval of the bootstrap
    high: float | None


def interval(samples: np.ndarray, value: float | None) -> Estimate:
    finite = samples[np.isfinite(samples)]
    if value is None or len(finite) == 0:
        return Estimate(value, None, None)
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return Estimate(value, float(lo), float(hi))


def difference(boot: np.ndarray, full: np.ndarray, a: int, b: int) -> tuple[Estimate, float]:
    """Run a minus run b on the average: the estimate with its interval, and the two-sided paired bootstrap
    p-value (twice the smaller share of replicates on either side of 0)."""
    d = boot[:, a] - boot[:, b]
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return interval(d, float(full[a] - full[b])), p


def recovered(boot: np.ndarray, full: np.ndarray, dense: int, compressed: int, run: int) -> Estimate:
    """The share of the compression loss `run` wins back, with its interval; undefined (None) unless the
    dense run beats the compressed one at the 95% level."""
    gap, _ = difference(boot, full, dense, compressed)
    if gap.low is None or gap.low <= 0:
        return Estimate(None, None, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (boot[:, run] - boot[:, compressed]) / (boot[:, dense] - boot[:, compressed])
    return interval(ratios, float((full[run] - full[compressed]) / (full[dense] - full[compressed])))
