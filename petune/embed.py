"""Encoder embeddings: pooling over encoder (or first decoder) states → ``[n, d]`` float32."""

from __future__ import annotations

import contextlib
import inspect
import os

import numpy as np
import torch

from .cache import Cache, fingerprint, tensors_fingerprint, texts_fingerprint, weights_fingerprint
from .models import encoder_config
from .regions import RegionInputs, images_digest
from .tuned import SIDES, TunedModel, base_of, is_task_list

POOLINGS = ("mean", "first", "decoder")
_NEEDS_PART = ("images need a TunedModel with a part that reads them: petune.attach(model, method) (or 'none'), "
               "then petune.vision.add_visual(tuned, ...)")
_TOKENIZE_SLICE = 2048  # texts per tokenizer call


def _encoder_output(model, input_ids, attention_mask, output_hidden_states, images=None):
    if isinstance(model, TunedModel):
        return model.encoder_output(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                                    images=images)
    if images is not None:
        raise TypeError(_NEEDS_PART)
    out = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=output_hidden_states, return_dict=True)
    return out, attention_mask


def prepare_images(model, texts, images, cache_dir=None):
    """An encode call's ``images`` through the part of ``model`` that reads them (files and PIL
    images become features there): ``(texts, per-example region entries)``.

    Raises:
        TypeError / ValueError: a model without such a part; what the part raises.
    """
    if not isinstance(model, TunedModel):
        raise TypeError(_NEEDS_PART)
    return model.part_for("images").prepare(model, texts, images, cache_dir)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-aware average: ``[batch, seq, d]`` and ``[batch, seq]`` → ``[batch, d]``."""
    mask = mask.to(states.dtype).unsqueeze(-1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _decoder_start_state(model, states, mask):
    """Last decoder layer's state at the decoder start token, ``[batch, d_model]``."""
    base = base_of(model)
    start = getattr(base.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(base, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError("pooling='decoder' needs config.decoder_start_token_id; set it on the model config")
    ids = torch.full((states.shape[0], 1), int(start), dtype=torch.long, device=states.device)
    out = base.get_decoder()(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask,
                             output_hidden_states=True, return_dict=True)
    last = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
    return last[:, 0]


def pool(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean",
         layers: int | None = None, layer_combine: str = "mean", images: dict | None = None,
         side: str | None = None) -> torch.Tensor:
    """Embed one tokenised batch: ``[batch, seq]`` ids and mask → ``[batch, d]`` (``d·layers`` if
    concat; a tuned model's projection head then maps it to ``[batch, dim]``, :mod:`petune.heads`).

    ``"first"`` is the first *input* token (CLS for BERT, the first T5 token); under prompt tuning
    the virtual tokens before it are skipped. ``"mean"`` averages every position the mask covers,
    virtual and visual tokens included. ``layers=n`` pools each of the last ``n`` encoder layers and
    averages (``layer_combine="mean"``) or concatenates (``"concat"``) the results. ``images``: the
    batch's visual input (:func:`petune.vision.image_batch`), for models with a visual embedding.
    ``side="passage"`` on a query-side model (``attach(..., sides="query")``) embeds with the
    frozen base; any other side with the method. On a model with separate sides
    (``sides="separate"``) ``side`` picks the module (``None``: the active side's).

    Raises:
        ValueError: images on the frozen passage side.
    """
    if isinstance(model, TunedModel) and model.is_frozen_side(side):
        if images is not None:
            raise ValueError("images go with queries: the passage side of a query-side model is the frozen base")
        with model.frozen_base() as base:
            return pool(base, input_ids, attention_mask, pooling, layers, layer_combine)
    if isinstance(model, TunedModel) and model.switches_side(side):
        with model.side(side):
            return pool(model, input_ids, attention_mask, pooling, layers, layer_combine, images)
    want_layers = layers is not None and layers > 1
    out, mask = _encoder_output(model, input_ids, attention_mask, want_layers, images)
    stack = list(out.hidden_states[-layers:]) if want_layers else [out.last_hidden_state]
    first = model.method.prefix_length() if isinstance(model, TunedModel) else 0  # skip virtual tokens
    pooled = []
    for states in stack:
        if pooling == "mean":
            pooled.append(mean_pool(states, mask))
        elif pooling == "first":
            pooled.append(states[:, first])
        else:
            pooled.append(_decoder_start_state(model, states, mask))
    if len(pooled) == 1:
        out = pooled[0]
    else:
        out = torch.cat(pooled, dim=-1) if layer_combine == "concat" else torch.stack(pooled).mean(0)
    return model.after_pooling(out) if isinstance(model, TunedModel) else out


def pool_inputs(model, inputs: dict, pooling: str = "mean", side: str | None = None) -> torch.Tensor:
    """:func:`pool` of a collated batch ``{"input_ids", "attention_mask"[, "images"]}``."""
    return pool(model, inputs["input_ids"], inputs["attention_mask"], pooling, images=inputs.get("images"),
                side=side)


def _task_per_text(tasks, texts) -> list[str]:
    tasks = list(tasks)
    if len(tasks) != len(texts):
        raise ValueError(f"task lists one task per text: got {len(tasks)} tasks for {len(texts)} texts")
    return tasks


def _check_args(texts, pooling, layers, layer_combine, batch_size):
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string; wrap it: [text]")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: nothing to encode")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise ValueError(f"layers must be a positive integer (the last n encoder layers), got {layers!r}")
    if layers and layers > 1 and pooling == "decoder":
        raise ValueError("layers= pools encoder layers; it cannot be combined with pooling='decoder'")
    if layer_combine not in ("mean", "concat"):
        raise ValueError(f"layer_combine must be 'mean' or 'concat', got {layer_combine!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return texts


def pad_ids(tokenizer, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → ``[batch, seq]`` ids and attention mask, padded with the tokenizer's pad id
    on its padding side (what ``tokenizer.pad`` does, without a fast tokenizer's warning that
    calling ``pad`` is slower than tokenising with padding)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), getattr(tokenizer, "pad_token_id", None) or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _check_quantize(model, quantize) -> None:
    if quantize is None:
        return
    if quantize != "int8":
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if isinstance(model, TunedModel) and model.tuned_parameters():
        raise ValueError("quantize='int8' encodes frozen or merged models; this one has tuned modules. Merge them "
                         "first (petune.export(tuned, path), then load the folder with transformers), or encode "
                         "without quantize")
    if next(base_of(model).parameters()).device.type != "cpu":
        raise ValueError("quantize='int8' (dynamic quantisation) runs on CPU; on a GPU encode in float32 or "
                         "under torch.autocast")


def int8_copy(model):
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 weights (activations
    quantised per batch): torch's ``quantize_dynamic``, for CPU inference."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def _max_length(model, tokenizer, max_length, n_visual: int = 0):
    """Cap the input length so that prompt + input + visual tokens fit the encoder's position table."""
    limit = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    positions = getattr(encoder_config(base_of(model)), "max_position_embeddings", None)
    n_virtual = model.method.prefix_length() if isinstance(model, TunedModel) else 0
    if positions:
        limit = min(limit, positions - n_virtual - n_visual)
    if limit < 1:
        raise ValueError(f"no room for input: {n_virtual} virtual and {n_visual} visual tokens fill the "
                         f"{positions} positions")
    return limit


def encode(model, tokenizer, texts, *, pooling: str = "mean", layers: int | None = None,
           layer_combine: str = "mean", prefix: str = "", max_length: int = 256, batch_size: int = 32,
           normalize: bool = False, task: str | list[str] | None = None, progress: bool | None = None,
           cache_dir: str | os.PathLike | None = None, images=None, quantize: str | None = None,
           side: str | None = None) -> np.ndarray:
    """Embed texts (and images) with a (tuned) encoder-decoder: ``[n, d]`` float32, rows in input order.

    Args:
        model: a :class:`petune.TunedModel` or a plain Hugging Face encoder-decoder.
        tokenizer: the model's tokenizer.
        texts: list of strings (``None`` with ``images``: image only, each text then being ``prefix``).
        images: one entry per text, for models with a visual embedding
            (:func:`petune.vision.add_visual`): ``None`` (text only), features ``[feat_dim]`` /
            ``[cells, feat_dim]`` / ``{"features", "boxes"}`` (see :func:`petune.vision.regions`),
            or the image itself (path or PIL; features extracted with the model's backbone, and
            cached in ``cache_dir`` too). Each example's visual tokens follow its text.
        pooling: ``"mean"`` (mask-aware mean of encoder states; prompt positions included),
            ``"first"`` (first input token: CLS or the first T5 token), or ``"decoder"`` (last
            decoder layer at the decoder start token).
        layers, layer_combine: pool each of the last ``layers`` encoder layers and average
            (``"mean"``) or concatenate (``"concat"``, giving ``d = layers · d_model``).
        prefix: prepended to every text (task prefixes such as ``"question: "``).
        max_length: truncation length in tokens; under prompt tuning it is also capped so that
            input + virtual tokens fit the encoder's position embeddings.
        batch_size: texts per forward. Texts are sorted by length and padded per batch.
        normalize: L2-normalise the rows (cosine similarity = inner product).
        task: the task whose module to use (multi-task tuned models); restored afterwards. Or a
            list, one task per text: each text through its own task's module, mixed in the same
            batches (:meth:`petune.TunedModel.routed`); equal to encoding each task's texts
            separately.
        progress: show a tqdm bar; default: when there are more than 10 batches.
        cache_dir: reuse the embeddings stored there when the model weights, tokenizer, texts and
            every option above but ``batch_size`` / ``progress`` are the same (the log says so);
            otherwise compute and store them (``.npy``, written atomically). The decoder's own
            weights count only under ``pooling="decoder"``. See :mod:`petune.cache`.
        quantize: ``"int8"`` encodes with a copy of the model whose ``nn.Linear`` layers are
            dynamically quantised to int8 (torch's ``quantize_dynamic``), on CPU, for frozen or
            merged models (a plain Hugging Face model, or ``petune.export``'s merged one): 1.79×
            the float32 throughput on 256-token passages, MRR@10 0.752 vs 0.756 on the offline BBC
            test split (benchmarks/encode_speed.py). Activations are quantised per batch, so a
            text's vector varies slightly with the texts batched with it. Part of the cache key.
        side: ``"query"`` or ``"passage"``: required for a query-side model (``attach(...,
            sides="query")``), whose passages go through the frozen base — with the frozen
            model's own cache key, so its cached embeddings and stores serve them — and for a
            model with separate sides (``sides="separate"``), where it picks the module (part of
            the cache key); ignored by symmetric models.

    Returns:
        ``np.ndarray`` of shape ``[len(texts), d]``, dtype float32.

    Raises:
        ValueError: empty ``texts``, bad ``pooling`` / ``layers`` / ``batch_size``, unknown task,
            a task list not one per text; ``quantize`` other than ``"int8"``, or on a model with
            tuned modules or on a GPU;
            ``images`` not one per text, or on a model without a visual embedding; no ``side`` for
            a query-side model or one with separate sides.
        TypeError: ``texts`` is a string or holds non-strings.
        FloatingPointError: the model produced NaN or inf (names the first bad text).
    """
    from tqdm.auto import tqdm

    check_side(model, side)
    if isinstance(model, TunedModel) and model.is_frozen_side(side):
        with side_model(model, side) as base:  # the base's own call: its cache key, its embeddings
            return encode(base, tokenizer, texts, pooling=pooling, layers=layers, layer_combine=layer_combine,
                          prefix=prefix, max_length=max_length, batch_size=batch_size, normalize=normalize,
                          progress=progress, cache_dir=cache_dir, images=images, quantize=quantize)
    if isinstance(model, TunedModel) and model.switches_side(side):
        with model.side(side):  # the side's module for the whole call: routing, pooling and the cache key
            return encode(model, tokenizer, texts, pooling=pooling, layers=layers, layer_combine=layer_combine,
                          prefix=prefix, max_length=max_length, batch_size=batch_size, normalize=normalize,
                          task=task, progress=progress, cache_dir=cache_dir, images=images, quantize=quantize,
                          side=side)
    if images is not None:
        texts, images = prepare_images(model, texts, images, cache_dir)
    texts = _check_args(texts, pooling, layers, layer_combine, batch_size)
    _check_quantize(model, quantize)
    per_row = is_task_list(task)
    if per_row:
        task = _task_per_text(task, texts)
        if not isinstance(model, TunedModel):
            raise TypeError("one task per text needs a TunedModel attached with tasks=[...]")
    regions = RegionInputs(images) if images is not None else None
    n_visual = regions.counts if regions is not None else [0] * len(texts)
    limit = _max_length(model, tokenizer, max_length, max(n_visual))
    cache = Cache(cache_dir) if cache_dir is not None else None
    if cache is not None:
        key = _cache_key(model, tokenizer, texts, dict(pooling=pooling, layers=layers, layer_combine=layer_combine,
                                                       prefix=prefix, max_length=max_length, normalize=normalize,
                                                       task=task, images=images, quantize=quantize))
        hit = cache.load_array("embeddings", key)
        if hit is not None:
            return hit
    if quantize is not None:
        model = int8_copy(model)
    encoded = []  # tokenised in slices: a fast tokenizer's encodings of a whole collection take GBs
    for start in range(0, len(texts), _TOKENIZE_SLICE):
        encoded += tokenizer([prefix + t for t in texts[start:start + _TOKENIZE_SLICE]], truncation=True,
                             max_length=limit, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    order = np.argsort([-len(ids) - r for ids, r in zip(encoded, n_visual)], kind="stable")  # longest first
    device = next(base_of(model).parameters()).device
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    show = len(batches) > 10 if progress is None else progress
    out = None
    was_training = model.training
    one_task = isinstance(model, TunedModel) and task is not None and not per_row
    model.eval()
    try:
        with model.task(task) if one_task else contextlib.nullcontext(), torch.inference_mode():
            for idx in tqdm(batches, desc="encode", unit="batch", disable=not show):
                ids, mask = pad_ids(tokenizer, [encoded[i] for i in idx])
                visual = regions.batch(idx, device) if regions is not None else None
                ids, mask = ids.to(device), mask.to(device)
                if per_row:
                    vecs = model.routed([task[i] for i in idx], lambda i, m, v: pool(
                        model, i, m, pooling, layers, layer_combine, images=v), ids, mask, visual).float()
                else:
                    vecs = pool(model, ids, mask, pooling, layers, layer_combine, images=visual).float()
                if normalize:
                    vecs = torch.nn.functional.normalize(vecs, dim=-1)
                vecs = vecs.cpu().numpy()
                if out is None:
                    out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
                out[idx] = vecs
    finally:
        model.train(was_training)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise FloatingPointError(f"{int(bad.sum())} embeddings contain NaN/inf (first: text {first}: "
                                 f"{texts[first][:60]!r}); check the model weights and dtype")
    if cache is not None:
        cache.save_array("embeddings", key, out)
    return out


def check_side(model, side) -> None:
    """``side`` is valid, and given when ``model`` tunes the query side only.

    Raises:
        ValueError: another value, or ``None`` for a query-side model.
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'query', 'passage' or None, got {side!r}")
    if side is None and getattr(model, "sides", None) == "query":
        raise ValueError("this model tunes the query side only: encode queries with side='query' and passages "
                         "with side='passage' (the frozen base)")
    if side is None and getattr(model, "sides", None) == "separate" and not model._side_held:
        raise ValueError("this model has a module per side: encode queries with side='query' and passages "
                         "with side='passage' (or inside `with tuned.side(...)`)")


def encode_side(model, side: str) -> str | None:
    """:func:`encode`'s ``side`` for ``model``: ``side`` for a model with asymmetric sides
    (``sides="query"`` or ``"separate"``), else ``None``."""
    return side if getattr(model, "sides", None) in ("query", "separate") else None


@contextlib.contextmanager
def side_model(model, side: str | None):
    """Context manager giving the model that encodes ``side``: a query-side model's frozen base
    (:meth:`petune.TunedModel.frozen_base`) for passages; a model with separate sides switched to
    ``side``'s module (:meth:`petune.TunedModel.side`, so :func:`encode` needs no ``side=``); else
    ``model`` itself.

    Raises:
        ValueError: see :func:`check_side`.
    """
    check_side(model, side)
    if isinstance(model, TunedModel) and model.is_frozen_side(side):
        with model.frozen_base() as base:
            yield base
    elif isinstance(model, TunedModel) and model.sides == "separate":
        with model.side(side):
            yield model
    else:
        yield model


#: encode() options that change the embeddings (batch_size and progress do not)
_KEYED = ("pooling", "layers", "layer_combine", "prefix", "max_length", "normalize", "task", "images", "quantize")


def _with_defaults(options: dict) -> dict:
    """encode()'s keyword options with its defaults filled in."""
    defaults = {k: p.default for k, p in inspect.signature(encode).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**defaults, **options}


def _cache_key(model, tokenizer, texts, options: dict) -> str:
    """What the embeddings depend on: weights, tokenizer, texts, the keyed options of an encode()
    call (defaults filled in, max_length as capped) and the task the model routes to."""
    return fingerprint(encoder_key(model, tokenizer, options), texts_fingerprint(texts))


def keyed_options(model, tokenizer, options: dict) -> dict:
    """The options of an encode() call that change the embeddings: defaults filled in, max_length
    as capped, the task (and side) the model routes to — none for a plain model —, images as
    their digest (JSON-serialisable)."""
    options = {k: v for k, v in _with_defaults(options).items() if k in _KEYED}
    options["max_length"] = _max_length(model, tokenizer, options["max_length"])
    if isinstance(model, TunedModel):
        if options["task"] is None:
            options["task"] = model.active_task
        if model.sides == "separate":
            options["side"] = model.active_side  # both sides' weights are in the digest: the side picks the module
    elif isinstance(options["task"], str):
        options["task"] = None  # a plain model (a query-side model's frozen base) has no tasks: encode() ignores it
    if options["images"] is not None:
        options["images"] = images_digest(options["images"])
    return options


def encoder_key(model, tokenizer, options: dict) -> str:
    """A digest of what embeddings depend on besides the texts: the weights the pooling reads,
    the tokenizer and :func:`keyed_options`."""
    options = keyed_options(model, tokenizer, options)
    tok = [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
           len(tokenizer) if hasattr(tokenizer, "__len__") else None]  # added tokens change the ids
    return fingerprint(_weights_key(model, _decoder_only(model, options["pooling"])), tok, options)


def _weights_key(model, exclude) -> str:
    """:func:`petune.cache.weights_fingerprint`; for a tuned model's base with its method switched
    off (:meth:`petune.TunedModel.frozen_base`), the digest of the model before the method was
    attached — its class, its parameter names (peft's ``base_layer`` taken out), without the
    method's tensors — so that the frozen model's cached embeddings and stores are found."""
    method_tensors = getattr(model, "_petune_method_tensors", None)
    if method_tensors is None:
        return weights_fingerprint(model, exclude=exclude)
    skip = method_tensors | {id(t) for t in exclude}
    named = [(n.replace(".base_layer", ""), t) for n, t in [*model.named_parameters(), *model.named_buffers()]
             if id(t) not in skip]
    return tensors_fingerprint(getattr(model, "_petune_base_class", type(model).__name__), named)


def _decoder_only(model, pooling: str) -> list:
    """The decoder's own parameters and buffers (not those it shares with the encoder, such as tied
    embeddings): pooling encoder states never runs them, so the cache key leaves them out and a
    decoder initialised from another seed (BERT2BERT's new cross-attention) still hits the cache."""
    if pooling == "decoder":
        return []
    base = base_of(model)
    if not hasattr(base, "get_decoder"):
        return []
    encoder, decoder = base.get_encoder(), base.get_decoder()
    shared = {id(t) for t in [*encoder.parameters(), *encoder.buffers()]}
    return [t for t in [*decoder.parameters(), *decoder.buffers()] if id(t) not in shared]


def encode_sharded(model, tokenizer, texts, *, gather_to: str = "main", cache_dir: str | os.PathLike | None = None,
                   progress: bool | None = None, **options) -> np.ndarray | None:
    """:func:`encode` split across the processes of an ``accelerate launch`` / ``torchrun`` run.

    Every process must call it with the same texts. The texts are dealt to the processes in order
    of length (longest first, like cards), so each gets about the same work whatever the input
    order; each process encodes ``ceil(n / processes)`` texts (padded by repeating one of its own,
    so that the collectives see equal shapes); the blocks are gathered, put back in input order and
    the padding is cut. With one process it is :func:`encode`.

    Args:
        gather_to: ``"main"`` — the embeddings arrive on the main process only (others get
            ``None``; what a recipe that scores on rank 0 needs); ``"all"`` — on every process.
        cache_dir: as in :func:`encode`; the main process decides hit or miss for everyone, and
            writes the entry.
        progress: the main process's bar (the others never show one).
        **options: :func:`encode`'s keyword arguments (pooling, prefix, max_length, task, ...).

    Returns:
        ``[len(texts), d]`` float32 in input order, or ``None`` off the main process with
        ``gather_to="main"``.

    Raises:
        ValueError: bad ``gather_to``; everything :func:`encode` raises.
    """
    from accelerate.utils import broadcast_object_list

    from .dist import gather_rows, process_state, shard_indices, unshard

    if gather_to not in ("main", "all"):
        raise ValueError(f"gather_to must be 'main' or 'all', got {gather_to!r}")
    side = options.pop("side", None)
    if isinstance(model, TunedModel) and model.is_frozen_side(side):
        with side_model(model, side) as base:
            return encode_sharded(base, tokenizer, texts, gather_to=gather_to, cache_dir=cache_dir, progress=progress,
                                  **options)
    check_side(model, side)
    if isinstance(model, TunedModel) and model.switches_side(side):
        with model.side(side):  # the side's module for the cache key and every process's encode
            return encode_sharded(model, tokenizer, texts, gather_to=gather_to, cache_dir=cache_dir,
                                  progress=progress, side=side, **options)
    options["side"] = side
    state = process_state()
    if state.num_processes == 1:
        return encode(model, tokenizer, texts, cache_dir=cache_dir, progress=progress, **options)
    o = _with_defaults(options)
    images = o["images"]
    if images is not None:  # every process extracts the features (or reads them from the cache)
        texts, images = prepare_images(model, texts, images, cache_dir)
        options = {**options, "images": images}
    texts = _check_args(texts, o["pooling"], o["layers"], o["layer_combine"], o["batch_size"])
    cached = None
    if cache_dir is not None:
        # main looks the entry up (encode() with a cache hit never runs the model), then tells the others
        found = [None]
        if state.is_main_process:
            key = _cache_key(model, tokenizer, texts, options)
            found = [key if Cache(cache_dir).has("embeddings", key, ".npy") else None]
        broadcast_object_list(found)
        if found[0] is not None:
            if state.is_main_process:
                cached = Cache(cache_dir).load_array("embeddings", found[0])
            if gather_to == "all":
                cached = broadcast_object_list([cached])[0]
            return cached
    lengths = [len(t) for t in texts]  # characters: a cheap proxy of each text's encoding cost
    rows, _ = shard_indices(lengths, state.num_processes, state.process_index)
    if images is not None:
        options["images"] = [images[i] for i in rows]
    if is_task_list(options.get("task")):  # one task per text: each process takes its rows' tasks
        tasks = _task_per_text(options["task"], texts)
        options["task"] = [tasks[i] for i in rows]
    local = encode(model, tokenizer, [texts[i] for i in rows],
                   progress=progress if state.is_main_process else False, **options)
    gathered = gather_rows(local, to_all=gather_to == "all")
    if gathered is None:
        return None
    out = unshard(gathered, lengths, state.num_processes)
    if cache_dir is not None and state.is_main_process:
        Cache(cache_dir).save_array("embeddings", key, out)
    return out

