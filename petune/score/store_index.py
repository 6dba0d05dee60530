"""Indexes over an :class:`~petune.store.EmbeddingStore` that never hold its whole matrix.

- :class:`ExactStoreIndex` — exact search chunk by chunk: each chunk searched with
  ``faiss.knn``, the top-k kept in a ``faiss.ResultHeap`` (what FAISS offers for datasets that do
  not fit in RAM); on several processes each searches its own chunks and the main process merges.
- :func:`build_index` — ``"Flat"`` gives the exact index above; any other ``faiss.index_factory``
  string (``"IVF4096,PQ64"``, ``"IVF1024,SQ8"``, ``"OPQ64,IVF4096,PQ64"``, ``"HNSW32"``...) is
  trained on a sample of the store and filled chunk by chunk: memory is the index (the codes),
  the training sample and one chunk.
"""

from __future__ import annotations

import logging

import numpy as np

from ..atomic import atomic_path, remove_stale_temps
from ..cache import fingerprint
from .retrieval import DenseIndex, _check_ids, _clamp_k, _metric, check_embeddings
from .runs import ranx_run

log = logging.getLogger(__name__)


def _to_run(scores, rows, query_ids, ids, metric: str):
    if metric == "l2":
        scores = -scores
    return ranx_run({qid: {ids[int(j)]: float(s) for s, j in zip(row_scores, row_idx) if j >= 0}
                     for qid, row_scores, row_idx in zip(query_ids, scores, rows)})


class ExactStoreIndex:
    """Exact (brute-force) search over an embedding store, one chunk in memory at a time.

    The results are those of a ``Flat`` index over the whole matrix (same top-k, same scores),
    at the memory cost of one chunk plus the ``[queries, k]`` results. Each search reads the
    store once (sequential reads: 15 GB for 10⁷ × 768 float16 vectors).

    Args:
        store: an :class:`~petune.store.EmbeddingStore` (or its path).
        metric: ``"ip"`` (inner product, DPR and meerqat) or ``"l2"``.

    Raises:
        ValueError: a bad metric.
    """

    factory = "Flat"

    def __init__(self, store, metric: str = "ip"):
        from ..store import EmbeddingStore

        self.store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
        self.metric = metric
        self._faiss_metric = _metric(metric)

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def ids(self):
        return self.store.ids

    def __len__(self) -> int:
        return len(self.store)

    def search_arrays(self, queries: np.ndarray, k: int, part: tuple[int, int] = (0, 1)):
        """Top-``k`` of the chunks in ``part`` (``(i, parts)``: chunks ``c % parts == i``):
        ``(scores [nq, k] float32, rows [nq, k] int64)``, best first; rows are the store's row
        numbers, ``-1`` where fewer than ``k`` rows were searched."""
        import faiss

        heap = faiss.ResultHeap(len(queries), k, keep_max=self.metric == "ip")
        for start, block in self.store.chunks(part=part):
            scores, rows = faiss.knn(queries, block, min(k, len(block)), metric=self._faiss_metric)
            heap.add_result(scores, np.where(rows >= 0, rows + start, -1))
        heap.finalize()
        return heap.D, heap.I

    def search(self, queries, query_ids, k: int = 100, sharded: bool = False):
        """Top-``k`` documents per query as a ``ranx.Run`` (scores: inner product, or -L2 distance).

        Args:
            queries: ``[n_queries, d]`` float32.
            query_ids: one id per query.
            k: depth; larger than the collection warns and returns every document.
            sharded: under several processes (``accelerate launch`` / ``torchrun``), each process
                searches every ``processes``-th chunk and the main process merges the top-k
                (every process must call it with the same queries); the main process gets the run,
                the others ``None``. With one process it is the plain search.

        Raises:
            ValueError: query dimension differs from the store, NaN / inf, ids that do not match.
        """
        q = check_embeddings(queries, "query embeddings", dim=self.dim)
        query_ids = _check_ids(query_ids, len(q), "query ids")
        k = _clamp_k(k, len(self))
        if not sharded:
            return _to_run(*self.search_arrays(q, k), query_ids, self.ids, self.metric)
        import faiss
        from accelerate.utils import gather_object

        from ..dist import process_state

        state = process_state()
        if state.num_processes == 1:
            return _to_run(*self.search_arrays(q, k), query_ids, self.ids, self.metric)
        mine = self.search_arrays(q, k, part=(state.process_index, state.num_processes))
        parts = gather_object([mine])
        if not state.is_main_process:
            return None
        heap = faiss.ResultHeap(len(q), k, keep_max=self.metric == "ip")
        for scores, rows in parts:
            heap.add_result(scores, rows)
        heap.finalize()
        return _to_run(heap.D, heap.I, query_ids, self.ids, self.metric)


