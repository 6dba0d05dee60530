"""Embeddings of a whole collection on disk, in chunks: written by :func:`encode_to_store` (one or
many processes, resumable), read by :class:`EmbeddingStore` one chunk at a time.

Layout of a store directory::

    manifest.json          format, chunk size, dtype, encoder key and options; n and d once complete
    chunk-000000.npy       rows [0, chunk_size) as [rows, d] (float16 or float32)
    chunk-000000.json      that chunk's row count, first row, digest of its texts (and its ids)
    ...
    ids.npy                with user ids: every row's id, utf-8 bytes of one width (memory-mapped)

Chunk ``c`` holds rows ``[c · chunk_size, (c + 1) · chunk_size)`` of the collection. Each chunk is
written to a temp file, flushed to disk and renamed into place, its ``.json`` last: a chunk whose
``.json`` is there and whose ``.npy`` has the shape the ``.json`` states is complete, and a rerun
after a kill (or a crash of the machine) encodes only the other chunks. At the field's size
(10⁷ passages, d = 768) the store is 15 GB in float16; nothing here holds more than one chunk.
User ids are checked unique while encoding and kept on disk: 10⁷ ids are never a Python list.
"""

from __future__ import annotations

import json
import logging
import os
import re
from array import array
from collections.abc import Iterator, Sequence
from itertools import chain, repeat, zip_longest
from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_write, remove_stale_temps
from .cache import texts_fingerprint
from .data.stream import RowIds, collection_size, id_hash, text_batches

log = logging.getLogger(__name__)

FORMAT = "petune-embedding-store"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
_CHUNK = re.compile(r"chunk-(\d{6})\.json$")
IDS = "ids.npy"


class StoreError(ValueError):
    """A store that cannot be written or trusted as asked (texts that differ from a finished
    chunk's, duplicate ids, a store written with other settings...): the message names the
    problem and the fix. Raised on every process of a multi-process run, never on one alone."""


class StoreRangeError(StoreError, FloatingPointError):
    """Embeddings beyond the store dtype's range (or NaN / inf)."""


def _chunk_name(c: int, suffix: str) -> str:
    return f"chunk-{c:06d}{suffix}"


def _finished_chunks(path: Path) -> set[int]:
    """Chunks with their ``.json`` (written last): complete."""
    return {int(m.group(1)) for m in (_CHUNK.match(p.name) for p in path.glob("chunk-*.json")) if m}


def _npy_shape(file: Path) -> tuple | None:
    """The shape of a ``.npy`` file whose bytes are all there, else ``None`` (missing, truncated,
    or not an array file): numpy's memory map checks the size against the header; no data is read."""
    try:
        block = np.load(file, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    shape = tuple(block.shape)
    del block
    return shape


def _chunk_is_whole(path: Path, c: int) -> bool:
    """A chunk whose ``.json`` and ``.npy`` agree: the ``.npy`` holds the rows the ``.json`` states."""
    try:
        meta = json.loads((path / _chunk_name(c, ".json")).read_text())
    except (OSError, ValueError):
        return False
    return _npy_shape(path / _chunk_name(c, ".npy")) == (meta.get("rows"), meta.get("dim"))


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
        """One id per row: the ids given to :func:`encode_to_store` (a :class:`StoreIds`, read
        from ``ids.npy`` memory-mapped, one id at a time), or the row numbers (``"0"``, ``"1"``,
        ... as a :class:`~petune.data.stream.RowIds`). Neither holds a list; both are unique."""
        if self._ids is None:
            if not self.manifest["has_ids"]:
                self._ids = RowIds(self.n)
            elif (self.path / IDS).exists():
                self._ids = StoreIds(self.path / IDS)
            else:  # a store finished before ids.npy existed: its ids, checked unique once
                ids = [i for c in range(self.num_chunks) for i in self._chunk_meta(c)["ids"]]
                if len(set(ids)) != len(ids):
                    raise StoreError(f"{self.path} holds duplicate ids; encode the collection again with unique ids")
                self._ids = ids
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


class StoreIds(Sequence):
    """A store's ids from ``ids.npy`` (fixed-width utf-8 bytes, memory-mapped): ``ids[row]`` is a
    ``str``; only the rows asked for are read. Unique (checked when the store was written)."""

    unique = True

    def __init__(self, file: Path):
        self._array = np.load(file, mmap_mode="r")

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [b.decode() for b in self._array[i]]
        return bytes(self._array[int(i)]).decode()

    def __iter__(self):
        for start in range(0, len(self._array), 65536):
            yield from (b.decode() for b in self._array[start:start + 65536])


def _write_ids(path: Path, count: int) -> None:
    """``ids.npy`` from the chunks' ``.json`` (two passes: the width, then the rows), one chunk in
    memory at a time."""
    def metas():
        return (json.loads((path / _chunk_name(c, ".json")).read_text()) for c in range(count))

    width, rows = 1, 0
    for meta in metas():
        width, rows = max(width, *(len(i.encode()) for i in meta["ids"])), rows + meta["rows"]
    with atomic_path(path / IDS) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=f"S{width}", shape=(rows,))
        row = 0
        for meta in metas():
            out[row:row + len(meta["ids"])] = [i.encode() for i in meta["ids"]]
            row += len(meta["ids"])
        out.flush()
        del out


