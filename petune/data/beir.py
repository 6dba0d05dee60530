"""A user's retrieval collection in the BEIR layout (Thakur et al., 2021), and training files in
the shapes Tevatron and sentence-transformers read.

BEIR layout::

    corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."}   (title optional)
    queries.jsonl       {"_id": "q1", "text": "..."}
    qrels/train.tsv     query-id <TAB> corpus-id <TAB> score   (header line optional)
    qrels/dev.tsv       (optional)
    qrels/test.tsv

Everything is checked before anything is trained, and every problem is a
:class:`~petune.data.files.DataError` naming the file, the line and the fix: malformed JSON,
missing fields, duplicate ids, qrels naming unknown queries or documents, splits without a
positive judgement, test queries that are also training (or dev) queries. The corpus is read
line by line and written once to an Arrow ``datasets.Dataset`` (columns ``_id`` and
``passage`` = title + " " + text), which the store, BM25 and the recipes stream: no Python list
of the collection.
"""

from __future__ import annotations

import os
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import DataError, jsonl_rows, require_file, text_lines
from .stream import id_hash

SPLITS = ("train", "dev", "test")
CORPUS_LINE = '{"_id": "d1", "title": "A title", "text": "The passage."}'
QUERY_LINE = '{"_id": "q1", "text": "What is asked?"}'
QRELS_LINE = "q1<TAB>d1<TAB>1"
HOW = "see the BEIR layout in docs/your-data.md"


@dataclass
class BeirData:
    """A checked BEIR collection.

    Attributes:
        root: the directory.
        corpus: ``datasets.Dataset`` with ``_id`` and ``passage`` (title + " " + text), in
            corpus.jsonl's order (memory-mapped Arrow).
        queries: ``{query id: text}``.
        qrels: ``{split: {query id: {doc id: score}}}`` for the splits present (scores > 0 are
            relevant; 0 judgements are kept, as ranx reads them).
    """

    root: Path
    corpus: object
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def split_queries(self, split: str) -> dict[str, str]:
        """``{query id: text}`` of the queries judged in ``split``."""
        return {q: self.queries[q] for q in self.qrels.get(split, {})}


def _read_queries(path: Path) -> dict[str, str]:
    queries, line_of = {}, {}
    for number, row in jsonl_rows(path, {"_id": str, "text": str}, QUERY_LINE):
        if row["_id"] in queries:
            raise DataError(path, number, f"duplicate _id {row['_id']!r} (first on line {line_of[row['_id']]})",
                            "give every query its own _id")
        queries[row["_id"]], line_of[row["_id"]] = row["text"], number
    if not queries:
        raise DataError(path, 0, "no queries", f"write one query per line, e.g. {QUERY_LINE}")
    return queries


def _read_qrels(path: Path, queries: dict) -> tuple[dict, dict]:
    """``({query: {doc: score}}, {doc: first line})`` of one qrels file; queries without a
    positive judgement are left out with a warning (BEIR's evaluation skips them: they cannot be
    scored)."""
    qrels, doc_lines, pair_lines = {}, {}, {}
    for number, line in text_lines(path):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if number == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # BEIR's header
        if len(parts) != 3:
            raise DataError(path, number, f"{len(parts)} tab-separated fields, not 3",
                            f"each line is query-id, corpus-id and score separated by tabs: {QRELS_LINE}")
        qid, did, score = (p.strip() for p in parts)
        try:
            score = int(score)
        except ValueError:
            raise DataError(path, number, f"score {score!r} is not an integer",
                            f"the third field is a relevance grade such as 1: {QRELS_LINE}") from None
        if qid not in queries:
            raise DataError(path, number, f"query-id {qid!r} is not in queries.jsonl",
                            "add the query to queries.jsonl or drop the judgement")
        judged = qrels.setdefault(qid, {})
        if did in judged and judged[did] != score:
            raise DataError(path, number, f"query {qid!r} and document {did!r} are judged {score} here and "
                            f"{judged[did]} on line {pair_lines[qid, did]}", "keep one judgement per pair")
        judged[did] = score
        pair_lines.setdefault((qid, did), number)
        doc_lines.setdefault(did, number)
    unjudged = sorted(q for q, docs in qrels.items() if not any(s > 0 for s in docs.values()))
    if len(unjudged) == len(qrels):
        raise DataError(path, 0, "no positive judgement (score > 0)",
                        f"judge at least one relevant document per split, e.g. {QRELS_LINE}; or remove the file")
    if unjudged:
        warnings.warn(f"{path}: {len(unjudged)} queries have no positive judgement (e.g. {unjudged[:3]}); they are "
                      "left out, as BEIR's evaluation leaves them out (they cannot be scored)", stacklevel=3)
        for q in unjudged:
            del qrels[q]
    return qrels, doc_lines


