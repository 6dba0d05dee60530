"""The cached contrastive losses (GradCache): same value and gradient as the uncached loss on the
same batch, for every method with a visual embedding, dropout included, through the Trainer."""

import numpy as np
import pytest
import torch

import petune
from conftest import tiny
from petune.train import DPRLoss, PairCollator, PairLoss, RetrievalCollator, Task, Trainer
from petune.train.cached import split_inputs
from test_embed import CharTokenizer as Tok

METHODS = [("prompt", {"num_virtual_tokens": 3}), ("adapter", {"d": 8}), ("lora", {"r": 2}), ("ia3", {})]


def tuned_model(method, options, seed=0):
    torch.manual_seed(seed)
    tuned = petune.attach(tiny("t5"), method, **options)
    petune.vision.add_visual(tuned, 6)
    with torch.no_grad():  # LoRA's B and (IA)^3's ones start at a point where some gradients vanish
        for p in tuned.tuned_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    return tuned


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # T5's attention calls F.dropout with it
            module.dropout = 0.0


def retrieval_batch(n=5):
    g = torch.Generator().manual_seed(1)
    examples = [{"query": f"question {i} " + "q" * i, "image": torch.randn(6, generator=g).numpy(),
                 "positive": f"passage {i} " * (1 + i % 3), "negatives": [f"other {i + 7} " + "z" * i]}
                for i in range(n)]
    examples[3]["image"] = None  # a text-only query among image ones
    return RetrievalCollator(Tok())(examples)


def pair_batch(n=5):
    g = torch.Generator().manual_seed(2)
    return PairCollator(Tok(), prefix_a="match: ")(
        [{"a": "", "image_a": torch.randn(2, 2, 6, generator=g).numpy().reshape(4, 6), "b": f"text {i} " + "ab" * i}
         for i in range(n)])


