"""Which encoder-decoders petune knows, their sizes, and per-architecture default target modules.

Defaults come from peft's own tables (``peft.utils.constants``) where peft has an entry; petune
only adds the architectures peft's tables lack (mBART, Pegasus, Marian share BART's module
names; ``EncoderDecoderModel`` uses its encoder's architecture).
"""

from __future__ import annotations

from torch import nn

# Architectures whose attention / FFN modules are named like BART's (q_proj, v_proj, fc2).
_BART_LIKE = {"mbart", "pegasus", "marian", "plbart"}

#: model_type values tested with every built-in method (bottleneck adapters: see ADAPTERS_SUPPORTED).
KNOWN_ARCHITECTURES = ("t5", "mt5", "bart", "mbart", "pegasus", "marian", "encoder-decoder")

#: model_type values the ``adapters`` library (1.3) can attach bottleneck adapters to.
ADAPTERS_SUPPORTED = ("t5", "mt5", "bart", "mbart", "encoder-decoder")


def check_encoder_decoder(model) -> None:
    """Raise unless ``model`` is a Hugging Face encoder-decoder that has not been tuned already.

    Raises:
        TypeError: ``model`` is not a ``transformers.PreTrainedModel`` encoder-decoder.
        ValueError: ``model`` already carries a peft, adapters or petune method.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"petune needs a Hugging Face transformers model, got {type(model).__name__}. "
            "Load one with e.g. transformers.AutoModelForSeq2SeqLM.from_pretrained(name_or_path)."
        )
    config = model.config
    if not getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        raise TypeError(
            f"{type(model).__name__} (model_type={config.model_type!r}) is not an encoder-decoder. "
            "petune tunes encoder-decoders: T5, mT5, BART, mBART, Pegasus, Marian or "
            "EncoderDecoderModel (e.g. EncoderDecoderModel.from_encoder_decoder_pretrained(enc, dec))."
        )
    if getattr(model, "_petune_attached", False) or hasattr(model, "peft_config"):
        raise ValueError(
            f"{type(model).__name__} already has a tuning method attached. Attach to a fresh copy of "
            "the base model (from_pretrained again), or switch tasks with tuned.use_task(name)."
        )
    if getattr(model, "adapters_config", None) is not None and len(model.adapters_config.adapters) > 0:
        raise ValueError(
            f"{type(model).__name__} already has adapters ({list(model.adapters_config.adapters)}). "
            "Attach to a fresh copy of the base model."
        )


def model_type(model: nn.Module) -> str:
    return model.config.model_type


def encoder_config(model: nn.Module):
    """The config that describes the encoder (``config.encoder`` for EncoderDecoderModel)."""
    config = model.config
    return config.encoder if config.model_type == "encoder-decoder" else config


def d_model(model: nn.Module) -> int:
    """Hidden size of the encoder states (T5 ``d_model``, BERT ``hidden_size``)."""
    config = encoder_config(model)
    for attr in ("d_model", "hidden_size"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ValueError(f"cannot read the hidden size of model_type={config.model_type!r}")


def num_layers(model: nn.Module) -> int:
    config = encoder_config(model)
    for attr in ("num_layers", "encoder_layers", "num_hidden_layers"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 1


def num_heads(model: nn.Module) -> int:
    config = encoder_config(model)
    for attr in ("num_heads", "encoder_attention_heads", "num_attention_heads"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 1


def _peft_key(model: nn.Module) -> str:
    mt = model_type(model)
    if mt == "encoder-decoder":
        return model.config.encoder.model_type
    return "bart" if mt in _BART_LIKE else mt


def default_targets(model: nn.Module, method: str) -> dict:
    """peft's default ``target_modules`` (and ``feedforward_modules`` for (IA)^3) for ``model``.

    Args:
        method: ``"lora"`` or ``"ia3"``.

    Raises:
        ValueError: no default is known for the architecture; the message asks for ``target_modules``.
    """
    from peft.utils import constants as c

    key = _peft_key(model)
    if method == "lora":
        targets = c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(key)
        found = {"target_modules": list(targets)} if targets else None
    else:
        targets = c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(key)
        ff = c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(key, [])
        found = {"target_modules": list(targets), "feedforward_modules": list(ff)} if targets else None
    if found is None:
        raise ValueError(
            f"no default target_modules for {method} on model_type={model_type(model)!r}. "
            f"Pass them explicitly, e.g. petune.attach(model, {method!r}, target_modules=['q_proj', 'v_proj'])."
        )
    return found


def can_generate(model: nn.Module) -> bool:
    """True for ``*ForConditionalGeneration`` classes, False for bare ``T5Model`` / ``BartModel``."""
    return hasattr(model, "prepare_inputs_for_generation") and hasattr(model, "generate")
