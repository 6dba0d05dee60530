import numpy as np
import pytest
import torch

import petune
from conftest import tiny
from petune.embed import encode, mean_pool


class CharTokenizer:
    """Enough of a tokenizer for tiny models: one id per character, padding with 0. Called with
    ``padding=True`` (as the training collators do) it returns padded tensors."""

    model_max_length = 64

    def __call__(self, texts, truncation=True, max_length=64, padding=False, **_):
        ids = {"input_ids": [[5 + (ord(c) % 100) for c in t][:max_length] or [5] for t in texts]}
        return self.pad(ids) if padding else ids

    def pad(self, features, return_tensors="pt"):
        ids = features["input_ids"]
        n = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


TEXTS = ["a short one", "a somewhat longer text here", "mid length", "x"]


def by_hand(model, text):
    ids = torch.tensor([CharTokenizer()([text])["input_ids"][0]])
    with torch.no_grad():
        return model.get_encoder()(input_ids=ids).last_hidden_state[0]


def test_mean_pool_ignores_padding():
    states = torch.arange(12, dtype=torch.float).reshape(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(mean_pool(states, mask), torch.tensor([[1.5, 2.5, 3.5], [4.5, 5.5, 6.5]]))


@pytest.mark.parametrize("arch", ["t5", "bart", "bert2bert"])
def test_mean_and_first_by_hand(arch):
    model = tiny(arch)
    mean = encode(model, CharTokenizer(), TEXTS, pooling="mean", batch_size=2)
    first = encode(model, CharTokenizer(), TEXTS, pooling="first", batch_size=2)
    assert mean.shape == (4, 32) and mean.dtype == np.float32
    for i, text in enumerate(TEXTS):  # rows come back in input order despite length sorting
        states = by_hand(model, text)
        np.testing.assert_allclose(mean[i], states.mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(first[i], states[0].numpy(), atol=1e-5)
    assert not np.allclose(mean, first)


@pytest.mark.parametrize("arch", ["t5", "bart", "bert2bert"])
def test_decoder_pooling_is_the_start_state_of_the_full_model(arch):
    model = tiny(arch)
    got = encode(model, CharTokenizer(), TEXTS[:2], pooling="decoder")
    start = model.config.decoder_start_token_id
    for i, text in enumerate(TEXTS[:2]):
        ids = torch.tensor([CharTokenizer()([text])["input_ids"][0]])
        with torch.no_grad():
            out = model(input_ids=ids, decoder_input_ids=torch.tensor([[start]]), output_hidden_states=True)
        np.testing.assert_allclose(got[i], out.decoder_hidden_states[-1][0, 0].numpy(), atol=1e-5)


def test_last_layers_mean_and_concat():
    model = tiny("bart")
    ids = torch.tensor([CharTokenizer()([TEXTS[1]])["input_ids"][0]])
    with torch.no_grad():
        hs = model.get_encoder()(input_ids=ids, output_hidden_states=True).hidden_states
    concat = encode(model, CharTokenizer(), [TEXTS[1]], layers=2, layer_combine="concat")
    mean = encode(model, CharTokenizer(), [TEXTS[1]], layers=2)
    expected = [hs[-2][0].mean(0), hs[-1][0].mean(0)]
    np.testing.assert_allclose(concat[0], torch.cat(expected).numpy(), atol=1e-5)
    np.testing.assert_allclose(mean[0], torch.stack(expected).mean(0).numpy(), atol=1e-5)


def test_prompt_tuned_pooling_by_hand():
    """Mean pooling covers the virtual tokens; 'first' is the first input token after them."""
    tuned = petune.attach(tiny("t5"), "prompt", num_virtual_tokens=3)
    text = TEXTS[1]
    ids = torch.tensor([CharTokenizer()([text])["input_ids"][0]])
    prompt = next(iter(tuned.tuned_parameters().values())).detach()  # [3, d]
    with torch.no_grad():
        embeds = torch.cat([prompt[None], tuned.base_model.get_input_embeddings()(ids)], dim=1)
        states = tuned.base_model.get_encoder()(inputs_embeds=embeds).last_hidden_state[0]
    mean = encode(tuned, CharTokenizer(), [text, "pad me"], pooling="mean")
    first = encode(tuned, CharTokenizer(), [text, "pad me"], pooling="first")
    np.testing.assert_allclose(mean[0], states.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(first[0], states[3].numpy(), atol=1e-5)
    # the padded row too: its prompt positions are not masked out
    short = encode(tuned, CharTokenizer(), ["pad me"], pooling="mean")
    np.testing.assert_allclose(mean[1], short[0], atol=1e-5)


def test_task_prefix_normalize_and_task_switch():
    tuned = petune.attach(tiny("t5"), "lora", tasks=["qa", "topic"])
    with torch.no_grad():
        for p in tuned.task_parameters("topic").values():
            p.add_(0.5)
    qa = encode(tuned, CharTokenizer(), TEXTS, task="qa", normalize=True)
    topic = encode(tuned, CharTokenizer(), TEXTS, task="topic")
    np.testing.assert_allclose(np.linalg.norm(qa, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(qa, topic / np.linalg.norm(topic, axis=1, keepdims=True))
    prefixed = encode(tuned, CharTokenizer(), TEXTS, task="qa", prefix="query: ")
    assert not np.allclose(prefixed, encode(tuned, CharTokenizer(), TEXTS, task="qa"))


def test_encode_errors():
    model = tiny("t5")
    with pytest.raises(ValueError, match="empty"):
        encode(model, CharTokenizer(), [])
    with pytest.raises(TypeError, match="not one string"):
        encode(model, CharTokenizer(), "hello")
    with pytest.raises(TypeError, match="item 1"):
        encode(model, CharTokenizer(), ["a", 3])
    with pytest.raises(ValueError, match="pooling must be one of"):
        encode(model, CharTokenizer(), ["a"], pooling="max")
    with torch.no_grad():
        model.get_encoder().final_layer_norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        encode(model, CharTokenizer(), ["a"])


def test_prompt_length_fits_position_table(minilm_bert2bert, minilm_tokenizer):
    tuned = petune.attach(minilm_bert2bert, "prompt", num_virtual_tokens=20)
    vecs = encode(tuned, minilm_tokenizer, ["word " * 600], max_length=512)  # 512 + 20 > 512 positions
    assert vecs.shape == (1, 384)
