"""The visual embedding of VL-T5 / VL-BART (Cho et al., 2021, "Unifying Vision-and-Language Tasks via
Text Generation"), as VL-Adapter (Sung et al., CVPR 2022) trains it: image features become encoder
tokens beside the text."""

from __future__ import annotations

import torch
from torch import nn

from ..models import d_model, model_type
from ..parts import SHARED, Part, register_part
from ..tuned import TunedModel

VISUAL_PART = "visual embedding"  # its row in the trainable report

#: encoders whose ``inputs_embeds`` path is not position-correct in transformers 4.57 (FSMT makes
#: position ids from the embedding values), so visual tokens cannot be joined to their input
NO_INPUTS_EMBEDS = ("fsmt",)


class VisualEmbedding(nn.Module):
    """Image features and their boxes → visual tokens in the encoder's input space.

    ``Linear(feat_dim → d_model) + LayerNorm`` of the features, plus ``Linear(5 → d_model) +
    LayerNorm`` of each region's box ``(x1, y1, x2, y2, area)``, plus an image-order embedding when
    an example holds several images — VL-T5's ``VisualEmbedding`` (``feat_embedding`` +
    ``absolute_vis_pos_embedding`` + ``img_order_embedding``).

    Args:
        feat_dim: feature size of the image backbone (1280 for EfficientNet-Lite0, 768 for CLIP
            ViT-B/32's vision tower, 2048 for Faster R-CNN regions).
        d_model: the encoder's hidden size.
        n_images: images per example at most (adds the image-order embedding when > 1).
    """

    def __init__(self, feat_dim: int, d_model: int, n_images: int = 1):
        super().__init__()
        self.feat_dim, self.n_images = feat_dim, n_images
        self.features = nn.Sequential(nn.Linear(feat_dim, d_model), nn.LayerNorm(d_model))
        self.position = nn.Sequential(nn.Linear(5, d_model), nn.LayerNorm(d_model))
        self.image_order = nn.Embedding(n_images, d_model) if n_images > 1 else None

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, order: torch.Tensor | None = None):
        """``features [batch, regions, feat_dim]``, ``boxes [batch, regions, 4]`` (x1, y1, x2, y2 as
        fractions of the image), ``order [batch, regions]`` (image index) → ``[batch, regions, d_model]``.

        Raises:
            ValueError: features of another size than ``feat_dim`` (another backbone).
        """
        if features.shape[-1] != self.feat_dim:
            raise ValueError(f"image features have size {features.shape[-1]}, but the visual embedding expects "
                             f"{self.feat_dim}: extract them with the backbone the model was set up for")
        param = self.features[0].weight
        features, boxes = features.to(param), boxes.to(param)
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        x = self.features(features) + self.position(torch.cat([boxes, area.unsqueeze(-1)], dim=-1))
        if self.image_order is None:
            if order is not None and int(order.max()) > 0:
                raise ValueError("an example holds several images; add_visual(..., n_images=N) gives the "
                                 "visual embedding an image-order embedding for them")
        else:
            if order is None:
                order = torch.zeros(features.shape[:2], dtype=torch.long, device=features.device)
            elif int(order.max()) >= self.n_images:
                raise ValueError(f"an example holds {int(order.max()) + 1} images; this visual embedding was "
                                 f"made for at most {self.n_images} (add_visual(..., n_images=...))")
            x = x + self.image_order(order)
        return x


