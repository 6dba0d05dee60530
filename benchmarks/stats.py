"""Paired timing statistics for the overhead benchmarks: ABBA order and bootstrap confidence intervals.

Protocol (benchmarks/RESULTS.md): the two sides run the same work in pairs; within pair ``k`` the
side that goes first alternates A B, B A, A B, ... so that slow drift of the machine hits both
sides alike; each pair gives one ratio ``r_k = time(petune) / time(direct)``. The estimate is the
geometric mean of the ``r_k`` and its 95 % interval the percentile bootstrap over pairs (10,000
resamples, fixed seed). Pairs, not single steps, are resampled: steps of one run are correlated.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def abba(k: int) -> tuple[str, str]:
    """Which side runs first in pair ``k``: ``("petune", "direct")`` then ``("direct", "petune")``."""
    return ("petune", "direct") if k % 2 == 0 else ("direct", "petune")


def timed_pairs(petune: Callable[[], object], direct: Callable[[], object], pairs: int) -> dict[str, list[float]]:
    """Run each side's pass ``pairs`` times in ABBA order: ``{"petune": [s, ...], "direct": [s, ...]}``."""
    seconds = {"petune": [], "direct": []}
    run = {"petune": petune, "direct": direct}
    for k in range(pairs):
        for side in abba(k):
            start = time.perf_counter()
            run[side]()
            seconds[side].append(time.perf_counter() - start)
    return seconds


def ratio_ci(ratios, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict:
    """Geometric mean of per-pair ratios with a percentile-bootstrap interval.

    Returns:
        ``{"ratio", "low", "high", "pairs", "half_width_percent"}``; the half width is the larger
        distance from the estimate to a bound, in percent of the estimate.

    Raises:
        ValueError: fewer than 2 ratios, or a non-positive one.
    """
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    if logs.size < 2 or not np.isfinite(logs).all():
        raise ValueError(f"need at least 2 positive ratios, got {ratios!r}")
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, logs.size, (resamples, logs.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    estimate = float(np.exp(logs.mean()))
    low, high = (float(np.exp(q)) for q in np.quantile(means, [tail, 1 - tail]))
    return {"ratio": estimate, "low": low, "high": high, "pairs": int(logs.size),
            "half_width_percent": 100 * max(estimate - low, high - estimate) / estimate}


def verdict(ci: dict, target: float, higher_is_better: bool = False) -> str:
    """``"met"`` when the whole interval is on the right side of the target, ``"not met"`` when the
    whole interval is on the wrong side, else ``"undecided"``."""
    good, bad = (ci["low"] >= target, ci["high"] < target) if higher_is_better else \
        (ci["high"] <= target, ci["low"] > target)
    return "met" if good else "not met" if bad else "undecided"
