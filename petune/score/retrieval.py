"""Dense retrieval: a FAISS index over embeddings, searched into ``ranx.Run`` objects and scored
with ranx (metrics, Fisher's randomization test, markdown / LaTeX reports)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .runs import _id_width, _ranx_build, load_qrels, load_run, make_qrels, make_run, ranx_run  # noqa: F401

from .significance import fisher_randomization_test

#: ranx metric names. ``hit_rate@20`` is "Hit@20" (any relevant in the top 20); ranx's ``hits``
#: counts relevant documents instead.
DEFAULT_METRICS = ["mrr@10", "mrr@100", "precision@1", "precision@20", "hit_rate@20", "recall@10", "ndcg@10"]


def check_embeddings(x, name: str = "embeddings", dim: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[n, d]`` array, or a clear error.

    Raises:
        ValueError: not 2-D, empty, NaN/inf, or ``d != dim``.
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]} but the index holds {dim}-d vectors; "
                         "encode both with the same model and pooling")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} rows contain NaN/inf (first: row {int(np.flatnonzero(bad)[0])})")
    return x


def _check_ids(ids, n: int, name: str):
    if getattr(ids, "unique", False):  # row numbers, a store's ids: unique by construction, held as no list
        if len(ids) != n:
            raise ValueError(f"{name}: {len(ids)} ids for {n} embeddings")
        return ids
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{name}: {len(ids)} ids for {n} embeddings")
    if len(set(ids)) != n:
        raise ValueError(f"{name} must be unique")
    return ids


@contextlib.contextmanager
def _numba_casts_quiet():
    """Silence numba's "unsafe cast from uint64 to int64" warning, which ranx's metrics raise when
    numba compiles them (ranx's own code, harmless for counts of documents)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="unsafe cast from uint64 to int64")
        yield


def _metric(metric: str):
    import faiss

    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _clamp_k(k: int, n: int) -> int:
    if k > n:
        warnings.warn(f"k={k} is larger than the collection ({n} documents); returning all of them", stacklevel=3)
        return n
    return k


class DenseIndex:
    """A FAISS index of document embeddings with their ids.

    Args:
        embeddings: ``[n_docs, d]`` float32 (converted if needed).
        ids: one id per row.
        factory: a ``faiss.index_factory`` string: ``"Flat"`` (exact inner product, the default,
            as in DPR and meerqat), ``"L2norm,Flat"`` (cosine), ``"HNSW32"``, ``"IVF4096,PQ64"``
            (large collections; trained on the embeddings given).
        metric: ``"ip"`` (inner product) or ``"l2"``.

    Raises:
        ValueError: empty / NaN / inf embeddings, ids that do not match, a bad factory string.
    """

    def __init__(self, embeddings, ids, factory: str = "Flat", metric: str = "ip"):
        import faiss

        x = check_embeddings(embeddings, "document embeddings")
        self.ids = _check_ids(ids, len(x), "document ids")
        self.factory, self.metric = factory, metric
        try:
            self.index = faiss.index_factory(x.shape[1], factory, _metric(metric))
        except RuntimeError as e:
            raise ValueError(f"faiss cannot build index {factory!r}: {str(e).splitlines()[-1]}") from None
        if not self.index.is_trained:
            self.index.train(x)
        self.index.add(x)

    @classmethod
    def wrap(cls, index, ids, factory: str, metric: str = "ip") -> "DenseIndex":
        """A :class:`DenseIndex` around a filled FAISS ``index`` (see
        :func:`petune.score.build_index`, which fills one from an embedding store)."""
        self = cls.__new__(cls)
        self.index, self.factory, self.metric = index, factory, metric
        self.ids = _check_ids(ids, index.ntotal, "document ids")
        return self

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries, query_ids, k: int = 100, batch_size: int = 4096):
        """Top-``k`` documents per query as a ``ranx.Run`` (scores: inner product, or -L2 distance).

        ``k`` larger than the collection warns and returns every document.

        Raises:
            ValueError: query dimension differs from the index, NaN/inf, ids that do not match.
        """
        q = check_embeddings(queries, "query embeddings", dim=self.dim)
        query_ids = _check_ids(query_ids, len(q), "query ids")
        k = _clamp_k(k, len(self))
        run = {}
        for start in range(0, len(q), batch_size):
            scores, idx = self.index.search(q[start:start + batch_size], k)
            if self.metric == "l2":
                scores = -scores
            for qid, row_scores, row_idx in zip(query_ids[start:start + batch_size], scores, idx):
                run[qid] = {self.ids[j]: float(s) for s, j in zip(row_scores, row_idx) if j >= 0}
        return ranx_run(run)

    def save(self, path) -> Path:
        """Write ``index.faiss`` and ``ids.json`` to the directory ``path`` (built beside it and
        renamed into place: an interrupted save leaves the previous index)."""
        import faiss

        from ..data.stream import RowIds
        from ..atomic import atomic_dir

        with atomic_dir(path) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            ids = {"rows": len(self.ids)} if isinstance(self.ids, RowIds) else {"ids": list(self.ids)}
            (tmp / "ids.json").write_text(json.dumps({**ids, "factory": self.factory, "metric": self.metric}))
        return Path(path)

    @classmethod
    def load(cls, path) -> "DenseIndex":
        import faiss

        from ..data.stream import RowIds

        path = Path(path)
        if not (path / "index.faiss").exists():
            raise FileNotFoundError(f"{path} holds no saved index (index.faiss); write one with DenseIndex.save")
        meta = json.loads((path / "ids.json").read_text())
        self = cls.__new__(cls)
        self.index = faiss.read_index(str(path / "index.faiss"))
        self.ids = RowIds(meta["rows"]) if "rows" in meta else meta["ids"]
        self.factory, self.metric = meta["factory"], meta["metric"]
        return self


