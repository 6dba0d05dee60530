"""A projection head after pooling: ``Linear(d → dim)`` on the pooled embedding, trained with the
method and saved with the tuned parameters (SimCLR's projection head, Chen et al., 2020; DPR-style
retrievers and sentence-transformers' ``Dense`` module put one after pooling too). Everything that
pools a tuned model — the contrastive losses, :func:`petune.encode`, the stores — then gives
``[batch, dim]`` embeddings."""

from __future__ import annotations

import torch
from torch import nn

from .parts import SHARED, Part, register_part
from .tuned import TunedModel

HEAD_PART = "projection head"  # its row in the trainable report


@register_part("head")
class ProjectionHead(Part):
    """One ``Linear(d_in → dim)`` shared by the tasks, applied to every pooled embedding.
    Options: ``d_in``, ``dim``, ``bias``."""

    label = HEAD_PART
    input_key = ""

    def after_pooling(self, key, pooled):
        linear = self[key]
        if pooled.shape[-1] != linear.in_features:
            raise ValueError(f"the projection head maps {linear.in_features}-d embeddings, got {pooled.shape[-1]}: "
                             "pool one layer (layer_combine='concat' changes the size)")
        return linear(pooled.to(linear.weight.dtype))

    @classmethod
    def from_options(cls, tuned, d_in, dim, bias=True) -> "ProjectionHead":
        part = cls({SHARED: nn.Linear(d_in, dim, bias=bias)}, False, {"d_in": d_in, "dim": dim, "bias": bias})
        tuned.add_part(part)
        return part


def add_projection_head(tuned: TunedModel, dim: int | None = None, *, bias: bool = True,
                        seed: int | None = None) -> TunedModel:
    """Give a tuned model a trainable projection head after pooling.

    Args:
        tuned: from :func:`petune.attach`.
        dim: output size; default: the encoder's hidden size (``d_model``), initialised as the
            identity (training starts from the model's own embeddings).
        bias: add a bias.
        seed: seeds the random initialisation when ``dim`` differs from ``d_model``.

    Returns:
        ``tuned``, changed in place: a "projection head" row in ``trainable_report()``; pooled
        embeddings become ``[batch, dim]``; :func:`petune.save` / :func:`petune.load` keep it.

    Raises:
        TypeError: ``tuned`` is not a :class:`petune.TunedModel`.
        ValueError: a bad ``dim``; a head already added; a query-side model (its passages are
            the frozen base's embeddings, which a head on the query side would no longer match).
    """
    from .models import d_model

    if not isinstance(tuned, TunedModel):
        raise TypeError("add_projection_head takes the TunedModel from petune.attach")
    if "head" in tuned.extra_parts:
        raise ValueError("this model already has a projection head")
    if tuned.sides == "query":
        raise ValueError("a query-side model's passages are the frozen base's embeddings: a projection head on "
                         "its queries would map them out of that space; attach without sides= for a head")
    d_in = d_model(tuned.base_model)
    dim = d_in if dim is None else dim
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer (the projected size), got {dim!r}")
    if seed is not None:
        torch.manual_seed(seed)
    part = ProjectionHead.from_options(tuned, d_in, dim, bias=bias)
    if dim == d_in:
        with torch.no_grad():
            part[SHARED].weight.copy_(torch.eye(dim))
            if bias:
                part[SHARED].bias.zero_()
    return tuned
