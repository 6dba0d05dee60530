"""Export a tuned model to a standalone Hugging Face model directory that plain ``transformers``
loads, with the embedding settings written beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .io import atomic_dir
from .tuned import TunedModel

#: the embedding settings written beside the exported weights (like sentence-transformers'
#: ``modules.json`` / pooling config)
EXPORT_CONFIG = "petune_export.json"


def export(tuned: TunedModel, path: str | os.PathLike, *, task: str | None = None, tokenizer=None,
           pooling: str = "mean", prefix: str = "", normalize: bool = False, max_length: int | None = None) -> Path:
    """Write ``task``'s tuned model as a plain Hugging Face model directory.

    LoRA and (IA)^3 are merged into the base weights (peft's ``merge_and_unload``, on a copy: the
    tuned model is left as it was), so ``AutoModelForSeq2SeqLM.from_pretrained(path)`` (or
    ``AutoModel`` for bare models) loads the tuned model with ``transformers`` alone and runs at the
    base model's speed. ``"none"`` writes the base model. Bottleneck adapters and soft prompts have
    no place in a transformers architecture: they raise, naming the alternative.

    Written atomically (a temp directory renamed into place): the weights (safetensors) and
    config from ``save_pretrained``, the tokenizer's files when ``tokenizer`` is given, and
    ``petune_export.json`` with the embedding settings to use with it — ``pooling`` (``"mean"``:
    mask-aware mean of the last encoder states; ``"first"``: the first token's state), ``prefix``,
    ``normalize``, ``max_length`` — plus the method, its options and the task.

    Args:
        task: the task whose module to export (required when the model has one module per task).
        tokenizer: saved beside the weights (optional).

    Returns:
        The directory.

    Raises:
        ValueError: a method that cannot be merged (adapter, prompt), a model with a visual
            embedding, an unknown task, or ``pooling`` other than ``"mean"`` / ``"first"``.
    """
    if pooling not in ("mean", "first"):
        raise ValueError(f"export writes encoder pooling 'mean' or 'first', got {pooling!r}")
    if tuned.petune_visual is not None:
        raise ValueError("the visual embedding (petune.vision) is not part of any transformers architecture; "
                         "save with petune.save(tuned, path) and load with petune.load(model, path)")
    module = tuned.module_for(task)
    plain = tuned.method.merged(tuned.model, module)
    settings = {"pooling": pooling, "prefix": prefix, "normalize": normalize, "max_length": max_length,
                "method": tuned.method.name, "options": tuned.method.options, "task": task,
                "model_class": type(plain).__name__}
    with atomic_dir(path) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(settings, indent=1, default=str))
    return Path(path)
