"""Which encoder-decoders petune knows, their sizes, and per-architecture default target modules.

Defaults come from peft's own tables (``peft.utils.constants``) where peft has an entry; petune
only adds the architectures peft's tables lack (mBART, Pegasus, Marian share BART's module
names; ``EncoderDecoderModel`` uses its encoder's architecture).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Architectures whose attention / FFN modules are named like BART's (q_proj, v_proj, fc2).
_BART_LIKE = {"mbart", "pegasus", "marian", "plbart"}

#: model_type values whose bottleneck adapters come from the ``adapters`` library (1.3); every other
#: encoder-decoder gets petune's own bottleneck (``petune.methods.bottleneck``).
ADAPTERS_SUPPORTED = ("t5", "mt5", "bart", "mbart", "plbart", "encoder-decoder")


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
            "petune tunes encoder-decoders: any AutoModelForSeq2SeqLM architecture (T5, mT5, BART, "
            "Pegasus, Marian, M2M100, LED, ...) or EncoderDecoderModel "
            "(e.g. EncoderDecoderModel.from_encoder_decoder_pretrained(enc, dec))."
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


def input_embeddings(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The encoder's token embeddings ``[batch, seq, d_model]`` for ``[batch, seq]`` ids, as the
    encoder would compute them from ``input_ids`` — so that ``encoder(inputs_embeds=...)`` with
    them gives the same output. Encoders that scale embeddings in their forward (Pegasus, Marian,
    Blenderbot-Small, FSMT: ``embed_scale``) get the scale here; the ``*ScaledWordEmbedding``
    modules of BART, M2M100 and others scale inside the embedding already.
    """
    encoder = model.get_encoder()
    embed = getattr(encoder, "embed_tokens", None) or model.get_input_embeddings()
    scale = getattr(encoder, "embed_scale", None)
    embeds = embed(input_ids)
    return embeds * scale if isinstance(scale, (int, float)) and scale != 1.0 else embeds


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
    """Default ``target_modules`` (and ``feedforward_modules`` for (IA)^3) for ``model``.

    peft's own per-architecture table where it has the architecture (petune adds mBART, Pegasus,
    Marian, PLBart → BART's names and EncoderDecoderModel → its encoder's), so results there are
    exactly peft's. Any other encoder-decoder: found by structure (:func:`find_layout`) — LoRA on
    the attention query and value projections, (IA)^3 on keys, values and the feed-forward output
    projection (scaled on its input), peft's choices for the families it knows. Names are the
    shortest module-name suffixes that match those modules and no other linear layer.

    Args:
        method: ``"lora"`` or ``"ia3"``.

    Raises:
        ValueError: the layout cannot be found; the message lists the linear modules present.
    """
    from peft.utils import constants as c

    key = _peft_key(model)
    if method == "lora":
        targets = c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(key)
        if targets:
            return {"target_modules": list(targets)}
    else:
        targets = c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(key)
        if targets:
            return {"target_modules": list(targets),
                    "feedforward_modules": list(c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(key, []))}
    return structural_targets(model, method)


def structural_targets(model: nn.Module, method: str) -> dict:
    """:func:`default_targets` found by structure alone (no table), for any encoder-decoder."""
    layout = find_layout(model)
    if method == "lora":
        return {"target_modules": _suffixes(model, layout.names("query") + layout.names("value"))}
    if not layout.names("key"):
        raise ValueError(f"no attention key projections found in model_type={layout.model_type!r}; pass "
                         "target_modules=[...] and feedforward_modules=[...] to (IA)^3")
    feedforward = _suffixes(model, layout.names("ffn_out"))
    attention = _suffixes(model, layout.names("key") + layout.names("value"))
    return {"target_modules": attention + [f for f in feedforward if f not in attention],
            "feedforward_modules": feedforward}


def _suffixes(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest dotted suffixes (peft matches ``target_modules`` by suffix) that cover every
    module in ``names`` and no other linear layer of ``model``, in first-seen order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = set(names)
    others = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n not in wanted]
    out = []
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                break
        if suffix not in out:
            out.append(suffix)
    return out


