"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"),
from peft, with the soft prompt prepended to the encoder input only."""

from __future__ import annotations

import contextlib
import os

import torch

from ..models import d_model, num_heads, num_layers
from .registry import register_method
from ._peft import PeftMethod, positive_int
from .base import join_tokens


@register_method("prompt")
class PromptTuning(PeftMethod):
    """A learned soft prompt of ``num_virtual_tokens`` vectors prepended to the encoder input.

    Uses ``peft.PromptTuningConfig`` with ``num_transformer_submodules=1`` so that only the
    encoder sees the prompt (peft's seq2seq default also prefixes the decoder). Encoder states
    come back as ``[batch, num_virtual_tokens + seq, d_model]`` and the attention mask is
    extended with ones for the virtual tokens (see :meth:`encoder_output`).

    Options:
        num_virtual_tokens: prompt length (default 20).
        init_text: initialise the prompt from the embeddings of this text (repeated or cut to
            ``num_virtual_tokens``); needs ``tokenizer``. Default: random init (peft's).
        tokenizer: name or local path of the tokenizer used for ``init_text``.

    Trainable parameters: ``num_virtual_tokens · d_model`` per prompt (76,800 for 100 tokens on
    T5-base).

    Raises:
        ValueError: non-positive ``num_virtual_tokens``; ``init_text`` without ``tokenizer``.
    """

    markers = ("prompt_encoder",)
    routing = "native"  # per-row prompts in one forward
    _row_modules: list[str] | None = None

    def __init__(self, num_virtual_tokens=20, init_text=None, tokenizer=None):
        positive_int("num_virtual_tokens", num_virtual_tokens)
        if init_text is not None and not tokenizer:
            raise ValueError("init_text needs tokenizer=<name or local path of the model's tokenizer>")
        if isinstance(tokenizer, os.PathLike):
            tokenizer = os.fspath(tokenizer)
        elif tokenizer is not None and not isinstance(tokenizer, str):
            tokenizer = getattr(tokenizer, "name_or_path", None)
            if not tokenizer:
                raise ValueError("tokenizer must be a name or local path (or a tokenizer loaded from one)")
        super().__init__(num_virtual_tokens=num_virtual_tokens, init_text=init_text, tokenizer=tokenizer)

    def peft_config(self, model):
        from peft import PromptTuningConfig, PromptTuningInit

        o = self.options
        init = {}
        if o["init_text"] is not None:
            init = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=o["init_text"],
                        tokenizer_name_or_path=o["tokenizer"])
        # token_dim / layers / heads given explicitly: peft cannot read them off EncoderDecoderConfig.
        return PromptTuningConfig(task_type=self.task_type(model), num_virtual_tokens=o["num_virtual_tokens"],
                                  num_transformer_submodules=1, token_dim=d_model(model),
                                  num_layers=num_layers(model), num_attention_heads=num_heads(model), **init)

    def prefix_length(self) -> int:
        return self.options["num_virtual_tokens"]

    def merged(self, model, module):
        raise ValueError("a soft prompt is not part of any transformers architecture, so plain transformers cannot "
                         "load it; save with petune.save(tuned, path) and load with petune.load(model, path), or use "
                         "LoRA / (IA)^3, which export merged")

    def unloaded(self, model):
        """A soft prompt leaves the base's layers alone: a copy of the base is the model without it."""
        import copy

        return copy.deepcopy(model.get_base_model())

    @contextlib.contextmanager
    def route(self, model, row_modules):
        """Each row gets its own module's virtual tokens (the decoder has no prompt)."""
        self._row_modules = list(row_modules)
        try:
            yield
        finally:
            self._row_modules = None

    def _prompts(self, model, batch: int, device) -> torch.Tensor:
        """``[batch, n_virtual, d_model]``: the active prompt, or under :meth:`route` each row's own."""
        if self._row_modules is None:
            return model.get_prompt(batch_size=batch)
        n_virtual = self.options["num_virtual_tokens"]
        own = {m: model.prompt_encoder[m](model.prompt_tokens[m][:n_virtual].unsqueeze(0).to(device))
               for m in dict.fromkeys(self._row_modules)}
        return torch.cat([own[m] for m in self._row_modules])

    def encoder_output(self, model, input_ids, attention_mask, output_hidden_states=False, extra=None):
        """Encoder output with the prompt, as peft's forward builds it.

        Returns:
            ``(output, mask)``: states ``[batch, n_virtual + seq, d_model]`` and mask
            ``[batch, n_virtual + seq]``; the virtual tokens come first and the mask covers them.
            A part's tokens (``extra``, see :meth:`petune.Method.encoder_output`) follow each
            row's text: prompt, text, image.
        """
        batch = input_ids.shape[0]
        embeds = model.word_embeddings(input_ids)
        if extra is not None:
            embeds, attention_mask = join_tokens(embeds, attention_mask, *extra)
        prompts = self._prompts(model, batch, embeds.device).to(embeds.dtype)
        n_virtual = model.active_peft_config.num_virtual_tokens
        embeds = torch.cat([prompts[:, :n_virtual], embeds], dim=1)
        prefix = torch.ones(batch, n_virtual, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([prefix, attention_mask], dim=1)
        encoder = self.base_model(model).get_encoder()
        # input_ids=None explicitly: FSMT's encoder takes it as a required positional argument
        out = encoder(input_ids=None, inputs_embeds=embeds, attention_mask=mask,
                      output_hidden_states=output_hidden_states, return_dict=True)
        return out, mask
