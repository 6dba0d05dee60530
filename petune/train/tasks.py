"""How a recipe declares a task for the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass
class Task:
    """One task of a multi-task run.

    Attributes:
        name: the task name; must be one of the tuned model's tasks (or any name when the model
            was attached without tasks / with ``shared=True``).
        dataset: a map-style dataset (a list works) of examples.
        collate: ``list[example] -> batch`` (tokenises; see ``petune.train.collate``).
        loss: ``loss(model, batch) -> scalar tensor``; ``model`` is the :class:`petune.TunedModel`
            already switched to this task. A loss that is an ``nn.Module`` with parameters (a
            logit scale, a classification head) has them trained and checkpointed too.
        batch_size: examples per batch on each process.
        prefix: a text prefix for this task's inputs, for collates that take one.
        drop_last: drop the last incomplete batch (keeps in-batch negatives the same size).
        repeat: passes over this task's data per epoch (default 1). A small task with ``repeat=2``
            gets twice its batches in the round-robin schedule, each pass freshly shuffled:
            upsampling, without changing the other tasks' share.
    """

    name: str
    dataset: Sequence[Any]
    collate: Callable[[list], dict]
    loss: Callable
    batch_size: int = 16
    prefix: str = ""
    drop_last: bool = False
    repeat: int = 1

    def __post_init__(self):
        for key in ("batch_size", "repeat"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"task {self.name!r}: {key} must be a positive integer, got {value!r}")
        if len(self.dataset) == 0:
            raise ValueError(f"task {self.name!r} has an empty dataset")