def can_generate(model: nn.Module) -> bool:
    """True for ``*ForConditionalGeneration`` classes, False for bare ``T5Model`` / ``BartModel``."""
    return hasattr(model, "prepare_inputs_for_generation") and hasattr(model, "generate")


# -- the layout of any encoder-decoder, found by structure --------------------------------------
# Leaf names the families use (T5 / BART / BERT / ProphetNet / LED / FSMT / DistilBERT-style ...).
QUERY_NAMES = ("q", "q_proj", "query", "query_proj", "q_lin")
KEY_NAMES = ("k", "k_proj", "key", "key_proj", "k_lin")
VALUE_NAMES = ("v", "v_proj", "value", "value_proj", "v_lin")
OUT_NAMES = ("o", "o_proj", "out_proj", "out_lin", "output", "dense")
#: path parts that mark attention modules, and among them cross-attention ones
ATTENTION_MARKS = ("attention", "attn")
CROSS_MARKS = ("encdec", "cross", "encoder_attn")
#: path parts of mixture-of-experts routers (their Linear is no feed-forward projection)
ROUTER_MARKS = ("router", "gate")


@dataclass
class Layer:
    """One transformer layer's linear projections (full module paths in the model)."""

    path: str
    query: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    value: list[str] = field(default_factory=list)
    self_out: list[str] = field(default_factory=list)   # self-attention output projection
    cross_out: list[str] = field(default_factory=list)  # cross-attention output projection
    ffn_in: list[str] = field(default_factory=list)
    ffn_out: list[str] = field(default_factory=list)
    ffn_block: str | None = None                        # what a Pfeiffer adapter follows

    ROLES = ("query", "key", "value", "self_out", "cross_out", "ffn_in", "ffn_out")

    def relative(self) -> tuple:
        """``((role, names relative to the layer), ...)`` for the roles found, the adapter's place last."""
        cut = len(self.path) + 1
        rows = tuple((role, tuple(n[cut:] for n in getattr(self, role))) for role in self.ROLES if getattr(self, role))
        return rows + ((("adapter after", (self.ffn_block[cut:],)),) if self.ffn_block else ())


@dataclass
class Layout:
    """Where the layers of an encoder-decoder and their projections are (:func:`find_layout`)."""

    model_type: str
    d_model: int
    encoder: list[Layer]
    decoder: list[Layer]

    @property
    def layers(self) -> list[Layer]:
        return self.encoder + self.decoder

    def names(self, role: str) -> list[str]:
        return [n for layer in self.layers for n in getattr(layer, role)]

    def __str__(self) -> str:
        lines = [f"{self.model_type}: d_model {self.d_model}, {len(self.encoder)} encoder + {len(self.decoder)} "
                 "decoder layers"]
        for stack, layers in (("encoder", self.encoder), ("decoder", self.decoder)):
            groups: dict[tuple, list[int]] = {}  # layers with the same relative names print once
            for i, layer in enumerate(layers):
                groups.setdefault(layer.relative(), []).append(i)
            for rows, indices in groups.items():
                lines.append(f"  {stack} layer{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))} "
                             f"({layers[indices[0]].path.rsplit('.', 1)[0]}.N):")
                lines += [f"    {role:<9} {', '.join(names)}" for role, names in rows]
        return "\n".join(lines)


