"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), from the ``adapters`` library
where it supports the architecture, else petune's own bottleneck (:mod:`petune.methods.bottleneck`)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter

from ..models import ADAPTERS_SUPPORTED, d_model, find_layout, model_type
from .registry import register_method
from .base import Method, module_after
from .bottleneck import CONTAINER, BottleneckHooks

PLACEMENTS = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig"}


def _NO_ACTIVE_ADAPTER(record) -> bool:
    """A logging filter: drop the adapters library's warning that no adapter is active."""
    return "none are activated" not in record.getMessage()


@register_method("adapter")
class BottleneckAdapter(Method):
    """Down-project → non-linearity → up-project, added with a residual in every layer.

    ``placement="pfeiffer"`` (``adapters.SeqBnConfig``): one adapter after each feed-forward
    block. ``placement="houlsby"`` (``adapters.DoubleSeqBnConfig``): one after self-attention and
    one after the feed-forward block (for BERT2BERT the adapters library also adds one after the
    decoder's cross-attention, since BERT shares the output class). Encoder and decoder layers
    both get adapters.

    Architectures: the ``adapters`` library's implementation (its parameter names and files) for
    T5, mT5, BART, mBART, PLBart and ``EncoderDecoderModel``; on every other encoder-decoder
    (Pegasus, Marian, LongT5, UMT5, SwitchTransformers, Blenderbot, M2M100, NLLB-MoE, LED, ...)
    petune inserts the same bottleneck with forward hooks after the output projection of each
    layer's feed-forward block (after the expert block in mixture-of-experts layers) and, for
    Houlsby, of its self-attention — found by structure (:func:`petune.models.find_layout`;
    ``petune.models.describe(model)`` prints where). Same sizes, same parameter count.

    Size, exactly one of:
        d: bottleneck width; must divide the model's ``d_model`` (the adapters library sizes
           bottlenecks by ``reduction_factor = d_model / d``). A ``d`` that does not divide raises,
           naming the nearest valid widths, so the size you ask for is the size you get.
        reduction_factor: ``d = d_model // reduction_factor`` (the adapters library's rule; a
           factor that does not divide ``d_model`` warns and floors).

    Other options: ``non_linearity`` (default ``"relu"``).

    Trainable parameters per adapter: ``2 · d_model · d + d + d_model`` (T5-base, reduction
    factor 8: 148,320 per layer, 3,559,680 Pfeiffer, 7,119,360 Houlsby).

    Raises:
        ValueError: both or neither of ``d`` / ``reduction_factor``; a non-positive size; ``d`` that
            does not divide ``d_model``; an unknown placement; an architecture whose layers cannot
            be found by structure (the message lists the linear modules present).
    """

    library = "adapters"
    routing = "native"  # the adapters library's BatchSplit, or petune's hooks per row

    def __init__(self, d=None, reduction_factor=None, placement="pfeiffer", non_linearity="relu"):
        if (d is None) == (reduction_factor is None):
            raise ValueError(
                "give the adapter size as exactly one of d (bottleneck width, e.g. d=96) "
                f"or reduction_factor (e.g. reduction_factor=8); got d={d!r}, reduction_factor={reduction_factor!r}"
            )
        for key, value in (("d", d), ("reduction_factor", reduction_factor)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        if d is not None and int(d) != d:
            raise ValueError(f"d must be a whole number of dimensions, got {d!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {placement!r}")
        super().__init__(d=None if d is None else int(d), reduction_factor=reduction_factor,
                         placement=placement, non_linearity=non_linearity)

    def validate(self, model):
        width = d_model(model)
        d, rf = self.options["d"], self.options["reduction_factor"]
        if d is not None:
            if d > width or width % d:
                valid = [k for k in range(1, width + 1) if width % k == 0]
                nearest = sorted(valid, key=lambda k: (abs(k - d), k))[:2]
                raise ValueError(
                    f"d={d} does not divide d_model={width}; the adapters library sizes bottlenecks by "
                    f"d_model / d. Nearest valid widths: {sorted(nearest)} (or pass reduction_factor)."
                )
            self.rf = width // d
        else:
            if width % rf:
                warnings.warn(f"reduction_factor={rf} does not divide d_model={width}: bottleneck "
                              f"width is floor({width} / {rf}) = {int(width // rf)}", stacklevel=3)
            if width // rf < 1:
                raise ValueError(f"reduction_factor={rf} leaves no bottleneck on d_model={width}")
            self.rf = rf
        self.width = int(width // self.rf)
        self.library = "adapters" if model_type(model) in ADAPTERS_SUPPORTED else "petune"
        if self.library == "petune":
            self.places = self._places(model)

    def _places(self, model) -> dict[str, int]:
        """``{module path: output width}`` after which a bottleneck goes, found by structure."""
        layout = find_layout(model)
        places = {}
        for layer in layout.layers:
            if layer.ffn_block is None:
                raise ValueError(f"no feed-forward block found in {layer.path}; bottleneck adapters need one")
            if self.options["placement"] == "houlsby":
                places.update({out: layout.d_model for out in layer.self_out})
            places[layer.ffn_block] = layout.d_model  # find_layout picks projections to d_model only
        return places

    def attach(self, model, modules):
        self._modules = set(modules)
        if self.library == "petune":
            self.hooks = BottleneckHooks(model, self.places, modules, self.width, self.options["non_linearity"])
            return model
        import adapters

        config_cls = getattr(adapters, PLACEMENTS[self.options["placement"]])
        config = config_cls(reduction_factor=self.rf, non_linearity=self.options["non_linearity"])
        was_training = model.training
        adapters.init(model)
        log = logging.getLogger("adapters.model_mixin")
        level = log.level
        log.setLevel(logging.ERROR)  # "none are activated" notices: petune activates one just below
        try:
            for module in modules:
                model.add_adapter(module, config=config)
            model.train_adapter(modules[0])  # the library's own freezing; petune re-enables every module
        finally:
            log.setLevel(level)
        model.train(was_training)
        return model

    def module_of(self, param_name):
        return module_after(param_name, (CONTAINER,) if self.library == "petune" else ("adapters",), self._modules)

    def activate(self, model, module):
        if self.library == "petune":
            self.hooks.active = module
        else:
            model.set_active_adapters(module)

    @contextlib.contextmanager
    def disabled(self, model):
        """No adapter active (the adapters library's ``set_active_adapters(None)``, or petune's
        hooks passing states through), then the previous ones again."""
        if self.library == "petune":
            previous, self.hooks.active = self.hooks.active, None
            try:
                yield
            finally:
                self.hooks.active = previous
            return
        quiet = logging.getLogger("adapters.model_mixin")
        quiet.addFilter(_NO_ACTIVE_ADAPTER)  # "none are activated": meant, here (switching warns too)
        previous = model.active_adapters
        model.set_active_adapters(None)
        try:
            yield
        finally:
            model.set_active_adapters(previous)
            quiet.removeFilter(_NO_ACTIVE_ADAPTER)

    def merged(self, model, module):
        raise ValueError("bottleneck adapters are non-linear layers that no transformers architecture has, so they "
                         "cannot be merged into the weights or loaded by plain transformers; save with "
                         "petune.save(tuned, path) and load with petune.load(model, path) (the adapters library "
                         "can also load them: model.save_adapter / load_adapter), or use LoRA / (IA)^3, which export "
                         "merged")

    @contextlib.contextmanager
    def route(self, model, row_modules):
        """Rows arrive grouped by module: the adapters library's ``BatchSplit`` over the groups'
        sizes, or petune's bottleneck hooks applying each module to its rows."""
        if self.library == "petune":
            self.hooks.row_modules = list(row_modules)
            try:
                yield
            finally:
                self.hooks.row_modules = None
            return
        from adapters.composition import BatchSplit

        groups = Counter(row_modules)  # first-appearance order: the order the rows come in
        previous = model.active_adapters
        model.set_active_adapters(BatchSplit(*groups, batch_sizes=list(groups.values())))
        try:
            yield
        finally:
            model.set_active_adapters(previous)
