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


def _longest_first(lengths) -> np.ndarray:
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")  # ties keep input order


def shard_indices(lengths, num_processes: int, process_index: int) -> tuple[list[int], int]:
    """The rows a process handles, balanced by length: rows sorted longest first are dealt like
    cards (row ``k`` of that order to process ``k mod num_processes``), so every process gets about
    the same amount of work whatever the input order. Each list is padded to
    ``ceil(n / num_processes)`` rows by repeating its last row (collectives need equal shapes).

    Args:
        lengths: one cost per row (e.g. characters per text), ``n`` rows.

    Returns:
        ``(rows, real)``: the row indices to process (padded) and how many of them are real.
    """
    order = _longest_first(lengths)
    mine = order[process_index::num_processes].tolist()
    per = -(-len(order) // num_processes)
    return mine + [mine[-1] if mine else int(order[-1])] * (per - len(mine)), len(mine)


def unshard(gathered: np.ndarray, lengths, num_processes: int) -> np.ndarray:
    """Put the rows of :func:`gather_rows` (every process's padded block, in rank order) back in
    input order, dropping the padding."""
    order = _longest_first(lengths)
    per = gathered.shape[0] // num_processes
    out = np.empty((len(order),) + gathered.shape[1:], dtype=gathered.dtype)
    for rank in range(num_processes):
        mine = order[rank::num_processes]
        out[mine] = gathered[rank * per:rank * per + len(mine)]
    return out


def gather_rows(local: np.ndarray, to_all: bool = False, chunk_rows: int = 16384) -> np.ndarray | None:
    """Concatenate every process's ``[rows, d]`` block in rank order.

    Every process must pass the same shape (see :func:`shard_indices`; :func:`unshard` restores
    the input order). Blocks travel in chunks of ``chunk_rows`` rows, so a collective never holds
    more than ``world · chunk_rows · d`` values.

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
