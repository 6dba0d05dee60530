"""ViQuAE (Lerner et al., SIGIR 2022): questions about named entities, answered from Wikipedia passages.

Loads the questions, the Wikipedia knowledge base and its passages from the Hugging Face Hub
or from local copies (``datasets.load_from_disk``), and finds each question's relevant passages
with meerqat's rule.

Expected columns (the hub datasets have them):
    questions (splits train / validation / test): ``input`` (the question), ``output`` with
        ``original_answer`` (str), ``answer`` (list of alternative answers) and ``provenance``
        (entries with ``wikipedia_id``); an id column ``id`` or ``kilt_id`` (else the row number).
    knowledge base: ``wikipedia_id`` and, to find each article's passages, ``passage_index``
        (row numbers in the passages dataset) — or passages that carry ``wikipedia_id`` or
        ``index`` (the article's row in the knowledge base).
    passages: ``passage`` (text, title prepended).
    images (optional, for multimodal queries): the questions' ``image`` column holds each
        question's image file name, relative to the folder of ViQuAE's images (distributed
        beside the dataset; meerqat reads it from ``$VIQUAE_IMAGES_PATH``).
"""

from __future__ import annotations

import os
import re
import string
from collections import defaultdict

HUB_IDS = {"dataset": "PaulLerner/viquae_dataset", "kb": "PaulLerner/viquae_wikipedia",
           "passages": "PaulLerner/viquae_passages"}


class MissingDataError(RuntimeError):
    """ViQuAE data could be loaded neither from the given local copy nor from the hub."""


def load(kind: str, path: str | None = None):
    """Load ``kind`` (``"dataset"``, ``"kb"`` or ``"passages"``) from ``path`` (``load_from_disk``)
    or, without a path, from its hub id.

    Raises:
        MissingDataError: with what is missing and how to get it.
    """
    import datasets

    hub = HUB_IDS[kind]
    if path:
        if not os.path.exists(path):
            raise MissingDataError(f"ViQuAE {kind}: {path} does not exist. " + how_to_get(kind))
        try:
            return datasets.load_from_disk(path)
        except Exception as e:  # a folder that is not a saved dataset
            raise MissingDataError(f"ViQuAE {kind}: {path} is not a dataset saved with save_to_disk ({e}). "
                                   + how_to_get(kind)) from None
    try:
        loaded = datasets.load_dataset(hub)
    except Exception as e:
        raise MissingDataError(f"ViQuAE {kind}: cannot load {hub} from the Hugging Face Hub "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). " + how_to_get(kind)) from None
    if kind != "dataset" and isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[next(iter(loaded))]  # the kb and passages have a single split
    return loaded


def how_to_get(kind: str) -> str:
    flag = {"dataset": "--dataset-path", "kb": "--kb-path", "passages": "--passages-path"}[kind]
    return (f"On a machine with Hub access run: python -c \"import datasets; "
            f"datasets.load_dataset('{HUB_IDS[kind]}').save_to_disk('viquae/{kind}')\", "
            f"copy the folder here and pass {flag} viquae/{kind}.")


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and English articles, squeeze spaces (SQuAD / meerqat)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _provenance_ids(output) -> list[str]:
    prov = output.get("provenance") or []
    if isinstance(prov, dict):  # datasets stores a list of structs as a struct of lists
        ids = prov.get("wikipedia_id") or []
    else:
        ids = [p.get("wikipedia_id") for p in prov]
    return [str(i) for i in ids if i is not None]


def _answers(output) -> list[str]:
    answers = [output.get("original_answer")] + list(output.get("answer") or [])
    return [a for a in {normalize_answer(a) for a in answers if a} if a]


