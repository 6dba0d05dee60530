"""Collections as streams of text batches: a ``datasets`` column read from its Arrow files batch by
batch, or any iterable of strings, without a Python list of the whole collection.

A ``datasets.Dataset`` memory-maps its Arrow files: iterating it leaves every page it touched
resident in the process (counted in its RSS) for as long as the dataset is open — the whole
collection, at 10⁷ passages several GB. :func:`text_batches` reads the files with plain reads
instead, one record batch at a time, so a pass over the collection holds one batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence


def _dataset_column(texts, column):
    """``(dataset, column name)`` when ``texts`` is a ``datasets.Dataset`` (with ``column``) or one
    of its columns (``dataset["text"]``); else ``None``."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return None
    if isinstance(texts, datasets.Dataset):
        if column is None:
            raise ValueError(f"texts is a datasets.Dataset: name its text column, column=... "
                             f"(it has {texts.column_names})")
        if column not in texts.column_names:
            raise ValueError(f"the dataset has no column {column!r}; it has {texts.column_names}")
        return texts, column
    if isinstance(texts, datasets.arrow_dataset.Column) and isinstance(texts.source, datasets.Dataset):
        return texts.source, texts.column_name
    if column is not None:
        raise ValueError("column= names a column of a datasets.Dataset; texts is a "
                         f"{type(texts).__name__}")
    return None


def collection_size(texts, column: str | None = None) -> int | None:
    """Number of texts when it is known without reading them (a dataset, a sequence), else ``None``."""
    found = _dataset_column(texts, column)
    if found is not None:
        return len(found[0])
    return len(texts) if isinstance(texts, Sequence) or hasattr(texts, "__len__") else None


def _arrow_files(dataset, column: str) -> list[str] | None:
    """The Arrow files holding exactly the dataset's rows of ``column``, in order, or ``None`` when
    its table is not simply those files (an indices mapping from ``select`` / ``shuffle``, a slice,
    a renamed or cast column, columns added in memory)."""
    import pyarrow as pa
    from datasets.table import ConcatenationTable, MemoryMappedTable

    if getattr(dataset, "_indices", None) is not None:
        return None
    table = dataset.data
    if isinstance(table, MemoryMappedTable):
        blocks = [table]
    elif isinstance(table, ConcatenationTable) and all(len(row) == 1 for row in table.blocks):
        blocks = [row[0] for row in table.blocks]
    else:
        return None
    def plain(block) -> bool:  # replays other than metadata (slices, renames, casts) change what the file holds
        return (isinstance(block, MemoryMappedTable) and column in block.schema.names
                and all(replay[0] == "replace_schema_metadata" for replay in block.replays))

    if not all(plain(b) for b in blocks):
        return None
    files = [b.path for b in blocks]
    rows = 0
    for name in files:  # count rows from the batch headers (a memory map read for metadata only)
        with pa.memory_map(name) as source:
            rows += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    return files if rows == len(dataset) else None


def _read_arrow_column(files, column) -> Iterator[list]:
    import pyarrow as pa

    for name in files:
        with pa.OSFile(name) as source:  # plain reads: no page of the file stays mapped
            for batch in pa.ipc.open_stream(source):
                yield batch.column(column).to_pylist()


def column_rows(texts, column: str | None = None) -> Iterator:
    """The collection's values one by one, in order, streamed (see :func:`text_batches`); no
    type check (ids may be numbers)."""
    found = _dataset_column(texts, column)
    if found is None:
        if isinstance(texts, str):
            raise TypeError("texts must be a collection of strings, not one string; wrap it: [text]")
        return iter(texts)
    dataset, name = found
    files = _arrow_files(dataset, name)
    source = (_read_arrow_column(files, name) if files is not None
              else (b[name] for b in dataset.select_columns([name]).iter(batch_size=1000)))
    return (value for part in source for value in part)


def text_batches(texts, batch_size: int = 1000, column: str | None = None) -> Iterator[list[str]]:
    """The collection as lists of at most ``batch_size`` strings, in order.

    Args:
        texts: a ``datasets.Dataset`` (with ``column``), one of its columns (``dataset["text"]``),
            or any iterable of strings (a list, a generator, a file's lines).
        batch_size: strings per yielded list.
        column: the text column of a dataset.

    Raises:
        ValueError: a dataset without ``column``, or a column it does not have.
        TypeError: ``texts`` is one string, or an item is not a string (names its row).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch, row = [], 0
    for t in column_rows(texts, column):
        if not isinstance(t, str):
            raise TypeError(f"texts must all be strings; row {row} is {type(t).__name__}")
        batch.append(t)
        row += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def id_hash(text: str) -> int:
    """A 64-bit hash of one id (blake2b): what duplicate-id checks keep per row instead of the id,
    8 bytes each."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class RowIds(Sequence):
    """Ids ``"0"``, ``"1"``, ... ``str(n - 1)`` as a sequence that holds no list: the default ids of
    a collection (its row numbers)."""

    unique = True

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [str(j) for j in range(*i.indices(self.n))]
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"row {i} out of range for {self.n} rows")
        return str(i % self.n)

    def __iter__(self):
        return (str(i) for i in range(self.n))

    def __eq__(self, other):
        return isinstance(other, RowIds) and other.n == self.n

    def __repr__(self):
        return f"RowIds({self.n})"

