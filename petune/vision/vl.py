"""VL-T5 / VL-BART's own visual embedding and joint encoder (Cho et al., 2021, "Unifying
Vision-and-Language Tasks via Text Generation"; j-min/VL-T5, and VL-Adapter's copy of it,
ylsung/VL_adapter), so that their published checkpoints compute here what they compute there.

How this ``"vl-t5"`` mode differs from petune's default visual embedding (:mod:`.embedding`):

- the object-order embedding is the model's **word embedding matrix read from its end**: region
  ``k`` of an image adds the embedding of token ``vocab_size - k - 1`` (VL-T5's ``<vis_extra_id_k>``);
  the image-order embedding has ``n_images`` rows (2 in their pretraining);
- the fifth box input is VL-T5's ``get_area``: ``(b[3] - b[2]) * (b[1] - b[0])``. Its docstring
  calls the boxes ``(x1, x2, y1, y2)``, but its data loaders pass the feature files' ``(x1, y1, x2,
  y2)`` fractions unchanged, so the pretrained weights saw ``(y2 - x2) * (y1 - x1)``; petune takes
  ``(x1, y1, x2, y2)`` fractions as everywhere and computes that same value;
- each branch (features, box) has its own norm — T5's RMS norm for T5, ``LayerNorm`` for BART
  (``individual_vis_layer_norm``), or one norm after the sum;
- in the encoder, T5's **relative position bias covers text ↔ text only** (text ↔ vision and
  vision ↔ vision get 0); BART's learned positions and its embedding ``LayerNorm`` apply to the text
  tokens only, the visual tokens enter as the visual embedding gives them.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

#: model types whose encoder the "vl-t5" mode knows: T5's relative position bias, or BART's
#: learned positions and embedding LayerNorm
T5_FAMILY = ("t5", "mt5", "umt5")
BART_FAMILY = ("bart", "mbart")
VL_TYPES = T5_FAMILY + BART_FAMILY

#: keys of 2021 checkpoints that transformers 4.57 has no parameter for, and that mean nothing:
#: old T5 gave the decoder's cross-attention a relative bias it never used (VL-T5's own class lists
#: it in ``_keys_to_ignore_on_load_unexpected``)
IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


class VLVisualEmbedding(nn.Module):
    """VL-T5's ``VisualEmbedding``: region features and boxes → visual tokens ``[batch, regions,
    d_model]``, with its parameter names (``feat_embedding``, ``absolute_vis_pos_embedding``,
    ``img_order_embedding``, ``layer_norm``), so that a checkpoint's keys load as they are.

    Args:
        feat_dim: region feature size (2048 for VL-T5's Faster R-CNN regions).
        d_model: the language model's hidden size.
        n_images: rows of the image-order embedding (VL-T5 pretrained with 2).
        use_vis_order_embedding: add the image-order and object-order embeddings.
        individual_vis_layer_norm: a norm on each branch (True) or one after their sum (False).
        use_vis_layer_norm: whether there are norms at all.
        additional_layers: VL-Adapter's ``additional_visual_embedding_layers``: ``Linear + ReLU
            (+ norm)`` blocks after the feature branch's first norm (0 in VL-T5).
        norm: ``"rms"`` (T5's RMS norm, for T5 models) or ``"layer"`` (``nn.LayerNorm``, BART).
        eps: the norm's epsilon (T5: ``layer_norm_epsilon``; BART: 1e-5).
    """

    def __init__(self, feat_dim: int, d_model: int, *, n_images: int = 2, use_vis_order_embedding: bool = True,
                 individual_vis_layer_norm: bool = True, use_vis_layer_norm: bool = True,
                 additional_layers: int = 0, norm: str = "rms", eps: float = 1e-6):
        super().__init__()
        if norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' (T5) or 'layer' (BART), got {norm!r}")
        self.feat_dim, self.n_images = feat_dim, n_images
        self.options = {"n_images": n_images, "use_vis_order_embedding": use_vis_order_embedding,
                        "individual_vis_layer_norm": individual_vis_layer_norm,
                        "use_vis_layer_norm": use_vis_layer_norm, "additional_layers": additional_layers,
                        "norm": norm, "eps": eps}

        def make_norm():
            if norm == "layer":
                return nn.LayerNorm(d_model, eps=eps)
            from transformers.models.t5.modeling_t5 import T5LayerNorm

            return T5LayerNorm(d_model, eps=eps)

        branch_norm = individual_vis_layer_norm and use_vis_layer_norm
        feat = [nn.Linear(feat_dim, d_model)] + ([make_norm()] if branch_norm else [])
        for _ in range(additional_layers):
            feat += [nn.Linear(d_model, d_model), nn.ReLU(True)] + ([make_norm()] if branch_norm else [])
        self.feat_embedding = nn.Sequential(*feat)
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(5, d_model), *([make_norm()] if branch_norm else []))
        self.img_order_embedding = nn.Embedding(n_images, d_model) if use_vis_order_embedding else None
        self.layer_norm = make_norm() if use_vis_layer_norm and not individual_vis_layer_norm else None

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, image: torch.Tensor | None = None,
                region: torch.Tensor | None = None, word_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """``features [batch, R, feat_dim]``, ``boxes [batch, R, 4]`` (x1, y1, x2, y2 fractions),
        ``image [batch, R]`` (which image of the example), ``region [batch, R]`` (index within its
        image), ``word_embeddings [vocab, d_model]`` (the model's; with the order embeddings) →
        ``[batch, R, d_model]``.

        Raises:
            ValueError: features of another size; an image index beyond ``n_images``; a region
                index beyond the vocabulary.
        """
        if features.shape[-1] != self.feat_dim:
            raise ValueError(f"region features have size {features.shape[-1]}, but this VL-T5 visual embedding "
                             f"expects [regions, {self.feat_dim}]: use the features the checkpoint was trained on")
        param = self.absolute_vis_pos_embedding[0].weight
        features, boxes = features.to(param), boxes.to(param)
        area = (boxes[..., 3] - boxes[..., 2]) * (boxes[..., 1] - boxes[..., 0])  # VL-T5's get_area, as trained
        x = self.feat_embedding(features) + self.absolute_vis_pos_embedding(torch.cat([boxes, area[..., None]], -1))
        if self.img_order_embedding is not None:
            shape, device = features.shape[:2], features.device
            image = torch.zeros(shape, dtype=torch.long, device=device) if image is None else image
            region = torch.arange(shape[1], device=device).expand(shape) if region is None else region
            if int(image.max()) >= self.n_images:
                raise ValueError(f"an example holds {int(image.max()) + 1} images; this visual embedding has an "
                                 f"image-order embedding for {self.n_images}")
            vocab = word_embeddings.shape[0]
            if int(region.max()) >= vocab:
                raise ValueError(f"an image holds {int(region.max()) + 1} regions, more than the {vocab} rows of "
                                 "the word embeddings its object-order embedding reads")
            objects = nn.functional.embedding(vocab - region - 1, word_embeddings)  # raw rows, as VL-T5 / VL-BART
            x = x + self.img_order_embedding(image) + objects.to(x.dtype)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x


def vl_family(model_type: str) -> str:
    """``"t5"`` or ``"bart"``: which of VL-T5's encoders the mode follows for ``model_type``.

    Raises:
        ValueError: another architecture (names the supported ones).
    """
    if model_type in T5_FAMILY:
        return "t5"
    if model_type in BART_FAMILY:
        return "bart"
    raise ValueError(f"the 'vl-t5' visual mode is VL-T5 / VL-BART's encoder, defined for {', '.join(VL_TYPES)}; "
                     f"a {model_type} model takes petune's default mode (add_visual without mode=)")


@contextlib.contextmanager
def text_only_positions(encoder: nn.Module, family: str, text_lengths: torch.Tensor):
    """While active, ``encoder`` gives positions to each row's first ``text_lengths[b]`` tokens
    only (its prompt and text; the visual tokens follow): T5's relative position bias is zero
    unless both tokens are text; BART's learned positions and embedding ``LayerNorm`` apply to
    text tokens only (so a text that fits the position table fits with any number of regions).
    Restores the encoder on exit, error or not."""
    undo = []
    try:
        if family == "t5":
            layers = [m for m in encoder.modules()
                      if getattr(m, "has_relative_attention_bias", False) and hasattr(m, "compute_bias")]
            for attention in layers:
                undo.append(_restorer(attention, "compute_bias"))
                attention.compute_bias = _text_only_bias(attention.compute_bias, text_lengths)
        else:
            def is_text(length, device):
                return torch.arange(length, device=device)[None, :] < text_lengths.to(device)[:, None]

            def positions(module, args, out):
                return out * is_text(out.shape[-2], out.device)[..., None].to(out.dtype)

            def embedding_norm(module, args, out):
                return torch.where(is_text(out.shape[-2], out.device)[..., None], out, args[0])

            def in_table(module, args, kwargs):  # visual / padding positions may run past the table: clamp them
                length = args[0].shape[1]
                limit = module.weight.shape[0] - getattr(module, "offset", 0) - 1
                kwargs["position_ids"] = torch.arange(length, device=module.weight.device).clamp(max=limit)
                return args, kwargs

            table = encoder.embed_positions
            undo.append(table.register_forward_pre_hook(in_table, with_kwargs=True).remove)
            undo.append(table.register_forward_hook(positions).remove)
            undo.append(encoder.layernorm_embedding.register_forward_hook(embedding_norm).remove)
        yield
    finally:
        for step in reversed(undo):
            step()


def _restorer(obj, name):
    """A function that puts ``obj.name`` back as it is now (an instance attribute, or the class's)."""
    if name in vars(obj):
        old = vars(obj)[name]
        return lambda: setattr(obj, name, old)
    return lambda: delattr(obj, name)


def _text_only_bias(compute_bias, text_lengths):
    def compute(query_length, key_length, device=None, cache_position=None):
        bias = compute_bias(query_length, key_length, device=device, cache_position=cache_position)
        text = torch.arange(key_length, device=bias.device)[None, :] < text_lengths.to(bias.device)[:, None]
        pairs = text[:, -bias.shape[-2]:, None] & text[:, None, :]  # [batch, q, k]
        return bias * pairs[:, None].to(bias.dtype)  # [batch, heads, q, k]

    return compute


# -- checkpoints ------------------------------------------------------------------------------------
class VLCheckpoint(NamedTuple):
    """What :func:`from_vl_t5` / :func:`from_vl_bart` load: the language model (a transformers
    model, ready for :func:`petune.attach`) and its visual embedding (for
    :func:`petune.vision.add_visual`'s ``pretrained=``)."""

    model: nn.Module
    visual: VLVisualEmbedding


def from_vl_t5(checkpoint, base="t5-base", **options) -> VLCheckpoint:
    """Load a VL-T5 checkpoint (j-min/VL-T5's ``snap/pretrain/VLT5/Epoch30.pth``, or a VL-Adapter
    one) into a ``T5ForConditionalGeneration`` and a :class:`VLVisualEmbedding`::

        model, visual = petune.vision.from_vl_t5("snap/pretrain/VLT5/Epoch30.pth", base="t5-base")
        tuned = petune.attach(model, "adapter", reduction_factor=8)
        petune.vision.add_visual(tuned, pretrained=visual)      # mode "vl-t5": VL-T5's forward

    Args:
        checkpoint: a path (``torch.save``'d state dict, ``.pth`` / ``.bin``, or ``.safetensors``)
            or a state dict. ``module.`` (DDP) and ``vis_encoder.`` prefixes are read as VL-T5 reads them.
        base: the T5 the checkpoint was trained from, for its configuration only (a hub name, a
            path, or a ``T5Config``); the vocabulary size is the checkpoint's (VL-T5: 32,200).
        options: the checkpoint family's settings (``feat_dim``, ``pos_dim`` (4), ``n_images``,
            ``use_vis_order_embedding``, ``individual_vis_layer_norm``, ``use_vis_layer_norm``,
            ``additional_layers``): read from the checkpoint's keys and shapes; given ones are checked.

    Returns:
        ``VLCheckpoint(model, visual)``, both in eval mode.

    Raises:
        ValueError: a key of the checkpoint that neither part takes, or a parameter it does not
            give (all named); a shape that differs from ``base``'s configuration; an option that
            contradicts the checkpoint; no visual embedding in it (not a VL-T5 checkpoint).
    """
    return _load(checkpoint, base, "t5", options)


def from_vl_bart(checkpoint, base="facebook/bart-base", **options) -> VLCheckpoint:
    """Load a VL-BART checkpoint (``snap/pretrain/VLBart/Epoch30.pth``) into a
    ``BartForConditionalGeneration`` and a :class:`VLVisualEmbedding` (``LayerNorm`` branches);
    as :func:`from_vl_t5` (VL-BART's vocabulary: BART's 50,265 + 200 added tokens)."""
    return _load(checkpoint, base, "bart", options)


def _read_state(checkpoint) -> dict:
    if isinstance(checkpoint, dict):
        state = dict(checkpoint)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file {path} (VL-T5's are snap/pretrain/VLT5/Epoch30.pth)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint must be a state dict of tensors (VL-T5 saves model.state_dict())")
    renamed = {}
    for key, value in state.items():  # as VL-T5's load_state_dict / load_checkpoint read them
        key = key.removeprefix("module.")
        for old, new in (("vis_encoder.", "encoder."), ("model.vis_encoder.", "model.encoder.")):
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    return renamed


def _load(checkpoint, base, family: str, given: dict) -> VLCheckpoint:
    import transformers as T

    state = _read_state(checkpoint)
    root = "" if family == "t5" else "model."
    prefix, shared_key = f"{root}encoder.visual_embedding.", f"{root}shared.weight"
    visual = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    lm = {k: v for k, v in state.items() if not k.startswith(prefix) and k not in IGNORED_KEYS}
    name = "VL-T5" if family == "t5" else "VL-BART"
    if not visual or shared_key not in lm:
        raise ValueError(f"not a {name} checkpoint: it has no {prefix}* keys or no {shared_key} (its keys start "
                         f"with {sorted({k.split('.')[0] for k in state})})")
    config = base if isinstance(base, T.PretrainedConfig) else T.AutoConfig.from_pretrained(base)
    if vl_family(config.model_type) != family:
        raise ValueError(f"base {getattr(config, '_name_or_path', '') or config.model_type!r} is a "
                         f"{config.model_type} model; a {name} checkpoint needs a "
                         f"{'T5' if family == 't5' else 'BART'} base")
    config = copy.deepcopy(config)
    config.vocab_size = lm[shared_key].shape[0]
    words = lm[shared_key]
    objects = visual.pop("obj_order_embedding.weight", None)
    if objects is not None and not torch.equal(objects, words):
        raise ValueError(f"{prefix}obj_order_embedding.weight differs from {shared_key}: in {name} they are one "
                         "matrix (the object-order embedding reads the word embeddings from the end)")
    options = _visual_options(visual, given, family, config)
    embedding = VLVisualEmbedding(options.pop("feat_dim"), config.d_model, **options)
    _load_into(embedding, visual, prefix, "visual embedding")
    model_class = T.T5ForConditionalGeneration if family == "t5" else T.BartForConditionalGeneration
    model = model_class(config)
    _load_into(model, lm, "", "language model", tied=model.get_input_embeddings().weight)
    return VLCheckpoint(model.eval(), embedding.eval())


def _load_into(module: nn.Module, state: dict, prefix: str, what: str, tied=None) -> None:
    expected = module.state_dict()
    unexpected = sorted(prefix + k for k in state if k not in expected)
    # a parameter the checkpoint leaves out is fine only when it is tied to one it gives (T5's lm_head)
    missing = sorted(prefix + k for k, v in expected.items()
                     if k not in state and not (tied is not None and v.data_ptr() == tied.data_ptr()))
    shapes = [f"{prefix}{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = ([f"keys the {what} has no parameter for: {unexpected}"] if unexpected else []) + \
               ([f"parameters of the {what} the checkpoint does not give: {missing}"] if missing else []) + \
               ([f"shapes that differ: {shapes}"] if shapes else [])
    if problems:
        raise ValueError("the checkpoint does not fit: " + "; ".join(problems) + " (a task checkpoint with heads, "
                         "or a base whose configuration differs from the one it was trained from?)")
    module.load_state_dict(state, strict=False)


def _visual_options(visual: dict, given: dict, family: str, config) -> dict:
    """The visual embedding's options, read from the checkpoint's keys and shapes; given ones checked."""
    known = {"feat_dim", "pos_dim", "n_images", "use_vis_order_embedding", "individual_vis_layer_norm",
             "use_vis_layer_norm", "additional_layers"}
    unknown = set(given) - known
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; the checkpoint family's options are {sorted(known)}")
    first = visual.get("feat_embedding.0.weight")
    if first is None:
        raise ValueError("the visual embedding has no feat_embedding.0.weight")
    individual = "layer_norm.weight" not in visual
    second = visual.get("feat_embedding.1.weight")
    use_norm = "layer_norm.weight" in visual or (second is not None and second.ndim == 1)
    linears = sorted(int(k.split(".")[1]) for k in visual
                     if k.startswith("feat_embedding.") and k.endswith(".weight") and visual[k].ndim == 2)
    order = visual.get("img_order_embedding.weight")
    box = visual.get("absolute_vis_pos_embedding.0.weight")
    if box is None or box.shape[1] != 5:
        raise ValueError("the visual embedding's absolute_vis_pos_embedding.0.weight must map VL-T5's 4 box "
                         f"coordinates and area (pos_dim 4, 5 inputs); it has shape "
                         f"{None if box is None else tuple(box.shape)}")
    read = {"feat_dim": first.shape[1], "pos_dim": 4, "individual_vis_layer_norm": individual,
            "use_vis_layer_norm": use_norm,
            "use_vis_order_embedding": order is not None, "n_images": order.shape[0] if order is not None else 2,
            "additional_layers": len(linears) - 1}
    wrong = {k: (v, read[k]) for k, v in given.items() if v != read[k]}
    if wrong:
        raise ValueError("options contradict the checkpoint: " + ", ".join(
            f"{k}={v!r} but its keys say {r!r}" for k, (v, r) in wrong.items()))
    eps = config.layer_norm_epsilon if family == "t5" else 1e-5
    read.pop("pos_dim")
    return {**read, "norm": "rms" if family == "t5" else "layer", "eps": eps}