def _duplicate_rows(hashes) -> tuple[int, int] | None:
    """The first two rows whose id hashes are equal (``hashes``: one uint64 per row), or ``None``."""
    h = np.frombuffer(hashes, dtype=np.uint64) if not isinstance(hashes, np.ndarray) else hashes
    order = np.argsort(h, kind="stable")
    same = np.flatnonzero(h[order][1:] == h[order][:-1])
    if not same.size:
        return None
    pairs = sorted((int(order[j]), int(order[j + 1])) for j in same)
    return pairs[0]


def _check_unique_ids(read) -> None:
    """Duplicate ids are an error, found before encoding: ``read()`` streams the ids (called a
    second time only to name a duplicate); 8 bytes per id in memory."""
    twice = _duplicate_rows(np.fromiter((id_hash(str(i)) for i in read()), dtype=np.uint64))
    if twice is None:
        return
    same = [str(i) for row, i in enumerate(read()) if row in twice]
    if same[0] == same[1]:
        raise StoreError(f"ids must be unique: rows {twice[0]} and {twice[1]} are both {same[0]!r}; "
                         "give every text its own id")


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
        removed = remove_stale_temps(path)  # no writer is at work yet: every process waits for this check
        if removed:
            log.info("%s: removed %d temp files left by a killed run", path, removed)
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
    raises :class:`StoreError` with that message, so no process waits forever for a failed one."""
    from accelerate.utils import broadcast_object_list

    error = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(error)
    if error[0]:
        raise StoreError(error[0])


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
        if not _chunk_is_whole(path, c):
            return (f"{path}: chunk {c}'s .npy does not hold the {meta['rows']} rows its .json states; rerun to "
                    "encode it again")
        dims.add(meta["dim"])
    if len(dims) != 1:
        return f"{path}: chunks of different dimensions {sorted(dims)}; delete the store to encode again"
    if head["has_ids"]:
        _write_ids(path, count)
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
            batch_size, normalize, task, quantize, side, ...); not ``images`` nor a list of tasks.
            ``side="passage"`` on a query-side model writes (or finds) the frozen base's store;
            on a model with separate sides ``side`` picks the module (and the store's key).

    Returns:
        The finished :class:`EmbeddingStore` (on every process). Its ``last_run`` says which
        chunks this process encoded and how many it found finished.

    Raises:
        ValueError: empty ``texts``, bad ``dtype`` / ``chunk_size`` / options, ``ids`` not one
            per text.
        StoreError: (a ``ValueError``) a store at ``path`` written with another model, tokenizer,
            options, chunk size or dtype; finished chunks whose texts differ from the given ones
            (a store holds one collection); duplicate ``ids`` (checked before encoding when
            ``ids`` is a column or a list, else before the store is marked complete).
        StoreRangeError: (a :class:`StoreError` and a ``FloatingPointError``) NaN / inf
            embeddings, or values beyond float16's range with ``dtype="float16"``.
        TypeError: ``texts`` is one string or holds non-strings.

    Under several processes an error on one is raised on every one (naming the process), before
    any of them waits at a barrier: none hangs. A chunk whose ``.npy`` does not hold the rows its
    ``.json`` states (a crash of the machine between the two writes) is encoded again.
    """
    from tqdm.auto import tqdm

    from .data.stream import _dataset_column, column_rows
    from .dist import agree_on_errors, process_state
    from .embed import _check_quantize, check_side, encode, int8_copy, side_model
    from .tuned import TunedModel

    side = options.get("side")
    check_side(model, side)
    if isinstance(model, TunedModel) and model.is_frozen_side(side):
        options.pop("side")  # a query-side model's passages: the frozen base's store
        with side_model(model, "passage") as base:
            return encode_to_store(base, tokenizer, texts, path, column=column, ids=ids, chunk_size=chunk_size,
                                   dtype=dtype, progress=progress, **options)
    if isinstance(model, TunedModel) and model.switches_side(side):
        with model.side(side):  # the side's module for the store's key and every chunk
            return encode_to_store(model, tokenizer, texts, path, column=column, ids=ids, chunk_size=chunk_size,
                                   dtype=dtype, progress=progress, **options)
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
    checked = True  # duplicate ids: found before encoding when the ids can be read twice
    if isinstance(ids, str) and _dataset_column(texts, column) is not None:
        _check_unique_ids(lambda: column_rows(_dataset_column(texts, column)[0], ids))
    elif isinstance(ids, Sequence) and not isinstance(ids, str):
        _check_unique_ids(lambda: iter(ids))
    else:
        checked = ids is None
    _on_main(state, lambda: _check_manifest(path, head))
    state.wait_for_everyone()
    options = dict(options)
    if options.get("quantize") is not None:  # one int8 copy for every chunk (the key names the option)
        _check_quantize(model, options["quantize"])
        model, options["quantize"] = int8_copy(model), None
    finished = set()
    for c in _finished_chunks(path):
        if c % world != rank or _chunk_is_whole(path, c):
            finished.add(c)
        else:  # a crash between the writes, or a disk that lost the data: the .json vouches for nothing
            log.warning("chunk %d of %s: its .npy does not hold the rows its .json states; encoding it again", c, path)
    show = state.is_main_process and (progress is None or progress)
    bar = tqdm(total=size, initial=min(len(finished) * chunk_size, size or 0), unit="text",
               desc="encode to store", disable=not show)
    encoded, reused = [], 0
    hashes = None if checked else array("Q")  # a one-pass iterator's ids: 8 bytes each, checked at the end

    def flush(c: int, chunk_texts: list[str], chunk_ids: list) -> None:
        nonlocal reused
        digest = texts_fingerprint(chunk_texts + (chunk_ids if ids is not None else []))
        if c in finished:
            if json.loads((path / _chunk_name(c, ".json")).read_text())["texts"] != digest:
                raise StoreError(f"chunk {c} of {path} was encoded from other texts (or ids) than rows "
                                 f"{c * chunk_size}-{c * chunk_size + len(chunk_texts) - 1} given now: a store "
                                 "holds one collection; give this one its own path (or delete this store to "
                                 "encode it again)")
            reused += 1
            return
        log.info("process %d: encoding chunk %d", rank, c)
        vecs = encode(model, tokenizer, chunk_texts, progress=False, **options).astype(dtype)
        if not np.isfinite(vecs).all():
            raise StoreRangeError(f"chunk {c}: embeddings beyond {dtype}'s range (or NaN); use dtype='float32'")
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

    current, chunk_texts, chunk_ids, n, error = 0, [], [], 0, None
    try:
        for row, (text, id_) in enumerate(_rows(texts, column, ids)):
            c = row // chunk_size
            if c != current:
                if current % world == rank:
                    flush(current, chunk_texts, chunk_ids)
                current, chunk_texts, chunk_ids = c, [], []
            if c % world == rank:
                chunk_texts.append(text)
                chunk_ids.append(id_)
            if hashes is not None:
                hashes.append(id_hash(id_))
            n = row + 1
        if chunk_texts:
            flush(current, chunk_texts, chunk_ids)
    except (ValueError, TypeError, FloatingPointError) as e:  # the user's data or options: every process learns it
        error = e
    finally:
        bar.close()
    agree_on_errors(error)
    log.info("process %d: %d chunks encoded, %d finished ones reused", rank, len(encoded), reused)
    state.wait_for_everyone()
    if hashes is not None:  # every process read every id: the same verdict everywhere, no message needed
        twice = _duplicate_rows(hashes)
        if twice is not None:
            same = [json.loads((path / _chunk_name(r // chunk_size, ".json")).read_text())["ids"][r % chunk_size]
                    for r in twice]
            if same[0] == same[1]:
                raise StoreError(f"ids must be unique: rows {twice[0]} and {twice[1]} are both {same[0]!r}; give "
                                 f"every text its own id (the store at {path} stays unfinished)")
    _on_main(state, lambda: _finish(path, head, n, chunk_size))
    state.wait_for_everyone()
    store = EmbeddingStore(path)
    store.last_run = {"encoded": encoded, "reused": reused}
    return store
