"""Training losses. Each loss class is called as ``loss(model, batch)`` by the training loop.
Batches may carry images (``"images"`` beside ``input_ids``, from the collators): the losses pass
them to the model, so image–text matching is :class:`PairLoss`, multimodal retrieval
:class:`DPRLoss` and image classification :class:`ClassificationLoss`.

Under several processes the contrastive losses gather the other processes' embeddings (in-batch
negatives across GPUs, as in DPR / meerqat) with an all-gather that sends each copy's gradient back
to the process that computed it. Once the training loop averages gradients, N processes of batch b
give exactly the gradient of one process with batch N·b. (Gathering detached copies, as DPR's code
does, drops every embedding's part as another process's negative; that part cancels a direction
shared by all local embeddings, and without it image–text matching, whose image-side inputs differ
only in their visual tokens, did not learn under 2 processes.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..embed import pool_inputs
from .distill import DISTILL_LOSSES, listwise_kl, margin_mse, own_scores


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' ``x`` concatenated in rank order; the backward pass sums each block's
    gradients from every process and hands them to the process that owns the block
    (``torch.distributed.nn.functional.all_gather``: reduce-scatter on NCCL, all-to-all on gloo).
    Every process must call it, and later run backward, the same number of times (the loop runs
    the same task on every process at each step).

    Args:
        x: ``[n, d]``, the same ``n`` on every process (Accelerate's ``even_batches`` ensures it).

    Returns:
        ``([world · n, d], rank · n)``: the gathered tensor and the local block's offset.
    """
    from torch.distributed.nn.functional import all_gather

    from ..dist import process_state

    state = process_state()
    if state.num_processes == 1:
        return x, 0
    return torch.cat(all_gather(x.contiguous())), state.process_index * x.shape[0]


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """Every process's ``keys`` (integer tensor, same shape everywhere) concatenated in rank order."""
    from accelerate.utils import gather

    from ..dist import process_state

    return keys if process_state().num_processes == 1 else gather(keys.contiguous())


def false_negatives(query_keys: torch.Tensor, all_query_keys: torch.Tensor, all_passage_keys: torch.Tensor,
                    relevant_keys: torch.Tensor) -> torch.Tensor:
    """Which candidate passages of :func:`dpr_loss` are relevant to a query although they are not
    its own positive: ``[N, P]`` bool over the ``P`` (gathered) passages; its own positive is
    marked too (:func:`dpr_loss` keeps it).

    A passage is a false negative of query ``i`` when its text is one of ``i``'s relevant texts
    (a duplicate of its positive, another answer of the same question, another query's hard
    negative that is ``i``'s positive) or when it is the positive of a query with the same text as
    ``i`` (one question with several answers gives several examples). Texts are compared by key
    (:func:`petune.train.collate.text_key`), as DPR's data removes duplicate passages.

    Args:
        query_keys: ``[N]``, the local queries' keys.
        all_query_keys: ``[Q]``, every process's query keys in rank order.
        all_passage_keys: ``[Q · M]``, every process's passage keys, ``M`` per query, positive first.
        relevant_keys: ``[N, R]``, the local queries' relevant keys, padded with a negative value.
    """
    m = all_passage_keys.shape[0] // all_query_keys.shape[0]
    relevant = (all_passage_keys.view(1, -1, 1) == relevant_keys.unsqueeze(1)).any(-1)
    positive = torch.arange(all_passage_keys.shape[0], device=all_passage_keys.device) % m == 0
    same_query = all_query_keys.repeat_interleave(m).view(1, -1) == query_keys.view(-1, 1)
    return relevant | (positive & same_query)


