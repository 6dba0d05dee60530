"""Teacher scores for distillation (:mod:`petune.train.distill`), computed once and cached.

A teacher scores (query, passage) pairs. Three kinds:

- :func:`sentence_transformer_teacher`: a bigger bi-encoder loaded by sentence-transformers
  (``all-mpnet-base-v2``, a path or a hub name): cosine (or inner product) of its embeddings;
- :func:`cross_encoder_teacher`: a sentence-transformers ``CrossEncoder`` (its logits);
- :func:`petune_teacher`: any model :func:`petune.encode` encodes (a tuned or frozen seq2seq
  encoder).

:func:`add_teacher_scores` gives every training example ``"teacher_scores"`` (one per passage:
positive first, then its negatives); scores the training file gave (``"scores"``, see
:func:`petune.data.beir.read_training_file`) are kept and only the missing pairs are scored.
Under several processes the main process scores and the others receive its scores, so every
process trains on the same numbers; with ``cache_dir`` the scores are written once (named by the
teacher and the pairs) and a rerun or a resumed run reads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A scorer of (query, passage) pairs.

    Attributes:
        name: what the cached scores are named by (the model and the scoring options).
        score: ``(queries [n], passages [n]) -> [n]`` float scores of the pairs.
    """

    name: str
    score: Callable[[Sequence[str], Sequence[str]], np.ndarray]


def _unique(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    index: dict[str, int] = {}
    rows = np.array([index.setdefault(t, len(index)) for t in texts], dtype=np.int64)
    return list(index), rows


def _loaded(model, load):
    """``model`` itself, or a function that loads it (once, on first use) from a name / path: only
    the process that scores pays for the teacher."""
    if not isinstance(model, (str, os.PathLike)):
        return lambda: model
    cache = []
    return lambda: cache[0] if cache else cache.append(load(str(model))) or cache[0]


def sentence_transformer_teacher(model, *, normalize: bool = True, batch_size: int = 32,
                                 max_length: int | None = None, query_prefix: str = "",
                                 passage_prefix: str = "") -> Teacher:
    """A bi-encoder teacher through sentence-transformers (the ``serve`` extra).

    Args:
        model: a ``SentenceTransformer``, or a name / path it loads (``all-mpnet-base-v2``) when
            the teacher first scores.
        normalize: cosine similarity (else inner product).
        max_length: the model's ``max_seq_length`` (tokens) while scoring; ``None`` keeps its own.
        query_prefix, passage_prefix: prepended to the texts (e5-style ``"query: "``).

    Raises:
        ImportError: sentence-transformers is not installed (``pip install 'petune[serve]'``).
    """
    from sentence_transformers import SentenceTransformer

    get = _loaded(model, lambda path: SentenceTransformer(path, device=None if _cuda() else "cpu"))
    name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__

    def encode(texts):
        st = get()
        if max_length is not None:
            st.max_seq_length = max_length
        unique, rows = _unique(texts)
        return st.encode(unique, batch_size=batch_size, normalize_embeddings=normalize, convert_to_numpy=True,
                         show_progress_bar=len(unique) > 1000)[rows]

    def score(queries, passages):
        q = encode([query_prefix + t for t in queries])
        p = encode([passage_prefix + t for t in passages])
        return np.einsum("nd,nd->n", q, p).astype(np.float32)

    return Teacher(f"st:{name}|norm={normalize}|len={max_length}|{query_prefix!r}|{passage_prefix!r}", score)


def cross_encoder_teacher(model, *, batch_size: int = 32, max_length: int | None = None) -> Teacher:
    """A cross-encoder teacher: sentence-transformers ``CrossEncoder.predict`` on each pair (its
    raw scores; pick ``teacher_temperature`` for their scale).

    Args:
        model: a ``CrossEncoder``, or a name / path it loads when the teacher first scores.

    Raises:
        ImportError: sentence-transformers is not installed (``pip install 'petune[serve]'``).
    """
    from sentence_transformers import CrossEncoder

    get = _loaded(model, lambda path: CrossEncoder(path, max_length=max_length))
    name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__

    def score(queries, passages):
        return np.asarray(get().predict(list(zip(queries, passages)), batch_size=batch_size,
                                        show_progress_bar=len(queries) > 1000), dtype=np.float32).reshape(-1)

    return Teacher(f"cross:{name}|len={max_length}", score)


def petune_teacher(model, tokenizer, *, name: str, normalize: bool = True, query_length: int = 64,
                   passage_length: int = 256, **encode_options) -> Teacher:
    """A teacher that :func:`petune.encode` encodes: cosine (or inner product) of its query and
    passage embeddings. ``name`` names the cached scores (say which model and weights)."""
    import petune

    def embed(texts, max_length):
        unique, rows = _unique(texts)
        return petune.encode(model, tokenizer, unique, max_length=max_length, normalize=normalize, progress=False,
                             **encode_options)[rows]

    def score(queries, passages):
        return np.einsum("nd,nd->n", embed(list(queries), query_length), embed(list(passages), passage_length))

    return Teacher(f"petune:{name}|norm={normalize}|{query_length}|{passage_length}|{sorted(encode_options.items())}",
                   score)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def passages_of(example: dict) -> list[str]:
    """An example's passages in the order of its teacher scores: positive, then negatives."""
    return [example["positive"], *example.get("negatives", [])]


def _scores(teacher: Teacher, queries: list[str], passages: list[str], file: Path | None) -> np.ndarray:
    """The teacher's scores of the pairs, read from ``file`` when it holds them (else written there)."""
    from ..atomic import atomic_path

    if file is not None and file.exists():
        scores = np.load(file)
        if scores.shape == (len(queries),):
            log.info("teacher scores of %d pairs read from %s", len(scores), file)
            return scores
    log.info("scoring %d (query, passage) pairs with the teacher %s", len(queries), teacher.name)
    scores = np.asarray(teacher.score(queries, passages), dtype=np.float32).reshape(-1)
    if scores.shape[0] != len(queries) or not np.isfinite(scores).all():
        raise ValueError(f"the teacher gave {scores.shape[0]} scores for {len(queries)} pairs, or NaN / inf")
    if file is not None:
        with atomic_path(file) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, scores)
    return scores


