"""Region features read from the files VL-T5 and VL-Adapter train on: Faster R-CNN regions with
their boxes (VL-T5's ``*_boxes36.h5``: ``{image_id}/features [36, 2048]``, ``{image_id}/boxes``
in pixels as (x1, y1, x2, y2), ``{image_id}/img_h``, ``{image_id}/img_w``), or CLIP grid features
without boxes (VL-Adapter: a folder of ``{image_id}.h5`` holding ``{image_id}/features [L, D]``).
The same names in ``.npz`` files work too, one per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_SUFFIXES = (".h5", ".hdf5", ".npz")


class RegionFeatures:
    """Image id → ``{"features": [n, feat_dim], "boxes": [n, 4]}`` (boxes as fractions of the
    image), the entry :func:`petune.vision.image_batch` and :func:`petune.encode`'s ``images`` take.

    Boxes are normalised as VL-T5's loaders do it: x by ``img_w``, y by ``img_h``, then clipped to
    [0, 1] (a box more than 1e-5 outside the image is an error). Files without boxes (VL-Adapter's
    CLIP grids) give zero boxes, as VL-Adapter feeds them.

    Args:
        path: one HDF5 file holding every image (``{id}/features`` …), or a folder of per-image
            ``{id}.h5`` / ``{id}.npz`` files (in an ``.npz``: ``features``, ``boxes``, ``img_h``,
            ``img_w``, with or without the ``{id}/`` prefix).
        feat_dim: the feature size expected (the model's); a file with another is an error.
        max_regions: keep the first ``max_regions`` regions of each image (VL-T5: 36).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImportError: an HDF5 file and no ``h5py`` (``pip install 'petune[vision]'``).
        KeyError: an image id the files do not hold (on lookup).
        ValueError: on lookup, features that are not ``[n, feat_dim]``, boxes that are not ``[n, 4]``
            in (x1, y1, x2, y2) order, or boxes outside the image.
    """

    def __init__(self, path, feat_dim: int | None = None, max_regions: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no region features at {self.path} (an .h5 file, or a folder of "
                                    "{image_id}.h5 / .npz files)")
        self.feat_dim, self.max_regions = feat_dim, max_regions
        self._h5 = None

    def __contains__(self, image_id) -> bool:
        try:
            self._group(str(image_id))
        except KeyError:
            return False
        return True

    def __getitem__(self, image_id) -> dict:
        image_id = str(image_id)
        where = f"{self.path} [{image_id}]"
        group = self._group(image_id)
        features = np.asarray(group["features"], dtype=np.float32)
        if features.ndim != 2 or (self.feat_dim is not None and features.shape[1] != self.feat_dim):
            raise ValueError(f"{where}: features have shape {features.shape}; expected [regions, "
                             f"{self.feat_dim or 'feat_dim'}]")
        if "boxes" in group:
            boxes = _normalised_boxes(np.array(group["boxes"], dtype=np.float32), group, features.shape[0], where)
        else:
            boxes = np.zeros((features.shape[0], 4), dtype=np.float32)
        if self.max_regions is not None:
            features, boxes = features[:self.max_regions], boxes[:self.max_regions]
        return {"features": features, "boxes": boxes}

    def _group(self, image_id: str):
        if self.path.is_file():
            return _H5Group(self._file(self.path), image_id)
        for suffix in _SUFFIXES:
            file = self.path / f"{image_id}{suffix}"
            if file.is_file():
                if suffix == ".npz":
                    return _NpzGroup(np.load(file), image_id)
                return _H5Group(_open_h5(file), image_id)
        raise KeyError(f"no region features for image {image_id!r} in {self.path} (looked for "
                       f"{image_id}.h5 / .hdf5 / .npz)")

    def _file(self, path):
        if self._h5 is None:  # opened once, read-only, by each process that reads
            self._h5 = _open_h5(path)
        return self._h5


def _open_h5(path):
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading HDF5 region features needs h5py: pip install 'petune[vision]'") from e
    return h5py.File(path, "r")


class _H5Group:
    def __init__(self, file, image_id):
        if image_id not in file:
            raise KeyError(f"no region features for image {image_id!r} in {file.filename}")
        self.group = file[image_id]

    def __contains__(self, name):
        return name in self.group

    def __getitem__(self, name):
        return self.group[name][()]


class _NpzGroup:
    def __init__(self, arrays, image_id):
        self.arrays, self.prefix = arrays, f"{image_id}/"

    def _name(self, name):
        return self.prefix + name if self.prefix + name in self.arrays.files else name

    def __contains__(self, name):
        return self._name(name) in self.arrays.files

    def __getitem__(self, name):
        return self.arrays[self._name(name)]


def _normalised_boxes(boxes, group, regions, where) -> np.ndarray:
    if boxes.shape != (regions, 4):
        raise ValueError(f"{where}: boxes have shape {boxes.shape}; expected [{regions}, 4] as (x1, y1, x2, y2)")
    if "img_w" in group and "img_h" in group:  # pixels, as VL-T5's files
        boxes[:, (0, 2)] /= float(group["img_w"])
        boxes[:, (1, 3)] /= float(group["img_h"])
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        row = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise ValueError(f"{where}: box {row} has x2 < x1 or y2 < y1; boxes must be (x1, y1, x2, y2)")
    if (boxes > 1 + 1e-5).any() or (boxes < -1e-5).any():
        raise ValueError(f"{where}: boxes fall outside the image; give them in pixels with img_w and img_h, or as "
                         "fractions of the image")
    return np.clip(boxes, 0.0, 1.0)
