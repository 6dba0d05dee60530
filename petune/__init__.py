"""petune: parameter-efficient tuning of Hugging Face encoder-decoders.

One call attaches prompt tuning, bottleneck adapters, (IA)^3 or LoRA (from peft and adapters),
freezes everything else and reports what is trainable::

    tuned = petune.attach(model, "adapter", reduction_factor=8, tasks=["vqa", "gqa"])
    print(tuned.trainable_report())
"""

from . import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .embed import encode, encode_sharded
from .export import export
from .io import load, read_config, save
from .store import EmbeddingStore, encode_to_store
from .methods.base import Method
from .methods.registry import get_method, methods, register_method
from .tuned import TrainableReport, TunedModel, attach
from .heads import add_projection_head
from . import vision  # noqa: E402  (after attach: vision builds on it)

__version__ = "0.1.0"

__all__ = ["attach", "add_projection_head", "encode", "encode_sharded", "encode_to_store", "EmbeddingStore", "export",
           "register_method", "methods", "get_method", "Method",
           "TunedModel", "TrainableReport", "save", "load", "read_config", "vision", "__version__"]
