"""BM25 (Robertson & Zaragoza, 2009) with ``bm25s``: a baseline run and hard-negative mining, over
collections of any size.

The index is ``bm25s``'s own (a sparse CSC matrix of precomputed scores, searched by
``bm25s.BM25.retrieve``; saved and memory-mapped by ``bm25s``), built from a stream: ``bm25s``'s
``Tokenizer.streaming_tokenize`` reads the collection batch by batch, each document's distinct
terms and counts are spilled to disk, and the matrix is filled column by column from the spill
with ``bm25s``'s own idf and term-frequency scorers. Peak memory is the index plus one batch —
not the token lists of the whole collection that ``bm25s.index`` keeps as Python objects
(3 KB per 100-word passage: 33 GiB for ViQuAE's 11.9M passages).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from itertools import chain
from pathlib import Path

import numpy as np

from ..cache import Cache, collection_fingerprint, fingerprint, texts_fingerprint
from ..data.stream import RowIds, collection_size, column_rows, text_batches
from .runs import ranx_run

INDEX_META = "petune_bm25.json"
#: words of several languages a stemmer is tried on for the cache key: two stemmers that stem them
#: alike are taken as one (a name alone cannot tell PyStemmer's English from its French, or two lambdas)
STEMMER_PROBE = ["running", "connections", "generously", "universities", "happily", "nationalement",
                 "continuaient", "décisions", "häuser", "zeitungen", "corriendo", "ciudades", "ragazzi"]


def stemmer_key(stemmer) -> list | None:
    """What identifies a stemmer in a cache key: its module and name, and what it makes of
    :data:`STEMMER_PROBE` (``None`` for no stemmer)."""
    if stemmer is None:
        return None
    name = f"{getattr(stemmer, '__module__', None) or type(stemmer).__module__}." \
           f"{getattr(stemmer, '__qualname__', type(stemmer).__qualname__)}"
    return [name, [str(w) for w in stemmer(list(STEMMER_PROBE))]]


def _stem_one(stemmer):
    """A stemmer of one word from petune's contract (a callable on a list of words, such as
    PyStemmer's ``stemWords``), as ``bm25s.tokenization.Tokenizer`` wants it."""
    if stemmer is None:
        return None
    return lambda word: stemmer([word])[0]


SPILL = "petune-bm25-spill-"


