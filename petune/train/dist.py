"""Process state shared by the loop and the losses."""

from __future__ import annotations

import os

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