def _check_overlap(qrels: dict, files: dict) -> None:
    for a, b in (("train", "test"), ("dev", "test")):
        if a in qrels and b in qrels:
            shared = sorted(set(qrels[a]) & set(qrels[b]))
            if shared:
                raise DataError(files[b], 0, f"{len(shared)} test queries are also {a} queries (e.g. {shared[0]!r})",
                                f"a query belongs to one split: remove them from qrels/{a}.tsv or from the test split")


def _scan_corpus(path: Path, wanted: dict) -> int:
    """Check corpus.jsonl (fields, unique ids) and that the qrels' documents are in it; its size."""
    hashes = array("Q")
    missing = set(wanted)
    for number, row in jsonl_rows(path, {"_id": str, "text": str}, CORPUS_LINE):
        if not isinstance(row.get("title") or "", str):  # null is no title, as the reader takes it
            raise DataError(path, number, f"'title' is a {type(row['title']).__name__}",
                            f"it must be text, e.g. {CORPUS_LINE}")
        hashes.append(id_hash(row["_id"]))
        missing.discard(row["_id"])
    if not hashes:
        raise DataError(path, 0, "no documents", f"write one document per line, e.g. {CORPUS_LINE}")
    values, counts = np.unique(np.frombuffer(hashes, dtype=np.uint64), return_counts=True)
    if (counts > 1).any():  # find the lines (rare path: a second read)
        clash, first = set(values[counts > 1].tolist()), {}
        for number, row in jsonl_rows(path, {"_id": str, "text": str}, CORPUS_LINE):
            if id_hash(row["_id"]) in clash:
                if row["_id"] in first:
                    raise DataError(path, number, f"duplicate _id {row['_id']!r} (first on line {first[row['_id']]})",
                                    "give every document its own _id")
                first[row["_id"]] = number
    if missing:
        doc = min(missing, key=lambda d: wanted[d][1])
        split_file, line = wanted[doc]
        raise DataError(split_file, line, f"corpus-id {doc!r} is not in corpus.jsonl ({len(missing)} such ids)",
                        "add the document to the corpus or drop the judgement")
    return len(hashes)


def _corpus_rows(path: str, stamp: str = ""):  # stamp: the file's size and time, in the cache key
    for _, row in jsonl_rows(path, {"_id": str, "text": str}, CORPUS_LINE):
        yield {"_id": row["_id"], "passage": f"{row.get('title') or ''} {row['text']}".strip()}


def load_beir(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              required: tuple[str, ...] = ("test",)) -> BeirData:
    """Read and check a BEIR directory.

    Args:
        root: the directory (corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv).
        cache_dir: where ``datasets`` keeps the corpus's Arrow file (default: its own cache).
        required: splits that must be there.

    Raises:
        DataError: anything wrong with the files, before any of them is converted.
    """
    import datasets

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, 0, "no such directory", f"give a BEIR directory ({HOW})")
    corpus_file = require_file(root / "corpus.jsonl", "the corpus", f"one document per line, e.g. {CORPUS_LINE}")
    queries = _read_queries(require_file(root / "queries.jsonl", "the queries",
                                         f"one query per line, e.g. {QUERY_LINE}"))
    files = {s: root / "qrels" / f"{s}.tsv" for s in SPLITS if (root / "qrels" / f"{s}.tsv").is_file()}
    for split in required:
        if split not in files:
            raise DataError(root / "qrels" / f"{split}.tsv", 0, f"no {split} split",
                            f"write qrels/{split}.tsv: query-id, corpus-id, score per line ({HOW})")
    qrels, wanted = {}, {}
    for split, path in files.items():
        qrels[split], lines = _read_qrels(path, queries)
        for doc, line in lines.items():
            wanted.setdefault(doc, (path, line))
    _check_overlap(qrels, files)
    _scan_corpus(corpus_file, wanted)
    stat = corpus_file.stat()
    stamp = f"{corpus_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    corpus = datasets.Dataset.from_generator(
        _corpus_rows, gen_kwargs={"path": str(corpus_file.resolve()), "stamp": stamp},
        cache_dir=None if cache_dir is None else str(cache_dir),
        features=datasets.Features({"_id": datasets.Value("string"), "passage": datasets.Value("string")}),
        fingerprint=f"beir-{id_hash(stamp):016x}")
    return BeirData(root, corpus, queries, qrels)


