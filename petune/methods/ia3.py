"""(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"), from peft."""

from __future__ import annotations

from ..models import default_targets
from .registry import register_method
from ._peft import PeftMethod, module_list


@register_method("ia3")
class IA3(PeftMethod):
    """Learned vectors that rescale keys, values and feed-forward activations (``peft.IA3Config``).

    Options:
        target_modules: modules whose activations are rescaled; default per architecture from
            peft's table (T5 ``k, v, wo``; BART-family ``q_proj, v_proj, fc2``).
        feedforward_modules: the subset of ``target_modules`` scaled on their *input* (T5 ``wo``);
            default from peft's table with the default targets, ``[]`` with user targets.

    Trainable parameters: one vector per target module (129,024 on T5-base with the defaults).

    Raises:
        ValueError: no default for the architecture, or ``feedforward_modules`` not a subset of
            ``target_modules``.
    """

    markers = ("ia3_l",)

    def __init__(self, target_modules=None, feedforward_modules=None):
        targets = module_list("target_modules", target_modules)
        ff = module_list("feedforward_modules", feedforward_modules) if feedforward_modules else None
        if targets is not None and ff is not None and not set(ff) <= set(targets):
            raise ValueError(f"feedforward_modules {ff} must be a subset of target_modules {targets}")
        if targets is not None and ff is None:
            ff = []
        super().__init__(target_modules=targets, feedforward_modules=ff)

    def validate(self, model):
        if self.options["target_modules"] is None:
            defaults = default_targets(model, "ia3")
            if self.options["feedforward_modules"] not in (None, []) and not set(
                self.options["feedforward_modules"]
            ) <= set(defaults["target_modules"]):
                raise ValueError(
                    f"feedforward_modules must be a subset of the default target_modules "
                    f"{defaults['target_modules']}; pass target_modules too"
                )
            self.options["target_modules"] = defaults["target_modules"]
            if self.options["feedforward_modules"] is None:
                self.options["feedforward_modules"] = defaults["feedforward_modules"]

    def peft_config(self, model):
        from peft import IA3Config

        return IA3Config(target_modules=list(self.options["target_modules"]),
                         feedforward_modules=list(self.options["feedforward_modules"]),
                         task_type=self.task_type(model))