@register_part("visual")
class VisualPart(Part):
    """The visual embedding as a part of a tuned model (:mod:`petune.parts`): one
    :class:`VisualEmbedding` shared by the tasks or one per task, reading the ``images`` a batch
    passes (:func:`petune.regions.image_batch`). Options: ``feat_dim``, ``backbone`` (a name, or
    ``None``), ``grid``, ``per_task``, ``n_images``."""

    label = VISUAL_PART
    input_key = "images"

    def tokens(self, key, images):
        """``images`` → ``([batch, regions, d_model], [batch, regions])`` through module ``key``."""
        embedding = self[key]
        features, mask = images["features"], images["mask"]
        if not mask.any():  # a batch without any image: its placeholder features have no size to check
            features = features.new_zeros(*features.shape[:2], embedding.feat_dim)
        return embedding(features, images["boxes"], images.get("order")), mask

    def prepare(self, tuned, texts, values, cache_dir=None):
        """Images given as files or PIL images become features from the recorded backbone."""
        from .inputs import resolve_images

        return resolve_images(self, texts, values, cache_dir)

    @classmethod
    def from_options(cls, tuned, feat_dim, backbone=None, grid=False, per_task=False, n_images=1) -> "VisualPart":
        part = _visual_part(tuned, feat_dim, per_task, n_images, {"feat_dim": feat_dim, "backbone": backbone,
                                                                 "grid": grid, "per_task": per_task,
                                                                 "n_images": n_images})
        tuned.add_part(part)
        return part


def _visual_part(tuned, feat_dim, per_task, n_images, options) -> VisualPart:
    modules = list(tuned.tasks) if per_task else [SHARED]
    return VisualPart({m: VisualEmbedding(feat_dim, d_model(tuned.base_model), n_images) for m in modules},
                      per_task, options)


def add_visual(tuned: TunedModel, feat_dim: int | None = None, *, backbone=None, grid: bool | int = False,
               per_task: bool = False, n_images: int = 1) -> TunedModel:
    """Give a tuned model a trainable visual embedding, so that it reads images beside text.

    Each example's visual tokens follow its text tokens in the encoder input (VL-T5's order; after
    the prompt under prompt tuning): ``[prompt] text image [padding]``. Works with every method,
    including ``"none"`` (VL-Adapter's "projection only" row: only the visual embedding trains).

    Args:
        tuned: from :func:`petune.attach`.
        feat_dim: image feature size; may be left out when ``backbone`` says it.
        backbone: the feature extractor the model will read (a :class:`FeatureExtractor` or a name
            of :func:`petune.vision.feature_extractor`); recorded so that :func:`petune.encode` can
            take images themselves, and saved with the model.
        grid: the features :func:`petune.encode` extracts when given images themselves, as
            :func:`petune.vision.extract_features`'s ``grid`` (``False``: pooled, ``True``: the full
            grid, ``k``: ``k × k`` cells); train on the same.
        per_task: one visual embedding per task (default: one shared by all tasks, as VL-Adapter).
        n_images: images per example at most.

    Returns:
        ``tuned``, changed in place: ``trainable_report()`` gets a "visual embedding" row,
        :func:`petune.save` / :func:`petune.load` include it.

    Raises:
        TypeError: ``tuned`` is not a :class:`petune.TunedModel`.
        ValueError: no ``feat_dim``; one already added; ``per_task`` on a model without tasks; an
            architecture whose encoder cannot take input embeddings (FSMT).
    """
    from .features import feature_extractor

    if not isinstance(tuned, TunedModel):
        raise TypeError("add_visual takes the TunedModel from petune.attach; for the frozen base with only "
                        "a visual embedding, attach the 'none' method first: petune.attach(model, 'none')")
    if "visual" in tuned.extra_parts:
        raise ValueError("this model already has a visual embedding")
    kind = model_type(tuned.base_model)
    if kind in NO_INPUTS_EMBEDS:
        raise ValueError(f"{kind} encoders compute positions from input ids only (their inputs_embeds path is "
                         "not position-correct in transformers), so visual tokens cannot join the input")
    name = None
    if backbone is not None:
        extractor = feature_extractor(backbone) if isinstance(backbone, str) else backbone
        name = extractor.name
        if feat_dim is None:
            feat_dim = extractor.feat_dim
        elif feat_dim != extractor.feat_dim:
            raise ValueError(f"feat_dim={feat_dim}, but backbone {name!r} gives {extractor.feat_dim}")
    if not isinstance(feat_dim, int) or feat_dim < 1:
        raise ValueError(f"feat_dim must be a positive integer (the image features' size), got {feat_dim!r}")
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if per_task and tuned.tasks is None:
        raise ValueError("per_task=True needs a model attached with tasks=[...]")
    VisualPart.from_options(tuned, feat_dim, backbone=name, grid=grid, per_task=per_task, n_images=n_images)
    return tuned