def beir_from_hub(name_or_path: str, dest: str | os.PathLike, qrels_name: str | None = None) -> Path:
    """Write a BEIR dataset from the Hugging Face Hub (``BeIR/scifact`` with its qrels in
    ``BeIR/scifact-qrels``, the BEIR convention; or a local clone of such a repository) to
    ``dest`` in the BEIR layout, for :func:`load_beir`.

    ``dest`` is written whole or not at all: the files go to a temp directory beside it, which is
    flushed and renamed to ``dest`` once every file is complete (a kill leaves no ``dest`` that a
    rerun could trust with fewer judgements). An existing ``dest`` is replaced.

    Raises:
        DataError: the datasets cannot be loaded (the message says what failed).
    """
    from ..atomic import atomic_dir

    import csv
    import json

    import datasets

    dest = Path(dest)
    try:
        corpus = datasets.load_dataset(name_or_path, "corpus", split="corpus")
        queries = datasets.load_dataset(name_or_path, "queries", split="queries")
        qrels = datasets.load_dataset(qrels_name or f"{name_or_path}-qrels")
    except Exception as e:
        raise DataError(name_or_path, 0, f"cannot load it with datasets ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})",
                        "give a BEIR directory instead, or a hub id with 'corpus' and 'queries' configs and a "
                        "'-qrels' companion (BeIR/scifact, BeIR/scifact-qrels)") from None
    with atomic_dir(dest) as tmp:
        (tmp / "qrels").mkdir()
        for name, rows, fields in (("corpus.jsonl", corpus, ("_id", "title", "text")),
                                   ("queries.jsonl", queries, ("_id", "text"))):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for batch in rows.iter(batch_size=10_000):
                    for values in zip(*(batch.get(k, [""] * len(batch["_id"])) for k in fields)):
                        f.write(json.dumps(dict(zip(fields, values))) + "\n")
        for split, rows in qrels.items():
            name = "dev" if split == "validation" else split
            with open(tmp / "qrels" / f"{name}.tsv", "w", encoding="utf-8", newline="") as f:
                out = csv.writer(f, delimiter="\t")
                out.writerow(["query-id", "corpus-id", "score"])
                for r in rows:
                    out.writerow([r["query-id"], r["corpus-id"], r["score"]])
    return dest


TRAIN_LINE = '{"query": "What is asked?", "positive": "A relevant passage.", "negatives": ["An irrelevant one."]}'


