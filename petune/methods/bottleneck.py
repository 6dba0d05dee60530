"""petune's own bottleneck adapters, for the encoder-decoders the ``adapters`` library does not cover.

The same bottleneck as the library's (Houlsby et al., 2019; Pfeiffer et al., 2021): down-projection,
non-linearity, up-projection, plus the input — inserted by forward hooks on the output of each
layer's feed-forward block (Pfeiffer) and also of its self-attention (Houlsby), where
:func:`petune.models.find_layout` found them. Weights are initialised like the library's default
(``init_weights="bert"``: normal, std 0.02). Parameters live in one ``petune_bottlenecks`` module
on the model, ``petune_bottlenecks.<module>.<place>.{down,up}.{weight,bias}``; the base model's own
parameter names are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

CONTAINER = "petune_bottlenecks"


class Bottleneck(nn.Module):
    """``x + up(f(down(x)))``: ``[..., d_model]`` → ``[..., d_model]``; ``2·d_model·d + d + d_model``
    parameters."""

    def __init__(self, d_model: int, d: int, non_linearity: str = "relu"):
        from transformers.activations import get_activation

        super().__init__()
        self.down, self.up = nn.Linear(d_model, d), nn.Linear(d, d_model)
        self.act = get_activation(non_linearity)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class BottleneckHooks:
    """Adds one :class:`Bottleneck` per module name at each place (a submodule path of the model)
    and routes each place's output through the active module's bottleneck.

    Args:
        model: the Hugging Face model; gets a ``petune_bottlenecks`` submodule.
        places: ``{submodule path: d_model of its output}``.
        modules: module (task) names; d, non_linearity: the bottleneck's size and activation.
    """

    def __init__(self, model: nn.Module, places: dict[str, int], modules: list[str], d: int, non_linearity: str):
        self.active: str | None = modules[0]
        self.row_modules: list[str] | None = None  # one module per row of the batch (per-example routing)
        self.slots = {path: path.replace(".", "-") for path in places}  # ModuleDict keys cannot hold dots
        container = nn.ModuleDict({m: nn.ModuleDict({self.slots[p]: Bottleneck(width, d, non_linearity)
                                                      for p, width in places.items()}) for m in modules})
        reference = next(model.parameters())
        model.add_module(CONTAINER, container.to(device=reference.device))
        self.container = container
        self.handles = [model.get_submodule(path).register_forward_hook(self._hook(self.slots[path]))
                        for path in places]

    def _hook(self, slot: str):
        def hook(module, args, output):
            states = output[0] if isinstance(output, tuple) else output  # MoE blocks: (states, router outputs)
            if self.row_modules is None:
                if self.active is None:  # switched off (Method.disabled)
                    return output
                states = self.container[self.active][slot](states)
            else:
                states = self._per_row(states, slot)
            return (states,) + output[1:] if isinstance(output, tuple) else states

        return hook

    def _per_row(self, states: torch.Tensor, slot: str) -> torch.Tensor:
        """``[batch, seq, d]`` with row ``i`` through ``row_modules[i]``'s bottleneck."""
        out = torch.empty_like(states)
        for m in dict.fromkeys(self.row_modules):
            rows = torch.tensor([i for i, r in enumerate(self.row_modules) if r == m], device=states.device)
            out[rows] = self.container[m][slot](states[rows])
        return out