def _stack_layers(stack: nn.Module, prefix: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer layers in an encoder or decoder: the one holding most parameters."""
    lists = [(name, m) for name, m in stack.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"no list of layers found under {prefix or 'the model'}")
    name, layers = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return ".".join(p for p in (prefix, name) if p), layers


def _relative_parts(path: str) -> list[str]:
    return [p.lower() for p in path.split(".")]


def _find_layer(path: str, layer: nn.Module, d_model: int) -> Layer:
    found = Layer(path)
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear) or not name:
            continue
        parts, leaf = _relative_parts(name), name.split(".")[-1]
        full = f"{path}.{name}"
        in_attention = any(mark in part for part in parts[:-1] for mark in ATTENTION_MARKS)
        if in_attention:
            if leaf in QUERY_NAMES:
                found.query.append(full)
            elif leaf in KEY_NAMES:
                found.key.append(full)
            elif leaf in VALUE_NAMES:
                found.value.append(full)
            elif leaf in OUT_NAMES and module.out_features == d_model:
                cross = any(mark in part for part in parts for mark in CROSS_MARKS)
                (found.cross_out if cross else found.self_out).append(full)
        elif not any(mark in part for part in parts for mark in ROUTER_MARKS) and leaf != "classifier":
            if module.in_features == d_model and module.out_features != d_model:
                found.ffn_in.append(full)
            elif module.out_features == d_model and module.in_features != d_model:
                found.ffn_out.append(full)
    found.ffn_block = _common_called_ancestor(layer, path, found.ffn_out)
    return found


def _common_called_ancestor(layer: nn.Module, path: str, names: list[str]) -> str | None:
    """The single feed-forward output projection, or — with several (experts) — the lowest module
    that contains them all and is itself called (not a ModuleDict / ModuleList)."""
    if len(names) <= 1:
        return names[0] if names else None
    parts = [n.split(".") for n in names]
    common = []
    for group in zip(*parts):
        if len(set(group)) > 1:
            break
        common.append(group[0])
    while len(common) > len(path.split(".")):
        module = layer.get_submodule(".".join(common[len(path.split(".")):]))
        if not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            return ".".join(common)
        common.pop()
    return None


def find_layout(model: nn.Module) -> Layout:
    """Locate every encoder and decoder layer of ``model`` and, in each, the attention query / key /
    value / output projections and the feed-forward input / output projections — by the module
    tree and the ``nn.Linear`` shapes (feed-forward projections map ``d_model`` to another width
    and back), with the families' usual names as hints for the attention projections.

    Works on a plain Hugging Face encoder-decoder or one with peft / adapters layers injected.

    Raises:
        ValueError: no layers, or a layer without the projections a method needs; the message
            lists the linear modules that are present, to pass as ``target_modules``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    width = d_model(base)
    stacks = {}
    for stack_name in ("encoder", "decoder"):
        getter = getattr(base, f"get_{stack_name}", None)
        stack = getter() if getter is not None else None
        if stack is None:
            stacks[stack_name] = []
            continue
        prefix = next(n for n, m in base.named_modules() if m is stack)
        list_path, layers = _stack_layers(stack, prefix)
        stacks[stack_name] = [_find_layer(f"{list_path}.{i}", layer, width) for i, layer in enumerate(layers)]
    layout = Layout(model_type(base), width, stacks["encoder"], stacks["decoder"])
    missing = [(layer.path, role) for layer in layout.layers for role in ("query", "value", "ffn_out")
               if not getattr(layer, role)]
    if not layout.encoder or missing:
        linear = sorted({n.split(".")[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"cannot find the layers of model_type={model_type(base)!r} by structure "
                         f"(missing: {missing[:3]}). Linear modules present: {linear}; pass "
                         "target_modules=[...] with some of them.")
    return layout


def describe(model: nn.Module) -> str:
    """What :func:`find_layout` found in ``model``, and the default targets each method would use:
    print it to check or to choose ``target_modules`` yourself."""
    layout = find_layout(model)
    lines = [str(layout), "default targets:"]
    for method in ("lora", "ia3"):
        lines.append(f"  {method}: {default_targets(model, method)}")
    return "\n".join(lines)


#: architectures whose encoder sentence-transformers (5.x, ``_ENCODER_ONLY_MODELS``) loads from a
#: directory: the T5 family through its ``*EncoderModel`` from the whole checkpoint, the others
#: through their bare ``*Encoder`` class, which needs the encoder's own weights (from a whole
#: checkpoint it would silently start from random weights); an ``EncoderDecoderModel``'s encoder
#: is a model of its own
ST_WHOLE_CHECKPOINT = ("t5", "mt5", "umt5", "longt5", "switch_transformers")
ST_ENCODER_ALONE = ("pegasus", "pegasus_x", "marian", "m2m_100", "blenderbot", "blenderbot-small")