def add_teacher_scores(examples: list[dict], teacher: Teacher | None, cache_dir: str | os.PathLike | None = None
                       ) -> list[dict]:
    """Examples (``{"query", "positive", "negatives"}``) with ``"teacher_scores"``: one float per
    passage, positive first. An example's own ``"scores"`` (``{passage text: score}``, from a
    training file) are used where they cover a passage; the teacher scores the rest.

    Every process must call it with the same examples: the main process scores, the others get
    its scores. With ``cache_dir`` the scores are read from (or written to) a file named by the
    teacher and the pairs.

    Returns:
        New example dicts (the given ones are not changed).

    Raises:
        ValueError: pairs without a score and no ``teacher`` (names how many and the fix).
    """
    from accelerate.utils import broadcast_object_list

    from ..dist import agree_on_errors, process_state

    missing = [(i, j) for i, e in enumerate(examples) for j, p in enumerate(passages_of(e))
               if p not in e.get("scores", {})]
    if missing and teacher is None:
        raise ValueError(f"{len(missing)} (query, passage) pairs of {len(examples)} examples have no teacher score: "
                         "give a teacher (--teacher) or scores for every passage in the training file")
    scores = None
    if missing:
        queries = [examples[i]["query"] for i, _ in missing]
        passages = [passages_of(examples[i])[j] for i, j in missing]
        key = hashlib.blake2b(teacher.name.encode(), digest_size=16)
        for q, p in zip(queries, passages):
            key.update(b"\0" + q.encode() + b"\1" + p.encode())
        file = Path(cache_dir) / "teacher" / f"{key.hexdigest()}.npy" if cache_dir else None
        state = process_state()
        error = None
        if state.is_main_process:
            try:
                scores = _scores(teacher, queries, passages, file)
            except Exception as e:  # noqa: BLE001 - carried to every process, then raised
                error = e
        agree_on_errors(error)
        if state.num_processes > 1:
            scores = broadcast_object_list([scores])[0]
    filled = {pair: float(s) for pair, s in zip(missing, scores)} if missing else {}
    out = []
    for i, e in enumerate(examples):
        own = e.get("scores", {})
        values = [own[p] if p in own else filled[(i, j)] for j, p in enumerate(passages_of(e))]
        out.append({**e, "teacher_scores": values})
    return out
