"""Files and directories written atomically and durably: a temp file or directory beside the
target, flushed to disk (``fsync``), renamed into place, and the parent directory's entry flushed
too, so a killed process — or a machine that loses power — leaves the old version or the whole new
one, never a mix or an empty file under the final name. Every room that writes (save / load,
caches, stores, checkpoints, reports) builds on these.

Temp names start with ``.{target name}.`` and end with :data:`TMP_MARK`, so that
:func:`remove_stale_temps` can find what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

#: every temp file or directory these helpers make ends with it
TMP_MARK = ".petune-tmp"


def _fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open directories; nothing more can be done there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``; an existing ``path`` is renamed aside
    first and removed after, so ``path`` always holds a complete old or new directory. ``tmp``'s
    files are flushed to disk before the rename, the parent's entries after it."""
    _fsync_tree(tmp)
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=TMP_MARK, dir=path.parent))
        os.rename(path, old / "d")
        os.rename(tmp, path)
        _fsync_path(path.parent)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
        _fsync_path(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp directory beside ``path``; on success it replaces ``path`` (:func:`replace_dir`),
    on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_MARK, dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp file name beside ``path`` for writers that need a path, not a file object
    (``numpy.lib.format.open_memmap``, ``faiss.write_index``, ranx's ``save``); on success it is
    flushed to disk and renamed to ``path`` (:func:`commit_file`), on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_MARK, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write a file through ``write(binary file object)`` into a temp file beside ``path``, flush
    it to disk, then rename it into place: ``path`` is always the old file or the whole new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def commit_file(tmp: Path, path: Path) -> None:
    """Flush the written temp file ``tmp`` to disk and rename it to ``path``, then flush the
    directory entry: after a crash, ``path`` is the old file or the whole new one."""
    _fsync_path(Path(tmp))
    os.replace(tmp, path)
    _fsync_path(Path(path).parent)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Remove the temp files and directories that killed writers left in ``folder`` (names that
    start with ``.`` and end with :data:`TMP_MARK`); call it only where no writer is at work.

    Returns:
        How many were removed.
    """
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    for p in folder.glob(f".*{TMP_MARK}"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed
