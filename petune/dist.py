"""Process state shared by the training loop, the losses and sharded encoding."""

from __future__ import annotations

import os

import numpy as np
import torch


def cpu_only() -> bool:
    """True when no accelerator (CUDA, XPU, MPS, ...) is present. Accelerate only runs several CPU
    processes (MULTI_CPU, gloo) when told ``cpu=True``; under ``torchrun`` on a CPU machine it
    would otherwise fall back to one process per launch, each believing it is alone."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return not accel.is_available()
    return not torch.cuda.is_available()


def process_state():
    """Accelerate's ``PartialState`` (process index, count), multi-process on CPU machines too."""
    from accelerate import PartialState

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return PartialState(cpu=cpu_only() and multi)


def shard_indices(n: int, num_processes: int, process_index: int) -> list[int]:
    """The rows of ``n`` that process ``process_index`` handles: a contiguous block of
    ``ceil(n / num_processes)``, the last blocks padded by repeating row ``n - 1`` so that every
    process has the same count (collectives need equal shapes; the padding is cut after gathering)."""
    per = -(-n // num_processes)
    return [min(i, n - 1) for i in range(process_index * per, (process_index + 1) * per)]


def gather_rows(local: np.ndarray, to_all: bool = False, chunk_rows: int = 16384) -> np.ndarray | None:
    """Concatenate every process's ``[rows, d]`` block in rank order.

    Every process must pass the same shape (see :func:`shard_indices`). Blocks travel in chunks of
    ``chunk_rows`` rows, so a collective never holds more than ``world · chunk_rows · d`` values.

    Returns:
        ``[world · rows, d]`` on the main process (on every process when ``to_all``), else ``None``.
    """
    import torch.distributed as dist

    state = process_state()
    if state.num_processes == 1:
        return local
    world, rank = state.num_processes, state.process_index
    blocks: list[list[np.ndarray]] = [[] for _ in range(world)]
    for start in range(0, local.shape[0], chunk_rows):
        t = torch.from_numpy(np.ascontiguousarray(local[start:start + chunk_rows])).to(state.device)
        receive = to_all or rank == 0
        parts = [torch.empty_like(t) for _ in range(world)] if receive else None
        if to_all:
            dist.all_gather(parts, t)
        else:
            dist.gather(t, parts, dst=0)
        if receive:
            for r, part in enumerate(parts):
                blocks[r].append(part.cpu().numpy())
    if not (to_all or rank == 0):
        return None
    return np.concatenate([np.concatenate(b) for b in blocks])
