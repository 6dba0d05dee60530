"""The Method protocol every registered method implements, and the wrapper for plain functions."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..models import input_embeddings


class Method:
    """One parameter-efficient tuning method, as a thin seam over the library that implements it.

    Subclasses set ``library`` and override:

    - ``__init__(**options)`` — validate the options (raise ``ValueError`` on bad ones) and store
      them, defaults filled in, in ``self.options`` (JSON-serialisable: saved with the parameters);
    - ``validate(model)`` — check the options against the model *before* it is touched;
    - ``attach(model, modules)`` — add one module per name in ``modules`` and return the model to
      use from now on (the same object, or a wrapper such as a ``peft.PeftModel``);
    - ``module_of(param_name)`` — the module a parameter belongs to, ``None`` for base parameters;
    - ``activate(model, module)`` — make ``module`` the one used by the next forward;
    - ``encoder_output(model, input_ids, attention_mask, output_hidden_states)`` — if the method
      changes what the encoder sees (prompt tuning);
    - optionally ``routing`` / ``route(model, row_modules)`` — one task per row in one call
      (:meth:`petune.TunedModel.routed`), and ``merged(model, module)`` — a plain transformers
      model for :func:`petune.export`.

    ``attach`` is called with every base parameter already frozen; petune then marks exactly the
    parameters for which ``module_of`` names a module as trainable.
    """

    name: ClassVar[str] = ""
    library: ClassVar[str] = ""
    #: False for methods that can only give one module shared by all tasks.
    per_task: ClassVar[bool] = True
    #: False for methods that add no parameters of their own (``"none"``).
    adds_parameters: ClassVar[bool] = True
    #: Per-example task routing (:meth:`petune.TunedModel.routed`): ``"native"`` (:meth:`route`
    #: gives a mixed-batch mechanism), ``"split"`` (petune runs each module's rows separately,
    #: switching with :meth:`activate`), or ``None``: not supported, a clear error.
    routing: ClassVar[str | None] = None

    def __init__(self, **options):
        self.options = dict(options)

    def validate(self, model: nn.Module) -> None:
        pass

    def attach(self, model: nn.Module, modules: list[str]) -> nn.Module:
        raise NotImplementedError

    def module_of(self, param_name: str) -> str | None:
        raise NotImplementedError

    def activate(self, model: nn.Module, module: str) -> None:
        pass

    #: whether :meth:`disabled` can switch the method off (a query-side-only model needs it)
    can_disable: ClassVar[bool] = True

    def disabled(self, model: nn.Module):
        """A context manager under which ``model`` computes what the base model computes, the
        method switched off (the frozen passage side of ``attach(..., sides="query")``)."""
        raise NotImplementedError

    def route(self, model: nn.Module, row_modules: list[str]):
        """A context manager under which one forward sends row ``i`` through ``row_modules[i]``
        (rows arrive grouped by module), or ``None`` to have petune run each module's rows
        separately. The default: ``None``."""
        return None

    def merged(self, model: nn.Module, module: str) -> nn.Module:
        """A plain Hugging Face model computing what ``model`` computes with ``module`` active,
        for :func:`petune.export`; ``model`` itself must stay usable (work on a copy).

        Raises:
            ValueError: the method cannot be expressed in the base architecture's own weights
                (the message says what to use instead).
        """
        raise ValueError(f"method {self.name!r} cannot be exported to a plain transformers model; save it with "
                         "petune.save(tuned, path) and load it with petune.load(model, path)")

    def unloaded(self, model: nn.Module) -> nn.Module:
        """A plain Hugging Face model computing the base model's output, the method removed, for
        :func:`petune.export` of a query-side model's passage side; ``model`` stays usable.

        Raises:
            ValueError: the method cannot be removed from a copy (the message says what to use).
        """
        raise ValueError(f"method {self.name!r} cannot be removed from a copy of the model; export the frozen base "
                         "model itself (the one given to petune.attach, before attaching) for the passage side")

    def base_model(self, model: nn.Module) -> nn.Module:
        """The Hugging Face model underneath whatever ``attach`` returned."""
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def prefix_length(self) -> int:
        """Positions the method puts before the input tokens in the encoder (prompt tuning's
        virtual tokens); 0 for methods that leave the input alone."""
        return 0

    def encoder_output(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       output_hidden_states: bool = False, extra=None):
        """Encoder output for a batch and the mask that goes with it.

        Args:
            extra: ``None``, or ``(embeds [batch, tokens, d_model], mask [batch, tokens])``: an
                added part's tokens (e.g. the visual embedding's) that follow each row's text
                (see :func:`join_tokens`).

        Returns:
            ``(output, mask)``: a transformers ``BaseModelOutput`` (``last_hidden_state``
            ``[batch, seq, d_model]``; ``hidden_states`` per layer if asked) and ``[batch, seq]``.
        """
        base = self.base_model(model)
        encoder = base.get_encoder()
        if extra is None:
            out = encoder(input_ids=input_ids, attention_mask=attention_mask,
                          output_hidden_states=output_hidden_states, return_dict=True)
            return out, attention_mask
        embeds, mask = join_tokens(input_embeddings(base, input_ids), attention_mask, *extra)
        out = encoder(input_ids=None, inputs_embeds=embeds, attention_mask=mask,
                      output_hidden_states=output_hidden_states, return_dict=True)
        return out, mask


def join_tokens(embeds: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor, extra_mask: torch.Tensor):
    """Put each row's ``extra`` tokens right after its own tokens, padding last.

    Args:
        embeds, mask: ``[batch, seq, d]`` and ``[batch, seq]`` (text, right-padded).
        extra, extra_mask: ``[batch, tokens, d]`` and ``[batch, tokens]`` (a part's tokens, e.g.
            visual ones; a row without any has an all-zero mask).

    Returns:
        ``([batch, seq', d], [batch, seq'])`` with ``seq' ≤ seq + regions`` (trailing all-padding
        columns cut). Valid positions come first in their order, so a row's positions do not
        depend on the other rows of the batch: a text-only row comes out as it went in.
    """
    embeds = torch.cat([embeds, extra.to(embeds.dtype)], dim=1)
    mask = torch.cat([mask, extra_mask.to(mask.dtype)], dim=1)
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # valid first, order kept
    mask = mask.gather(1, order)
    embeds = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    keep = max(int(mask.sum(1).max()), 1)
    return embeds[:, :keep], mask[:, :keep]


def module_after(param_name: str, markers: tuple[str, ...], modules: set[str]) -> str | None:
    """The name that follows one of ``markers`` in a dotted parameter name, if it is a module.

    ``decoder.block.0.layer.0.SelfAttention.q.lora_A.vqa.weight`` with marker ``lora_A`` → ``vqa``.
    """
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in markers and parts[i + 1] in modules:
            return parts[i + 1]
    return None


class FunctionMethod(Method):
    """A method registered as a plain function ``fn(model, **options)``: one shared module."""

    per_task = False
    can_disable = False  # what the function changed cannot be switched off
    library = "user"
    function = None  # set by register_method

    def attach(self, model, modules):
        result = type(self).function(model, **self.options)
        model = model if result is None else result
        self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if not self._trainable:
            raise ValueError(
                f"method {self.name!r} left no parameter trainable: the function must add parameters "
                "or set requires_grad=True on the ones to tune (petune freezes the base first)"
            )
        self._module = modules[0]
        return model

    def module_of(self, param_name):
        return self._module if param_name in self._trainable else None
