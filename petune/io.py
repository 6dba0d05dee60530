"""Save and load the tuned parameters only: ``model.safetensors`` + ``petune.json``, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .atomic import atomic_dir
from .models import d_model, model_type, num_layers
from .parts import part_class
from .tuned import TunedModel, attach, base_of

CONFIG_NAME = "petune.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: added parts under "parts" (1 had the visual embedding's options under "visual")


def _fingerprint(base: nn.Module) -> dict:
    """What a fresh base model must match for saved parameters to fit it."""
    return {"class": getattr(base, "_petune_base_class", type(base).__name__), "model_type": model_type(base),
            "d_model": d_model(base),
            "num_layers": num_layers(base)}


def save(tuned: TunedModel, path: str | os.PathLike) -> Path:
    """Write the tuned parameters of ``tuned`` (never the base weights) to the directory ``path``.

    Files: ``model.safetensors`` (parameter names as in ``tuned.model``, original dtypes) and
    ``petune.json`` (method, resolved options, tasks, sides, base-model fingerprint, parameter shapes, the
    added parts' kinds, modules and options (the visual embedding's): enough for :func:`load` to
    re-attach the method, and re-add the parts, to a fresh base model). The directory is
    built beside ``path`` and renamed into place, so an interrupted save leaves either the old
    directory or the new one, never a mix. For the library's own format use ``tuned.model``
    (``save_pretrained`` for peft, ``save_all_adapters`` for adapters).

    Returns:
        The directory path.

    Raises:
        TypeError: ``tuned`` is not a :class:`TunedModel`.
        ValueError: the method's options are not JSON-serialisable, or ``path`` exists and is not
            a petune directory (it is never overwritten then).
    """
    from safetensors.torch import save_file

    if not isinstance(tuned, TunedModel):
        raise TypeError(f"save() takes the TunedModel returned by petune.attach, got {type(tuned).__name__}")
    path = Path(path)
    if path.exists() and not (path.is_dir() and (path / CONFIG_NAME).exists() or _is_empty_dir(path)):
        raise ValueError(f"{path} exists and is not a petune directory; choose a new path or remove it")
    params = tuned.tuned_parameters()
    config = {
        "format_version": FORMAT_VERSION,
        "method": tuned.method.name,
        "options": tuned.method.options,
        "tasks": tuned.tasks,
        "shared": tuned.shared,
        "base": _fingerprint(tuned.base_model),
        "parameters": {n: list(p.shape) for n, p in params.items()},
    }
    if tuned.extra_parts:
        config["parts"] = _parts_config(tuned)
    if tuned.sides is not None:
        config["sides"] = tuned.sides
    try:
        text = json.dumps(config, indent=2)
    except TypeError as e:
        raise ValueError(f"cannot save: the options of method {tuned.method.name!r} are not "
                         f"JSON-serialisable ({e})") from None
    with atomic_dir(path) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, tmp / WEIGHTS_NAME,
                  metadata={"format": "pt", "petune_method": tuned.method.name})
        (tmp / CONFIG_NAME).write_text(text)
    return path


def _parts_config(tuned: TunedModel) -> dict:
    """``{kind: {"module", "options"}}`` of the added parts: where each registers, and its options."""
    return {kind: {"module": type(part).__module__, "options": part.options}
            for kind, part in tuned.extra_parts.items()}


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def read_config(path: str | os.PathLike) -> dict:
    """The ``petune.json`` of a saved directory.

    Raises:
        FileNotFoundError: ``path`` holds no petune save.
    """
    file = Path(path) / CONFIG_NAME
    if not file.exists():
        raise FileNotFoundError(f"{path} is not a petune save: no {CONFIG_NAME} (write one with petune.save)")
    return json.loads(file.read_text())


def load(model: nn.Module, path: str | os.PathLike) -> TunedModel:
    """Restore parameters written by :func:`save`.

    Args:
        model: a fresh base model of the same architecture (the method is re-attached from
            ``petune.json``), or a :class:`TunedModel` with the same method, options and tasks.

    Returns:
        The tuned model; its outputs are bit-identical to the saved one's.

    Raises:
        FileNotFoundError: no petune save at ``path``.
        ValueError: the save is for another method, options, tasks, architecture or shapes.
            Architecture, method, options and tasks are checked before anything is attached;
            shapes before any value is copied.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    config = read_config(path)
    expected = config["base"]
    found = _fingerprint(base_of(model))
    if found != expected:
        diff = {k: (expected[k], found.get(k)) for k in expected if expected[k] != found.get(k)}
        raise ValueError(f"{path} was saved for another base model: (saved, given) = {diff}")
    with safe_open(Path(path) / WEIGHTS_NAME, framework="pt") as f:
        saved_shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    if saved_shapes != config["parameters"]:
        raise ValueError(f"{path} is inconsistent: {WEIGHTS_NAME} does not match {CONFIG_NAME}")

    saved_parts = config.get("parts") or {}
    if config.get("visual") is not None:  # format 1
        saved_parts = {"visual": {"module": "petune.vision", "options": config["visual"]}}
    if isinstance(model, TunedModel):
        got = {"method": model.method.name, "options": model.method.options, "tasks": model.tasks,
               "shared": model.shared, "sides": model.sides,
               "parts": {k: e["options"] for k, e in _parts_config(model).items()}}
        want = {**{k: config.get(k) for k in got if k != "parts"},
                "parts": {k: e["options"] for k, e in saved_parts.items()}}
        if json.loads(json.dumps(got)) != want:
            raise ValueError(f"{path} holds parameters for {want}, but the model has {got}; "
                             "load it into a fresh base model instead")
        tuned = model
    else:
        tuned = attach(model, config["method"], tasks=config["tasks"], shared=config["shared"],
                       sides=config.get("sides"), **config["options"])
        for kind, entry in saved_parts.items():  # each part's own module rebuilds it from its options
            part_class(kind, entry["module"]).from_options(tuned, **entry["options"])
    params = tuned.tuned_parameters()
    shapes = {n: list(p.shape) for n, p in params.items()}
    if shapes != saved_shapes:
        missing = sorted(set(shapes) - set(saved_shapes))[:3]
        unexpected = sorted(set(saved_shapes) - set(shapes))[:3]
        wrong = sorted(n for n in set(shapes) & set(saved_shapes) if shapes[n] != saved_shapes[n])[:3]
        raise ValueError(f"{path} does not fit this model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatch {wrong}")
    state = load_file(Path(path) / WEIGHTS_NAME)
    for name, param in params.items():
        param.data.copy_(state[name].to(param.dtype))
    return tuned