def _passages(value, path, number, name, scores: dict | None = None) -> list[str]:
    """A field of training passages: a string, a list of strings, or Tevatron's list of
    ``{"title", "text"}`` objects; a Tevatron object's ``"score"`` goes in ``scores`` by text."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            out.append(f"{item.get('title') or ''} {item['text']}".strip())
            if scores is not None and "score" in item:
                scores[out[-1]] = _score(item["score"], path, number, name)
        elif isinstance(item, str):
            out.append(item)
        else:
            raise DataError(path, number, f"{name!r} holds a {type(item).__name__}",
                            f"passages are strings or {{'title', 'text'}} objects, e.g. {TRAIN_LINE}")
    return out


def _score(value, path, number, name) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise DataError(path, number, f"{name!r} holds {value!r}, not a number", "teacher scores are numbers")
    return float(value)


def read_training_file(path: str | os.PathLike) -> list[dict]:
    """Training examples from a JSON-lines file: ``{"query", "positive"(s), "negative"(s)}``
    (sentence-transformers' names ``anchor`` / ``positive`` / ``negative`` too) or Tevatron's
    ``{"query", "positive_passages", "negative_passages"}`` (lists of ``{"title", "text"}``).
    Teacher scores for distillation: FlagEmbedding's ``pos_scores`` / ``neg_scores`` (one per
    passage) or a ``"score"`` in each Tevatron passage object.

    Returns:
        ``[{"query", "positives": [...], "negatives": [...]}]``, one per line, with ``"scores"``
        ``{passage text: teacher score}`` on lines that give scores.

    Raises:
        DataError: malformed lines, no query, no positive passage, an empty file.
    """
    path = require_file(path, "the training file", f"one example per line, e.g. {TRAIN_LINE}")
    examples = []
    for number, row in jsonl_rows(path, {}, TRAIN_LINE):
        query = row.get("query", row.get("anchor"))
        if not isinstance(query, str) or not query.strip():
            raise DataError(path, number, "no 'query' text",
                            f"each line needs a query and a positive, e.g. {TRAIN_LINE}")
        pos_key = next((k for k in ("positive_passages", "positives", "positive") if k in row), None)
        if pos_key is None:
            raise DataError(path, number, "no 'positive' passage", f"each line needs one, e.g. {TRAIN_LINE}")
        neg_key = next((k for k in ("negative_passages", "negatives", "negative") if k in row), None)
        scores: dict[str, float] = {}
        positives = _passages(row[pos_key], path, number, pos_key, scores)
        if not positives:
            raise DataError(path, number, f"{pos_key!r} is empty", f"give at least one positive, e.g. {TRAIN_LINE}")
        negatives = _passages(row[neg_key], path, number, neg_key, scores) if neg_key else []
        for texts, key in ((positives, "pos_scores"), (negatives, "neg_scores")):  # FlagEmbedding's teacher scores
            if key in row:
                given = row[key] if isinstance(row[key], list) else [row[key]]
                if len(given) != len(texts):
                    raise DataError(path, number, f"{len(given)} {key!r} for {len(texts)} passages",
                                    "give one score per passage, in the passages' order")
                scores.update({t: _score(v, path, number, key) for t, v in zip(texts, given)})
        examples.append({"query": query, "positives": positives, "negatives": negatives,
                         **({"scores": scores} if scores else {})})
    if not examples:
        raise DataError(path, 0, "no examples", f"one example per line, e.g. {TRAIN_LINE}")
    return examples


def write_beir(dest: str | os.PathLike, corpus: dict, queries: dict[str, str], qrels: dict[str, dict]) -> Path:
    """Write a collection in the BEIR layout.

    Args:
        corpus: ``{doc id: text}`` or ``{doc id: {"title", "text"}}``.
        queries: ``{query id: text}``.
        qrels: ``{split: {query id: {doc id: score}}}`` (splits ``train``, ``dev``, ``test``).

    Returns:
        ``dest``.
    """
    import json

    dest = Path(dest)
    (dest / "qrels").mkdir(parents=True, exist_ok=True)
    with open(dest / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc, value in corpus.items():
            row = value if isinstance(value, dict) else {"title": "", "text": value}
            f.write(json.dumps({"_id": str(doc), "title": row.get("title", ""), "text": row["text"]}) + "\n")
    with open(dest / "queries.jsonl", "w", encoding="utf-8") as f:
        for q, text in queries.items():
            f.write(json.dumps({"_id": str(q), "text": text}) + "\n")
    for split, judged in qrels.items():
        with open(dest / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q, docs in judged.items():
                for doc, score in docs.items():
                    f.write(f"{q}\t{doc}\t{score}\n")
    return dest


def bbc_beir(dest: str | os.PathLike, max_chars: int = 1000, seed: int = 0) -> Path:
    """The offline job's BBC headline → article task (``recipes/offline.py``'s news task) written in
    the BEIR layout: every article a document (body cut to ``max_chars``), every headline a query,
    qrels split 80 / 10 / 10 by article with ``seed`` as the offline job splits them."""
    from .packaged import bbc_news, bbc_retrieval, split_ids

    articles = bbc_news()
    news = bbc_retrieval(articles, max_chars=max_chars)
    splits = dict(zip(SPLITS, split_ids([a["id"] for a in articles], seed=seed)))
    qrels = {s: {f"q-{a}": news.qrels[f"q-{a}"] for a in ids} for s, ids in splits.items()}
    return write_beir(dest, news.docs, news.queries, qrels)


def chatterbot_beir(dest: str | os.PathLike, seed: int = 0) -> Path:
    """The offline job's ChatterBot question → answer task (``recipes/offline.py``'s qa task) written
    in the BEIR layout: every distinct answer a document, every distinct question a query (all its
    answers relevant), qrels split 80 / 10 / 10 by question with ``seed`` as the offline job splits
    them. Raises ``ImportError`` without ``chatterbot-corpus``."""
    from .packaged import chatterbot_qa, split_ids

    chat = chatterbot_qa()
    splits = dict(zip(SPLITS, split_ids(list(chat.queries), seed=seed)))
    qrels = {s: {q: chat.qrels[q] for q in ids} for s, ids in splits.items()}
    return write_beir(dest, chat.docs, chat.queries, qrels)
