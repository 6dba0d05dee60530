"""Reading users' files line by line, with errors that name the file, the line and the fix."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """Bad input data: ``path:line: problem. fix`` (``line`` 0: the file as a whole)."""

    def __init__(self, path, line: int, problem: str, fix: str = ""):
        self.path, self.line, self.problem, self.fix = str(path), line, problem, fix
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}" + (f". {fix}" if fix else ""))


def require_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, f"no such file ({what})", fix)
    return path


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each line of a UTF-8 text file, read lazily; a byte-order mark
    at the start (as Excel and Notepad write) is dropped.

    Raises:
        DataError: a line that is not UTF-8 (names the line, the byte and its column).
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, number, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                                f"save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > fixed") from None
            yield number, line


def jsonl_rows(path: str | os.PathLike, fields: dict[str, type | tuple], example: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file, checked.

    Args:
        fields: required fields and their types (``str`` fields also accept ints, as ids often
            are; they are turned into strings).
        example: a well-formed line, quoted in the errors.

    Raises:
        DataError: a line that is not UTF-8 or not one JSON object, a missing field, a field of
            another type.
    """
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, number, f"not valid JSON ({e.msg} at column {e.colno})",
                            f"each line must be one JSON object, e.g. {example}") from None
        if not isinstance(row, dict):
            raise DataError(path, number, f"a JSON {type(row).__name__}, not an object",
                            f"each line must be one JSON object, e.g. {example}")
        for name, kind in fields.items():
            if name not in row:
                raise DataError(path, number, f"no {name!r} field (it has {sorted(row)})",
                                f"each line needs {sorted(fields)}, e.g. {example}")
            value = row[name]
            if kind is str and isinstance(value, int) and not isinstance(value, bool):
                row[name] = value = str(value)
            if not isinstance(value, kind):
                raise DataError(path, number, f"{name!r} is a {type(value).__name__}",
                                f"it must be a {getattr(kind, '__name__', kind)}, e.g. {example}")
        yield number, row
