"""Embeddings of a whole collection on disk, in chunks: written by :func:`encode_to_store` (one or
many processes, resumable), read by :class:`EmbeddingStore` one chunk at a time.

Layout of a store directory::

    manifest.json          format, chunk size, dtype, encoder key and options; n and d once complete
    chunk-000000.npy       rows [0, chunk_size) as [rows, d] (float16 or float32)
    chunk-000000.json      that chunk's row count, first row, digest of its texts (and its ids)
    ...

Chunk ``c`` holds rows ``[c · chunk_size, (c + 1) · chunk_size)`` of the collection. Each chunk is
written to a temp file and renamed into place, its ``.json`` last: a chunk with a ``.json`` is
complete, and a rerun after a kill encodes only the chunks without one. At the field's size
(10⁷ passages, d = 768) the store is 15 GB in float16; nothing here holds more than one chunk.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from itertools import chain, repeat, zip_longest
from pathlib import Path

import numpy as np

from .cache import texts_fingerprint
from .data.stream import RowIds, collection_size, text_batches
from .atomic import atomic_write

log = logging.getLogger(__name__)

FORMAT = "petune-embedding-store"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
_CHUNK = re.compile(r"chunk-(\d{6})\.json$")


def _chunk_name(c: int, suffix: str) -> str:
    return f"chunk-{c:06d}{suffix}"


def _finished_chunks(path: Path) -> set[int]:
    """Chunks with their ``.json`` (written last): complete."""
    return {int(m.group(1)) for m in (_CHUNK.match(p.name) for p in path.glob("chunk-*.json")) if m}


def _write_json(path: Path, value) -> None:
    text = json.dumps(value)
    atomic_write(path, lambda f: f.write(text.encode()))


class EmbeddingStore:
    """A complete store written by :func:`encode_to_store`, read one chunk at a time.

    Args:
        path: the store directory.

    Attributes:
        path, n (rows), dim (``d``), dtype (on disk), chunk_size, num_chunks, options (the encode
        options), key (digest of the encoder and options).

    Raises:
        FileNotFoundError: no store at ``path``.
        ValueError: the store is unfinished (says how many chunks are missing and how to finish it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.exists():
            raise FileNotFoundError(f"{self.path} holds no embedding store ({MANIFEST}); write one with "
                                    "petune.encode_to_store")
        manifest = json.loads(file.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{file} is not a petune embedding store manifest")
        if not manifest.get("complete"):
            done = len(_finished_chunks(self.path))
            raise ValueError(f"{self.path} is an unfinished store ({done} chunks written): rerun "
                             "encode_to_store with the same arguments to finish it")
        self.manifest = manifest
        self.n, self.dim, self.dtype = manifest["n"], manifest["dim"], manifest["dtype"]
        self.chunk_size, self.num_chunks = manifest["chunk_size"], manifest["num_chunks"]
        self.options, self.key = manifest["options"], manifest["key"]
        self._ids = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.dim

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, n={self.n}, dim={self.dim}, dtype={self.dtype})"

    @property
    def ids(self):
        """One id per row: the ids given to :func:`encode_to_store`, or the row numbers
        (``"0"``, ``"1"``, ... as a :class:`~petune.data.stream.RowIds`, which holds no list)."""
        if self._ids is None:
            if not self.manifest["has_ids"]:
                self._ids = RowIds(self.n)
            else:
                self._ids = [i for c in range(self.num_chunks) for i in self._chunk_meta(c)["ids"]]
        return self._ids

    def _chunk_meta(self, c: int) -> dict:
        return json.loads((self.path / _chunk_name(c, ".json")).read_text())

    def chunk_start(self, c: int) -> int:
        """The first row of chunk ``c``."""
        return c * self.chunk_size

    def chunk(self, c: int, dtype=np.float32) -> np.ndarray:
        """Chunk ``c`` as ``[rows, d]`` in ``dtype`` (read whole, not memory-mapped).

        Raises:
            IndexError: no chunk ``c``.
        """
        if not 0 <= c < self.num_chunks:
            raise IndexError(f"chunk {c} out of range: the store has {self.num_chunks} chunks")
        return np.load(self.path / _chunk_name(c, ".npy")).astype(dtype, copy=False)

    def chunks(self, dtype=np.float32, part: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, [rows, d] array)`` for each chunk in order, one in memory at a time.

        ``part=(i, parts)``: only chunks ``c`` with ``c % parts == i`` (one process's share).
        """
        i, parts = part
        for c in range(i, self.num_chunks, parts):
            yield self.chunk_start(c), self.chunk(c, dtype)

    def __getitem__(self, rows) -> np.ndarray:
        """Rows by index (an int, a slice, or an array of ints) as float32: ``[d]`` or ``[k, d]``."""
        if isinstance(rows, (int, np.integer)):
            return self[np.array([rows])][0]
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.n))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < -self.n or rows.max() >= self.n):
            raise IndexError(f"row index out of range for {self.n} rows")
        rows = rows % max(self.n, 1)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        which = rows // self.chunk_size
        for c in np.unique(which):
            sel = np.flatnonzero(which == c)
            block = np.load(self.path / _chunk_name(int(c), ".npy"), mmap_mode="r")
            out[sel] = block[rows[sel] - c * self.chunk_size]
            del block  # unmap: its pages leave the process
        return out

    def to_array(self, dtype=np.float32) -> np.ndarray:
        """The whole matrix ``[n, d]`` in memory: for small collections only (n · d · 4 bytes)."""
        out = np.empty((self.n, self.dim), dtype=dtype)
        for start, block in self.chunks(dtype):
            out[start:start + len(block)] = block
        return out


def _store_options(model, tokenizer, options: dict) -> tuple[str, dict]:
    from .embed import _check_args, _with_defaults, encoder_key, keyed_options
    from .tuned import is_task_list

    o = _with_defaults(options)
    if o["images"] is not None:
        raise ValueError("encode_to_store encodes text collections; encode images with petune.encode")
    if is_task_list(o["task"]):
        raise ValueError("encode_to_store takes one task for the whole collection (task='name'), not a list")
    _check_args(["x"], o["pooling"], o["layers"], o["layer_combine"], o["batch_size"])
    return encoder_key(model, tokenizer, options), keyed_options(model, tokenizer, options)


def _rows(texts, column, ids):
    """``(text, id or None)`` pairs of the collection, streamed; ``ids`` is a column name of the
    same dataset, an iterable parallel to ``texts``, or ``None``."""
    from .data.stream import _dataset_column, column_rows

    stream = chain.from_iterable(text_batches(texts, column=column))
    if ids is None:
        return zip(stream, repeat(None))
    if isinstance(ids, str):
        found = _dataset_column(texts, column)
        if found is None:
            raise ValueError(f"ids={ids!r} names a column, but texts is not a datasets.Dataset; pass one id "
                             "per text instead")
        ids = column_rows(found[0], ids)
    return _zip_strict(stream, (str(i) for i in ids))


def _zip_strict(texts, ids):
    missing = object()
    for row, (t, i) in enumerate(zip_longest(texts, ids, fillvalue=missing)):
        if t is missing or i is missing:
            raise ValueError(f"ids and texts differ in length (one of them ends at row {row}); give one id per text")
        yield t, i


def _check_manifest(path: Path, head: dict) -> str | None:
    """Create the store's manifest, or check that an existing one was written with ``head``'s
    settings; an error message, or ``None``."""
    file = path / MANIFEST
    if file.exists():
        found = json.loads(file.read_text())
        diff = {k: (found.get(k), v) for k, v in head.items() if found.get(k) != v}
        if diff:
            names = ", ".join(sorted(diff))
            return (f"{path} holds a store written with other settings ({names} differ: stored vs asked "
                    f"{diff}); choose another path, or delete it to encode again")
        return None
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        return f"{path} exists and is not an embedding store; choose a new path or remove it"
    path.mkdir(parents=True, exist_ok=True)
    _write_json(file, {**head, "complete": False})
    return None


def _on_main(state, fn) -> None:
    """Run ``fn`` (which returns an error message or ``None``) on the main process; every process
    raises ``ValueError`` with that message, so no process waits forever for a failed one."""
    from accelerate.utils import broadcast_object_list

    error = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(error)
    if error[0]:
        raise ValueError(error[0])


def _finish(path: Path, head: dict, n: int, chunk_size: int) -> str | None:
    """Check that chunks 0..K-1 are all there with the right row counts, then mark the store complete."""
    if n == 0:
        return "texts is empty: nothing to encode"
    count = -(-n // chunk_size)
    found = _finished_chunks(path)
    if found != set(range(count)):
        missing, extra = sorted(set(range(count)) - found), sorted(found - set(range(count)))
        return (f"{path}: chunks missing {missing[:5]} or beyond the collection's end {extra[:5]} "
                f"(expected {count} chunks for {n} texts); delete the store to encode again")
    dims = set()
    for c in range(count):
        meta = json.loads((path / _chunk_name(c, ".json")).read_text())
        if meta["rows"] != min(chunk_size, n - c * chunk_size):
            return f"{path}: chunk {c} has {meta['rows']} rows; delete the store to encode again"
        dims.add(meta["dim"])
    if len(dims) != 1:
        return f"{path}: chunks of different dimensions {sorted(dims)}; delete the store to encode again"
    _write_json(path / MANIFEST, {**head, "complete": True, "n": n, "dim": dims.pop(), "num_chunks": count})
    return None


def encode_to_store(model, tokenizer, texts, path: str | os.PathLike, *, column: str | None = None, ids=None,
                    chunk_size: int = 16384, dtype: str = "float32", progress: bool | None = None,
                    **options) -> EmbeddingStore:
    """Encode a collection straight to an on-disk :class:`EmbeddingStore`, chunk by chunk, on one
    process or split across the processes of an ``accelerate launch`` / ``torchrun`` run.

    Nothing holds the collection: texts are streamed (a ``datasets`` column is read from its
    Arrow files batch by batch, see :mod:`petune.data.stream`), each process encodes the chunks
    ``c`` with ``c % processes == rank`` with :func:`petune.encode` and writes each one atomically;
    no embedding is gathered. Rerun with the same arguments after a kill and the finished chunks
    are skipped (their texts checked against the digest they were written with): a kill loses at
    most the chunk each process was encoding. A chunk's embeddings do not depend on which process
    or run encoded it, so a resumed or N-process store equals an uninterrupted 1-process one.

    Args:
        model: a :class:`petune.TunedModel` or a plain Hugging Face encoder-decoder.
        tokenizer: the model's tokenizer.
        texts: a ``datasets.Dataset`` (with ``column``), one of its columns, or any iterable of
            strings (a generator is read once per process; every process must see the same texts).
        path: the store directory (created; a store there with other settings is an error).
        column: the text column when ``texts`` is a dataset.
        ids: one id per text — a column name of the same dataset, or an iterable — stored with
            each chunk; default: the row numbers (stored as nothing).
        chunk_size: rows per chunk file (16,384: about 25 MB at d = 384 in float32). A chunk is
            the unit of work lost to a kill and of memory while encoding.
        dtype: ``"float32"`` or ``"float16"`` (half the disk; values cast after encoding).
        progress: the main process's bar over the whole collection (every process's chunks, with
            an ETA when the size is known); default on. Other processes never show one.
        **options: :func:`petune.encode`'s keyword options (pooling, prefix, max_length,
            batch_size, normalize, task, quantize, ...); not ``images`` nor a list of tasks.

    Returns:
        The finished :class:`EmbeddingStore` (on every process). Its ``last_run`` says which
        chunks this process encoded and how many it found finished.

    Raises:
        ValueError: empty ``texts``, bad ``dtype`` / ``chunk_size`` / options, a store at ``path``
            written with another model, tokenizer, options, chunk size or dtype, finished chunks
            whose texts differ from the given ones, ``ids`` not one per text.
        TypeError: ``texts`` is one string or holds non-strings.
        FloatingPointError: NaN / inf embeddings, or values beyond float16's range with
            ``dtype="float16"``.
    """
    from tqdm.auto import tqdm

    from .dist import process_state
    from .embed import _check_quantize, encode, int8_copy

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    size = collection_size(texts, column)
    if size == 0:
        raise ValueError("texts is empty: nothing to encode")
    state = process_state()
    rank, world = state.process_index, state.num_processes
    path = Path(path)
    key, keyed = _store_options(model, tokenizer, options)
    head = {"format": FORMAT, "version": VERSION, "chunk_size": chunk_size, "dtype": dtype, "key": key,
            "options": keyed, "has_ids": ids is not None}
    _on_main(state, lambda: _check_manifest(path, head))
    state.wait_for_everyone()
    options = dict(options)
    if options.get("quantize") is not None:  # one int8 copy for every chunk (the key names the option)
        _check_quantize(model, options["quantize"])
        model, options["quantize"] = int8_copy(model), None
    finished = _finished_chunks(path)
    show = state.is_main_process and (progress is None or progress)
    bar = tqdm(total=size, initial=min(len(finished) * chunk_size, size or 0), unit="text",
               desc="encode to store", disable=not show)
    encoded, reused = [], 0

    def flush(c: int, chunk_texts: list[str], chunk_ids: list) -> None:
        nonlocal reused
        digest = texts_fingerprint(chunk_texts + (chunk_ids if ids is not None else []))
        if c in finished:
            if json.loads((path / _chunk_name(c, ".json")).read_text())["texts"] != digest:
                raise ValueError(f"chunk {c} of {path} was encoded from other texts (or ids) than rows "
                                 f"{c * chunk_size}-{c * chunk_size + len(chunk_texts) - 1} given now; "
                                 "delete the store to encode this collection")
            reused += 1
            return
        log.info("process %d: encoding chunk %d", rank, c)
        vecs = encode(model, tokenizer, chunk_texts, progress=False, **options).astype(dtype)
        if not np.isfinite(vecs).all():
            raise FloatingPointError(f"chunk {c}: embeddings beyond {dtype}'s range (or NaN); use dtype='float32'")
        atomic_write(path / _chunk_name(c, ".npy"), lambda f: np.save(f, vecs))
        meta = {"rows": len(chunk_texts), "start": c * chunk_size, "dim": int(vecs.shape[1]), "texts": digest}
        if ids is not None:
            meta["ids"] = chunk_ids
        _write_json(path / _chunk_name(c, ".json"), meta)  # last: the chunk is complete
        encoded.append(c)
        log.info("process %d: encoded chunk %d (rows %d-%d)", rank, c, c * chunk_size,
                 c * chunk_size + len(chunk_texts) - 1)
        if show:
            done = len(_finished_chunks(path)) * chunk_size  # every process's chunks
            bar.n = done if size is None else min(done, size)
            bar.refresh()

    current, chunk_texts, chunk_ids, n = 0, [], [], 0
    for row, (text, id_) in enumerate(_rows(texts, column, ids)):
        c = row // chunk_size
        if c != current:
            if current % world == rank:
                flush(current, chunk_texts, chunk_ids)
            current, chunk_texts, chunk_ids = c, [], []
        if c % world == rank:
            chunk_texts.append(text)
            chunk_ids.append(id_)
        n = row + 1
    if chunk_texts:
        flush(current, chunk_texts, chunk_ids)
    bar.close()
    log.info("process %d: %d chunks encoded, %d finished ones reused", rank, len(encoded), reused)
    state.wait_for_everyone()
    _on_main(state, lambda: _finish(path, head, n, chunk_size))
    state.wait_for_everyone()
    store = EmbeddingStore(path)
    store.last_run = {"encoded": encoded, "reused": reused}
    return store