def default_train_size(index, n: int) -> int:
    """Training sample for a FAISS index: 40 points per centroid of its largest k-means (FAISS
    warns below 39): the IVF lists, and 256 per PQ sub-quantizer; at least 10,000; at most ``n``."""
    import faiss

    centroids = 0
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        centroids = ivf.nlist
    for obj in (index, ivf):
        pq = getattr(faiss.downcast_index(obj), "pq", None) if obj is not None else None
        if pq is not None:
            centroids = max(centroids, pq.ksub)
    return int(min(n, max(40 * centroids, 10_000)))


def build_index(store, factory: str = "Flat", metric: str = "ip", train_size: int | None = None, seed: int = 0,
                search_params: str | None = None, progress: bool | None = None, cache: bool = True):
    """An index over a store, built in bounded memory.

    Args:
        store: an :class:`~petune.store.EmbeddingStore` (or its path).
        factory: ``"Flat"`` → :class:`ExactStoreIndex` (exact, nothing copied); any other
            ``faiss.index_factory`` string → a :class:`~petune.score.DenseIndex` trained on
            ``train_size`` rows drawn uniformly (``seed``) and filled chunk by chunk.
        metric: ``"ip"`` or ``"l2"``.
        train_size: training rows; default :func:`default_train_size` (FAISS's advice).
        search_params: FAISS search-time parameters, e.g. ``"nprobe=64"`` (IVF lists visited per
            query; FAISS's default of 1 loses recall).
        progress: a bar over the chunks added; default: when there are more than 10.
        cache: keep the trained and filled index in the store's ``indexes/`` folder, keyed by the
            factory, metric, training sample size and seed (the store itself is keyed by its encoder
            and collection), and read it back instead of training and filling again. Written
            atomically: a kill leaves no index to trust.

    Returns:
        An object with ``search(queries, query_ids, k) -> ranx.Run``, ``__len__``, ``dim``, ``ids``;
        its ``from_cache`` says whether the index was read back.

    Raises:
        ValueError: a bad factory string, metric or parameter, ``train_size`` below the index's
            needs (FAISS's message).
    """
    import faiss
    from tqdm.auto import tqdm

    from ..store import EmbeddingStore

    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    if factory == "Flat":
        return ExactStoreIndex(store, metric)
    try:
        index = faiss.index_factory(store.dim, factory, _metric(metric))
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index {factory!r}: {str(e).splitlines()[-1]}") from None
    size = None
    if not index.is_trained:
        size = default_train_size(index, len(store)) if train_size is None else int(train_size)
        if not 1 <= size <= len(store):
            raise ValueError(f"train_size must be in [1, {len(store)}], got {train_size!r}")
    where = store.path / "indexes" / f"{fingerprint(store.key, factory, metric, size, seed)}.faiss" if cache else None
    from_cache = where is not None and where.exists()
    if from_cache:
        log.info("reading the %s index of %s from %s", factory, store.path, where)
        index = faiss.read_index(str(where))
    else:
        if size is not None:
            rows = np.sort(np.random.default_rng(seed).choice(len(store), size, replace=False))
            log.info("training %s on %d of %d rows", factory, size, len(store))
            try:
                index.train(store[rows])
            except RuntimeError as e:
                raise ValueError(f"faiss cannot train {factory!r} on {size} rows: {str(e).splitlines()[-1]}") from None
        show = store.num_chunks > 10 if progress is None else progress
        for _, block in tqdm(store.chunks(), total=store.num_chunks, desc=f"add to {factory}", unit="chunk",
                             disable=not show):
            index.add(block)
        if where is not None:
            remove_stale_temps(where.parent)  # a killed write's leftovers (one process builds indexes)
            with atomic_path(where) as tmp:
                faiss.write_index(index, str(tmp))
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot set {search_params!r} on {factory!r}: {str(e).splitlines()[-1]}") from None
    wrapped = DenseIndex.wrap(index, store.ids, factory, metric)
    wrapped.from_cache = from_cache
    return wrapped
