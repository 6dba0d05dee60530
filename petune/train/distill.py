"""Distillation losses: a student's scores of each query's own passages (its positive and hard
negatives) pulled towards a teacher's scores of the same pairs.

- Margin-MSE (Hofstätter et al., 2020, "Improving Efficient Neural Ranking Models with
  Cross-Architecture Knowledge Distillation"; sentence-transformers' ``MarginMSELoss``): the
  squared difference between the student's and the teacher's margins ``s(q, p⁺) − s(q, p⁻)``.
- Listwise KL (Tevatron's ``DistilTevatronTrainer``, sentence-transformers' ``DistillKLDivLoss``):
  ``KL(softmax(teacher / τ_t) ‖ softmax(student / τ_s))`` over each query's passages, with the two
  temperatures separate (a cross-encoder's logits and a bi-encoder's cosines live on other scales).

Teacher scores are computed once, before training (:mod:`petune.train.teacher`), and travel in
the batch as ``"teacher_scores"`` ``[N, M]``; these losses need no gathering across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the distillation losses :class:`petune.train.DPRLoss` takes by name
DISTILL_LOSSES = ("margin-mse", "kl")


def own_scores(queries: torch.Tensor, passages: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Each query's scores of its own passages.

    Args:
        queries: ``[N, d]``.
        passages: ``[N · M, d]`` grouped by query (positive first), as :func:`petune.train.dpr_loss` takes.
        normalize: cosine similarity (else inner product).

    Returns:
        ``[N, M]``.
    """
    n = queries.shape[0]
    if normalize:
        queries, passages = F.normalize(queries, dim=-1), F.normalize(passages, dim=-1)
    return torch.einsum("nd,nmd->nm", queries, passages.view(n, -1, passages.shape[-1]))


def margin_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Margin-MSE over ``[N, M]`` scores (column 0 the positive): the mean over the ``N · (M − 1)``
    (positive, negative) pairs of ``((s⁺ − s⁻) − (t⁺ − t⁻))²``.

    Raises:
        ValueError: shapes differ, or ``M < 2`` (no negative, no margin).
    """
    _check(student, teacher)
    if student.shape[1] < 2:
        raise ValueError("Margin-MSE needs at least one hard negative per query (M >= 2)")
    return F.mse_loss(student[:, :1] - student[:, 1:], (teacher[:, :1] - teacher[:, 1:]).to(student.dtype))


def listwise_kl(student: torch.Tensor, teacher: torch.Tensor, student_temperature: float = 0.05,
                teacher_temperature: float = 0.05) -> torch.Tensor:
    """``KL(softmax(teacher / τ_t) ‖ softmax(student / τ_s))`` over each row of ``[N, M]`` scores,
    averaged over the ``N`` queries.

    Raises:
        ValueError: shapes differ, or a temperature is not positive.
    """
    _check(student, teacher)
    if not (student_temperature > 0 and teacher_temperature > 0):
        raise ValueError(f"temperatures must be positive, got student {student_temperature}, "
                         f"teacher {teacher_temperature}")
    target = F.log_softmax(teacher.to(student.dtype) / teacher_temperature, dim=1)
    return F.kl_div(F.log_softmax(student / student_temperature, dim=1), target, log_target=True,
                    reduction="batchmean")


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"teacher scores {tuple(teacher.shape)} do not match the student's {tuple(student.shape)}: "
                         "one teacher score per passage of each example (positive first, then its negatives)")