def remove_dead_spills(folder) -> int:
    """Remove the spill folders (``petune-bm25-spill-HOST-PID-*``, several GB at 10⁷ passages) that
    processes of this host killed while indexing left in ``folder``; those of live processes and
    of other hosts stay. Returns how many were removed."""
    import shutil

    removed, host = 0, socket.gethostname()
    for p in Path(folder).glob(f"{SPILL}{host}-*"):
        pid = p.name[len(SPILL) + len(host) + 1:].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def build_bm25s(batches, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords="en", stemmer=None,
                spill_dir=None, progress: bool = False, total: int | None = None):
    """A ``bm25s.BM25`` index and its ``bm25s`` tokenizer from a stream of text batches.

    Scores are ``bm25s``'s: its tokenizer, idf and term-frequency scorers, its CSC layout (each
    column's documents in increasing order) — equal to ``bm25s.BM25.index`` on the same tokens
    up to float rounding (1 ulp).

    Args:
        batches: an iterable of lists of strings (see :func:`petune.data.stream.text_batches`).
        spill_dir: where the per-document term counts go between the two passes (8 bytes per
            distinct term of each document; deleted after, and the spills of killed runs are
            removed before: :func:`remove_dead_spills`); default: the system temp folder.
        total: the number of documents, for the progress bar.

    Returns:
        ``(retriever, tokenizer)``.
    """
    import bm25s
    from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer
    from bm25s.tokenization import Tokenizer
    from tqdm.auto import tqdm

    tokenizer = Tokenizer(stopwords=stopwords, stemmer=_stem_one(stemmer))
    retriever = bm25s.BM25(k1=k1, b=b, method=method)
    if spill_dir is not None:
        remove_dead_spills(spill_dir)
    with tempfile.TemporaryDirectory(prefix=f"{SPILL}{socket.gethostname()}-{os.getpid()}-", dir=spill_dir) as tmp:
        terms_file, counts_file = Path(tmp) / "terms.i32", Path(tmp) / "counts.f32"
        doc_len, distinct, df = [], [], np.zeros(0, dtype=np.int64)
        bar = tqdm(total=total, desc="BM25 index", unit="doc", disable=not progress)
        with open(terms_file, "wb") as terms_out, open(counts_file, "wb") as counts_out:
            for batch in batches:  # pass 1: tokens → (term, count) per document, spilled
                ids = list(tokenizer.streaming_tokenize(batch, update_vocab=True))
                # a document with no term left (only stopwords: "No.", "it") comes back as bm25s's
                # empty-string token; bm25s.index counts it as length 0, and so must we (its average
                # document length, and so every score, would shift)
                empty = tokenizer.word_to_id.get("")
                if empty is not None:
                    ids = [[] if doc == [empty] else doc for doc in ids]
                lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
                docs = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
                pairs, counts = np.unique((docs << 32) | flat, return_counts=True)  # by document, then term
                terms = (pairs & 0xFFFFFFFF).astype(np.int32)
                terms.tofile(terms_out)
                counts.astype(np.float32).tofile(counts_out)
                doc_len.append(lengths.astype(np.int32))
                distinct.append(np.bincount((pairs >> 32).astype(np.int64), minlength=len(ids)).astype(np.int32))
                seen = np.bincount(terms, minlength=len(df))
                seen[:len(df)] += df
                df = seen
                bar.update(len(ids))
        bar.close()
        doc_len, distinct = np.concatenate(doc_len or [[]]), np.concatenate(distinct or [[]])
        n_docs, n_vocab = len(doc_len), len(df)
        if n_docs == 0:
            raise ValueError("BM25 needs at least one document")
        avg_doc_len = float(doc_len.mean())
        idf_fn = _select_idf_scorer(retriever.idf_method)
        idf = np.fromiter((idf_fn(int(x), N=n_docs) if x else 0.0 for x in df), dtype=np.float32, count=n_vocab)
        tfc_fn = _select_tfc_scorer(method)
        nonoccurrence = None
        if method in retriever.methods_requiring_nonoccurrence:
            zero = tfc_fn(tf_array=0, l_d=avg_doc_len, l_avg=avg_doc_len, k1=k1, b=b, delta=retriever.delta)
            nonoccurrence = (idf * np.float32(zero)).astype(np.float32)
        indptr = np.zeros(n_vocab + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        data = np.empty(int(indptr[-1]), dtype=np.float32)
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        heads = indptr[:-1].copy()
        with open(terms_file, "rb") as terms_in, open(counts_file, "rb") as counts_in:
            block = 8192  # documents per step: the step's temporaries stay ~50 MB
            for start in range(0, n_docs, block):  # pass 2: scores, placed column by column
                per_doc = distinct[start:start + block]
                size = int(per_doc.sum())
                terms = np.fromfile(terms_in, dtype=np.int32, count=size)
                counts = np.fromfile(counts_in, dtype=np.float32, count=size)
                docs = np.repeat(np.arange(start, start + len(per_doc), dtype=np.int32), per_doc)
                scores = idf[terms] * tfc_fn(tf_array=counts, l_d=doc_len[docs], l_avg=avg_doc_len, k1=k1, b=b,
                                             delta=retriever.delta)
                if nonoccurrence is not None:
                    scores = scores - nonoccurrence[terms]
                order = np.argsort(terms, kind="stable")  # documents stay in order within a term
                terms, docs, scores = terms[order], docs[order], scores[order]
                uniq, first, n_per = np.unique(terms, return_index=True, return_counts=True)
                pos = heads[terms] + (np.arange(len(terms)) - np.repeat(first, n_per))
                data[pos], indices[pos] = scores, docs
                heads[uniq] += n_per
    retriever.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}
    retriever.vocab_dict = tokenizer.word_to_id
    retriever.unique_token_ids_set = set(range(n_vocab))
    retriever.nonoccurrence_array = nonoccurrence
    return retriever, tokenizer


