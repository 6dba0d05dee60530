"""Asymmetric sides. Query-side-only tuning (attach(..., sides="query")): passages go through the frozen base, with the
frozen model's own embeddings, cache key and store, for every method; training encodes them without
gradients (cached and uncached alike); saves keep the side."""

import json
import logging
import warnings

import pytest
import torch

import petune
from conftest import tiny_seq2seq
from petune.embed import encoder_key, pool_inputs
from petune.train import DPRLoss
from petune.train.losses import dpr_loss
from test_architectures import METHODS
from test_embed import TEXTS, CharTokenizer

TOK = CharTokenizer()


@petune.register_method("scale-side-test")
def plain_function_method(model):
    """A method registered as a plain function: one module, which cannot be switched off."""
    model.get_encoder().final_layer_norm.weight.requires_grad_(True)


def query_side(arch, method, seed=0):
    """A query-side model whose method's parameters are random (as if trained), and the frozen twin."""
    name, options = METHODS.get(method, (method, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = petune.attach(tiny_seq2seq(arch, seed), name, sides="query", **options)
    g = torch.Generator().manual_seed(seed + 1)
    for p in tuned.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn(p.shape, generator=g) * 0.2)
    return tuned.eval(), tiny_seq2seq(arch, seed)


@pytest.mark.parametrize("arch,method", [("t5", "lora"), ("t5", "ia3"), ("t5", "prompt"), ("t5", "adapter (Pfeiffer)"),
                                         ("bart", "lora"), ("pegasus", "adapter (Houlsby)"), ("t5", "none")])
def test_passages_are_the_frozen_models_with_its_cache_key(arch, method, tmp_path, caplog):
    tuned, frozen = query_side(arch, method)
    frozen_vecs = petune.encode(frozen, TOK, TEXTS, cache_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="petune"):
        passages = petune.encode(tuned, TOK, TEXTS, side="passage", cache_dir=tmp_path)
    assert "reusing cached embeddings" in caplog.text  # the frozen model's entry, found by key
    petune.encode(tuned, TOK, TEXTS[:1], side="passage")
    assert "none are activated" not in caplog.text  # switching the adapters library off is meant: no warning
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 1
    assert (passages == frozen_vecs).all()
    torch.testing.assert_close(torch.from_numpy(petune.encode(tuned, TOK, TEXTS, side="passage")),
                               torch.from_numpy(frozen_vecs), atol=1e-6, rtol=1e-6)  # computed, not cached
    assert encoder_key(frozen, TOK, {}) != encoder_key(tuned, TOK, {})
    if method != "none":
        queries = petune.encode(tuned, TOK, TEXTS, side="query")
        assert not torch.allclose(torch.from_numpy(queries), torch.from_numpy(frozen_vecs), atol=1e-4)
    with pytest.raises(ValueError, match="side='query'.*side='passage'"):
        petune.encode(tuned, TOK, TEXTS)
    # the method is back on after the frozen side, and its parameters are keyed again
    assert all(not hasattr(m, "_petune_method_tensors") for m in tuned.modules())


def test_store_of_the_frozen_model_serves_the_passage_side(tmp_path):
    tuned, frozen = query_side("t5", "lora")
    first = petune.encode_to_store(frozen, TOK, TEXTS * 3, tmp_path / "store", chunk_size=4, progress=False)
    again = petune.encode_to_store(tuned, TOK, TEXTS * 3, tmp_path / "store", chunk_size=4, progress=False,
                                   side="passage")
    assert again.last_run == {"encoded": [], "reused": 3}
    assert (again.to_array() == first.to_array()).all() and again.path == first.path
    with pytest.raises(petune.store.StoreError):  # the query side is another model: not this store
        petune.encode_to_store(tuned, TOK, TEXTS * 3, tmp_path / "store", chunk_size=4, progress=False, side="query")


BATCH = {"query": TOK(["q one", "q two", "q three", "q four"], padding=True),
         "passages": TOK(["p a", "p b", "p c", "p d", "p e", "p f", "p g", "p h"], padding=True)}


def uncached_and_cached_gradients(make_model):
    """The parameters' gradients of ``DPRLoss`` on ``BATCH``, uncached then cached (mini-batches of
    2), each on a fresh model from ``make_model`` (eval: no dropout, so mini-batches see what the
    batch sees)."""
    grads = []
    for mini in (None, 2):
        tuned = make_model()
        DPRLoss(mini_batch_size=mini)(tuned, BATCH).backward()
        grads.append({n: p.grad.clone() for n, p in tuned.named_parameters() if p.grad is not None})
    return grads


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_training_encodes_passages_frozen_cached_equals_uncached(method):
    grads = uncached_and_cached_gradients(lambda: query_side("t5", method)[0])
    assert grads[0] and grads[0].keys() == grads[1].keys()  # the encoder's modules (the decoder's get none)
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    # the same as scoring the tuned queries against the frozen twin's passages
    tuned, frozen = query_side("t5", method)
    with torch.no_grad():
        passages = pool_inputs(frozen, BATCH["passages"])
    dpr_loss(pool_inputs(tuned, BATCH["query"], side="query"), passages).backward()
    for name, p in tuned.named_parameters():
        if name in grads[0]:
            torch.testing.assert_close(p.grad, grads[0][name], atol=1e-5, rtol=1e-4)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_sides_saved_loaded_and_refused_where_they_cannot_work(tmp_path):
    tuned, _ = query_side("t5", "lora")
    petune.save(tuned, tmp_path / "q")
    again = petune.load(tiny_seq2seq("t5"), tmp_path / "q")
    assert again.sides == "query" and petune.read_config(tmp_path / "q")["sides"] == "query"
    assert (petune.encode(again, TOK, TEXTS, side="query") == petune.encode(tuned, TOK, TEXTS, side="query")).all()
    symmetric = petune.attach(tiny_seq2seq("t5"), "lora", r=4)
    with pytest.raises(ValueError, match="holds parameters for"):
        petune.load(symmetric, tmp_path / "q")
    assert (petune.encode(symmetric, TOK, TEXTS, side="passage") == petune.encode(symmetric, TOK, TEXTS)).all()
    with pytest.raises(ValueError, match="sides must be None"):
        petune.attach(tiny_seq2seq("t5"), "lora", sides="passage")
    with pytest.raises(ValueError, match="side must be"):
        petune.encode(tuned, TOK, TEXTS, side="document")
    with pytest.raises(ValueError, match="projection head"):
        petune.add_projection_head(tuned, 8)
    with pytest.raises(ValueError, match="cannot be switched off"):
        petune.attach(tiny_seq2seq("t5"), "scale-side-test", sides="query")


@pytest.mark.parametrize("sides", ["query", "separate"])
def test_export_writes_one_folder_per_side_that_sentence_transformers_loads(tmp_path, minilm_tokenizer, sides):
    """Whole-model folders per side (the frozen base for a query-side model's passages, each side's
    module merged for separate sides) and, for separate sides, each module alone in peft's format."""
    st = pytest.importorskip("sentence_transformers", reason="pip install petune[serve]")
    import numpy as np

    from petune.data.packaged import minilm_encoder_decoder

    tuned = petune.attach(minilm_encoder_decoder(), "lora", r=4, sides=sides)
    for p in tuned.tuned_parameters().values():  # LoRA starts as the identity: make it change something
        torch.nn.init.normal_(p, std=0.05)
    texts = ["A short query.", "A much longer passage about markets and what happened there today."]
    served = {}
    for side in ("query", "passage"):
        path = petune.export(tuned, tmp_path / side, tokenizer=minilm_tokenizer, format="sentence-transformers",
                             normalize=True, side=side)
        served[side] = st.SentenceTransformer(str(path), device="cpu")
        want = petune.encode(tuned, minilm_tokenizer, texts, max_length=served[side].max_seq_length, normalize=True,
                             side=side)
        np.testing.assert_allclose(served[side].encode(texts, convert_to_numpy=True), want, atol=1e-5)
        if sides == "separate":
            peft_dir = petune.export(tuned, tmp_path / f"peft-{side}", format="peft", side=side)
            assert json.loads((peft_dir / "petune_export.json").read_text())["side"] == side
    assert not np.allclose(served["query"].encode(texts), served["passage"].encode(texts), atol=1e-4)
    with pytest.raises(ValueError, match="export each side to its own folder"):
        petune.export(tuned, tmp_path / "x", tokenizer=minilm_tokenizer, format="sentence-transformers")
    assert not (tmp_path / "x").exists()

# -- sides="separate": one backbone, a module per side ------------------------------------------------

def separate(arch, method, seed=0, **kw):
    """A model with separate sides whose modules are random (as if trained)."""
    name, options = METHODS.get(method, (method, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = petune.attach(tiny_seq2seq(arch, seed), name, sides="separate", **options, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for p in tuned.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn(p.shape, generator=g) * 0.2)
    return tuned.eval()


def symmetric_copy(tuned, arch, method, side, module="default"):
    """A symmetric model carrying ``side``'s module of ``tuned`` as its one module."""
    name, options = METHODS.get(method, (method, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sym = petune.attach(tiny_seq2seq(arch), name, **options).eval()
    params = dict(tuned.named_parameters())
    for n, p in sym.named_parameters():
        if p.requires_grad:
            p.data.copy_(params[n.replace("default", f"{module}-{side}")])
    return sym


@pytest.mark.parametrize("arch,method", [("t5", "lora"), ("t5", "ia3"), ("t5", "prompt"),
                                         ("t5", "adapter (Pfeiffer)"), ("bart", "lora")])
def test_separate_sides_encode_each_side_through_its_own_module(arch, method, tmp_path):
    tuned = separate(arch, method)
    report = tuned.trainable_report()
    assert set(report.per_module) == {"default-query", "default-passage"}
    assert report.per_module["default-query"] == report.per_module["default-passage"] > 0
    vecs = {side: petune.encode(tuned, TOK, TEXTS, side=side, cache_dir=tmp_path) for side in ("query", "passage")}
    assert not torch.allclose(torch.from_numpy(vecs["query"]), torch.from_numpy(vecs["passage"]), atol=1e-4)
    for side in ("query", "passage"):  # each side is exactly a symmetric model with that module
        assert (petune.encode(symmetric_copy(tuned, arch, method, side), TOK, TEXTS) == vecs[side]).all()
        assert (petune.encode(tuned, TOK, TEXTS, side=side, cache_dir=tmp_path) == vecs[side]).all()  # cached
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 2  # the side is part of the key
    assert tuned.active_side == "query"  # encoding a side switches back
    with pytest.raises(ValueError, match="module per side"):
        petune.encode(tuned, TOK, TEXTS)


def test_separate_sides_store_holds_the_sides_module(tmp_path):
    tuned = separate("t5", "lora", tasks=["news", "qa"])
    stores = {side: petune.encode_to_store(tuned, TOK, TEXTS * 3, tmp_path / side, chunk_size=4, progress=False,
                                           side=side, task="qa") for side in ("query", "passage")}
    for side, store in stores.items():
        assert (store.to_array() == petune.encode(tuned, TOK, TEXTS * 3, side=side, task="qa")).all()
    with pytest.raises(petune.store.StoreError):  # the passage module's store is not the query module's
        petune.encode_to_store(tuned, TOK, TEXTS * 3, tmp_path / "passage", chunk_size=4, progress=False,
                               side="query", task="qa")
    _, frozen = query_side("t5", "lora")
    tasks = petune.attach(tiny_seq2seq("t5"), "lora", r=4, tasks=["news"], sides="query")
    first = petune.encode_to_store(frozen, TOK, TEXTS * 3, tmp_path / "frozen", chunk_size=4, progress=False)
    again = petune.encode_to_store(tasks, TOK, TEXTS * 3, tmp_path / "frozen", chunk_size=4, progress=False,
                                   side="passage", task="news")  # a task on a query-side model: the frozen store
    assert again.last_run == {"encoded": [], "reused": 3} and again.path == first.path


def test_separate_sides_per_task_routed_saved_and_loaded(tmp_path):
    tuned = separate("t5", "lora", tasks=["news", "qa"])
    assert set(tuned.trainable_report().per_module) == {"news-query", "news-passage", "qa-query", "qa-passage"}
    assert tuned.trainable_report().per_task["news"] == 2 * tuned.trainable_report().per_module["news-query"]
    tasks = ["news", "qa", "news", "qa", "news", "qa"][:len(TEXTS)]
    for side in ("query", "passage"):
        routed = petune.encode(tuned, TOK, TEXTS, side=side, task=tasks)
        for task in ("news", "qa"):
            rows = [i for i, t in enumerate(tasks) if t == task]
            alone = petune.encode(tuned, TOK, [TEXTS[i] for i in rows], side=side, task=task)
            torch.testing.assert_close(torch.from_numpy(routed[rows]), torch.from_numpy(alone), atol=1e-5, rtol=1e-5)
    petune.save(tuned, tmp_path / "s")
    again = petune.load(tiny_seq2seq("t5"), tmp_path / "s")
    assert again.sides == "separate" and again.active_side == "query"
    for side in ("query", "passage"):
        assert (petune.encode(again.eval(), TOK, TEXTS, side=side, task="qa")
                == petune.encode(tuned, TOK, TEXTS, side=side, task="qa")).all()
    with pytest.raises(ValueError, match="holds parameters for"):
        petune.load(petune.attach(tiny_seq2seq("t5"), "lora", r=4, tasks=["news", "qa"], sides="query"),
                    tmp_path / "s")
    with pytest.raises(ValueError, match="side must be 'query' or 'passage'"):
        tuned.use_side("document")
    with pytest.raises(ValueError, match="one per side"):
        petune.attach(tiny_seq2seq("t5"), "scale-side-test", sides="separate")


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_separate_sides_training_gradients_cached_equals_uncached(method):
    grads = uncached_and_cached_gradients(lambda: separate("t5", method))
    sides = {side: [n for n in grads[0] if f"default-{side}" in n] for side in ("query", "passage")}
    assert sides["query"] and sides["passage"] and len(grads[0]) == len(sides["query"]) + len(sides["passage"])
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0])  # both modules learn
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
    # the same as each side through its own symmetric twin
    tuned = separate("t5", method)
    twins = {side: symmetric_copy(tuned, "t5", method, side) for side in ("query", "passage")}
    dpr_loss(pool_inputs(twins["query"], BATCH["query"]), pool_inputs(twins["passage"], BATCH["passages"])).backward()
    for side, twin in twins.items():
        got = {n.replace("default", f"default-{side}"): p.grad for n, p in twin.named_parameters()
               if p.grad is not None}
        assert got.keys() == set(sides[side])
        for name, grad in got.items():
            torch.testing.assert_close(grad, grads[0][name], atol=1e-5, rtol=1e-4)
