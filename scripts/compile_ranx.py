"""Compile the ranx kernels petune calls (numba JIT) into numba's on-disk cache, once.

ranx compiles each metric, its fusion and its data structures the first time a process uses them
(about a minute on 2 cores, and its data structures again for each document-id width) and caches
the machine code: in ``$NUMBA_CACHE_DIR`` when set, beside
ranx's sources otherwise. ``scripts/setup.sh`` runs this so that the first scoring run, or the
first test, does not pay for it; running it again only loads the cache.

    python scripts/compile_ranx.py
"""

import time

from ranx import fuse

from petune.score import compare, evaluate, make_qrels, make_run
from petune.score.retrieval import DEFAULT_METRICS

#: every metric family the jobs and benchmarks score with (one kernel per family; the cut-off is an argument)
METRICS = sorted({*DEFAULT_METRICS, "recall@100", "mrr@100"})
#: document-id widths compiled for: ids up to 64 characters; longer ones compile on first use
WIDTHS = (16, 32, 64)


def main() -> None:
    start = time.time()
    for width in WIDTHS:  # petune's runs and qrels come in these id widths (petune.score.retrieval._id_width)
        d = [f"d{i}".ljust(width, "x") for i in range(3)]
        qrels = make_qrels({"q1": {d[0]: 1}, "q2": {d[1]: 1, d[2]: 1}})
        runs = {name: make_run({"q1": {d[0]: 0.9 - i / 10, d[1]: 0.5}, "q2": {d[2]: 0.7, d[0]: 0.2 + i / 10}},
                               name=name) for i, name in enumerate(("a", "b"))}
        evaluate(qrels, runs["a"], METRICS)
        compare(qrels, runs, METRICS)
        fuse(list(runs.values()), norm=None, method="rrf")
    print(f"ranx kernels compiled or loaded from numba's cache in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
