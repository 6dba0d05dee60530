"""Collate functions: examples → tokenised batches for the losses in ``petune.train.losses``."""

from __future__ import annotations

import hashlib

import torch

#: pads ``relevant_keys`` (text keys are non-negative)
NO_KEY = -1


def text_key(text: str) -> int:
    """A stable 63-bit key of a text (BLAKE2b; Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _tokenize(tokenizer, texts, max_length, examples=None, image_key=None):
    """Tokenised texts; with ``image_key`` present in any of ``examples``, also ``"images"``: the
    batch's visual input (:func:`petune.vision.image_batch`; examples without it are text only)."""
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                           return_token_type_ids=False))
    if image_key is not None and any(image_key in e for e in examples):
        from ..regions import image_batch

        batch["images"] = image_batch([e.get(image_key) for e in examples])
    return batch


class RetrievalCollator:
    """``{"query": str, "positive": str, "negatives": [str, ...]}`` examples → ``{"query", "passages"}``
    with passages grouped per query (relevant first), as :func:`petune.train.losses.dpr_loss` expects.

    The batch also carries text keys (:func:`text_key`) with which :class:`DPRLoss` removes false
    negatives: ``"query_keys"`` ``[N]``, ``"passage_keys"`` ``[N · M]`` and ``"relevant_keys"``
    ``[N, R]`` (padded with :data:`NO_KEY`): each query's positive plus the texts of its optional
    ``"relevant"`` list — every passage relevant to the query, e.g. all answers of a question
    with several, so that none of them counts as its in-batch negative.

    Distillation: examples with ``"teacher_scores"`` (one per passage, positive first) give the
    batch ``"teacher_scores"`` ``[N, M]`` (:class:`petune.train.DPRLoss` with ``distill``).

    Multimodal queries (question + image → passage): an example's ``"image"`` (features, see
    :func:`petune.vision.regions`, or ``None``) joins its query as visual tokens.

    Raises:
        ValueError: examples in one batch with different numbers of negatives, or teacher scores
            on some examples only or not one per passage.
    """

    def __init__(self, tokenizer, query_max_length: int = 64, passage_max_length: int = 256,
                 query_prefix: str = "", passage_prefix: str = ""):
        self.tokenizer, self.qlen, self.plen = tokenizer, query_max_length, passage_max_length
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix

    def __call__(self, examples):
        counts = {len(e.get("negatives", [])) for e in examples}
        if len(counts) > 1:
            raise ValueError(f"every example of a batch needs the same number of negatives, got {sorted(counts)}")
        passages = [self.passage_prefix + p for e in examples for p in [e["positive"], *e.get("negatives", [])]]
        queries = [self.query_prefix + e["query"] for e in examples]
        relevant = [sorted({text_key(self.passage_prefix + p) for p in [e["positive"], *e.get("relevant", [])]})
                    for e in examples]
        width = max(map(len, relevant))
        batch = {"query": _tokenize(self.tokenizer, queries, self.qlen, examples, "image"),
                 "passages": _tokenize(self.tokenizer, passages, self.plen),
                 "query_keys": torch.tensor([text_key(q) for q in queries]),
                 "passage_keys": torch.tensor([text_key(p) for p in passages]),
                 "relevant_keys": torch.tensor([r + [NO_KEY] * (width - len(r)) for r in relevant])}
        scored = sum("teacher_scores" in e for e in examples)
        if scored:
            m = 1 + counts.pop()
            if scored < len(examples) or any(len(e["teacher_scores"]) != m for e in examples):
                raise ValueError(f"teacher scores: every example of a batch needs one per passage ({m}: positive, "
                                 "then negatives), or none has any")
            batch["teacher_scores"] = torch.tensor([e["teacher_scores"] for e in examples], dtype=torch.float32)
        return batch


class PairCollator:
    """``{"a": str, "b": str}`` examples → ``{"a", "b"}`` batches for :class:`PairLoss`.

    Image–text matching: ``"image_a"`` / ``"image_b"`` (features or ``None``) join side a / b as
    visual tokens; ``"a"`` may then be ``""`` (image only: the side's text is its prefix, e.g.
    ``"image text match: "``).
    """

    def __init__(self, tokenizer, max_length: int = 128, prefix_a: str = "", prefix_b: str = ""):
        self.tokenizer, self.max_length, self.prefix_a, self.prefix_b = tokenizer, max_length, prefix_a, prefix_b

    def __call__(self, examples):
        return {"a": _tokenize(self.tokenizer, [self.prefix_a + e["a"] for e in examples], self.max_length,
                               examples, "image_a"),
                "b": _tokenize(self.tokenizer, [self.prefix_b + e["b"] for e in examples], self.max_length,
                               examples, "image_b")}


class ClassificationCollator:
    """``{"text": str, "label": label}`` examples → ``{"inputs", "labels"}``; ``labels`` lists the classes.

    Image classification: an example's ``"image"`` (features or ``None``) joins its text as visual
    tokens; ``"text"`` may be ``""`` (the prefix alone).
    """

    def __init__(self, tokenizer, labels, max_length: int = 256, prefix: str = ""):
        self.tokenizer, self.max_length, self.prefix = tokenizer, max_length, prefix
        self.index = {label: i for i, label in enumerate(labels)}

    def __call__(self, examples):
        unknown = {e["label"] for e in examples} - set(self.index)
        if unknown:
            raise ValueError(f"labels {sorted(map(str, unknown))} are not among the classes {list(self.index)}")
        return {"inputs": _tokenize(self.tokenizer, [self.prefix + e["text"] for e in examples], self.max_length,
                                    examples, "image"),
                "labels": torch.tensor([self.index[e["label"]] for e in examples])}


class Seq2SeqCollator:
    """``{"source": str, "target": str}`` examples → ``{input_ids, attention_mask, labels}``
    (label padding set to -100 so the LM loss ignores it). An example's ``"image"`` (features or
    ``None``) joins its source as visual tokens (VL-T5's generative tasks, e.g. ``"vqa: "``)."""

    def __init__(self, tokenizer, max_length: int = 256, target_max_length: int = 64, prefix: str = ""):
        self.tokenizer, self.max_length, self.target_max_length, self.prefix = (
            tokenizer, max_length, target_max_length, prefix)

    def __call__(self, examples):
        batch = _tokenize(self.tokenizer, [self.prefix + e["source"] for e in examples], self.max_length,
                          examples, "image")
        target = _tokenize(self.tokenizer, [e["target"] for e in examples], self.target_max_length)
        labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        batch["labels"] = labels
        return batch
