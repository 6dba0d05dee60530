"""The on-disk cache: encode() and BM25 runs are reused when nothing they depend on changed, and
recomputed when anything did."""

import numpy as np
import pytest
import torch

import petune
import petune.embed
from conftest import tiny
from petune.cache import weights_fingerprint
from petune.score import BM25
from test_embed import TEXTS, CharTokenizer


def test_weights_fingerprint_follows_every_value():
    model = tiny("t5")
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert weights_fingerprint(model) != before


def test_encode_cache_hits_and_misses(tmp_path, monkeypatch, caplog):
    model, tok = tiny("t5"), CharTokenizer()
    first = petune.encode(model, tok, TEXTS, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    with monkeypatch.context() as m:  # same weights, texts and options: served from the cache, and logged
        m.setattr(petune.embed, "pool", no_model)
        with caplog.at_level("INFO", logger="petune.cache"):
            again = petune.encode(model, tok, TEXTS, cache_dir=tmp_path, batch_size=1)  # batch size is not keyed
        np.testing.assert_array_equal(again, first)
        assert "reusing cached embeddings" in caplog.text
        for changed in (dict(texts=TEXTS[:3]), dict(max_length=4), dict(pooling="first"), dict(prefix="q: ")):
            with pytest.raises(AssertionError, match="must not run"):
                petune.encode(model, tok, changed.pop("texts", TEXTS), cache_dir=tmp_path, **changed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    changed = petune.encode(model, tok, TEXTS, cache_dir=tmp_path)
    assert not np.array_equal(changed, first)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 2


def test_encode_cache_ignores_the_decoder_unless_it_pools_there(tmp_path):
    model, tok = tiny("bart"), CharTokenizer()  # tied embeddings: shared by encoder and decoder
    first = petune.encode(model, tok, TEXTS, cache_dir=tmp_path)
    pooled_by_decoder = petune.encode(model, tok, TEXTS, cache_dir=tmp_path, pooling="decoder")
    with torch.no_grad():
        model.get_decoder().layers[0].encoder_attn.v_proj.weight.mul_(2.0)  # as another seed's cross-attention
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 2
    np.testing.assert_array_equal(petune.encode(model, tok, TEXTS, cache_dir=tmp_path), first)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 2  # a hit: the encoder never runs that weight
    assert not np.allclose(petune.encode(model, tok, TEXTS, cache_dir=tmp_path, pooling="decoder"), pooled_by_decoder)
    with torch.no_grad():
        model.get_decoder().embed_tokens.weight.mul_(1.1)  # shared with the encoder: a miss
    assert not np.allclose(petune.encode(model, tok, TEXTS, cache_dir=tmp_path), first)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 4  # + the decoder-pooled one after the change


def test_encode_cache_keys_the_task(tmp_path):
    tuned = petune.attach(tiny("t5"), "lora", r=4, tasks=["a", "b"])
    with torch.no_grad():
        for p in tuned.tuned_parameters().values():
            p.normal_(0, 0.5)  # LoRA B starts at zero: make the two tasks' modules differ
    a = petune.encode(tuned, CharTokenizer(), TEXTS, task="a", cache_dir=tmp_path)
    b = petune.encode(tuned, CharTokenizer(), TEXTS, task="b", cache_dir=tmp_path)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(petune.encode(tuned, CharTokenizer(), TEXTS, task="a", cache_dir=tmp_path), a)


def test_bm25_cache_skips_indexing(tmp_path):
    docs = {"d1": "the cat sat on the mat", "d2": "dogs chase cats", "d3": "a bird sings"}
    queries = {"q1": "cat on a mat", "q2": "bird"}
    first = BM25(docs, cache_dir=tmp_path).search(queries, k=2)
    again = BM25(docs, cache_dir=tmp_path)
    assert again.search(queries, k=2).to_dict() == first.to_dict()
    assert not again._indexed  # the run came from the cache: the index was never built
    again.search(queries, k=3)  # another depth: computed
    assert again._indexed
    other = BM25({**docs, "d4": "cat cat cat"}, cache_dir=tmp_path)
    assert other.search(queries, k=2).to_dict() != first.to_dict() and other._indexed
