"""Images beside text: VL-T5's visual embedding for any encoder-decoder petune tunes, image features
from a frozen backbone (cached), and real offline image data.

::

    tuned = petune.attach(model, "lora", r=8)
    petune.vision.add_visual(tuned, backbone="efficientnet-lite0")     # trainable, saved with the model
    feats = petune.vision.extract_features(paths, cache_dir="cache")   # [n, 1280]
    # an image alone: no text, the prefix the training collator put before it (PairCollator's
    # prefix_a with an empty "a"), so it is encoded exactly as it was trained
    emb = petune.encode(tuned, tok, None, images=list(feats), prefix="image text match: ")
"""

from .data import tuxpaint, twemoji
from .embedding import VisualEmbedding, add_visual
from .features import (DEFAULT_BACKBONE, EfficientNetLite0, FeatureExtractor, HFVisionBackbone, extract_features,
                       feature_extractor, load_image)
from .inputs import grid_boxes, image_batch, num_regions, pool_grid, regions
from .region_files import RegionFeatures
from .vl import VLCheckpoint, VLVisualEmbedding, from_vl_bart, from_vl_t5

__all__ = ["add_visual", "VisualEmbedding", "extract_features", "feature_extractor", "FeatureExtractor",
           "EfficientNetLite0", "HFVisionBackbone", "load_image", "DEFAULT_BACKBONE", "image_batch", "regions",
           "grid_boxes", "pool_grid", "num_regions", "twemoji", "tuxpaint", "from_vl_t5", "from_vl_bart",
           "VLVisualEmbedding", "VLCheckpoint", "RegionFeatures"]
