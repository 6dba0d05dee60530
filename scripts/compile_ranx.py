"""Compile the ranx kernels petune calls (numba JIT) into numba's on-disk cache, once.

ranx compiles each metric, its fusion and its data structures the first time a process uses them
(about a minute on 2 cores) and caches the machine code: in ``$NUMBA_CACHE_DIR`` when set, beside
ranx's sources otherwise. ``scripts/setup.sh`` runs this so that the first scoring run, or the
first test, does not pay for it; running it again only loads the cache.

    python scripts/compile_ranx.py
"""

import time

from ranx import Qrels, Run, fuse

from petune.score import compare, evaluate
from petune.score.retrieval import DEFAULT_METRICS

#: every metric family the jobs and benchmarks score with (one kernel per family; the cut-off is an argument)
METRICS = sorted({*DEFAULT_METRICS, "recall@100", "mrr@100"})


def main() -> None:
    start = time.time()
    qrels = Qrels({"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}})
    runs = {name: Run({"q1": {"d1": 0.9 - i / 10, "d2": 0.5}, "q2": {"d3": 0.7, "d1": 0.2 + i / 10}}, name=name)
            for i, name in enumerate(("a", "b"))}
    evaluate(qrels, runs["a"], METRICS)
    compare(qrels, runs, METRICS)
    fuse(list(runs.values()), norm=None, method="rrf")
    print(f"ranx kernels compiled or loaded from numba's cache in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
