"""Files and directories written atomically: a temp file or directory beside the target, renamed
into place, so a killed process leaves the old version or the whole new one, never a mix. Every
room that writes (save / load, caches, stores, checkpoints, reports) builds on these."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``; an existing ``path`` is renamed aside
    first and removed after, so ``path`` always holds a complete old or new directory."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.rename(path, old / "d")
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp directory beside ``path``; on success it replaces ``path`` (:func:`replace_dir`),
    on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write a file through ``write(binary file object)`` into a temp file beside ``path``, then
    rename it into place: ``path`` is always the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
