"""Shared seam for the methods that come from peft (prompt tuning, LoRA, (IA)^3)."""

from __future__ import annotations

from ..models import can_generate
from .base import Method, module_after


class PeftMethod(Method):
    """Wraps ``peft.get_peft_model``: one peft adapter per module name, switched with ``set_adapter``."""

    library = "peft"
    routing = "split"  # peft mixes adapters in one batch for LoRA only (see LoRA.route)
    #: parameter-name parts that peft puts right before the adapter name
    markers: tuple[str, ...] = ()

    def peft_config(self, model):
        raise NotImplementedError

    @staticmethod
    def task_type(model):
        from peft import TaskType

        # Bare T5Model / BartModel cannot generate; peft's seq2seq wrapper needs generation hooks.
        return TaskType.SEQ_2_SEQ_LM if can_generate(model) else TaskType.FEATURE_EXTRACTION

    def attach(self, model, modules):
        from peft import get_peft_model

        wrapped = get_peft_model(model, self.peft_config(model), adapter_name=modules[0])
        for module in modules[1:]:
            wrapped.add_adapter(module, self.peft_config(model))
        self._modules = set(modules)
        return wrapped

    def module_of(self, param_name):
        return module_after(param_name, self.markers, self._modules)

    def activate(self, model, module):
        model.set_adapter(module)

    def disabled(self, model):
        return model.disable_adapter()  # peft's own switch: the base layers alone

    def merged(self, model, module):
        """peft's ``merge_and_unload`` of ``module`` on a copy: the update folded into the weights
        (LoRA: ``W + (alpha / r) · B A``; (IA)^3: the scaling vectors multiplied in)."""
        import copy
        import warnings

        clone = copy.deepcopy(model)
        clone.set_adapter(module)
        with warnings.catch_warnings():
            # peft compares the encoder's input embeddings with the decoder's output ones: in an
            # EncoderDecoderModel they were never one tensor, so "no longer tied" is no news
            warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
            return clone.merge_and_unload(adapter_names=[module])

    def unloaded(self, model):
        """peft's ``unload`` on a copy: the base layers, every adapter removed, nothing merged."""
        import copy

        return copy.deepcopy(model).unload()


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def module_list(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a non-empty list of module names, got {value!r}")
    return value
