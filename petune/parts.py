"""Trainable parts of a tuned model beside its method: modules with their own options, state and
file entries that turn an extra input of each example into tokens after its text (VL-T5's visual
embedding is one: :mod:`petune.vision` registers it). The core — :class:`petune.TunedModel`,
:func:`petune.save` / :func:`petune.load`, :func:`petune.export`, routing, :func:`petune.encode` —
treats every part the same way through this interface and knows no particular one.

A part registers itself by kind (``@register_part("visual")``); a save records each part's kind,
the module that registers it and its options, and :func:`petune.load` imports that module and
rebuilds the part from its options.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

SHARED = "default"  # the module key of a part shared by all tasks (as the method's shared module)

_PARTS: dict[str, type] = {}


def register_part(kind: str):
    """Class decorator: register a :class:`Part` subclass under ``kind`` (its name in saves)."""

    def decorate(cls):
        cls.kind = kind
        _PARTS[kind] = cls
        return cls

    return decorate


def part_class(kind: str, module: str | None = None) -> type:
    """The part class registered as ``kind``, importing ``module`` (where it registers) if needed.

    Raises:
        ValueError: no part of that kind (names the module that should have registered it).
    """
    if kind not in _PARTS and module:
        importlib.import_module(module)
    if kind not in _PARTS:
        raise ValueError(f"no part of kind {kind!r} is registered" + (f" (importing {module} did not register it)"
                                                                      if module else ""))
    return _PARTS[kind]


class Part(nn.ModuleDict):
    """A trainable part: one module per key (:data:`SHARED`, or one per task), reading the input a
    batch passes under :attr:`input_key` and giving tokens that follow each row's text, or
    mapping the pooled embedding (a projection head).

    Subclasses set :attr:`label` (its row in the trainable report), :attr:`input_key` (empty
    for a part that reads no input), and implement :meth:`tokens` or :meth:`after_pooling`,
    :meth:`from_options` and, when callers may give raw inputs that need preparing (an image
    file to turn into features), :meth:`prepare`.

    Args:
        modules: ``{key: module}``.
        per_task: one module per task (keys are task names) instead of one shared.
        options: JSON-serialisable options, enough for :meth:`from_options` to rebuild it.
    """

    kind: str = ""
    label: str = ""
    input_key: str = ""

    def __init__(self, modules: dict[str, nn.Module], per_task: bool, options: dict):
        super().__init__(modules)
        self.per_task = per_task
        self.options = options

    def key(self, task: str | None) -> str:
        """The module key ``task`` uses.

        Raises:
            ValueError: a per-task part and no task.
        """
        if not self.per_task:
            return SHARED
        if task is None:
            raise ValueError(f"this model has one {self.label} per task; name one of {list(self)}")
        return task

    def tokens(self, key: str, inputs, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [batch, tokens, d_model], mask [batch, tokens])`` of the batch's ``inputs``
        (``model``: the Hugging Face model underneath, for a part that reads its weights)."""
        raise NotImplementedError

    def encoder_context(self, model: nn.Module, text_lengths: torch.Tensor):
        """A context manager active while the encoder reads this part's tokens (default: none).
        ``text_lengths [batch]``: how many leading positions of each row are its prompt and text;
        the part's tokens follow them (VL-T5's mode gives positions to those only)."""
        return contextlib.nullcontext()

    def after_pooling(self, key: str, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled embedding ``[batch, d]`` as this part leaves it (default: unchanged; a
        projection head maps it, :mod:`petune.heads`)."""
        return pooled

    def prepare(self, tuned, texts, values, cache_dir=None):
        """An encode call's texts and raw per-example values → ``(texts, values)`` ready for
        :mod:`petune.regions` (default: as given)."""
        return texts, values

    @classmethod
    def from_options(cls, tuned, **options) -> "Part":
        """Rebuild the part from its saved options and add it to ``tuned`` (for :func:`petune.load`)."""
        raise NotImplementedError
