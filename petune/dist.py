"""Process state shared by the training loop, the losses and sharded encoding."""

from __future__ import annotations

import contextlib
import datetime
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


#: seconds a collective (a barrier, a gather) waits for the slowest process before it fails. Jobs
#: have one process work alone for long stretches at the field's size (BM25 over 10⁷ passages,
#: IVF training, Arrow conversion) while the others wait at a barrier: torch's own defaults
#: (10 minutes for NCCL, 30 for gloo) would kill them. Set it with the environment variable
#: PETUNE_COLLECTIVE_TIMEOUT (seconds) or the recipes' --collective-timeout (minutes).
DEFAULT_COLLECTIVE_TIMEOUT = 6 * 3600


def collective_timeout() -> float:
    """The timeout of the process group petune starts (:data:`DEFAULT_COLLECTIVE_TIMEOUT` unless
    ``PETUNE_COLLECTIVE_TIMEOUT`` says otherwise), in seconds.

    Raises:
        ValueError: ``PETUNE_COLLECTIVE_TIMEOUT`` is not a positive number.
    """
    value = os.environ.get("PETUNE_COLLECTIVE_TIMEOUT")
    if value is None:
        return float(DEFAULT_COLLECTIVE_TIMEOUT)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"PETUNE_COLLECTIVE_TIMEOUT must be a positive number of seconds, got {value!r}")
    return seconds


def process_state():
    """Accelerate's ``PartialState`` (process index, count), multi-process on CPU machines too.

    The first call starts the process group (under ``accelerate launch`` / ``torchrun``) with
    :func:`collective_timeout`; later calls, and Accelerate's own ``Accelerator``, share it."""
    from accelerate import PartialState

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    if not multi:
        return PartialState(cpu=False)
    return PartialState(cpu=cpu_only(), timeout=datetime.timedelta(seconds=collective_timeout()))


def agree_on_errors(error: BaseException | None) -> None:
    """Carry one process's failure to every process before they go on to a collective.

    Every process calls it with the exception it caught (or ``None``) at the same point; if any
    failed, every process raises: the failed ones their own exception, the others one of the same
    class (when it can be built from a message, else ``RuntimeError``) saying which process failed
    and why. Without it, a process that raises alone leaves the others waiting at the next
    barrier until the collective timeout.
    """
    from accelerate.utils import gather_object

    state = process_state()
    if state.num_processes == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error), f"{error}")
    verdicts = gather_object([mine])
    failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, (cls, message) = failed[0]
    raise _carried(cls, f"process {rank} failed: {message}")


def _carried(cls, text: str) -> BaseException:
    """Another process's failure, raised here: its class when it is built from one message."""
    try:
        return cls(text)
    except Exception:
        return RuntimeError(f"{cls.__name__}: {text}")


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


@contextlib.contextmanager
def main_process_first():
    """Run the block on the main process first, then on the others (which read what it cached):
    Accelerate's ``main_process_first``, except that an error on the main process reaches the
    others instead of leaving them at its barrier. The others wait for the main process's verdict;
    if its block raised, each of them raises too (as :func:`agree_on_errors` does), and the main
    process raises its own exception.
    """
    from accelerate.utils import broadcast_object_list

    state = process_state()
    if state.num_processes == 1:
        yield
        return
    if not state.is_main_process:
        verdict = [None]
        broadcast_object_list(verdict)  # waits for the main process's block to end
        if verdict[0] is not None:
            cls, message = verdict[0]
            raise _carried(cls, f"process 0 failed: {message}")
        yield
        return
    try:
        yield
    except Exception as e:
        broadcast_object_list([(type(e), f"{e}")])
        raise
    broadcast_object_list([None])