def _as_qrels(qrels):
    from ranx import Qrels

    return qrels if isinstance(qrels, Qrels) else make_qrels(qrels)


def _comparable(qrels, run, strict: bool):
    """Check coverage, then a copy of ``run`` restricted to the judged queries (ranx's
    ``make_comparable`` edits the run in place; the caller's run stays as it was)."""
    _check_coverage(qrels, run, strict)
    return ranx_run(run.to_dict(), name=run.name).make_comparable(qrels)


def _check_coverage(qrels, run, strict: bool) -> None:
    judged, ranked = set(qrels.keys()), set(run.keys())
    unranked = judged - ranked
    unjudged = ranked - judged
    if not judged & ranked:
        raise ValueError("no query of the run has relevance judgements: query ids of qrels and run do not match")
    msgs = []
    if unranked:
        msgs.append(f"{len(unranked)} of {len(judged)} judged queries are missing from run "
                    f"{run.name or ''} and score 0 (e.g. {sorted(unranked)[:3]})")
    if unjudged:
        msgs.append(f"{len(unjudged)} queries of the run have no judgements and are ignored "
                    f"(e.g. {sorted(unjudged)[:3]})")
    if msgs:
        if strict:
            raise ValueError("; ".join(msgs))
        warnings.warn("; ".join(msgs), stacklevel=3)


def evaluate(qrels, run, metrics=DEFAULT_METRICS, strict: bool = False) -> dict[str, float]:
    """Score a run with ranx: ``{metric: mean over judged queries}``.

    Queries judged but missing from the run count as 0 and queries of the run without
    judgements are ignored — both with a warning giving their number (``strict=True`` raises).

    Raises:
        ValueError: no overlap at all between qrels and run, or a mismatch with ``strict``.
    """
    from ranx import evaluate as ranx_evaluate

    qrels = _as_qrels(qrels)
    run = _comparable(qrels, run, strict)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    with _numba_casts_quiet():
        scores = ranx_evaluate(qrels, run, metrics)
    return {metrics[0]: float(scores)} if len(metrics) == 1 else {m: float(v) for m, v in scores.items()}


