"""Images given to :func:`petune.encode` as files or PIL images: their features, from the backbone
the model's visual embedding records. (How region features are padded into a batch is core:
:mod:`petune.regions`, re-exported here.)"""

from __future__ import annotations

import os

from ..regions import grid_boxes, image_batch, images_digest, images_of, num_regions, pool_grid, regions  # noqa: F401


def resolve_images(part, texts, images, cache_dir=None):
    """:func:`petune.encode`'s ``images``: checked against ``texts`` (``None`` texts: image only),
    images (paths / PIL) turned into features with the backbone the visual embedding ``part`` was
    set up for (cached in ``cache_dir`` when given). Returns ``(texts, images)``.

    Raises:
        TypeError / ValueError: not one entry per text; images for a visual embedding that records
            no backbone.
    """
    from .features import extract_features

    if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
        raise TypeError("images must be a list (one entry per text: features, an image, or None)")
    images = list(images)
    if texts is None:
        texts = [""] * len(images)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} texts: give one entry per text (None for none)")
    raw = [i for i, x in enumerate(images) if x is not None and _is_image(x)]
    if raw:
        options = part.options
        if options["backbone"] is None:
            raise ValueError("this model's visual embedding records no backbone, so images must be given as "
                             "features (petune.vision.extract_features), or add_visual(..., backbone=...)")
        feats = extract_features([images[i] for i in raw], options["backbone"], grid=options["grid"],
                                 cache_dir=cache_dir)
        for i, f in zip(raw, feats):
            images[i] = f
    return texts, images


def _is_image(x) -> bool:
    if isinstance(x, (str, os.PathLike)):
        return True
    return type(x).__module__.startswith("PIL.")
