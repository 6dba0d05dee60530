"""Per-example task routing: the rows of one batch, each through its own task's module.

:meth:`petune.TunedModel.routed` groups the rows by module (a stable sort, so rows of one task
keep their order), runs the call once with the method's own mixed-batch mechanism when it has one
(:meth:`petune.Method.route`), or once per module otherwise, and puts the rows back in input
order. The helpers here move rows of whatever a call takes and returns: tensors whose first
dimension is the batch, tuples, dicts and ``transformers`` ``ModelOutput`` objects of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def group_rows(modules: list[str]) -> tuple[list[int], list[tuple[str, int]]]:
    """``(order, groups)``: row indices grouped by module, in first-appearance order of the
    modules, and ``[(module, rows of it), ...]`` in that order."""
    counts = Counter(modules)  # keeps first-appearance order
    first = {m: i for i, m in enumerate(counts)}
    order = sorted(range(len(modules)), key=lambda i: first[modules[i]])
    return order, list(counts.items())


def tensors_in(obj):
    """Every tensor in a nesting of tuples, lists and dicts."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors_in(v)


def take_rows(obj, index: torch.Tensor, batch: int):
    """``obj`` with the rows ``index`` of every batch-first tensor in it (other values as they are)."""
    if torch.is_tensor(obj):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, Mapping):
        return type(obj)(**{k: take_rows(v, index, batch) for k, v in obj.items()}) if _is_output(obj) \
            else {k: take_rows(v, index, batch) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(take_rows(v, index, batch) for v in obj)
    return obj


def concat_rows(parts: list, sizes: list[int]):
    """The per-module results of a split call, concatenated along the batch. Tensors of a
    different length along dimension 1 (the sequence: visual tokens are cut per sub-batch) are
    zero-padded to the longest, which the masks padded alongside mark as padding. Scalars (a
    loss) are averaged weighted by ``sizes``: rows, or label tokens for a seq2seq loss (its
    token mean over the whole batch)."""
    first = parts[0]
    if torch.is_tensor(first):
        if first.dim() == 0:
            return sum(p * n for p, n in zip(parts, sizes)) / sum(sizes)
        if first.dim() > 1 and len({p.shape[1] for p in parts}) > 1:
            longest = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, 0) * (p.dim() - 2) + (0, longest - p.shape[1])) for p in parts]
        return torch.cat(parts)
    if first is None:
        return None
    if isinstance(first, Mapping):
        joined = {k: concat_rows([p[k] for p in parts], sizes) for k in first}
        return type(first)(**joined) if _is_output(first) else joined
    if isinstance(first, (tuple, list)):
        return type(first)(concat_rows([p[i] for p in parts], sizes) for i in range(len(first)))
    raise TypeError(f"cannot join per-task results of type {type(first).__name__}")


def _is_output(obj) -> bool:
    from transformers.utils import ModelOutput

    return isinstance(obj, ModelOutput)
