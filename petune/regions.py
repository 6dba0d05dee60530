"""Region inputs: per-example feature vectors with boxes (an image's pooled features, its grid
cells, or detector regions), padded into one batch — the input of a part that adds tokens beside
the text (:mod:`petune.parts`; the visual embedding of :mod:`petune.vision` reads them). Pure
tensor packing: nothing here knows a backbone."""

from __future__ import annotations

import math

import numpy as np
import torch


def grid_boxes(cells: int) -> np.ndarray:
    """Boxes ``[cells, 4]`` (x1, y1, x2, y2 as fractions) of a square ``k × k`` grid, row-major.

    Raises:
        ValueError: ``cells`` is not a square number.
    """
    k = math.isqrt(cells)
    if k * k != cells:
        raise ValueError(f"grid features need a square number of cells (k x k), got {cells}; pass regions "
                         "as {'features': [n, feat_dim], 'boxes': [n, 4]} instead")
    i, j = np.divmod(np.arange(cells), k)
    return np.stack([j / k, i / k, (j + 1) / k, (i + 1) / k], axis=1).astype(np.float32)


def pool_grid(cells, k: int) -> np.ndarray:
    """Grid features ``[..., s·s, feat_dim]`` averaged into ``k × k`` cells ``[..., k·k, feat_dim]``
    (row-major, ``torch.nn.functional.adaptive_avg_pool2d``: with ``s`` not a multiple of ``k``
    neighbouring cells share a row or column of the grid; their boxes are :func:`grid_boxes`).

    Raises:
        ValueError: ``cells`` is not a square grid, or ``k`` is not an integer in ``1 … s``.
    """
    cells = np.asarray(cells, dtype=np.float32)
    s = math.isqrt(cells.shape[-2]) if cells.ndim >= 2 else 0
    if cells.ndim < 2 or s * s != cells.shape[-2]:
        raise ValueError(f"pool_grid needs grid features [..., s*s, feat_dim], got shape {cells.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s:
        raise ValueError(f"grid={k!r}: pool the {s}x{s} grid to k x k cells with an integer k in 1..{s}")
    lead, d = cells.shape[:-2], cells.shape[-1]
    maps = torch.from_numpy(np.ascontiguousarray(cells.reshape(-1, s, s, d))).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps, k).permute(0, 2, 3, 1).reshape(*lead, k * k, d)
    return pooled.numpy()


WHOLE_IMAGE = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)


def regions(image) -> tuple[np.ndarray, np.ndarray]:
    """One image's features as ``(features [regions, feat_dim], boxes [regions, 4])``.

    ``image`` is pooled features ``[feat_dim]`` (one region: the whole image), grid features
    ``[k·k, feat_dim]`` (one region per cell), or ``{"features": [n, feat_dim], "boxes": [n, 4]}``
    (detector regions, boxes as fractions of the image).

    Raises:
        ValueError: another shape, or boxes that do not match the features.
    """
    if isinstance(image, dict):
        feats = np.asarray(image["features"], dtype=np.float32)
        boxes = np.asarray(image["boxes"], dtype=np.float32)
        if feats.ndim != 2 or boxes.shape != (feats.shape[0], 4):
            raise ValueError(f"regions need features [n, feat_dim] and boxes [n, 4], got {feats.shape} and "
                             f"{boxes.shape}")
        return feats, boxes
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    feats = np.asarray(image, dtype=np.float32)
    if feats.ndim == 1:
        return feats[None], WHOLE_IMAGE
    if feats.ndim == 2:
        return feats, grid_boxes(feats.shape[0])
    raise ValueError(f"image features must be [feat_dim] (pooled) or [cells, feat_dim] (grid), got shape "
                     f"{feats.shape}; images themselves go through petune.vision.extract_features first")


def images_of(entry) -> list:
    """One example's image entry as a list of images (``None``: none; a list: several)."""
    if entry is None:
        return []
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def image_batch(images, device=None) -> dict[str, torch.Tensor]:
    """The visual input of a batch, as :meth:`petune.TunedModel.encoder_states` takes it.

    Args:
        images: one entry per example: ``None`` (text only), one image's features (see
            :func:`regions`), or a list of them (several images; their tokens get image-order ids).
        device: where to put the tensors.

    Returns:
        ``{"features": [batch, R, feat_dim] float32, "boxes": [batch, R, 4], "mask": [batch, R]
        long, "order": [batch, R] long, "region": [batch, R] long}``, ``R`` the most regions of
        any example (at least 1; examples without an image have an all-zero mask row); ``order``
        is each token's image within its example, ``region`` its index within that image.

    Raises:
        ValueError: features of different sizes in one batch, or a bad shape.
    """
    rows = [[regions(p) for p in images_of(item)] for item in images]
    dims = {f.shape[1] for per in rows for f, _ in per}
    if len(dims) > 1:
        raise ValueError(f"image features of different sizes in one batch: {sorted(dims)}")
    dim = dims.pop() if dims else 1
    width = max([sum(f.shape[0] for f, _ in per) for per in rows] + [1])
    feats = np.zeros((len(rows), width, dim), dtype=np.float32)
    boxes = np.zeros((len(rows), width, 4), dtype=np.float32)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    order = np.zeros((len(rows), width), dtype=np.int64)
    region = np.zeros((len(rows), width), dtype=np.int64)
    for i, per in enumerate(rows):
        at = 0
        for k, (f, b) in enumerate(per):
            feats[i, at:at + len(f)], boxes[i, at:at + len(f)] = f, b
            mask[i, at:at + len(f)], order[i, at:at + len(f)] = 1, k
            region[i, at:at + len(f)] = np.arange(len(f))
            at += len(f)
    out = {"features": torch.from_numpy(feats), "boxes": torch.from_numpy(boxes), "mask": torch.from_numpy(mask),
           "order": torch.from_numpy(order), "region": torch.from_numpy(region)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def num_regions(image) -> int:
    """How many visual tokens one example's image entry gives (0 for ``None``)."""
    return sum(regions(p)[0].shape[0] for p in images_of(image))


def images_digest(images) -> str:
    """Digest of one call's region entries (features and boxes), for the embeddings cache."""
    import hashlib

    h = hashlib.sha256()
    for item in images:
        parts = images_of(item)
        h.update(len(parts).to_bytes(4, "little"))
        for p in parts:
            f, b = regions(p)
            h.update(str(f.shape).encode())
            h.update(f.tobytes())
            h.update(b.tobytes())
    return h.hexdigest()[:24]


class RegionInputs:
    """One call's region entries (one per example: ``None``, an image's features, or a list of
    them), prepared once: how many tokens each row adds and the padded batch of any rows.

    Raises:
        ValueError: an entry of a bad shape (see :func:`regions`).
    """

    def __init__(self, entries):
        self.entries = list(entries)
        self.counts = [num_regions(e) for e in self.entries]

    def batch(self, rows, device=None) -> dict[str, torch.Tensor]:
        """:func:`image_batch` of the given rows."""
        return image_batch([self.entries[i] for i in rows], device)
