"""Hard negatives mined from the passage collection with the model being trained.

The field mines once, before training (Tevatron's encode → search → ``hn_mining.py``, FlagEmbedding's
``hn_mine.py`` with a rank window, sentence-transformers' ``mine_hard_negatives`` with
``range_min`` / ``range_max`` and ``relative_margin``, NV-Retriever's TopK-PercPos margin of 5 %).
:class:`NegativeMiner` does it again as training goes: before every ``every``-th epoch it encodes
the training queries with the current model, searches the passages, and gives each example
negatives from a window of ranks, dropping candidates that score above ``(1 - relative_margin)``
times the example's positive (likely false negatives) and the query's relevant passages.

Cost: with a query-side model (``attach(..., sides="query")``) the passages are the frozen
model's, encoded once and searched every time (only the training queries are encoded again).
With a tuned passage side each mining round encodes the whole collection with the current model;
``every`` sets how often that cost is paid.

Under several processes every process encodes its share, the main process searches and chooses,
and every process receives the same choice. With ``directory`` each round's choice is written
there (``epoch-N.npz``) before the epoch's first step, so a resumed run trains on the negatives
the interrupted one had.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class MinedNegatives(Sequence):
    """A retrieval training set (``{"query", "positive", "negatives", ...}`` examples, the same
    number ``k`` of negatives each) whose last ``count`` negatives are replaced by mined ones
    (:class:`NegativeMiner`); the first ``k - count`` stay (BM25's: a mix), or none when
    ``count == k``. Until the first mining round the examples are returned as given.

    Raises:
        ValueError: ``count`` is not in ``1 … k`` or the examples' numbers of negatives differ.
    """

    def __init__(self, examples: Sequence[dict], count: int, passage_text: Callable[[list[int]], list[str]]):
        ks = {len(e.get("negatives", [])) for e in examples}
        if len(ks) != 1:
            raise ValueError(f"every example needs the same number of negatives, got {sorted(ks)}")
        self.k = ks.pop()
        if not isinstance(count, int) or not 1 <= count <= self.k:
            raise ValueError(f"mined negatives per example must be 1 … {self.k} (its hard negatives), got {count!r}; "
                             "raise the number of hard negatives to mine more")
        self.examples, self.count, self.passage_text = examples, count, passage_text
        self.rows: np.ndarray | None = None  # [N, count] corpus rows, -1: the example's own negative stays
        self.teacher: np.ndarray | None = None  # [N, count] teacher scores of the mined rows
        self._texts: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        if self.rows is None:
            return e
        negatives, scores = list(e["negatives"]), list(e.get("teacher_scores", []))
        for j, row in enumerate(self.rows[i]):
            if row >= 0:
                slot = self.k - self.count + j
                negatives[slot] = self._texts[int(row)]
                if scores:
                    scores[1 + slot] = float(self.teacher[i, j])
        return {**e, "negatives": negatives, **({"teacher_scores": scores} if scores else {})}

    def set_rows(self, rows: np.ndarray, teacher: np.ndarray | None = None) -> None:
        """Use the mined ``rows`` ``[N, count]`` (``-1``: keep the example's own negative) and
        their teacher scores ``[N, count]`` (required when the examples carry teacher scores)."""
        if rows.shape != (len(self.examples), self.count):
            raise ValueError(f"mined rows {rows.shape} do not match {len(self.examples)} examples × {self.count}")
        if "teacher_scores" in self.examples[0] and teacher is None:
            raise ValueError("these examples carry teacher scores: the mined negatives need theirs too")
        wanted = sorted({int(r) for r in rows.reshape(-1) if r >= 0})
        self._texts = dict(zip(wanted, self.passage_text(wanted))) if wanted else {}
        self.rows, self.teacher = rows, teacher


def choose_negatives(ranked_rows: np.ndarray, ranked_scores: np.ndarray, query_of: Sequence[int],
                     positive_scores: np.ndarray, exclude: Sequence[set], count: int, ranks: tuple[int, int],
                     relative_margin: float | None, seeds: Sequence[str]) -> list[list[int]]:
    """Each example's mined negatives: ``count`` rows drawn at random (``random.Random(seed)``)
    from ranks ``ranks[0] … ranks[1] - 1`` of its query's ranking (ranks counted once the query's
    relevant rows ``exclude`` are left out), keeping only candidates that score at most
    ``(1 - relative_margin) × positive score``. Fewer come back when fewer qualify.

    Args:
        ranked_rows, ranked_scores: ``[Q, K]`` search results per unique query, best first (-1: none).
        query_of: ``[N]`` the row of each example's query in the ranking.
        positive_scores: ``[N]`` each example's score of its positive (same model, same similarity).
        exclude: ``[N]`` rows never to give the example (its query's relevant ones).
        relative_margin: ``None`` keeps every candidate of the window.
    """
    out = []
    lo, hi = ranks
    for i, q in enumerate(query_of):
        window = [(int(r), float(s)) for r, s in zip(ranked_rows[q], ranked_scores[q])
                  if r >= 0 and int(r) not in exclude[i]][lo:hi]
        if relative_margin is not None:
            bound = (1.0 - relative_margin) * float(positive_scores[i])
            window = [(r, s) for r, s in window if s <= bound]
        rows = [r for r, _ in window]
        out.append(sorted(random.Random(seeds[i]).sample(rows, min(count + 2, len(rows))), key=rows.index))
    return out


def _search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(index, "search_arrays"):  # an embedding store's exact search
        return index.search_arrays(queries, k)
    scores, rows = index.index.search(queries, min(k, index.index.ntotal))  # a DenseIndex (FAISS)
    return scores, rows


def _vectors(index, rows: list[int]) -> np.ndarray:
    """The indexed vectors of ``rows``: an embedding store's rows, or a flat FAISS index's."""
    if hasattr(index, "store"):
        return np.asarray(index.store[np.asarray(rows, dtype=np.int64)], dtype=np.float32)
    return index.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))


@contextmanager
def memory_index(model, tokenizer, passages: Sequence[str], cache_dir=None, **encode_options):
    """The passages encoded in memory by every process's share (:func:`petune.encode_sharded`,
    ``encode_options`` with the passage ``side``) and indexed exactly on the main process (a
    :class:`petune.score.DenseIndex`; the others get ``None``). For collections that fit in
    memory; an embedding store's :class:`petune.score.ExactStoreIndex` serves the rest."""
    from ..embed import encode_sharded
    from ..score import DenseIndex

    vectors = encode_sharded(model, tokenizer, list(passages), cache_dir=cache_dir, **encode_options)
    yield None if vectors is None else DenseIndex(vectors, list(range(len(vectors))))


class NegativeMiner:
    """Mines hard negatives for a :class:`MinedNegatives` training set before every ``every``-th
    epoch; give it to the Trainer: ``Trainer(..., on_epoch_start=[miner])``.

    Args:
        dataset: the training set whose negatives it sets.
        tokenizer: the model's tokenizer.
        index_for: ``model -> context manager`` yielding the passage index on the main process
            (``None`` on the others; every process enters it): an object with ``search_arrays``
            (:class:`petune.score.ExactStoreIndex`) or a :class:`petune.score.DenseIndex`. Rows are
            the passages' positions, as ``dataset``'s ``passage_text`` reads them. See
            :func:`memory_index`.
        relevant: ``[N]`` each example's relevant passage rows (never mined for it).
        positive_rows: ``[N]`` each example's positive's row in the index where it is one of the
            passages (its vector is read there instead of encoded again), else ``None``.
        ranks: ``(first, last)`` window of ranks (0-based, last excluded) the negatives are drawn from.
        relative_margin: candidates scoring above ``(1 - relative_margin) ×`` the positive are
            dropped (``None``: kept). Scores are the encoder's (cosine when ``normalize``).
        every: mine before epochs ``0, every, 2·every, …``.
        seed: with the epoch, draws each example's negatives.
        directory: where each round's choice is written and read back on resume (``None``: nowhere).
        teacher: a :class:`petune.train.teacher.Teacher` scoring the mined pairs (distillation).
        query_length, passage_length, query_prefix, passage_prefix, normalize, pooling, task:
            how queries and positives are encoded (as the retrieval is scored).
        progress: log each round.

    Raises:
        ValueError: a bad window or margin.
    """

    def __init__(self, dataset: MinedNegatives, tokenizer, index_for, relevant: Sequence[set], *,
                 ranks: tuple[int, int] = (0, 50), relative_margin: float | None = 0.05, every: int = 1,
                 seed: int = 0, directory=None, teacher=None, query_length: int = 64, passage_length: int = 256,
                 query_prefix: str = "", passage_prefix: str = "", normalize: bool = True, pooling: str = "mean",
                 task: str | None = None, positive_rows: Sequence[int | None] | None = None):
        lo, hi = ranks
        if not (0 <= lo < hi):
            raise ValueError(f"the rank window must be 0 <= first < last, got {ranks}")
        if relative_margin is not None and not 0 <= relative_margin < 1:
            raise ValueError(f"relative_margin must be in [0, 1), got {relative_margin}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of epochs, got {every!r}")
        if len(relevant) != len(dataset):
            raise ValueError(f"relevant rows for {len(relevant)} examples, the dataset has {len(dataset)}")
        self.dataset, self.tokenizer, self.index_for, self.relevant = dataset, tokenizer, index_for, relevant
        self.ranks, self.relative_margin, self.every, self.seed = (lo, hi), relative_margin, every, seed
        self.directory = Path(directory) if directory else None
        self.teacher, self.task = teacher, task
        self.positive_rows = list(positive_rows) if positive_rows is not None else [None] * len(dataset)
        if len(self.positive_rows) != len(dataset):
            raise ValueError(f"positive rows for {len(self.positive_rows)} examples, the dataset has {len(dataset)}")
        self.encoding = dict(query_length=query_length, passage_length=passage_length, query_prefix=query_prefix,
                             passage_prefix=passage_prefix, normalize=normalize, pooling=pooling)
        self.history: list[dict] = []

    # -- what a round depends on: a file from other settings or other examples is not read back ----
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for e in self.dataset.examples:
            h.update(f"{e['query']}\0{e['positive']}\0".encode())
        settings = [self.ranks, self.relative_margin, self.every, self.seed, self.dataset.count, self.encoding,
                    self.teacher.name if self.teacher else None, self.task]
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()

    def __call__(self, trainer, epoch: int) -> None:
        from accelerate.utils import broadcast_object_list

        from ..dist import agree_on_errors, process_state

        state = process_state()
        round_epoch = epoch - epoch % self.every
        if self.dataset.rows is not None and self.history and self.history[-1]["epoch"] == round_epoch:
            return  # this round's negatives are in use already
        saved, error = None, None
        if state.is_main_process:
            try:
                saved = self._read(round_epoch)
            except Exception as e:  # noqa: BLE001 - carried to every process
                error = e
        agree_on_errors(error)
        saved = broadcast_object_list([saved])[0] if state.num_processes > 1 else saved
        if saved is None:
            saved = self._mine(trainer.model, round_epoch)
        rows, teacher, info = saved
        self.dataset.set_rows(rows, teacher)
        self.history.append({"epoch": round_epoch, **info})

    def _file(self, epoch: int) -> Path | None:
        return self.directory / f"epoch-{epoch:04d}.npz" if self.directory else None

    def _read(self, epoch: int):
        file = self._file(epoch)
        if file is None or not file.exists():
            return None
        try:
            with np.load(file) as saved:
                if str(saved["fingerprint"]) != self.fingerprint():
                    log.warning("mined negatives %s are from other examples or settings: mining again", file)
                    return None
                rows, info = saved["rows"], json.loads(str(saved["info"]))
                teacher = saved["teacher"] if "teacher" in saved else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # written atomically; damaged since
            log.warning("mined negatives %s cannot be read (%s): mining again", file, e)
            return None
        if rows.shape != (len(self.dataset), self.dataset.count):
            log.warning("mined negatives %s have shape %s, not %s: mining again", file, rows.shape,
                        (len(self.dataset), self.dataset.count))
            return None
        log.info("mined negatives of epoch %d read from %s", epoch, file)
        return rows, teacher, {**info, "read": True}

    def _mine(self, model, epoch: int):
        """Every process: encode and search; the main process chooses, writes and broadcasts."""
        import time

        from accelerate.utils import broadcast_object_list

        from ..dist import agree_on_errors, process_state
        from ..embed import encode_sharded, encode_side, side_model

        started = time.time()
        state = process_state()
        examples, opts = self.dataset.examples, self.encoding
        queries = list(dict.fromkeys(e["query"] for e in examples))
        query_row = {q: i for i, q in enumerate(queries)}
        was_training = model.training
        model.eval()
        try:
            common = dict(task=self.task, normalize=opts["normalize"], pooling=opts["pooling"])
            q = encode_sharded(model, self.tokenizer, queries, max_length=opts["query_length"],
                               prefix=opts["query_prefix"], side=encode_side(model, "query"), **common)
            passage_side = encode_side(model, "passage")
            unindexed = [i for i, r in enumerate(self.positive_rows) if r is None]  # the rest: read from the index
            positives = None
            if unindexed:
                with side_model(model, passage_side) as encoder:
                    positives = encode_sharded(encoder, self.tokenizer, [examples[i]["positive"] for i in unindexed],
                                               max_length=opts["passage_length"], prefix=opts["passage_prefix"],
                                               **common)
            with self.index_for(model) as index:
                result, error = None, None
                if state.is_main_process:
                    try:
                        result = self._choose(index, q, self._positives(index, positives, unindexed), query_row,
                                              epoch)
                    except Exception as e:  # noqa: BLE001 - carried to every process
                        error = e
                agree_on_errors(error)
        finally:
            model.train(was_training)
        if state.num_processes > 1:
            result = broadcast_object_list([result])[0]
        rows, teacher, info = result
        info["seconds"] = round(time.time() - started, 1)
        if state.is_main_process:
            log.info("mined negatives for epoch %d: %d of %d examples got all %d from ranks %d-%d (%.1f s)", epoch,
                     info["full"], len(examples), self.dataset.count, *self.ranks, info["seconds"])
            self._write(epoch, rows, teacher, info)
        return rows, teacher, info

    def _positives(self, index, encoded, unindexed) -> np.ndarray:
        """``[N, d]`` each example's positive: encoded now, or the index's vector of its row."""
        known = [i for i, r in enumerate(self.positive_rows) if r is not None]
        d = encoded.shape[1] if encoded is not None else None
        vectors = _vectors(index, [self.positive_rows[i] for i in known]) if known else None
        d = d or vectors.shape[1]
        out = np.empty((len(self.positive_rows), d), dtype=np.float32)
        if known:
            out[known] = vectors
        if unindexed:
            out[unindexed] = encoded
        return out

    def _choose(self, index, q, positives, query_row, epoch):
        examples, count = self.dataset.examples, self.dataset.count
        positive_scores = np.einsum("nd,nd->n", positives, q[[query_row[e["query"]] for e in examples]])
        depth = self.ranks[1] + max(len(r) for r in self.relevant)
        scores, rows = _search(index, np.ascontiguousarray(q, dtype=np.float32), depth)
        picked = choose_negatives(rows, scores, [query_row[e["query"]] for e in examples], positive_scores,
                                  self.relevant, count, self.ranks, self.relative_margin,
                                  [f"{self.seed}:{epoch}:{i}" for i in range(len(examples))])
        wanted = sorted({r for p in picked for r in p})
        text = dict(zip(wanted, self.dataset.passage_text(wanted))) if wanted else {}
        out = np.full((len(examples), count), -1, dtype=np.int64)
        for i, (e, p) in enumerate(zip(examples, picked)):
            relevant = {e["positive"], *e.get("relevant", []), *e["negatives"][:self.dataset.k - count]}
            chosen = [r for r in p if text[r] not in relevant][:count]  # a duplicate of a relevant text is no negative
            out[i, :len(chosen)] = chosen
        teacher = None
        if self.teacher is not None:
            pairs = [(i, j) for i in range(len(examples)) for j in range(count) if out[i, j] >= 0]
            teacher = np.zeros((len(examples), count), dtype=np.float32)
            if pairs:
                got = np.asarray(self.teacher.score([examples[i]["query"] for i, _ in pairs],
                                                    [text[int(out[i, j])] for i, j in pairs]), dtype=np.float32)
                for (i, j), s in zip(pairs, got):
                    teacher[i, j] = s
        info = {"full": int((out >= 0).all(1).sum()), "mined": int((out >= 0).sum()), "kept_own": int((out < 0).sum())}
        return out, teacher, info

    def _write(self, epoch: int, rows, teacher, info) -> None:
        file = self._file(epoch)
        if file is None:
            return
        from ..atomic import atomic_path

        arrays = {"rows": rows, "fingerprint": np.array(self.fingerprint()), "info": np.array(json.dumps(info))}
        if teacher is not None:
            arrays["teacher"] = teacher
        with atomic_path(file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