def article_passages(kb, passages, wanted=None) -> tuple[dict[str, int], dict[int, list[int]]]:
    """``(wikipedia_id → kb row, kb row → passage rows)``, for the articles in ``wanted`` (a set of
    wikipedia ids; default: every article).

    The columns are streamed (:func:`petune.data.stream.column_rows`) and only wanted articles
    are kept: on the full knowledge base (1.5M articles, 11.9M passages) the maps hold the few
    thousand articles the questions cite, not every article's passage list.

    Raises:
        ValueError: no way to link passages to articles (names the columns that would do).
    """
    from .stream import column_rows

    if "wikipedia_id" not in kb.column_names:
        raise ValueError(f"the knowledge base needs a wikipedia_id column; it has {kb.column_names}")
    keep = (lambda w: True) if wanted is None else (lambda w: w in wanted)
    row_of = {str(w): i for i, w in enumerate(column_rows(kb, "wikipedia_id")) if keep(str(w))}
    if "passage_index" in kb.column_names:
        rows = set(row_of.values())
        return row_of, {i: list(idx or []) for i, idx in enumerate(column_rows(kb, "passage_index")) if i in rows}
    groups = defaultdict(list)
    if "wikipedia_id" in passages.column_names:
        for p, w in enumerate(column_rows(passages, "wikipedia_id")):
            if str(w) in row_of:
                groups[row_of[str(w)]].append(p)
    elif "index" in passages.column_names:
        rows = set(row_of.values())
        for p, i in enumerate(column_rows(passages, "index")):
            if int(i) in rows:
                groups[int(i)].append(p)
    else:
        raise ValueError("cannot link passages to articles: give the knowledge base a passage_index column, "
                         f"or the passages a wikipedia_id or index column (passages have {passages.column_names})")
    return row_of, dict(groups)


def provenance_ids(*splits) -> set[str]:
    """The wikipedia ids the questions of ``splits`` cite (their provenance articles)."""
    return {w for split in splits for output in split["output"] for w in _provenance_ids(output)}


def question_ids(split) -> list[str]:
    for column in ("id", "kilt_id"):
        if column in split.column_names:
            return [str(i) for i in split[column]]
    return [str(i) for i in range(len(split))]


def relevant_passages(split, kb, passages, links=None) -> tuple[dict[str, dict[str, int]], list[str]]:
    """meerqat's relevance rule: the passages of a question's provenance article(s) that contain the
    normalised original answer or an alternative answer (word-boundary match).

    Returns:
        ``(qrels, dropped)``: ``{question_id: {passage_row: 1}}`` for questions with at least one
        relevant passage, and the ids of those without (to report and drop).

    Raises:
        ValueError: a required column is missing (named in the message).
    """
    for column in ("input", "output"):
        if column not in split.column_names:
            raise ValueError(f"ViQuAE questions need an {column!r} column; they have {split.column_names}")
    if "passage" not in passages.column_names:
        raise ValueError(f"ViQuAE passages need a 'passage' column; they have {passages.column_names}")
    row_of, passages_of = links or article_passages(kb, passages, provenance_ids(split))
    qrels, dropped = {}, []
    for qid, output in zip(question_ids(split), split["output"]):
        answers = _answers(output)
        pattern = re.compile(r"\b(" + "|".join(re.escape(a) for a in answers) + r")\b") if answers else None
        found = {}
        for wid in _provenance_ids(output):
            for p in passages_of.get(row_of.get(wid, -1), []):
                if pattern is not None and pattern.search(normalize_answer(passages[int(p)]["passage"])):
                    found[str(p)] = 1
        if found:
            qrels[qid] = found
        else:
            dropped.append(qid)
    return qrels, dropped


def image_names(split) -> list[str]:
    """The questions' ``image`` column: one image file name per question.

    Raises:
        MissingDataError: no ``image`` column.
    """
    if "image" not in split.column_names:
        raise MissingDataError(f"the ViQuAE questions have no 'image' column (they have {split.column_names}); "
                               "multimodal questions need the dataset's image file names")
    return list(split["image"])


def image_paths(split, images_dir) -> dict[str, str]:
    """``{question_id: image file path}`` from the questions' ``image`` column.

    Raises:
        MissingDataError: no ``image`` column, no such folder, or images missing from it (counts
            them and names the first).
    """
    from pathlib import Path

    names = image_names(split)
    root = Path(images_dir)
    if not root.is_dir():
        raise MissingDataError(f"--images-dir {root} is not a folder; download ViQuAE's images (the archive "
                               "beside PaulLerner/viquae_dataset on the Hub) and unpack it there")
    paths = {q: str(root / name) for q, name in zip(question_ids(split), names)}
    missing = [p for p in paths.values() if not Path(p).is_file()]
    if missing:
        raise MissingDataError(f"{len(missing)} of {len(paths)} question images are not in {root} "
                               f"(first: {missing[0]}); unpack all of ViQuAE's images there")
    return paths
