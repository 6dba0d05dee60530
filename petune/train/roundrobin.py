"""Round-robin multi-task batching: which task each step draws from, and the loader that follows it.

The design follows VL-Adapter's multi-task loader (Sung et al., 2022): a list with one task
name per batch, shuffled with ``random.Random(seed + epoch)``. Every process computes the same
list (same seed, same epoch, same batch counts), so all processes run the same task at each step.
A task can be upsampled: with ``repeats={"qa": 2}`` its data counts twice in the schedule (two
passes per epoch, each in a fresh shuffle).
"""

from __future__ import annotations

import math
import random
from collections import Counter

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
    A loader that runs out before its task's turns are over (``repeats`` above 1, ``"cycle"``, or
    ``"balanced"`` with ``batches_per_task`` above its size) restarts; a seedable loader then gets a
    shuffle of its own: pass ``j`` of epoch ``e`` of a task with ``P`` passes per epoch uses the
    loader's epoch ``e * P + j``, so no two passes of a run repeat an order.

    Args:
        loaders: ``{task: data loader}``.
        mode, batches_per_task: see :func:`task_order`.
        seed: the task order's seed.
        repeats: ``{task: r}``, a positive integer per task (default 1): the task's batches count
            ``r`` times in the schedule, i.e. ``r`` passes over its data per epoch (upsampling a
            small task).

    Raises:
        ValueError: what :func:`task_order` raises; a repeat that is not a positive integer, or
            one for a task with no loader.
    """

    def __init__(self, loaders: dict, mode: str = "proportional", seed: int = 0, batches_per_task: int | None = None,
                 repeats: dict[str, int] | None = None):
        self.loaders, self.mode, self.seed, self.batches_per_task = dict(loaders), mode, seed, batches_per_task
        repeats = dict(repeats or {})
        unknown = sorted(set(repeats) - set(self.loaders))
        if unknown:
            raise ValueError(f"repeats name task(s) {unknown} that have no loader (tasks: {list(self.loaders)})")
        bad = {t: r for t, r in repeats.items() if not isinstance(r, int) or isinstance(r, bool) or r < 1}
        if bad:
            raise ValueError(f"repeats must be positive integers (passes over a task's data per epoch), got {bad}")
        self.repeats = {t: repeats.get(t, 1) for t in self.loaders}
        self.epoch = 0
        turns = Counter(self.order())  # also validates now, not at the first step
        self.passes = {t: max(1, math.ceil(turns[t] / len(dl))) for t, dl in self.loaders.items()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for task in self.loaders:
            self._reshuffle(task, 0)

    def _reshuffle(self, task: str, passed: int) -> None:
        loader = self.loaders[task]
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch * self.passes[task] + passed)

    def order(self) -> list[str]:
        return task_order({t: len(dl) * self.repeats[t] for t, dl in self.loaders.items()}, self.mode, self.seed,
                          self.epoch, self.batches_per_task)

    def __len__(self) -> int:
        return len(self.order())

    def iterate(self, start: int = 0):
        """Yield ``(step, task, batch)`` for this epoch; the first ``start`` steps are drawn but not
        yielded (resuming mid-epoch replays the same data order). The replay leaves torch's RNG as
        it found it: creating a DataLoader iterator draws a seed from it, and a resumed run must
        see the same dropout masks as an uninterrupted one."""
        import torch

        rng = torch.get_rng_state() if start > 0 else None
        iterators, passed = {}, {}
        for step, task in enumerate(self.order()):
            if step == start and rng is not None:  # before this step's fetch, as in the original run
                torch.set_rng_state(rng)
            if task not in iterators:
                iterators[task], passed[task] = iter(self.loaders[task]), 0
            try:
                batch = next(iterators[task])
            except StopIteration:
                passed[task] += 1
                self._reshuffle(task, passed[task])
                iterators[task] = iter(self.loaders[task])
                batch = next(iterators[task])
            if step >= start:
                yield step, task, batch

    def __iter__(self):
        for _, task, batch in self.iterate():
            yield task, batch
