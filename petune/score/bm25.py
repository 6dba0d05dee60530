"""BM25 (Robertson & Zaragoza, 2009) with ``bm25s``: a baseline run and hard-negative mining."""

from __future__ import annotations

import warnings

from ..cache import Cache, fingerprint, texts_fingerprint


class BM25:
    """A BM25 index over a document collection (``bm25s``, Lucene variant by default).

    Args:
        docs: ``{doc_id: text}``.
        k1, b: BM25 parameters (defaults 1.5 / 0.75; ViQuAE's tuned values are k1=0.5, b=0.3).
        method: a ``bm25s`` variant: ``"lucene"``, ``"robertson"``, ``"atire"``, ``"bm25l"``, ``"bm25+"``.
        stopwords: ``bm25s`` stopword list name (``"en"``) or ``None``.
        stemmer: optional callable stemming a list of words (e.g. ``Stemmer.Stemmer("english").stemWords``
            from PyStemmer); applied to documents and queries alike.
        cache_dir: cache the runs of :meth:`search` there, keyed by the documents, the queries,
            ``k`` and every option above; the index is only built when a search misses the cache
            (on a large collection, building it is most of the cost). See :mod:`petune.cache`.

    Raises:
        ValueError: an empty collection.
    """

    def __init__(self, docs: dict[str, str], k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stopwords: str | None = "en", stemmer=None, cache_dir=None):
        import bm25s

        if not docs:
            raise ValueError("BM25 needs at least one document")
        self.ids = [str(d) for d in docs]
        self.texts = list(docs.values())
        self.stopwords, self.stemmer = stopwords, stemmer
        self.retriever = bm25s.BM25(method=method, k1=k1, b=b)
        self._indexed = False
        self.cache = Cache(cache_dir) if cache_dir is not None else None
        self._key = None
        if self.cache is not None:
            stemmer_name = None if stemmer is None else getattr(stemmer, "__qualname__", type(stemmer).__name__)
            self._key = [texts_fingerprint(self.ids), texts_fingerprint(self.texts), k1, b, method, stopwords,
                         stemmer_name]

    def __len__(self) -> int:
        return len(self.ids)

    def _index(self) -> None:
        import bm25s

        if not self._indexed:
            tokens = bm25s.tokenize(self.texts, stopwords=self.stopwords, stemmer=self.stemmer, show_progress=False)
            self.retriever.index(tokens, show_progress=False)
            self._indexed = True

    def search(self, queries: dict[str, str], k: int = 100, name: str = "BM25"):
        """Top-``k`` documents per query as a ``ranx.Run`` (documents with score 0 are left out:
        they share no term with the query and their order would be arbitrary).

        ``k`` larger than the collection warns and returns every matching document.
        """
        from ranx import Run

        if not queries:
            raise ValueError("no queries to search")
        if k > len(self):
            warnings.warn(f"k={k} is larger than the collection ({len(self)} documents); returning all of them",
                          stacklevel=2)
            k = len(self)
        key = run = None
        if self.cache is not None:
            key = fingerprint(self._key, texts_fingerprint([str(q) for q in queries]),
                              texts_fingerprint(list(queries.values())), k)
            run = self.cache.load_json("bm25-run", key)
        if run is None:
            run = self._search(queries, k)
            if key is not None:
                self.cache.save_json("bm25-run", key, run)
        empty = [q for q, docs in run.items() if not docs]
        if empty:
            warnings.warn(f"{len(empty)} queries share no term with any document (e.g. {empty[:3]}); "
                          "they retrieve nothing and score 0", stacklevel=2)
        return Run(run, name=name)

    def _search(self, queries: dict[str, str], k: int) -> dict[str, dict[str, float]]:
        import bm25s

        self._index()
        tokens = bm25s.tokenize(list(queries.values()), stopwords=self.stopwords, stemmer=self.stemmer,
                                return_ids=False, show_progress=False)
        idx, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        return {str(qid): {self.ids[j]: float(s) for j, s in zip(row_idx, row_scores) if s > 0}
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
