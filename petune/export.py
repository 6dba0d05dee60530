"""Export a tuned model to a standalone Hugging Face model directory that plain ``transformers``
loads, with the embedding settings written beside it."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .atomic import atomic_dir
from .card import EXAMPLES, base_model_name, encode_code, model_card, packaged_or_name, tokenizer_code
from .models import ST_ENCODER_ALONE, ST_WHOLE_CHECKPOINT, d_model
from .tuned import NAMED_SIDES, TunedModel

#: the embedding settings written beside the exported weights (like sentence-transformers'
#: ``modules.json`` / pooling config)
EXPORT_CONFIG = "petune_export.json"


FORMATS = ("transformers", "sentence-transformers", "peft", "adapters")
#: formats that write the tuned module alone, in its library's layout (petune.adapter_export)
ADAPTER_FORMATS = ("peft", "adapters")



def _sentence_transformers_encoder(plain):
    """The model to write at the root of a sentence-transformers directory, or a ``ValueError``."""
    model_type = getattr(plain.config, "model_type", "")
    if type(plain).__name__ == "EncoderDecoderModel" or model_type in ST_ENCODER_ALONE:
        return plain.get_encoder()
    if model_type in ST_WHOLE_CHECKPOINT:
        return plain
    supported = ", ".join(("encoder-decoder", *ST_WHOLE_CHECKPOINT, *ST_ENCODER_ALONE))
    raise ValueError(f"sentence-transformers cannot load the encoder of a {model_type!r} model on its own (it "
                     f"loads those of {supported}); export with format='transformers' and encode with petune")


def _prompts(prefix: str, query_prefix: str | None, passage_prefix: str | None) -> tuple[dict, str | None]:
    """sentence-transformers' ``prompts`` and ``default_prompt_name``: an asymmetric model's
    ``query`` and ``document`` prompts (what ``encode_query`` / ``encode_document`` prepend), or one
    default prompt for a symmetric one."""
    if query_prefix is not None or passage_prefix is not None:
        return {"query": query_prefix or "", "document": passage_prefix or ""}, None
    return ({"default": prefix}, "default") if prefix else ({}, None)


def _write_sentence_transformers(tmp: Path, encoder, tokenizer, pooling, prompts, default_prompt, normalize,
                                 max_length) -> None:
    """The folder layout sentence-transformers (and the servers that read it) load: the encoder and
    tokenizer at the root, ``modules.json``, ``sentence_bert_config.json``, ``1_Pooling`` and
    ``2_Normalize`` (the classic names, which every sentence-transformers version reads)."""
    import torch
    import transformers

    encoder.save_pretrained(tmp, safe_serialization=True)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as petune.encode: no token_type_ids
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # saved in tokenizer_config.json
    tokenizer.save_pretrained(tmp)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (tmp / "2_Normalize").mkdir()
    (tmp / "1_Pooling").mkdir()
    dim = d_model(encoder)
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "1_Pooling/config.json": {"word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "first",
                                  "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False},
        "config_sentence_transformers.json": {
            "__version__": {"pytorch": torch.__version__, "transformers": transformers.__version__},
            "prompts": prompts, "default_prompt_name": default_prompt,
            "similarity_fn_name": "cosine" if normalize else "dot"},
    }
    for name, value in files.items():
        (tmp / name).write_text(json.dumps(value, indent=2))


def _export_adapter(tuned, path: Path, task, format: str, settings: dict, scores_markdown, command,
                    side: str | None = None) -> Path:
    """``format="peft"`` / ``"adapters"``: the module of ``task`` (every task's, one folder each,
    when the model has one module per task and no task is named) with its card; on a model with
    separate sides, ``side``'s module."""
    from . import adapter_export

    write = adapter_export.write_peft if format == "peft" else adapter_export.write_adapters
    per_task = task is None and tuned.tasks is not None and not tuned.shared
    base = packaged_or_name(base_model_name(tuned))
    with atomic_dir(path) as tmp:
        for name in (tuned.tasks if per_task else [task]):
            folder = tmp / name if per_task else tmp
            folder.mkdir(exist_ok=True)
            write(tuned, tuned.module_for(name, side), folder)
            card_settings = {k: repr(v) if k == "prefix" else v for k, v in settings.items()}
            (folder / "README.md").write_text(model_card(
                tuned, library=format, settings=card_settings, scores_markdown=scores_markdown, command=command,
                usage=adapter_export.usage(format, base, settings, tuned.method.name)))
            (folder / EXPORT_CONFIG).write_text(json.dumps(
                {**settings, "method": tuned.method.name, "options": tuned.method.options, "task": name,
                 "format": format}, indent=1, default=str))
    return path


