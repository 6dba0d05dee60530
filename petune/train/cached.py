"""Cached contrastive losses (GradCache: Gao et al., 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup"; sentence-transformers' CachedMultipleNegativesRankingLoss is the
same scheme): an effective batch of ``B`` rows in the memory of a mini-batch of ``m``.

1. Embed the batch ``m`` rows at a time without a graph, recording each mini-batch's RNG state.
2. Compute the loss on those embeddings (detached leaves) and its gradient with respect to them
   (and to the loss's own parameters, e.g. a learnable temperature); under several processes the
   all-gather of the embeddings sends each copy's gradient home here, as in the uncached loss.
3. When the training loop back-propagates the returned loss, a hook embeds each mini-batch again
   with its RNG state replayed (same dropout) and the same autocast, and back-propagates the
   cached gradient through it.

The gradient equals the uncached loss's on the same batch (dropout included); the price is one
extra forward. Only ``m`` rows' activations are alive at a time.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..embed import pool_inputs
from ..tuned import TunedModel


def split_inputs(inputs: dict, size: int) -> list[dict]:
    """A collated batch (``{"input_ids", "attention_mask"[, "images": {...}]}``, every tensor
    ``[batch, ...]``) → mini-batches of ``size`` rows; each keeps only the token columns its
    rows use (padding past the longest row is dropped; the embeddings do not change)."""
    n = inputs["input_ids"].shape[0]
    out = []
    for start in range(0, n, size):
        chunk = _rows(inputs, slice(start, start + size))
        mask = chunk.get("attention_mask")
        if mask is not None and mask.shape[1] and bool(mask[:, -1].eq(0).all()):
            used = mask.any(0).nonzero()
            width = int(used.max()) + 1 if used.numel() else 1
            chunk.update({k: chunk[k][:, :width] for k in ("input_ids", "attention_mask")})
        out.append(chunk)
    return out


def _rows(inputs: dict, rows: slice) -> dict:
    return {k: _rows(v, rows) if isinstance(v, dict) else v[rows] for k, v in inputs.items()}


class _RNGState:
    """The CPU and (when the model is on one) the CUDA device's RNG state, to replay dropout."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _device(inputs: dict) -> torch.device:
    return inputs["input_ids"].device


def cached_loss(loss_module: torch.nn.Module, model, groups: dict[str, dict], score, pooling: str,
                mini_batch_size: int, sides: dict[str, str] | None = None) -> torch.Tensor:
    """The value of ``score({name: pool_inputs(model, inputs, pooling)})`` with GradCache's
    backward (see the module docstring).

    Args:
        loss_module: the loss; its parameters that require grad get their gradient in step 3.
        model: the tuned model.
        groups: ``{name: collated inputs}``, each ``[rows, seq]`` (``rows`` may differ per group).
        score: ``embeddings {name: [rows, d]} -> scalar loss``.
        pooling: as :func:`petune.embed.pool`.
        mini_batch_size: rows embedded at a time.
        sides: ``{name: side}`` as :func:`petune.embed.pool`'s ``side``; a group on a query-side
            model's frozen passage side is embedded once (nothing to back-propagate into).

    Returns:
        A scalar tensor whose ``backward()`` puts the uncached loss's gradient on the model's
        tuned parameters and the loss's parameters.
    """
    sides = sides or {}
    frozen = {name for name in groups if isinstance(model, TunedModel) and model.is_frozen_side(sides.get(name))}
    device_type = _device(next(iter(groups.values()))).type
    amp = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    chunks = {name: split_inputs(inputs, mini_batch_size) for name, inputs in groups.items()}
    states: dict[str, list[_RNGState]] = {name: [] for name in groups}
    embeddings = {}
    with torch.no_grad():
        for name, parts in chunks.items():
            rows = []
            for chunk in parts:
                states[name].append(_RNGState(_device(chunk)))
                rows.append(pool_inputs(model, chunk, pooling, side=sides.get(name)))
            embeddings[name] = torch.cat(rows).detach().requires_grad_(name not in frozen)
    params = [p for p in loss_module.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = score(embeddings)
    tuned = [name for name in embeddings if name not in frozen]
    grads = torch.autograd.grad(loss, [*(embeddings[n] for n in tuned), *params], allow_unused=True)
    cached = dict(zip(tuned, grads[:len(tuned)]))
    param_grads = grads[len(tuned):]

    def backward(grad_output: torch.Tensor):
        with torch.enable_grad(), torch.autocast(device_type, dtype=amp[1], enabled=amp[0]):
            for name in tuned:
                for chunk, state, grad in zip(chunks[name], states[name], cached[name].split(mini_batch_size)):
                    with state.replay():
                        rows = pool_inputs(model, chunk, pooling, side=sides.get(name))
                    torch.autograd.backward(rows, grad.to(rows.dtype) * grad_output.to(rows.dtype))
        for p, g in zip(params, param_grads):
            if g is not None:
                g = g * grad_output
                p.grad = g if p.grad is None else p.grad + g

    out = loss.detach().requires_grad_()
    out.register_hook(backward)
    return out
