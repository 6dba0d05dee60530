"""Model cards: a ``README.md`` in the Hugging Face model-card convention (YAML metadata, then
markdown) for a tuned or exported model — base model, method and options, trainable parameters,
tasks, and the scored metrics with the command that measured them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tuned import TunedModel, base_of


def base_model_name(model) -> str | None:
    """The base model's hub id or path as its config recorded it (``None`` if unknown)."""
    config = base_of(model).config
    name = getattr(config, "_name_or_path", "") or ""
    encoder = getattr(config, "encoder", None)
    if not name and encoder is not None:  # EncoderDecoderModel built from two checkpoints
        name = getattr(encoder, "_name_or_path", "") or ""
    return name or None


def model_card(tuned: TunedModel, *, library: str = "petune", title: str | None = None, settings: dict | None = None,
               scores_markdown: str | None = None, command: str | None = None, usage: str | None = None) -> str:
    """The card's text.

    Args:
        library: ``"petune"`` (parameters for ``petune.load``), ``"transformers"`` or
            ``"sentence-transformers"`` (an exported directory): the ``library_name`` metadata.
        settings: embedding settings to list (pooling, prefix, normalisation, max length).
        scores_markdown: the run's score table (e.g. a recipe's report), shown with ``command``.
        usage: a code snippet that loads the model.
    """
    base = base_model_name(tuned)
    report = tuned.trainable_report()
    meta = {"library_name": library, "tags": ["petune", tuned.method.name, "parameter-efficient-fine-tuning"],
            "pipeline_tag": "sentence-similarity" if library == "sentence-transformers" else "feature-extraction"}
    if library == "sentence-transformers":
        meta["tags"] += ["sentence-transformers", "feature-extraction"]
    hub_id = base if base and not os.path.isabs(base) and not Path(base).exists() else None
    if hub_id:
        meta["base_model"] = hub_id  # a local path means nothing to the hub
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in meta.items()), "---", "",
             f"# {title or f'{tuned.method.name} on {hub_id or type(base_of(tuned)).__name__}'}", "",
             "Tuned with petune (parameter-efficient tuning of Hugging Face encoder-decoders).", "",
             "| | |", "|---|---|",
             f"| base model | `{base or type(base_of(tuned)).__name__}` ({type(base_of(tuned)).__name__}) |",
             f"| method | `{tuned.method.name}` |",
             f"| options | `{json.dumps(tuned.method.options, default=str)}` |",
             f"| tasks | {', '.join(tuned.tasks) if tuned.tasks else 'one module'} |",
             f"| trainable parameters | {report.trainable:,} of {report.total:,} ({report.percent:.4f} %) |"]
    for key, value in (settings or {}).items():
        lines.append(f"| {key} | `{value}` |")
    if scores_markdown:
        lines += ["", "## Scores", ""] + ([f"Measured with `{command}`:", ""] if command else []) + [scores_markdown]
    if usage:
        lines += ["", "## Usage", "", "```python", usage.strip(), "```"]
    return "\n".join(lines) + "\n"


def write_card(path: str | os.PathLike, text: str) -> Path:
    """Write ``README.md`` into the directory ``path`` (atomically)."""
    from .atomic import atomic_write

    return atomic_write(Path(path) / "README.md", lambda f: f.write(text.encode()))
