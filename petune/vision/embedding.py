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

    def tokens(self, key, images, model):
        """``images`` → ``([batch, regions, d_model], [batch, regions])`` through module ``key``
        (in the ``"vl-t5"`` mode the object-order embedding reads ``model``'s word embeddings)."""
        embedding = self[key]
        features, mask = images["features"], images["mask"]
        if not mask.any():  # a batch without any image: its placeholder features have no size to check
            features = features.new_zeros(*features.shape[:2], embedding.feat_dim)
        if self.mode == "vl-t5":
            return embedding(features, images["boxes"], images.get("order"), images.get("region"),
                             model.get_input_embeddings().weight), mask
        return embedding(features, images["boxes"], images.get("order")), mask

    @property
    def mode(self) -> str:
        return self.options.get("mode", "petune")

    def encoder_context(self, model, text_lengths):
        """In the ``"vl-t5"`` mode: positions for the prompt and text only (:func:`.vl.text_only_positions`)."""
        if self.mode != "vl-t5":
            return super().encoder_context(model, text_lengths)
        from .vl import text_only_positions, vl_family

        return text_only_positions(model.get_encoder(), vl_family(model_type(model)), text_lengths)

    def prepare(self, tuned, texts, values, cache_dir=None):
        """Images given as files or PIL images become features from the recorded backbone."""
        from .inputs import resolve_images

        return resolve_images(self, texts, values, cache_dir)

    @classmethod
    def from_options(cls, tuned, feat_dim, backbone=None, grid=False, per_task=False, n_images=1,
                     mode="petune", vl=None) -> "VisualPart":
        options = {"feat_dim": feat_dim, "backbone": backbone, "grid": grid, "per_task": per_task,
                   "n_images": n_images}
        if mode == "vl-t5":  # older saves have no mode: petune's
            options.update(mode=mode, vl=vl)

        def embedding():
            if mode != "vl-t5":
                return VisualEmbedding(feat_dim, d_model(tuned.base_model), n_images)
            from .vl import VLVisualEmbedding

            return VLVisualEmbedding(feat_dim, d_model(tuned.base_model), **vl)

        modules = list(tuned.tasks) if per_task else [SHARED]
        part = VisualPart({m: embedding() for m in modules}, per_task, options)
        tuned.add_part(part)
        return part


def add_visual(tuned: TunedModel, feat_dim: int | None = None, *, backbone=None, grid: bool | int = False,
               per_task: bool = False, n_images: int | None = None, mode: str | None = None,
               pretrained=None) -> TunedModel:
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
        n_images: images per example at most (default 1; 2 in the ``"vl-t5"`` mode, as VL-T5).
        mode: ``"petune"`` (the default: :class:`VisualEmbedding`, positions over the whole input)
            or ``"vl-t5"``: VL-T5 / VL-BART's own visual embedding and joint encoder
            (:mod:`petune.vision.vl`: object order from the word embeddings, positions for text
            only), for T5 and BART models — a fresh one, as VL-T5 starts from a text-only T5.
        pretrained: a loaded :class:`~petune.vision.vl.VLVisualEmbedding` (from
            :func:`petune.vision.from_vl_t5` / :func:`~petune.vision.from_vl_bart`): the
            ``"vl-t5"`` mode starting from its weights and options (each per-task copy too).

    Returns:
        ``tuned``, changed in place: ``trainable_report()`` gets a "visual embedding" row,
        :func:`petune.save` / :func:`petune.load` include it.

    Raises:
        TypeError: ``tuned`` is not a :class:`petune.TunedModel`.
        ValueError: no ``feat_dim``; one already added; ``per_task`` on a model without tasks; an
            architecture whose encoder cannot take input embeddings (FSMT); the ``"vl-t5"`` mode on
            an architecture other than T5 / BART, or ``pretrained`` whose size differs from the model
            or with ``mode="petune"``.
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
    mode = mode or ("vl-t5" if pretrained is not None else "petune")
    if mode not in ("petune", "vl-t5"):
        raise ValueError(f"mode must be 'petune' or 'vl-t5', got {mode!r}")
    if pretrained is not None and mode != "vl-t5":
        raise ValueError("a pretrained VL-T5 / VL-BART visual embedding computes VL-T5's forward: leave mode out")
    vl = None
    if mode == "vl-t5":
        feat_dim, n_images, vl = _vl_options(tuned, feat_dim, n_images, pretrained)
    n_images = 1 if n_images is None else n_images
    if not isinstance(feat_dim, int) or feat_dim < 1:
        raise ValueError(f"feat_dim must be a positive integer (the image features' size), got {feat_dim!r}")
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if per_task and tuned.tasks is None:
        raise ValueError("per_task=True needs a model attached with tasks=[...]")
    part = VisualPart.from_options(tuned, feat_dim, backbone=name, grid=grid, per_task=per_task, n_images=n_images,
                                   mode=mode, vl=vl)
    if pretrained is not None:
        for module in part.values():
            module.load_state_dict(pretrained.state_dict())
    return tuned


def _vl_options(tuned, feat_dim, n_images, pretrained):
    """``(feat_dim, n_images, VLVisualEmbedding options)`` of the "vl-t5" mode: the pretrained
    embedding's, or VL-T5's defaults with the model's norm."""
    from .vl import VLVisualEmbedding, vl_family

    base = tuned.base_model
    family = vl_family(model_type(base))
    if pretrained is None:
        config = base.config
        vl = {"n_images": n_images or 2, "use_vis_order_embedding": True, "individual_vis_layer_norm": True,
              "use_vis_layer_norm": True, "additional_layers": 0, "norm": "rms" if family == "t5" else "layer",
              "eps": config.layer_norm_epsilon if family == "t5" else 1e-5}
        return feat_dim, vl["n_images"], vl
    if not isinstance(pretrained, VLVisualEmbedding):
        raise TypeError("pretrained must be the visual embedding petune.vision.from_vl_t5 / from_vl_bart loaded")
    width = pretrained.absolute_vis_pos_embedding[0].out_features
    if width != d_model(base):
        raise ValueError(f"the pretrained visual embedding gives {width}-d tokens, the model's d_model is "
                         f"{d_model(base)}: attach to the model loaded with it")
    for name, value in (("feat_dim", feat_dim), ("n_images", n_images)):
        own = getattr(pretrained, name)
        if value is not None and value != own:
            raise ValueError(f"{name}={value}, but the pretrained visual embedding has {own}")
    return pretrained.feat_dim, pretrained.n_images, dict(pretrained.options)
