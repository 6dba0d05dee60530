"""On-disk cache for results that depend only on their inputs: embeddings of a model, BM25 runs.

An entry is keyed by a fingerprint of everything that determines it (model weights, the texts,
the options), so a change of any of them recomputes, and identical inputs are computed once.
Entries are written to a temp file and renamed into place: a killed run never leaves a broken one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write

log = logging.getLogger(__name__)


def fingerprint(*parts) -> str:
    """A short hex digest of JSON-serialisable ``parts`` (dict key order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def texts_fingerprint(texts) -> str:
    """Digest of a sequence of strings, order and boundaries included."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:24]


def collection_fingerprint(texts, column: str | None = None) -> str:
    """Digest naming a collection: a ``datasets.Dataset``'s own fingerprint and the column (no pass
    over its texts), else a digest of the texts (one streamed pass).

    Raises:
        ValueError: a one-pass iterator (it could not be read again after the digest).
    """
    from itertools import chain

    from .data.stream import _dataset_column, text_batches

    found = _dataset_column(texts, column)
    if found is not None and getattr(found[0], "_fingerprint", None):
        return fingerprint(found[0]._fingerprint, found[1])
    if iter(texts) is texts:
        raise ValueError("a collection that can be read twice (a list, a dataset) is needed here, not a one-pass "
                         "iterator")
    return texts_fingerprint(chain.from_iterable(text_batches(texts, column=column)))


def weights_fingerprint(model: nn.Module, exclude=()) -> str:
    """Digest of every parameter and buffer of ``model``: names, dtypes, shapes and values.

    ``exclude``: tensors left out (by identity), those the cached result does not depend on.
    About 0.3 s for a 50M-parameter model on one CPU core (values are hashed in place on CPU).
    """
    skip = {id(t) for t in exclude}
    named = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in skip]
    return tensors_fingerprint(type(model).__name__, named)


def tensors_fingerprint(kind: str, named) -> str:
    """Digest of ``kind`` and ``(name, tensor)`` pairs: names, dtypes, shapes and values."""
    h = hashlib.sha256(kind.encode())
    for name, t in named:
        data = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{data.dtype}|{tuple(t.shape)}".encode())
        h.update(data.view(torch.uint8).numpy())
    return h.hexdigest()[:24]


class Cache:
    """A folder of cached arrays (``.npy``) and JSON values, one file per ``(kind, key)``.

    Args:
        root: the folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / f"{kind}-{key}{suffix}"

    def has(self, kind: str, key: str, suffix: str) -> bool:
        return self.path(kind, key, suffix).exists()

    def load_array(self, kind: str, key: str) -> np.ndarray | None:
        path = self.path(kind, key, ".npy")
        if not path.exists():
            return None
        log.info("reusing cached %s from %s", kind, path)
        return np.load(path)

    def save_array(self, kind: str, key: str, array: np.ndarray) -> Path:
        return self._write(self.path(kind, key, ".npy"), lambda f: np.save(f, array))

    def load_json(self, kind: str, key: str):
        path = self.path(kind, key, ".json")
        if not path.exists():
            return None
        log.info("reusing cached %s from %s", kind, path)
        return json.loads(path.read_text())

    def save_json(self, kind: str, key: str, value) -> Path:
        text = json.dumps(value)
        return self._write(self.path(kind, key, ".json"), lambda f: f.write(text.encode()))

    def _write(self, path: Path, write) -> Path:
        atomic_write(path, write)
        log.info("cached %s", path)
        return path
