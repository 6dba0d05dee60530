"""Round-robin multi-task batching: which task each step draws from, and the loader that follows it.

The design follows VL-Adapter's multi-task loader (Sung et al., 2022): a list with one task
name per batch, shuffled with ``random.Random(seed + epoch)``. Every process computes the same
list (same seed, same epoch, same batch counts), so all processes run the same task at each step.
"""

from __future__ import annotations

import random

MODES = ("proportional", "cycle", "balanced")


def task_order(num_batches: dict[str, int], mode: str = "proportional", seed: int = 0, epoch: int = 0,
               batches_per_task: int | None = None) -> list[str]:
    """The task of every step of one epoch.

    Args:
        num_batches: batches per epoch of each task's loader (on this process).
        mode: ``"proportional"`` — each task appears once per batch it has, shuffled (VL-Adapter's
            round-robin); ``"cycle"`` — strict alternation task by task until the longest task is
            done, shorter tasks restarting; ``"balanced"`` — every task gives the same number of
            batches (``batches_per_task``, default the smallest task's count), shuffled.
        seed, epoch: the shuffle uses ``random.Random(seed + epoch)``.

    Raises:
        ValueError: unknown mode, no tasks, or a task with no batches.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not num_batches:
        raise ValueError("no tasks to sample from")
    empty = [t for t, n in num_batches.items() if n <= 0]
    if empty:
        raise ValueError(f"task(s) {empty} have no batches: their datasets are empty or smaller than "
                         "one batch with drop_last; give them data or remove them")
    names = list(num_batches)
    if mode == "cycle":
        return [t for _ in range(max(num_batches.values())) for t in names]
    if mode == "balanced":
        n = batches_per_task or min(num_batches.values())
        order = [t for t in names for _ in range(n)]
    else:
        order = [t for t in names for _ in range(num_batches[t])]
    random.Random(seed + epoch).shuffle(order)
    return order


class MultiTaskLoader:
    """Iterate ``(task, batch)`` over one data loader per task in :func:`task_order`'s order.

    Call :meth:`set_epoch` before each epoch: it reseeds the task order and each loader's shuffle
    (loaders prepared by Accelerate with a seedable sampler, or anything with ``set_epoch``).
    A loader that runs out before its task's turns are over (``"cycle"`` / ``"balanced"`` with
    ``batches_per_task`` above its size) restarts.
    """

    def __init__(self, loaders: dict, mode: str = "proportional", seed: int = 0, batches_per_task: int | None = None):
        self.loaders, self.mode, self.seed, self.batches_per_task = dict(loaders), mode, seed, batches_per_task
        self.epoch = 0
        self.order()  # validate now, not at the first step

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for loader in self.loaders.values():
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)

    def order(self) -> list[str]:
        return task_order({t: len(dl) for t, dl in self.loaders.items()}, self.mode, self.seed, self.epoch,
                          self.batches_per_task)

    def __len__(self) -> int:
        return len(self.order())

    def iterate(self, start: int = 0):
        """Yield ``(step, task, batch)`` for this epoch; the first ``start`` steps are drawn but not
        yielded (resuming mid-epoch replays the same data order). The replay leaves torch's RNG as
        it found it: creating a DataLoader iterator draws a seed from it, and a resumed run must
        see the same dropout masks as an uninterrupted one."""
        import torch

        rng = torch.get_rng_state() if start > 0 else None
        iterators = {}
        for step, task in enumerate(self.order()):
            if step == start and rng is not None:  # before this step's fetch, as in the original run
                torch.set_rng_state(rng)
            if task not in iterators:
                iterators[task] = iter(self.loaders[task])
            try:
                batch = next(iterators[task])
            except StopIteration:
                iterators[task] = iter(self.loaders[task])
                batch = next(iterators[task])
            if step >= start:
                yield step, task, batch

    def __iter__(self):
        for _, task, batch in self.iterate():
            yield task, batch
