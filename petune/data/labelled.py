"""Labelled texts for classification: csv / tsv / JSON-lines files, a dataset saved with
``datasets`` or a hub id, with a text and a label column — checked, with errors that name the
file, the line and the fix."""

from __future__ import annotations

import csv
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from .files import DataError, jsonl_rows, text_lines

LINE = '{"text": "Stocks fell sharply today.", "label": "business"}'


@dataclass
class Labelled:
    """Rows of one split: ``texts[i]`` has ``labels[i]`` and came from ``where[i]`` (``"file:line"``)."""

    texts: list[str]
    labels: list[str]
    where: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows) -> "Labelled":
        return Labelled([self.texts[i] for i in rows], [self.labels[i] for i in rows], [self.where[i] for i in rows])


def _check(path, line, text, label, text_column, label_column):
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, line, f"empty {text_column!r}", "every row needs a text; drop the row or fill it in")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DataError(path, line, f"empty {label_column!r}", "every row needs a label; drop the row or fill it in")


def read_labelled(source: str | os.PathLike, text_column: str = "text", label_column: str = "label",
                  split: str | None = None) -> Labelled:
    """Read labelled texts.

    Args:
        source: a ``.csv`` / ``.tsv`` (header row naming the columns), ``.jsonl`` / ``.json``
            (one object per line) file, a directory saved with ``datasets.save_to_disk``, or a hub
            id; ``NAME:SPLIT`` names a split of a dataset (``ag_news:test``, ``saved-dir:train``).
            Files are read as UTF-8 (a byte-order mark is dropped).
        split: for a dataset with several splits, which one (or give it in ``source``).

    Raises:
        DataError: a missing column, a malformed line, text that is not UTF-8, an empty text or
            label, an unlabelled row (``-1`` in a ``ClassLabel`` column), a CSV the ``csv`` module
            cannot read (a field over its size limit), no rows at all; each names the file and
            the line.
    """
    path = Path(source)
    if split is None and not path.exists() and ":" in str(source):
        source, split = str(source).rsplit(":", 1)
        path = Path(source)
    texts, labels, where = [], [], []
    if path.suffix in (".csv", ".tsv") and path.is_file():
        lines = (line for _, line in text_lines(path))
        reader = csv.DictReader(lines, delimiter="\t" if path.suffix == ".tsv" else ",")
        try:
            for column in (text_column, label_column):
                if column not in (reader.fieldnames or []):
                    raise DataError(path, 1, f"no column {column!r} (the header has {reader.fieldnames})",
                                    "name the columns with --text-column / --label-column")
            for row in reader:
                if None in row:
                    raise DataError(path, reader.line_num, "more fields than the header names",
                                    "quote fields that contain the separator")
                _check(path, reader.line_num, row[text_column], row[label_column], text_column, label_column)
                texts.append(row[text_column])
                labels.append(row[label_column].strip())
                where.append(f"{path}:{reader.line_num}")
        except csv.Error as e:
            raise DataError(path, reader.line_num, f"not readable as CSV ({e})", "shorten over-long fields, or save "
                            "the file again as plain UTF-8 CSV") from None
    elif path.suffix in (".jsonl", ".json") and path.is_file():
        for number, row in jsonl_rows(path, {text_column: str, label_column: (str, int)}, LINE):
            _check(path, number, row[text_column], row[label_column], text_column, label_column)
            texts.append(row[text_column])
            labels.append(str(row[label_column]))
            where.append(f"{path}:{number}")
    else:
        rows = _dataset(source, split)
        for column in (text_column, label_column):
            if column not in rows.column_names:
                raise DataError(source, 0, f"no column {column!r} (it has {rows.column_names})",
                                "name the columns with --text-column / --label-column")
        names = getattr(rows.features[label_column], "names", None)  # a ClassLabel: its names
        for i, (text, label) in enumerate(zip(rows[text_column], rows[label_column]), 1):
            _check(source, i, text, label, text_column, label_column)
            if names and not 0 <= label < len(names):  # -1: datasets' "no label" (e.g. GLUE's test splits)
                raise DataError(source, i, f"label {label} is not one of the {len(names)} classes (-1 marks an "
                                "unlabelled row)", "use a labelled split, or drop the unlabelled rows")
            texts.append(text)
            labels.append(names[label] if names else str(label))
            where.append(f"{source}: row {i}")
    if not texts:
        raise DataError(source, 0, "no rows", f"one labelled text per line, e.g. {LINE}")
    return Labelled(texts, labels, where)