def export(tuned: TunedModel, path: str | os.PathLike, *, task: str | None = None, tokenizer=None,
           pooling: str = "mean", prefix: str = "", normalize: bool = False, max_length: int | None = None,
           format: str = "transformers", scores_markdown: str | None = None, command: str | None = None,
           query_prefix: str | None = None, passage_prefix: str | None = None, side: str | None = None) -> Path:
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

    ``format="peft"`` / ``"adapters"`` write the tuned module alone, in the layout of the library
    it came from (:mod:`petune.adapter_export`): a peft adapter folder (prompt tuning, LoRA,
    (IA)^3) that ``PeftModel.from_pretrained(base, path)`` loads, with a ``sentence-transformers/``
    copy of its encoder's share that ``SentenceTransformer(base_export).load_adapter(...)`` loads
    onto a sentence-transformers export of the base (LoRA, (IA)^3); or the adapters library's
    saved-adapter folder (bottleneck adapters) that ``model.load_adapter(path)`` reads after
    ``adapters.init(model)``. A model with one module per task and no ``task`` named writes one
    folder per task (``path/TASK``).

    ``format="sentence-transformers"`` writes instead the layout sentence-transformers reads:
    the encoder side of the merged model (an ``EncoderDecoderModel``'s encoder; the whole T5 /
    mT5 / Pegasus / Marian / M2M100 / ... checkpoint, whose encoder sentence-transformers loads),
    the tokenizer, ``modules.json``, the pooling (``1_Pooling``), normalisation (``2_Normalize``),
    ``max_seq_length`` and ``prefix`` as the default prompt, so that
    ``SentenceTransformer(path).encode(texts)`` gives ``petune.encode``'s embeddings with these
    settings (tested within 1e-5 with sentence-transformers 5.7.0, an optional dependency:
    ``pip install petune[serve]``; exporting does not need it). A retrieval model trained with a
    query prefix and a passage prefix (the recipes' ``--query-prefix`` / ``--passage-prefix``)
    gives them as ``query_prefix`` / ``passage_prefix``: they become the ``query`` and
    ``document`` prompts, which ``encode_query`` and ``encode_document`` prepend.

    Both formats carry a model card, ``README.md`` (Hugging Face convention): base model, method,
    options, trainable parameters, tasks, the embedding settings, and ``scores_markdown`` with the
    ``command`` that measured it when given.

    Args:
        task: the task whose module to export (required when the model has one module per task).
        tokenizer: saved beside the weights (optional; required for sentence-transformers).
        max_length: input tokens; for sentence-transformers default the tokenizer's and the
            model's limit (what ``petune.encode`` caps to), at most 512.
        format: ``"transformers"``, ``"sentence-transformers"``, ``"peft"`` or ``"adapters"``.
        query_prefix, passage_prefix: an asymmetric retrieval model's prefixes (instead of
            ``prefix``, which must then be empty).
        side: for a query-side model (``attach(..., sides="query")``), which side this folder
            holds: ``"query"`` (the method merged) or ``"passage"`` (the frozen base, the method
            removed: peft's ``unload`` on a copy). For a model with separate sides
            (``sides="separate"``), the side whose module this folder holds (merged, or in the
            ``"peft"`` / ``"adapters"`` formats the module alone). Two folders, each a model of
            its own that sentence-transformers or transformers loads; encode queries with the
            first and passages with the second. Ignored by symmetric models.

    Returns:
        The directory.

    Raises:
        ValueError: a method that cannot be merged (adapter, prompt) into a whole-model format, a
            model with an added part (the visual embedding), an unknown task, ``pooling`` other
            than ``"mean"`` / ``"first"``, an unknown ``format``; ``"peft"`` for a method peft does
            not give (bottleneck adapters), ``"adapters"`` for one the adapters library does not;
            for sentence-transformers, no tokenizer or an architecture whose encoder it cannot
            load alone (BART, mBART, LED, ...); a query-side model without ``side`` in a
            whole-model format, or a model with separate sides without ``side``.
    """
    if pooling not in ("mean", "first"):
        raise ValueError(f"export writes encoder pooling 'mean' or 'first', got {pooling!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "sentence-transformers" and tokenizer is None:
        raise ValueError("format='sentence-transformers' needs the tokenizer: export(..., tokenizer=tok)")
    if prefix and (query_prefix is not None or passage_prefix is not None):
        raise ValueError("give prefix (one for every text) or query_prefix / passage_prefix, not both")
    prompts, default_prompt = _prompts(prefix, query_prefix, passage_prefix)
    if tuned.extra_parts:
        labels = [f"the {part.label}" for part in tuned.extra_parts.values()]
        named = labels[0] + " is" if len(labels) == 1 else ", ".join(labels[:-1]) + f" and {labels[-1]} are"
        raise ValueError(f"{named} not part of any transformers architecture; save with "
                         "petune.save(tuned, path) and load with petune.load(model, path)")
    if tuned.sides == "separate" and side not in NAMED_SIDES:
        raise ValueError("this model has a module per side: export each side to its own folder, "
                         "export(..., side='query') and export(..., side='passage')")
    if format in ADAPTER_FORMATS:  # a query-side model's module: for its queries only, as the settings say
        applies = {"query": {"applies_to": "queries only"}, "separate": {"applies_to": f"{side} side",
                   "side": side}}.get(tuned.sides, {})
        return _export_adapter(tuned, Path(path), task, format, {"prefix": prefix, "max_length": max_length,
                               "pooling": pooling, "normalize": normalize, **applies},
                               scores_markdown, command, side=side)
    if tuned.sides == "query" and side not in NAMED_SIDES:
        raise ValueError("this model tunes the query side only: export each side to its own folder, "
                         "export(..., side='query') and export(..., side='passage') (the frozen base)")
    if tuned.sides == "query" and side == "passage":
        plain = tuned.method.unloaded(tuned.model)
    else:
        plain = tuned.method.merged(tuned.model, tuned.module_for(task, side))  # side: separate sides only
    settings = {"pooling": pooling, "prefix": prefix, "normalize": normalize, "max_length": max_length,
                "method": tuned.method.name, "options": tuned.method.options, "task": task,
                "model_class": type(plain).__name__, **({"side": side} if tuned.sides is not None else {})}
    card_settings = {"pooling": pooling, "prefix": repr(prefix), "normalize": normalize, "max_length": max_length}
    if default_prompt is None and prompts:
        for key, value in (("query_prefix", prompts["query"]), ("passage_prefix", prompts["document"])):
            settings[key], card_settings[key] = value, repr(value)
        del settings["prefix"], card_settings["prefix"]
    def encode_options(text_prefix: str) -> dict:  # petune.encode's options as the card shows them
        shown = {"prefix": text_prefix, "max_length": max_length, "pooling": pooling, "normalize": normalize}
        return {k: v for k, v in shown.items() if v not in ("", None, False) and (k, v) != ("pooling", "mean")}

    if format == "sentence-transformers":
        from .embed import _max_length

        encoder = _sentence_transformers_encoder(plain)
        settings["max_length"] = card_settings["max_length"] = max_length = _max_length(
            plain, tokenizer, max_length or min(512, getattr(tokenizer, "model_max_length", 512) or 512))
        if default_prompt is None and prompts:
            calls = (f"queries = model.encode_query({EXAMPLES['queries']!r})  # [n, d], the query prompt prepended\n"
                     f"passages = model.encode_document({EXAMPLES['passages']!r})  # [n, d], the document prompt "
                     "prepended")
        else:
            calls = (f"texts = model.encode({EXAMPLES['texts']!r})  # [n, d]"
                     + (", the prefix applied as the default prompt" if prefix else ""))
        usage = ("from sentence_transformers import SentenceTransformer\n\n"
                 "model = SentenceTransformer('.')  # this folder: run from it, or give its path\n" + calls)
    else:
        cls = type(plain).__name__
        if tokenizer is not None:
            loaded = (f"from transformers import AutoTokenizer, {cls}\n\n"
                      f"model = {cls}.from_pretrained('.')  # this folder: run from it, or give its path\n"
                      "tokenizer = AutoTokenizer.from_pretrained('.')")
        else:
            loaded = (f"{tokenizer_code(packaged_or_name(base_model_name(tuned)))}\nfrom transformers import {cls}"
                      f"\n\nmodel = {cls}.from_pretrained('.')  # this folder: run from it, or give its path")
        sides = ({"queries": prompts["query"], "passages": prompts["document"]}
                 if default_prompt is None and prompts else {"texts": prefix})
        usage = (f"import petune\n{loaded}\n\n"
                 + encode_code({name: encode_options(p) for name, p in sides.items()}, model="model"))
    card = model_card(tuned, library=format, settings=card_settings, scores_markdown=scores_markdown,
                      command=command, usage=usage)
    with atomic_dir(path) as tmp:
        if format == "sentence-transformers":
            _write_sentence_transformers(tmp, encoder, tokenizer, pooling, prompts, default_prompt, normalize,
                                         max_length)
        else:
            plain.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_CONFIG).write_text(json.dumps({**settings, "format": format}, indent=1, default=str))
        (tmp / "README.md").write_text(card)
    return Path(path)