def compare(qrels, runs, metrics=DEFAULT_METRICS, max_p: float = 0.01, stat_test: str = "fisher",
            n_permutations: int = 1000, random_seed: int = 42, strict: bool = False):
    """Evaluate several runs and test every pair, **Fisher's randomization test, p ≤ 0.01** by
    default (ranx's own default is Student's t).

    Metrics, per-query scores and the report are ranx's. The Fisher test is petune's
    :func:`petune.score.significance.fisher_randomization_test` — ranx's test (same statistic,
    permutation scheme and ``n_permutations``) drawn from one seeded numpy generator — because
    ranx 0.3.21's numba-parallel version leaves its permuting threads unseeded and its p-values
    (and so the significance marks) change between recomputations. Here the same qrels, runs and
    ``random_seed`` give the same p-values in every process. ``stat_test="student"`` and
    ``"tukey"`` are ranx's own.

    Args:
        qrels: ``{query: {doc: relevance}}``, a ``ranx.Qrels``, or a qrels file's path.
        runs: ``{name: ranx.Run}`` or a list of named runs; a run may be a run file's path
            (:func:`petune.score.runs.load_run`: TREC or ranx JSON, e.g. another seed's, another
            recipe's, another tool's), named by the dict key or else by its tag.
        max_p: significance threshold.

    Returns:
        ``ranx.Report``: ``print()`` it, or use :func:`report_markdown` / :func:`report_latex`;
        ``report.comparisons[a, b][metric]`` holds ``{"p_value", "significant"}``.

    Raises:
        ValueError: fewer than two runs, duplicate run names, or qrels and runs that do not overlap.
    """
    from ranx import compare as ranx_compare
    from ranx import evaluate as ranx_evaluate
    from ranx.data_structures import FrozensetDict, Report

    qrels = load_qrels(qrels) if isinstance(qrels, (str, os.PathLike)) else _as_qrels(qrels)
    if isinstance(runs, dict):
        runs = {name: load_run(run, name) if isinstance(run, (str, os.PathLike)) else run for name, run in runs.items()}
        for name, run in runs.items():
            run.name = name
        runs = list(runs.values())
    runs = [load_run(run) if isinstance(run, (str, os.PathLike)) else run for run in runs]
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    names = [run.name for run in runs]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"runs need distinct names to be compared, got {names}")
    runs = [_comparable(qrels, run, strict) for run in runs]
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if stat_test != "fisher":
        with _numba_casts_quiet():
            return ranx_compare(qrels, runs, metrics=metrics, stat_test=stat_test, max_p=max_p,
                            n_permutations=n_permutations, random_seed=random_seed)

    scores = {}
    for run in runs:
        with _numba_casts_quiet():
            per_query = ranx_evaluate(qrels, run, metrics, return_mean=False)
        scores[run.name] = {metrics[0]: per_query} if len(metrics) == 1 else per_query
    comparisons, win_tie_loss = FrozensetDict(), {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            comparisons[frozenset([a, b])] = {}
            for m in metrics:
                p = fisher_randomization_test(scores[a][m], scores[b][m], n_permutations, random_seed)
                comparisons[frozenset([a, b])][m] = {"p_value": p, "significant": p <= max_p}
    for a in names:
        for b in names:
            if a != b:
                win_tie_loss[(a, b)] = {m: {"W": int((scores[a][m] > scores[b][m]).sum()),
                                            "T": int((scores[a][m] == scores[b][m]).sum()),
                                            "L": int((scores[a][m] < scores[b][m]).sum())} for m in metrics}
    results = {n: {m: float(np.mean(scores[n][m])) for m in metrics} for n in names}
    return Report(model_names=names, results=results, comparisons=comparisons, metrics=metrics, max_p=max_p,
                  win_tie_loss=win_tie_loss, stat_test="fisher")


def p_values(report) -> dict[str, dict[str, float]]:
    """``{"a vs b": {metric: p}}`` for every pair of runs of a :func:`compare` report, ``a`` before
    ``b`` in the report's run order (ranx keys pairs by frozensets, whose iteration order changes
    from one Python process to the next; these keys do not)."""
    from itertools import combinations

    return {f"{a} vs {b}": {m: report.comparisons[a, b][m]["p_value"] for m in report.metrics}
            for a, b in combinations(report.model_names, 2)}


def report_markdown(report) -> str:
    """A ranx report as a markdown table; superscript letters mark significant wins (p ≤ max_p)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    header = ["#", "run"] + [report.get_metric_label(m) for m in report.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (run, scores) in enumerate(report.results.items()):
        cells = [letters[i], run] + [
            f"{report.format_score(scores[m])}{report.get_superscript_for_table(run, m)}" for m in report.metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Superscripts: significantly better than the run with that letter "
                 f"({report.get_stat_test_label(report.stat_test)}, p ≤ {report.max_p}).")
    return "\n".join(lines)


def report_latex(report) -> str:
    """A ranx report as a LaTeX table (ranx's own ``to_latex``)."""
    return report.to_latex()
