"""Runs and qrels: built for ranx (:func:`ranx_run`, :func:`make_qrels`, :func:`make_run`) and kept
on disk, so that any two rows — of one recipe, two seeds, two recipes, or petune
and another tool — can be compared later, paired, with Fisher's test (:func:`compare` takes paths).

The files are ranx's: TREC run files (``query Q0 doc rank score tag``, what trec_eval, pyserini and
Tevatron write) for runs and TREC qrels (``query 0 doc relevance``) for judgements, read and
written by ``ranx.Run`` / ``ranx.Qrels``; ``.json`` (ranx's ``{query: {doc: score}}``) works too.
Files are written atomically (a temp file renamed into place).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..atomic import atomic_path

#: what a recipe names the folder of its runs, beside report.json
RUNS_DIR = "runs"


def _id_width(docs: list[list[str]]) -> int:
    """numpy string width for the document ids: the longest, rounded up to a power of two ≥ 16.

    ranx builds each run from a ``<U{longest id}`` array, and numba compiles ranx's kernels again
    for every new width (about 6 s per width and kernel in each process, until numba's on-disk
    cache holds it). Rounding the width keeps that to a few compiles per installation
    (scripts/compile_ranx.py makes them at setup); the ids themselves do not change."""
    longest = max((len(i) for ids in docs for i in ids), default=1)
    return max(16, 1 << (longest - 1).bit_length())


def _ranx_build(cls, table_attr: str, data: dict, name: str | None, dtype):
    """``ranx.Run`` / ``ranx.Qrels`` from ``{query_id: {doc_id: value}}`` (str ids), as their
    constructor builds it — through ranx's own ``create_and_sort`` — with :func:`_id_width`'s width."""
    from numba.typed import List as TypedList
    from ranx.data_structures.common import create_and_sort

    built = cls(name=name)
    if not data:
        return built
    docs = [list(d) for d in data.values()]
    width = _id_width(docs)
    table = create_and_sort(TypedList(list(data)),
                            TypedList([np.array(ids, dtype=f"<U{width}") for ids in docs]),
                            TypedList([np.array(list(d.values()), dtype=dtype) for d in data.values()]))
    setattr(built, table_attr, table)  # where ranx's own constructor keeps it: Run.run, Qrels.qrels
    built.sorted = True
    return built


def ranx_run(run: dict, name: str | None = None):
    """``{query_id: {doc_id: score}}`` (str ids, float scores) → ``ranx.Run``, equal to
    ``ranx.Run(run, name=name)`` but compiled once per id-width class instead of once per id
    length (see :func:`_id_width`). Every run petune makes is built here."""
    from ranx import Run

    return _ranx_build(Run, "run", run, name, float)


def make_qrels(qrels: dict):
    """``{query_id: {doc_id: relevance}}`` → ``ranx.Qrels`` (relevance: positive int)."""
    from ranx import Qrels

    if not qrels:
        raise ValueError("qrels is empty")
    clean = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    if not any(r > 0 for docs in clean.values() for r in docs.values()):
        raise ValueError("qrels has no positive relevance judgement")
    return _ranx_build(Qrels, "qrels", clean, None, int)


def make_run(run: dict, name: str | None = None):
    """``{query_id: {doc_id: score}}`` → ``ranx.Run``."""
    return ranx_run({str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()}, name=name)




def _tag(name: str | None) -> str:
    """A run name as one TREC field (TREC files split on whitespace)."""
    return re.sub(r"\s+", "_", name or "run").strip("_") or "run"


def _kind(path: Path) -> str:
    return "json" if path.suffix == ".json" else "trec"


def save_run(run, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write a ``ranx.Run`` (or ``{query: {doc: score}}``) as a TREC run file (``.json``: ranx's
    JSON), its ``name`` (default: the run's) as the tag with spaces made ``_``; atomically.
    Returns the path."""
    path = Path(path)
    data = run.to_dict() if hasattr(run, "to_dict") else run
    out = ranx_run(data, name=_tag(name or getattr(run, "name", None)))
    with atomic_path(path) as tmp:
        out.save(str(tmp), kind=_kind(path))
    return path


def load_run(path: str | os.PathLike, name: str | None = None):
    """A run file (TREC, gzipped TREC, ranx JSON) as a ``ranx.Run`` named ``name`` (default: its
    tag, else the file's stem).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a TREC line without its six fields (names the file).
    """
    from ranx import Run

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run file at {path}")
    try:
        kind = {".json": "json", ".gz": None, ".lz4": None}.get(path.suffix, "trec")  # None: ranx infers
        loaded = Run.from_file(str(path), kind=kind)
    except ValueError as e:
        raise ValueError(f"{path} is not a TREC run file (query Q0 doc rank score tag per line): {e}") from None
    return ranx_run(loaded.to_dict(), name=name or loaded.name or path.stem)


def save_qrels(qrels, path: str | os.PathLike) -> Path:
    """Write qrels (``ranx.Qrels`` or ``{query: {doc: relevance}}``) as a TREC qrels file (``.json``:
    ranx's JSON); atomically. Returns the path."""
    from ranx import Qrels

    path = Path(path)
    qrels = qrels if isinstance(qrels, Qrels) else make_qrels(qrels)
    with atomic_path(path) as tmp:
        qrels.save(str(tmp), kind=_kind(path))
    return path


def load_qrels(path: str | os.PathLike):
    """A TREC qrels file (or ranx JSON) as a ``ranx.Qrels``.

    Raises:
        FileNotFoundError: no such file.
    """
    from ranx import Qrels

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no qrels file at {path}")
    loaded = Qrels.from_file(str(path), kind=_kind(path))
    return _ranx_build(Qrels, "qrels", loaded.to_dict(), None, int)


def save_runs(folder: str | os.PathLike, qrels, runs: dict) -> dict[str, Path]:
    """A recipe's runs and qrels in ``folder``: ``qrels.trec`` and one ``NAME.trec`` per run
    (``{name: run}``; the name made a file name). Returns ``{name: path}``, ``"qrels"`` included."""
    folder = Path(folder)
    written = {"qrels": save_qrels(qrels, folder / "qrels.trec")}
    for name, run in runs.items():
        written[name] = save_run(run, folder / f"{re.sub(r'[^A-Za-z0-9._+-]+', '_', name).strip('_')}.trec", name)
    return written
