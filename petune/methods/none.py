"""The frozen base model as a method: nothing added, nothing trainable."""

from __future__ import annotations

import contextlib

from .registry import register_method
from .base import Method


@register_method("none")
class NoMethod(Method):
    """Attaches nothing: the base model stays as it is and fully frozen.

    For baselines that should go through the same code as the tuned rows (encode, scoring, a
    :class:`petune.train.Trainer` that trains only a task loss's own parameters), and for
    VL-Adapter's "visual projection only" row: ``petune.vision.add_visual`` on top of it trains the
    visual embedding alone. No options; one shared module (attach with ``tasks=..., shared=True``
    for task names).
    """

    library = "transformers"
    per_task = False
    adds_parameters = False

    def attach(self, model, modules):
        return model

    def module_of(self, param_name):
        return None

    def disabled(self, model):
        return contextlib.nullcontext()  # nothing to switch off

    def merged(self, model, module):
        return model  # nothing attached: the base model is what export writes

    def unloaded(self, model):
        return model