def _dataset(source, split):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(source)) if Path(source).is_dir() else datasets.load_dataset(str(source))
    except Exception as e:
        raise DataError(source, 0, f"neither a csv / tsv / jsonl file nor a dataset datasets can load "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                        "give a .csv, .tsv or .jsonl file, a save_to_disk directory or a hub id") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) > 1:
            raise DataError(source, 0, f"several splits {list(loaded)}", f"pick one (e.g. --train {source}:"
                            f"{next(iter(loaded))})")
        if split is not None and split not in loaded:
            raise DataError(source, 0, f"no split {split!r} (it has {list(loaded)})", "name one of them after the ':'")
        loaded = loaded[split or next(iter(loaded))]
    return loaded


def split_labelled(data: Labelled, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> tuple[Labelled, ...]:
    """Train / dev / test subsets of ``data``, stratified and without shared texts.

    A text that occurs several times is kept once (its first row; a warning counts the others), so
    no text lands in two splits. Each label's rows are shuffled with ``seed`` and split by
    ``fractions`` on their own, so every split keeps the label proportions, and a label too rare
    to split (its dev and test shares round to nothing) stays in training only — never in a test
    split without training examples.
    """
    first: dict[str, int] = {}
    for i, t in enumerate(data.texts):
        first.setdefault(t, i)
    if len(first) < len(data):
        warnings.warn(f"{len(data) - len(first)} rows repeat an earlier text and are left out (e.g. "
                      f"{next(w for i, w in enumerate(data.where) if first[data.texts[i]] != i)})", stacklevel=2)
    by_label: dict[str, list[int]] = {}
    for i in sorted(first.values()):
        by_label.setdefault(data.labels[i], []).append(i)
    rng = random.Random(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        dev, test = int(round(fractions[1] * len(rows))), int(round(fractions[2] * len(rows)))
        train = max(1, len(rows) - dev - test)
        dev = min(dev, len(rows) - train)
        parts[0].extend(rows[:train])
        parts[1].extend(rows[train:train + dev])
        parts[2].extend(rows[train + dev:])
    return tuple(data.subset(sorted(p)) for p in parts)


def check_splits(train: Labelled, test: Labelled, name: str = "test") -> None:
    """A test split must be disjoint from training and use only the training labels.

    Raises:
        DataError: an empty split, a single label, a test text that is also a training text, a
            test label never seen in training (each names the row).
    """
    for split, rows in (("train", train), (name, test)):
        if not len(rows):
            raise DataError(split, 0, f"the {split} split is empty", "give it rows, or change the split fractions")
    if len(set(train.labels)) < 2:
        raise DataError(train.where[0].rpartition(":")[0], 0, f"one label only ({train.labels[0]!r})",
                        "classification needs two labels or more: check --label-column")
    seen = dict(zip(train.texts, train.where))
    known = set(train.labels)
    for text, label, where in zip(test.texts, test.labels, test.where):
        file, _, line = where.rpartition(":")
        if text in seen:
            raise DataError(file, int(line) if line.isdigit() else 0, f"this {name} text is also a training text "
                            f"({seen[text]})", "a text belongs to one split: remove one of the two")
        if label not in known:
            raise DataError(file, int(line) if line.isdigit() else 0, f"label {label!r} never occurs in training",
                            "add training examples of it, or drop these rows: kNN can only predict seen labels")
