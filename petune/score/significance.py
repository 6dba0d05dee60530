"""Fisher's randomization test, reproducible: the same scores and seed give the same p-value in
every process, on every thread count.

ranx 0.3.21 runs its ``fisher_randomization_test`` as ``@njit(parallel=True)`` and seeds only the
calling thread's generator; the worker threads that permute are unseeded, so p-values near 0.01
change between recomputations (and significance marks flip). This is the same test — the same
statistic (absolute difference of the two means), the same scheme (each query's pair of scores
swapped with probability 1/2, independently), the same ``n_permutations`` and the same p-value
(share of permutations whose difference is at least the observed one) — drawn from one seeded
``numpy.random.Generator``. Reference: Smucker, Allan & Carterette, "A Comparison of Statistical
Significance Tests for Information Retrieval Evaluation", CIKM 2007.
"""

from __future__ import annotations

import numpy as np

#: permutations drawn per block (bounds memory at block × queries booleans)
_BLOCK = 256


def fisher_randomization_test(control, treatment, n_permutations: int = 1000, random_seed: int = 42) -> float:
    """Two-sided p-value of Fisher's (approximate) randomization test on paired per-query scores.

    Args:
        control, treatment: ``[n_queries]`` scores of two systems on the same queries, same order.
        n_permutations: random swaps drawn (ranx's default: 1000).
        random_seed: seeds ``numpy.random.default_rng``; the same seed gives the same p-value.

    Returns:
        The share of permutations whose ``|mean(control') - mean(treatment')|`` is at least the
        observed ``|mean(control) - mean(treatment)|`` (in ``[0, 1]``).

    Raises:
        ValueError: the score arrays differ in length, are empty, or ``n_permutations < 1``.
    """
    control = np.asarray(control, dtype=np.float64)
    treatment = np.asarray(treatment, dtype=np.float64)
    if control.shape != treatment.shape or control.ndim != 1 or control.size == 0:
        raise ValueError(f"need two non-empty 1-d score arrays of the same length, got {control.shape} "
                         f"and {treatment.shape}")
    if not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be a positive integer, got {n_permutations!r}")
    observed = abs(control.mean() - treatment.mean())
    rng = np.random.default_rng(random_seed)
    hits = 0
    for start in range(0, n_permutations, _BLOCK):
        swap = rng.random((min(_BLOCK, n_permutations - start), control.size)) < 0.5
        permuted_c = np.where(swap, treatment, control)
        permuted_t = np.where(swap, control, treatment)
        hits += int((np.abs(permuted_c.mean(axis=1) - permuted_t.mean(axis=1)) >= observed).sum())
    return hits / n_permutations