class BM25:
    """A BM25 index over a document collection (``bm25s``, Lucene variant by default), built from a
    stream in memory that follows the index (see :func:`build_bm25s`).

    Args:
        docs: ``{doc_id: text}``, or a collection streamed without a list of its texts: a
            ``datasets.Dataset`` (with ``column``), one of its columns, or any re-iterable of
            strings (with ``ids``).
        k1, b: BM25 parameters (defaults 1.5 / 0.75; ViQuAE's tuned values are k1=0.5, b=0.3).
        method: a ``bm25s`` variant: ``"lucene"``, ``"robertson"``, ``"atire"``, ``"bm25l"``, ``"bm25+"``.
        stopwords: ``bm25s`` stopword list name (``"en"``) or ``None``.
        stemmer: optional callable stemming a list of words (e.g. ``Stemmer.Stemmer("english").stemWords``
            from PyStemmer); applied to documents and queries alike.
        cache_dir: cache there the index (``bm25s``'s files, memory-mapped when read back) and the
            runs of :meth:`search`, keyed by the documents (a dataset's fingerprint, or a digest of
            the texts), the ids, the queries, ``k`` and every option above; the index is built or
            read only when a search misses the cache. See :mod:`petune.cache`.
        column: the text column when ``docs`` is a dataset.
        ids: for a streamed collection, one id per document: a column name of the dataset, or an
            iterable; default: the row numbers (``"0"``, ``"1"``, ...).
        progress: show a bar while indexing.
        n_threads: threads searching queries at once (``bm25s``'s ``n_threads``); default: every
            core of the machine (``os.cpu_count()``). Results do not depend on it.
        backend: ``bm25s``'s top-k backend: ``"numpy"`` (the default) or ``"numba"`` (compiled,
            parallel; about 75x faster per query here). Scores are equal; documents tied at the
            depth cut-off may be others, so runs are cached per backend.

    Raises:
        ValueError: an empty collection; ``docs`` a dataset without ``column``.
    """

    def __init__(self, docs, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stopwords: str | None = "en", stemmer=None, cache_dir=None, *, column: str | None = None,
                 ids=None, progress: bool = False, n_threads: int | None = None, backend: str = "numpy"):
        from ..data.stream import _dataset_column

        if backend not in ("numpy", "numba"):
            raise ValueError(f"backend must be 'numpy' or 'numba', got {backend!r}")
        self.backend = backend
        self.n_threads = max(1, int(n_threads or os.cpu_count() or 1))
        self._column = column
        if isinstance(docs, dict):
            if not docs:
                raise ValueError("BM25 needs at least one document")
            if column is not None or ids is not None:
                raise ValueError("docs is a {doc_id: text} dict: it names its ids; column= and ids= are for "
                                 "streamed collections")
            self._texts, self.ids = docs.values(), [str(d) for d in docs]
        else:
            size = collection_size(docs, column)
            if size == 0:
                raise ValueError("BM25 needs at least one document")
            self._texts = docs
            if ids is None:
                self.ids = RowIds(size) if size is not None else None  # None: known once indexed
            elif isinstance(ids, str):
                found = _dataset_column(docs, column)
                if found is None:
                    raise ValueError(f"ids={ids!r} names a column, but docs is not a datasets.Dataset")
                self.ids = [str(i) for i in column_rows(found[0], ids)]
            else:
                self.ids = [str(i) for i in ids]
        self.k1, self.b, self.method, self.stopwords, self.stemmer = k1, b, method, stopwords, stemmer
        self.progress = progress
        self.retriever = self.tokenizer = None
        self._indexed = False
        self.cache = Cache(cache_dir) if cache_dir is not None else None
        self._key = None
        if self.cache is not None:
            self._key = [self._docs_fingerprint(), texts_fingerprint(self.ids or []), k1, b, method, stopwords,
                         stemmer_key(stemmer)]

    def _docs_fingerprint(self) -> str:
        """A dataset's own fingerprint (no pass over its texts), else a digest of the texts."""
        try:
            return collection_fingerprint(self._texts, self._column)
        except ValueError:
            raise ValueError("cache_dir needs a collection that can be read twice (a list, a dataset), "
                             "not a one-pass iterator") from None

    def __len__(self) -> int:
        if self.ids is None:  # a stream of unknown length: counted while indexing
            self._index()
        return len(self.ids)

    def _index_dir(self) -> Path | None:
        return None if self.cache is None else self.cache.root / f"bm25-index-{fingerprint(self._key)}"

    def _index(self) -> None:
        import bm25s
        from bm25s.tokenization import Tokenizer

        from ..atomic import atomic_dir

        if self._indexed:
            return
        where = self._index_dir()
        if where is not None and (where / INDEX_META).exists():
            self.retriever = bm25s.BM25.load(where, mmap=True, show_progress=False)
            self.tokenizer = Tokenizer(stopwords=self.stopwords, stemmer=_stem_one(self.stemmer))
            self.tokenizer.load_vocab(where)
            n = json.loads((where / INDEX_META).read_text())["documents"]
        else:
            batches = text_batches(self._texts, batch_size=4096, column=self._column)
            spill = None if self.cache is None else self.cache.root
            if spill is not None:
                spill.mkdir(parents=True, exist_ok=True)
            self.retriever, self.tokenizer = build_bm25s(
                batches, self.k1, self.b, self.method, self.stopwords, self.stemmer, spill_dir=spill,
                progress=self.progress, total=None if self.ids is None else len(self.ids))
            n = self.retriever.scores["num_docs"]
            if where is not None:
                with atomic_dir(where) as tmp:
                    self.retriever.save(tmp, show_progress=False)
                    self.tokenizer.save_vocab(tmp)
                    (tmp / INDEX_META).write_text(json.dumps({"documents": n}))
        self.retriever.backend = self.backend
        if self.ids is None:
            self.ids = RowIds(n)
        elif len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} documents; give one id per document")
        self._indexed = True

    def search(self, queries: dict[str, str], k: int = 100, name: str = "BM25"):
        """Top-``k`` documents per query as a ``ranx.Run`` (documents with score 0 are left out:
        they share no term with the query and their order would be arbitrary).

        ``k`` larger than the collection warns and returns every matching document.
        """
        if not queries:
            raise ValueError("no queries to search")
        key = run = None
        if self.cache is not None:
            key = fingerprint(self._key, texts_fingerprint([str(q) for q in queries]),
                              texts_fingerprint(list(queries.values())), k,
                              *([self.backend] if self.backend != "numpy" else []))
            run = self.cache.load_json("bm25-run", key)
        if run is None:
            run = self._search(queries, k)
            if key is not None:
                self.cache.save_json("bm25-run", key, run)
        if k > len(self):
            warnings.warn(f"k={k} is larger than the collection ({len(self)} documents); returning all of them",
                          stacklevel=2)
        empty = [q for q, docs in run.items() if not docs]
        if empty:
            warnings.warn(f"{len(empty)} queries share no term with any document (e.g. {empty[:3]}); "
                          "they retrieve nothing and score 0", stacklevel=2)
        return ranx_run(run, name=name)

    def _search(self, queries: dict[str, str], k: int) -> dict[str, dict[str, float]]:
        self._index()
        k = min(k, len(self))
        tokens = self.tokenizer.tokenize(list(queries.values()), update_vocab=False, return_as="ids",
                                         show_progress=False)
        idx, scores = self.retriever.retrieve(tokens, k=k, show_progress=False,  # 0: bm25s's one-thread path
                                              n_threads=self.n_threads if self.n_threads > 1 else 0)
        return {str(qid): {self.ids[int(j)]: float(s) for j, s in zip(row_idx, row_scores) if s > 0}
                for qid, row_idx, row_scores in zip(queries, idx, scores)}

    def hard_negatives(self, queries: dict[str, str], qrels: dict, k: int = 100, n: int | None = None,
                       run=None) -> dict[str, list[str]]:
        """For each query, its BM25 top-``k`` documents that are not relevant, in BM25 rank order.

        Args:
            qrels: ``{query_id: {doc_id: relevance}}``; relevance > 0 counts as relevant.
            k: BM25 depth searched (meerqat: 100).
            n: keep at most ``n`` negatives per query (default: all found).
            run: reuse an existing BM25 run for these queries instead of searching again.

        Returns:
            ``{query_id: [doc_id, ...]}`` (possibly empty lists).
        """
        run = (self.search(queries, k=k) if run is None else run).to_dict()
        negatives = {}
        for qid in queries:
            relevant = {d for d, r in qrels.get(qid, {}).items() if r > 0}
            ranked = sorted(run.get(qid, {}).items(), key=lambda item: -item[1])
            found = [d for d, _ in ranked if d not in relevant]
            negatives[qid] = found if n is None else found[:n]
        return negatives


def index_size(retriever) -> int:
    """Bytes of a ``bm25s`` index's arrays (scores, row indices, column pointers)."""
    return int(sum(v.nbytes for v in retriever.scores.values() if hasattr(v, "nbytes")))