def grads(tuned, loss, batch):
    params = {**tuned.tuned_parameters(), **{f"loss.{k}": p for k, p in loss.named_parameters()}}
    for p in params.values():
        p.grad = None
    value = loss(tuned, batch)
    value.backward()
    return float(value.detach()), {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


def assert_same(a, b, tol=1e-5):
    assert a[0] == pytest.approx(b[0], abs=tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        assert torch.allclose(a[1][k], b[1][k], atol=tol, rtol=1e-4), k


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_cached_dpr_loss_equals_uncached(method, options):
    tuned = tuned_model(method, options).eval()
    batch = retrieval_batch()
    uncached = grads(tuned, DPRLoss(), batch)
    for m in (1, 2, 4):
        assert_same(grads(tuned, DPRLoss(mini_batch_size=m), batch), uncached)
    assert any(k.startswith("petune_visual.") for k in uncached[1])  # the visual embedding is trained


@pytest.mark.parametrize("method,options", METHODS[:3:2], ids=[m for m, _ in METHODS[:3:2]])
def test_cached_pair_loss_equals_uncached_with_its_temperature(method, options):
    tuned = tuned_model(method, options).eval()
    batch, loss = pair_batch(), PairLoss()
    uncached = grads(tuned, loss, batch)
    loss.mini_batch_size = 2
    cached = grads(tuned, loss, batch)
    assert_same(cached, uncached)
    assert "loss.logit_scale.log_scale" in cached[1]


def test_cached_loss_replays_dropout():
    """In train mode the second embedding of each mini-batch sees the dropout of the first: the
    cached gradient equals the uncached gradient of the loss embedded mini-batch by mini-batch
    from the same RNG state (a wrong replay changes the masks and the gradient)."""
    from petune.embed import pool_inputs

    tuned = tuned_model("lora", {"r": 2}).train()
    for module in tuned.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    batch, loss = retrieval_batch(), DPRLoss(mini_batch_size=2)
    torch.manual_seed(5)
    cached = grads(tuned, loss, batch)
    params = tuned.tuned_parameters()
    for p in params.values():
        p.grad = None
    torch.manual_seed(5)
    embeddings = {name: torch.cat([pool_inputs(tuned, chunk, "mean") for chunk in split_inputs(inputs, 2)])
                  for name, inputs in loss.groups(batch).items()}
    value = loss.score(embeddings, batch)
    value.backward()
    by_hand = (float(value.detach()), {k: p.grad.clone() for k, p in params.items() if p.grad is not None})
    assert_same(cached, by_hand)
    torch.manual_seed(6)
    assert abs(grads(tuned, loss, batch)[0] - cached[0]) > 1e-4  # other masks do change it


def test_split_inputs_drops_only_padding():
    batch = retrieval_batch()["passages"]
    chunks = split_inputs(batch, 4)
    assert [c["input_ids"].shape[0] for c in chunks] == [4, 4, 2]
    for start, c in zip((0, 4, 8), chunks):
        width = c["input_ids"].shape[1]
        assert int(c["attention_mask"].sum(1).max()) == width  # its longest row fills it
        assert torch.equal(c["input_ids"], batch["input_ids"][start:start + 4, :width])
        assert not batch["attention_mask"][start:start + 4, width:].any()
    images = retrieval_batch()["query"]
    assert split_inputs(images, 2)[1]["images"]["features"].shape[0] == 2


def test_trainer_with_cached_loss_equals_uncached():
    """The first optimizer step's gradient under the Trainer, with two micro-batches accumulated:
    the cached loss's hook takes the loop's 1/accumulation exactly as autograd does (dropout off,
    so both runs see the same model)."""
    data = [{"query": f"question {i}", "positive": f"passage number {i} " * 2, "negatives": [f"unrelated {i + 7}"]}
            for i in range(12)]
    first_step = []
    for m in (None, 2):
        tuned = tuned_model("lora", {"r": 2})
        no_dropout(tuned)
        task = Task("ret", data, RetrievalCollator(Tok()), DPRLoss(mini_batch_size=m), batch_size=6)
        trainer = Trainer(tuned, [task], epochs=1, lr=1e-2, gradient_accumulation_steps=2, max_grad_norm=None,
                          max_steps=1, progress=False, log_with=None)
        sync = trainer._sync_gradients  # runs first in each optimizer step: the gradient about to be applied
        trainer._sync_gradients = lambda t=tuned, sync=sync: (first_step.append(
            {k: p.grad.clone() for k, p in t.tuned_parameters().items() if p.grad is not None}), sync())
        trainer.fit()
    uncached, cached = first_step
    assert uncached.keys() == cached.keys() and uncached
    for k in uncached:
        assert torch.allclose(uncached[k], cached[k], atol=1e-6, rtol=1e-4), k


def test_mini_batch_size_errors():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="mini_batch_size"):
            DPRLoss(mini_batch_size=bad)


def test_projection_head_trains_saves_and_encodes(tmp_path):
    """A projection head after pooling: identity at d_model (the embeddings do not change until it
    trains), [batch, dim] otherwise; the cached loss trains it exactly; save / load keep it."""
    tuned = tuned_model("lora", {"r": 2}).eval()
    texts = ["a short one", "another text"]
    plain = petune.encode(tuned, Tok(), texts, progress=False)
    petune.add_projection_head(tuned)
    assert np.allclose(petune.encode(tuned, Tok(), texts, progress=False), plain, atol=1e-6)
    assert "projection head" in str(tuned.trainable_report())
    tuned = petune.add_projection_head(tuned_model("lora", {"r": 2}).eval(), dim=8, seed=0)
    assert petune.encode(tuned, Tok(), texts, progress=False).shape == (2, 8)
    batch = retrieval_batch()
    uncached = grads(tuned, DPRLoss(), batch)
    assert_same(grads(tuned, DPRLoss(mini_batch_size=2), batch), uncached)
    assert any(k.startswith("petune_head.") for k in uncached[1])
    path = petune.save(tuned, tmp_path / "s")
    loaded = petune.load(tiny("t5"), path).eval()
    assert np.allclose(petune.encode(loaded, Tok(), texts, progress=False),
                       petune.encode(tuned, Tok(), texts, progress=False), atol=1e-6)
    with pytest.raises(ValueError, match="already has a projection head"):
        petune.add_projection_head(tuned)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        petune.add_projection_head(tuned_model("lora", {"r": 2}), dim=0)
    with pytest.raises(ValueError, match="the visual embedding and the projection head are not part of any "):
        petune.export(tuned, tmp_path / "e")
    with pytest.raises(ValueError, match="the visual embedding is not part of any transformers architecture"):
        petune.export(tuned_model("lora", {"r": 2}), tmp_path / "v")
