"""Adapter-only exports: a tuned module in the layout the library it came from reads, without the
base weights — a peft adapter folder (prompt tuning, LoRA, (IA)^3) for
``PeftModel.from_pretrained`` and sentence-transformers' ``load_adapter``, or the adapters
library's saved-adapter folder (bottleneck adapters) for ``model.load_adapter``, as AdapterHub
distributes them. :func:`petune.export` writes them with ``format="peft"`` / ``"adapters"``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .card import base_model_name, is_hub_id, packaged_or_name
from .models import ST_ENCODER_ALONE, ST_WHOLE_CHECKPOINT

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: where a peft export puts the encoder-side copy that sentence-transformers' load_adapter reads
ENCODER_FOLDER = "sentence-transformers"


def _portable_base(tuned) -> str | None:
    """The base as another machine names it: a hub id, else nothing (never a local path)."""
    name = packaged_or_name(base_model_name(tuned))
    return name if is_hub_id(name) else None


def write_peft(tuned, module: str, folder: Path) -> None:
    """peft's ``save_pretrained`` of ``module`` alone, moved to ``folder``'s root (peft puts an
    adapter not named ``default`` in a subfolder), its ``base_model_name_or_path`` a hub id or
    nothing; then the encoder-side copy (:func:`write_peft_encoder`) where sentence-transformers
    can load the encoder alone."""
    if tuned.method.library != "peft":
        raise ValueError(f"format='peft' writes peft adapters (prompt, lora, ia3); {tuned.method.name!r} comes from "
                         f"{tuned.method.library}: use format='adapters' for bottleneck adapters, or petune.save")
    saved = folder / ".peft"
    tuned.model.save_pretrained(str(saved), selected_adapters=[module])
    src = saved if (saved / PEFT_FILES[0]).exists() else saved / module
    for name in PEFT_FILES:
        shutil.move(str(src / name), str(folder / name))
    shutil.rmtree(saved)
    config = json.loads((folder / PEFT_FILES[0]).read_text())
    config["base_model_name_or_path"] = _portable_base(tuned)
    (folder / PEFT_FILES[0]).write_text(json.dumps(config, indent=2))
    base = tuned.base_model
    model_type = getattr(base.config, "model_type", "")
    if tuned.method.name != "prompt" and (type(base).__name__ == "EncoderDecoderModel"
                                          or model_type in ST_WHOLE_CHECKPOINT + ST_ENCODER_ALONE):
        encoder = base.get_encoder()
        where = next(name for name, module in base.named_modules() if module is encoder)  # "encoder", "model.encoder"
        write_peft_encoder(folder, folder / ENCODER_FOLDER, f"{where}.", strip=model_type not in ST_WHOLE_CHECKPOINT)


def write_peft_encoder(folder: Path, dest: Path, encoder: str, strip: bool) -> None:
    """The encoder's share of a peft adapter (the keys under ``encoder``, the encoder's path in the
    seq2seq model), named as in the model sentence-transformers loads: an ``EncoderDecoderModel``'s
    or Pegasus / Marian's encoder alone (``strip``: that path dropped from each key), T5's
    ``*EncoderModel`` (the keys as they are). The decoder's entries are left out; an adapter with
    none in the encoder writes nothing."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / PEFT_FILES[1]))
    prefix = "base_model.model."
    kept = {}
    for key, value in weights.items():
        inner = key[len(prefix):] if key.startswith(prefix) else key
        if not inner.startswith(encoder):
            continue  # the decoder's (and cross-attention's) updates: the encoder alone has no place for them
        kept[prefix + (inner[len(encoder):] if strip else inner)] = value.contiguous()
    if not kept:
        return
    dest.mkdir()
    save_file(kept, str(dest / PEFT_FILES[1]))
    shutil.copy(folder / PEFT_FILES[0], dest / PEFT_FILES[0])


def write_adapters(tuned, module: str, folder: Path) -> None:
    """The adapters library's ``save_adapter`` of ``module``: ``adapter_config.json`` and its
    weights, which ``model.load_adapter(folder)`` reads after ``adapters.init(model)``."""
    if tuned.method.name != "adapter" or tuned.method.library != "adapters":
        what = ("petune's own bottleneck adapter (the adapters library has no layout for this architecture)"
                if tuned.method.name == "adapter" else f"{tuned.method.name!r}, from {tuned.method.library}")
        raise ValueError(f"format='adapters' writes the adapters library's bottleneck adapters; this model has {what}: "
                         "use format='peft' for prompt / lora / ia3, or petune.save")
    tuned.model.save_adapter(str(folder), module)


def usage(format: str, base: str | None, settings: dict, method: str) -> str:
    """A card's usage block for an adapter folder: the base built as :func:`petune.card.base_code`
    builds it, the library's own loading call, and petune.encode with the export's settings
    (not for soft prompts, which act in peft's forward, not in the encoder petune.encode calls)."""
    from .card import base_code, encode_code

    options = {k: v for k, v in settings.items() if v not in ("", None, False) and (k, v) != ("pooling", "mean")}
    if format == "peft":
        imports, load = "from peft import PeftModel", ("model = PeftModel.from_pretrained(base, '.')  # this folder: "
                                                       "run from it, or give its path")
    else:
        imports, load = "import adapters", ("adapters.init(base)\nbase.set_active_adapters(base.load_adapter('.'))  "
                                            "# this folder: run from it, or give its path\nmodel = base")
    head = f"import petune\n{imports}\n{base_code(base)}\n\n{load}\n"
    if method == "prompt":
        return head + ("# the soft prompt is prepended in peft's forward (model(input_ids=..., attention_mask=...)); "
                       "petune.encode\n# reads the encoder alone: for petune's embeddings use petune.save / "
                       "petune.load instead")
    return head + encode_code({"texts": options}, model="model")