def dpr_loss(queries: torch.Tensor, passages: torch.Tensor, gather: bool = True,
             false_negative: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """DPR contrastive loss (Karpukhin et al., 2020) with in-batch and hard negatives.

    Args:
        queries: ``[N, d]``.
        passages: ``[N · M, d]`` grouped by query: rows ``i·M … i·M+M-1`` belong to query ``i``,
            the first relevant, the other ``M-1`` its hard negatives. Every other query's passages
            are in-batch negatives (from every process when ``gather``).
        false_negative: optional ``[N, world · N · M]`` bool, candidates relevant to the query
            besides its own positive (:func:`false_negatives`): left out of its softmax.
        scale: ``None`` scores by inner product (DPR); a number scores by cosine similarity times
            ``scale`` (sentence-transformers' MultipleNegativesRankingLoss, scale 20 = temperature 0.05).

    Returns:
        ``NLLLoss(mean)`` of ``log_softmax`` over the ``[N, world · N · M]`` score matrix.

    Raises:
        ValueError: ``passages`` rows are not a multiple of ``queries`` rows.
    """
    n = queries.shape[0]
    if n == 0 or passages.shape[0] % n:
        raise ValueError(f"passages ({passages.shape[0]} rows) must hold M rows per query ({n} queries)")
    m = passages.shape[0] // n
    if scale is not None:
        queries, passages = F.normalize(queries, dim=-1), F.normalize(passages, dim=-1)
    everyone, offset = gather_with_grad(passages) if gather else (passages, 0)
    scores = queries @ everyone.T if scale is None else scale * queries @ everyone.T
    labels = offset + torch.arange(n, device=queries.device) * m
    if false_negative is not None:
        keep = ~false_negative
        keep[torch.arange(n, device=keep.device), labels] = True
        scores = scores.masked_fill(~keep, float("-inf"))
    return F.nll_loss(F.log_softmax(scores, dim=1), labels)


class LogitScale(nn.Module):
    """CLIP's learnable temperature: ``exp(s)`` with ``s`` initialised to ``log(1 / 0.07)``, clamped at 100."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al., 2021) over paired rows of ``a`` and ``b`` ``[N, d]``,
    cosine similarity times ``scale``."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    all_b, offset = gather_with_grad(b) if gather else (b, 0)
    all_a, _ = gather_with_grad(a) if gather else (a, 0)
    labels = offset + torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(scale * a @ all_b.T, labels) + F.cross_entropy(scale * b @ all_a.T, labels)) / 2


class ContrastiveLoss(nn.Module):
    """Base of the contrastive losses: pool each input group of a batch, then score the
    embeddings. With ``mini_batch_size`` set and a group larger than it, the loss is cached
    (:mod:`petune.train.cached`, GradCache): the same value and gradient as uncached, with only
    ``mini_batch_size`` rows' activations in memory at a time, so the batch (the in-batch
    negatives) can grow past what one forward holds. Subclasses give :meth:`groups` and :meth:`score`.

    Raises:
        ValueError: ``mini_batch_size`` is not a positive integer (at construction).
    """

    #: ``{group: side}`` for :func:`petune.embed.pool` (a query-side model's passages: its frozen base)
    sides: dict[str, str] = {}

    def __init__(self, pooling: str, mini_batch_size: int | None):
        super().__init__()
        if mini_batch_size is not None and (not isinstance(mini_batch_size, int) or mini_batch_size < 1):
            raise ValueError(f"mini_batch_size must be a positive integer or None, got {mini_batch_size!r}")
        self.pooling, self.mini_batch_size = pooling, mini_batch_size

    def groups(self, batch) -> dict[str, dict]:
        """``{name: collated inputs}`` to embed."""
        raise NotImplementedError

    def score(self, embeddings: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The loss of the pooled embeddings ``{name: [rows, d]}``."""
        raise NotImplementedError

    def forward(self, model, batch):
        groups = self.groups(batch)
        m = self.mini_batch_size
        if m is not None and max(g["input_ids"].shape[0] for g in groups.values()) > m:
            from .cached import cached_loss

            return cached_loss(self, model, groups, lambda e: self.score(e, batch), self.pooling, m, self.sides)
        return self.score({k: pool_inputs(model, g, self.pooling, side=self.sides.get(k)) for k, g in groups.items()},
                          batch)


