"""Recipe options shared by the vision and ViQuAE recipes for VL-T5 / VL-BART checkpoints
(:mod:`petune.vision.vl`) and region-feature files (:class:`petune.vision.RegionFeatures`)."""

from __future__ import annotations

import argparse

from .common import JobError, load_model

DEFAULT_BASES = {"t5": "t5-base", "bart": "facebook/bart-base"}


def add_vl_args(parser: argparse.ArgumentParser) -> None:
    """``--vl-t5`` / ``--vl-bart CHECKPOINT``, ``--vl-base``, ``--region-features``,
    ``--max-regions`` and ``--visual-mode``."""
    group = parser.add_argument_group("VL-T5 / VL-BART checkpoints and region features")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--vl-t5", metavar="CHECKPOINT", help="start from a VL-T5 checkpoint (j-min/VL-T5's "
                       "snap/pretrain/VLT5/Epoch30.pth): its language model and visual embedding, VL-T5's forward; "
                       "needs --region-features")
    which.add_argument("--vl-bart", metavar="CHECKPOINT", help="the same for a VL-BART checkpoint")
    group.add_argument("--vl-base", help="the text model the checkpoint was trained from, for its configuration "
                       "and tokenizer (a hub name or a folder; default: t5-base, facebook/bart-base)")
    group.add_argument("--region-features", metavar="PATH", help="image features from a file instead of "
                       "EfficientNet-Lite0: VL-T5's boxes36 HDF5 file (features and boxes per image id), or a "
                       "folder of per-image .h5 / .npz files (VL-Adapter's CLIP grids)")
    group.add_argument("--max-regions", type=int, default=36, help="regions kept per image (default 36, VL-T5's)")
    group.add_argument("--visual-mode", choices=["petune", "vl-t5"], help="the visual embedding's forward: "
                       "VL-T5's (default with --vl-t5 / --vl-bart; from a text-only T5 or BART, VL-T5's 'raw' "
                       "start) or petune's (default otherwise)")


def vl_checkpoint(args) -> tuple[str, str] | None:
    """``(family, path)`` of ``--vl-t5`` / ``--vl-bart``, or ``None``."""
    if args.vl_t5:
        return "t5", args.vl_t5
    if args.vl_bart:
        return "bart", args.vl_bart
    return None


def check_vl_args(args) -> None:
    """Refuse option combinations that cannot work, before anything is written.

    Raises:
        JobError: ``--model`` with a checkpoint, or a checkpoint without ``--region-features``.
    """
    if vl_checkpoint(args) is None:
        if args.vl_base:
            raise JobError("--vl-base names the text model of a --vl-t5 / --vl-bart checkpoint; give one")
        return
    if getattr(args, "model", None):
        raise JobError("--model and --vl-t5 / --vl-bart: the checkpoint is the model (its configuration and "
                       "tokenizer come from --vl-base)")
    if not args.region_features:
        raise JobError("a VL-T5 / VL-BART checkpoint reads the region features it was trained on: give "
                       "--region-features (VL-T5's *_boxes36.h5)")


def load_base(args):
    """``(model, tokenizer, pretrained visual embedding or None)``: the checkpoint's language model
    and visual embedding with ``--vl-t5`` / ``--vl-bart``, else ``--model`` (or the packaged MiniLM).

    Raises:
        JobError: the checkpoint is missing or does not fit its base (the loader's message).
    """
    checkpoint = vl_checkpoint(args)
    if checkpoint is None:
        return (*load_model(getattr(args, "model", None)), None)
    from transformers import AutoConfig, AutoTokenizer

    from petune.vision import from_vl_bart, from_vl_t5

    family, path = checkpoint
    base = args.vl_base or DEFAULT_BASES[family]
    try:
        model, visual = (from_vl_t5 if family == "t5" else from_vl_bart)(path, base=AutoConfig.from_pretrained(base))
    except (FileNotFoundError, ValueError) as e:
        raise JobError(str(e)) from e
    return model, AutoTokenizer.from_pretrained(base), visual


def region_features(args, names: dict) -> dict | None:
    """``{key: region entry}`` from ``--region-features`` for ``names`` (``{key: image id}``;
    ``None`` without the option); an image id is looked up as given, then without a file extension
    (ViQuAE's ``image`` column names files). Each image is read once.

    Raises:
        JobError: the file is missing, holds no features for some images (counts and names the
            first), or holds features of a bad shape (the reader's message).
    """
    if not args.region_features:
        return None
    from petune.vision import RegionFeatures

    try:
        regions = RegionFeatures(args.region_features, max_regions=args.max_regions)
        found, missing = {}, []
        for image_id in dict.fromkeys(names.values()):
            entry = _lookup(regions, image_id)
            if entry is None:
                missing.append(image_id)
            else:
                found[image_id] = entry
    except (FileNotFoundError, ValueError) as e:
        raise JobError(str(e)) from e
    if missing:
        raise JobError(f"{len(missing)} of {len(found) + len(missing)} images have no features in "
                       f"{args.region_features} (first: {missing[0]!r})")
    return {key: found[image_id] for key, image_id in names.items()}


def _lookup(regions, image_id):
    """``regions[image_id]``, else ``regions[image_id without its extension]``, else ``None``."""
    for key in dict.fromkeys((str(image_id), str(image_id).rsplit(".", 1)[0])):
        try:
            return regions[key]
        except KeyError:
            continue
    return None


def add_visual_from_args(tuned, args, pretrained, feat_dim: int | None, **options):
    """The visual embedding the options ask for: the checkpoint's (VL-T5's forward), or a fresh one
    in ``--visual-mode`` of ``feat_dim`` (``options``: :func:`petune.vision.add_visual`'s others)."""
    import petune

    if pretrained is not None:
        if args.visual_mode == "petune":
            raise JobError("--visual-mode petune with a VL-T5 / VL-BART checkpoint: its visual embedding computes "
                           "VL-T5's forward; leave --visual-mode out")
        return petune.vision.add_visual(tuned, pretrained=pretrained, **options)
    return petune.vision.add_visual(tuned, feat_dim, mode=args.visual_mode, **options)
