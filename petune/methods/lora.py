"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), from peft."""

from __future__ import annotations

from ..models import default_targets
from .registry import register_method
from ._peft import PeftMethod, module_list, positive_int


@register_method("lora")
class LoRA(PeftMethod):
    """Low-rank updates ``W + (alpha / r) · B A`` on the target linear layers (``peft.LoraConfig``).

    Options:
        r: LoRA rank (default 8).
        alpha: scaling numerator ``lora_alpha`` (default 8, peft's default).
        dropout: dropout on the LoRA input, in [0, 1) (default 0.0).
        target_modules: module-name suffixes to adapt; default per architecture from peft's table
            (T5 ``q, v``; BART-family ``q_proj, v_proj``; BERT2BERT ``query, value``), which also
            covers the decoder's cross-attention.

    Trainable parameters: ``r · (in + out)`` per target layer (884,736 for r=8 on T5-base q, v).

    Raises:
        ValueError: non-positive ``r`` or ``alpha``, ``dropout`` outside [0, 1), or no default
            target modules for the architecture.
    """

    markers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, r=8, alpha=8, dropout=0.0, target_modules=None):
        positive_int("r (LoRA rank)", r)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise ValueError(f"alpha (lora_alpha) must be a positive number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        super().__init__(r=r, alpha=alpha, dropout=float(dropout),
                         target_modules=module_list("target_modules", target_modules))

    def validate(self, model):
        if self.options["target_modules"] is None:
            self.options["target_modules"] = default_targets(model, "lora")["target_modules"]

    routing = "native"

    def route(self, model, row_modules):
        """peft's mixed-batch LoRA (``adapter_names``, one adapter per row), in eval mode; peft
        refuses it in training mode, where petune runs each task's rows separately instead."""
        if model.training:
            return None
        # the context PeftModel.forward opens for adapter_names=...; entered directly so that the
        # encoder alone can be called under it
        return model._enable_peft_forward_hooks(adapter_names=list(row_modules))

    def peft_config(self, model):
        from peft import LoraConfig

        o = self.options
        return LoraConfig(r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"],
                          target_modules=list(o["target_modules"]), task_type=self.task_type(model))