class DPRLoss(ContrastiveLoss):
    """Task loss for retrieval batches ``{"query": {input_ids, attention_mask}, "passages": {...}}``
    (from :class:`petune.train.collate.RetrievalCollator`): pool both, then :func:`dpr_loss`.

    With ``mask_false_negatives`` (default) and the collator's text keys in the batch, in-batch and
    hard negatives that are relevant to the query (:func:`false_negatives`) are left out of its
    softmax instead of being pushed away. ``scale``: see :func:`dpr_loss` (``None``: inner product;
    score the tuned model the same way, ``encode(..., normalize=True)`` when a scale is given).
    ``mini_batch_size``: embed that many queries (and passages) at a time with a cached loss
    (:class:`ContrastiveLoss`); ``None`` embeds the whole batch at once. On a query-side model
    (``attach(..., sides="query")``) passages are embedded by the frozen base, without gradients.

    Distillation (:mod:`petune.train.distill`): with ``distill="margin-mse"`` or ``"kl"`` the batch
    must carry ``"teacher_scores"`` ``[N, M]`` (the collator passes the examples'), and the loss is
    ``contrastive_weight · DPR + distill_weight · distillation`` over each query's own ``M``
    passages, scored as the contrastive part scores them (cosine when ``scale`` is given, else
    inner product), without the scale; ``kl`` divides by ``student_temperature`` (default
    ``1 / scale``, or 1) and the teacher's by ``teacher_temperature`` (default the same).
    ``contrastive_weight=0`` trains on the teacher alone. Works with the cached loss.

    Raises:
        ValueError: an unknown ``distill``, negative weights, both weights 0; at a call, a
            distilling loss given a batch without teacher scores.
    """

    sides = {"query": "query", "passages": "passage"}

    def __init__(self, pooling: str = "mean", gather: bool = True, mask_false_negatives: bool = True,
                 scale: float | None = None, mini_batch_size: int | None = None, distill: str | None = None,
                 distill_weight: float = 1.0, contrastive_weight: float = 1.0,
                 student_temperature: float | None = None, teacher_temperature: float | None = None):
        super().__init__(pooling, mini_batch_size)
        self.gather, self.mask_false_negatives, self.scale = gather, mask_false_negatives, scale
        if distill is not None and distill not in DISTILL_LOSSES:
            raise ValueError(f"distill must be one of {DISTILL_LOSSES} or None, got {distill!r}")
        if distill_weight < 0 or contrastive_weight < 0 or (contrastive_weight == 0 and (
                distill is None or distill_weight == 0)):
            raise ValueError(f"weights must be non-negative and not both 0, got contrastive {contrastive_weight}, "
                             f"distill {distill_weight if distill else None}")
        self.distill, self.distill_weight, self.contrastive_weight = distill, distill_weight, contrastive_weight
        self.student_temperature = student_temperature or (1.0 / scale if scale else 1.0)
        self.teacher_temperature = teacher_temperature or self.student_temperature

    def groups(self, batch):
        return {"query": batch["query"], "passages": batch["passages"]}

    def score(self, embeddings, batch):
        mask = None
        if self.mask_false_negatives and "relevant_keys" in batch:
            everyone = gather_keys if self.gather else (lambda keys: keys)
            mask = false_negatives(batch["query_keys"], everyone(batch["query_keys"]),
                                   everyone(batch["passage_keys"]), batch["relevant_keys"])
        loss = 0.0
        if self.contrastive_weight:
            loss = self.contrastive_weight * dpr_loss(embeddings["query"], embeddings["passages"], self.gather, mask,
                                                      self.scale)
        if self.distill and self.distill_weight:
            if "teacher_scores" not in batch:
                raise ValueError("this loss distils from a teacher, but the batch has no 'teacher_scores': give every "
                                 "example 'teacher_scores' (petune.train.teacher.add_teacher_scores)")
            student = own_scores(embeddings["query"], embeddings["passages"], self.scale is not None)
            teacher = batch["teacher_scores"].to(student.device)
            loss = loss + self.distill_weight * (margin_mse(student, teacher) if self.distill == "margin-mse" else
                                                 listwise_kl(student, teacher, self.student_temperature,
                                                             self.teacher_temperature))
        return loss


class PairLoss(ContrastiveLoss):
    """Task loss for paired batches ``{"a": {...}, "b": {...}}``: symmetric InfoNCE with a learnable
    temperature (:class:`LogitScale`, trained with the method's parameters). ``mini_batch_size``:
    embed that many pairs at a time with a cached loss (:class:`ContrastiveLoss`)."""

    def __init__(self, pooling: str = "mean", init_temperature: float = 0.07, gather: bool = True,
                 mini_batch_size: int | None = None):
        super().__init__(pooling, mini_batch_size)
        self.gather = gather
        self.logit_scale = LogitScale(init_temperature)

    def groups(self, batch):
        return {"a": batch["a"], "b": batch["b"]}

    def score(self, embeddings, batch):
        return info_nce(embeddings["a"], embeddings["b"], self.logit_scale(), self.gather)


class ClassificationLoss(nn.Module):
    """Cross-entropy of a linear head on pooled encoder embeddings, for batches
    ``{"inputs": {...}, "labels": [batch]}``. The head is trained and checkpointed with the task."""

    def __init__(self, d_model: int, num_labels: int, pooling: str = "mean"):
        super().__init__()
        self.pooling = pooling
        self.head = nn.Linear(d_model, num_labels)

    def forward(self, model, batch):
        x = pool_inputs(model, batch["inputs"], self.pooling)
        return F.cross_entropy(self.head(x), batch["labels"])


class Seq2SeqLoss(nn.Module):
    """The model's own LM loss for generative batches ``{input_ids, attention_mask, labels}``
    (labels padded with -100; ``images`` too when the collator added them)."""

    def forward(self, model, batch):
        return model(**batch).loss
