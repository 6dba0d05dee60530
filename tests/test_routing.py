"""Per-example task routing (task=[...]) and export to a plain transformers model."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

import petune
from conftest import batch, tiny
from petune.embed import mean_pool
from test_embed import CharTokenizer as Tok

TASKS = ["x", "y", "z"]  # not "a": peft warns about adapter names inside its "lora_" prefix
TEXTS = [f"text {i} " + "xy" * i for i in range(7)]
ROWS = ["y", "x", "z", "x", "y", "y", "z"]
#: (architecture, method, options): the adapters library (t5, bart, bert2bert) and petune's own
#: bottlenecks (pegasus), peft's native LoRA mixing, its split (IA)^3, per-row prompts
CASES = [("t5", "lora", {}), ("bart", "lora", {}), ("t5", "ia3", {}), ("bert2bert", "ia3", {}),
         ("t5", "prompt", {"num_virtual_tokens": 3}), ("bart", "prompt", {"num_virtual_tokens": 3}),
         ("t5", "adapter", {"d": 8}), ("bert2bert", "adapter", {"d": 8}), ("pegasus", "adapter", {"d": 8})]


def tuned_apart(arch, method, tasks=TASKS, **options):
    """A tuned model whose task modules differ from each other (LoRA's B starts at zero)."""
    tuned = petune.attach(tiny(arch), method, tasks=tasks, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.tuned_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return tuned.eval()


def by_task(rows, run):
    """``run(task, indices)`` for each task's rows, results put back in row order."""
    out = {}
    for task in dict.fromkeys(rows):
        idx = [i for i, r in enumerate(rows) if r == task]
        for i, value in zip(idx, run(task, idx)):
            out[i] = value
    return [out[i] for i in range(len(rows))]


@pytest.mark.parametrize("arch,method,options", CASES)
def test_encode_one_task_per_text_equals_each_task_alone(arch, method, options):
    tuned = tuned_apart(arch, method, **options)
    routed = petune.encode(tuned, Tok(), TEXTS, task=ROWS, batch_size=4)
    alone = np.stack(by_task(ROWS, lambda t, idx: petune.encode(tuned, Tok(), [TEXTS[i] for i in idx], task=t)))
    np.testing.assert_allclose(routed, alone, atol=2e-5)
    other = petune.encode(tuned, Tok(), TEXTS, task="x")
    assert np.abs(other[0] - routed[0]).max() > 1e-3  # row 0 is task b: the routing mattered
    assert tuned.active_task == "x"  # the task active before the routed call is active after it


@pytest.mark.parametrize("arch,method,options", CASES)
def test_forward_one_task_per_row(arch, method, options):
    tuned = tuned_apart(arch, method, **options)
    b = batch(0, size=4)
    rows = ["z", "x", "z", "y"]
    out = tuned(**b, task=rows)
    logits = torch.stack(by_task(rows, lambda t, idx: tuned(**{k: v[idx] for k, v in b.items()}, task=t).logits))
    torch.testing.assert_close(out.logits, logits, atol=2e-5, rtol=1e-4)
    expected = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_encoder_states_routed_in_training_mode_reach_every_task():
    """peft refuses mixed LoRA batches in training mode: petune splits, and gradients reach each
    row's own task only."""
    tuned = tuned_apart("t5", "lora").train()
    b = batch(1, size=3)
    states, mask = tuned.encoder_states(b["input_ids"], b["attention_mask"], task=["x", "z", "x"])
    (states * mask.unsqueeze(-1)).pow(2).mean().backward()
    grads = {t: any(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.task_parameters(t).values())
             for t in TASKS}
    assert grads == {"x": True, "y": False, "z": True}


def test_routing_with_one_visual_embedding_per_task():
    tuned = tuned_apart("t5", "lora")
    petune.vision.add_visual(tuned, 6, per_task=True)
    feats = [np.random.default_rng(i).standard_normal(6).astype(np.float32) for i in range(len(TEXTS))]
    routed = petune.encode(tuned, Tok(), TEXTS, images=feats, task=ROWS)
    alone = np.stack(by_task(ROWS, lambda t, idx: petune.encode(
        tuned, Tok(), [TEXTS[i] for i in idx], images=[feats[i] for i in idx], task=t)))
    np.testing.assert_allclose(routed, alone, atol=2e-5)


def test_routing_errors(monkeypatch):
    tuned = tuned_apart("t5", "lora")
    with pytest.raises(ValueError, match="one task per text"):
        petune.encode(tuned, Tok(), TEXTS, task=ROWS[:3])
    with pytest.raises(ValueError, match="unknown task 'w'"):
        petune.encode(tuned, Tok(), TEXTS, task=["w"] * len(TEXTS))
    b = batch(0, size=2)
    with pytest.raises(TypeError, match="one task per call"):
        tuned.generate(input_ids=b["input_ids"], task=["x", "y"])
    with pytest.raises(TypeError, match="one task per text needs a TunedModel"):
        petune.encode(tiny("t5"), Tok(), TEXTS[:2], task=["x", "y"])
    same = petune.encode(tuned, Tok(), TEXTS, task=["z"] * len(TEXTS))  # one task: the plain path
    np.testing.assert_array_equal(same, petune.encode(tuned, Tok(), TEXTS, task="z"))
    monkeypatch.setattr(type(tuned.method), "routing", None)  # a user method that declares no routing
    with pytest.raises(NotImplementedError, match="does not support one task per row"):
        tuned.encoder_states(b["input_ids"], b["attention_mask"], task=["x", "y"])


# -- export -----------------------------------------------------------------------------------
def plain_mean_pool(model, texts):
    """Mean-pooled last encoder states with transformers alone (the CharTokenizer's ids)."""
    tok, out = Tok(), []
    for text in texts:
        ids = torch.tensor(tok([text], truncation=True, max_length=256, return_attention_mask=False,
                               return_token_type_ids=False)["input_ids"])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            out.append(mean_pool(model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, mask)[0])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("arch,method", [("t5", "lora"), ("t5", "ia3"), ("bart", "lora"), ("bert2bert", "ia3"),
                                         ("pegasus", "lora")])
def test_export_loads_with_transformers_alone(tmp_path, arch, method):
    tuned = tuned_apart(arch, method, tasks=["x", "y"])
    before = petune.encode(tuned, Tok(), TEXTS, task="y")
    path = petune.export(tuned, tmp_path / "exported", task="y", prefix="query: ", max_length=128)
    plain = T.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    np.testing.assert_allclose(plain_mean_pool(plain, TEXTS), before, atol=1e-5)
    np.testing.assert_array_equal(petune.encode(tuned, Tok(), TEXTS, task="y"), before)  # tuned model untouched
    settings = json.loads((path / "petune_export.json").read_text())
    assert settings["pooling"] == "mean" and settings["prefix"] == "query: " and settings["task"] == "y"
    assert settings["method"] == method and settings["max_length"] == 128


def test_export_bare_model_and_none(tmp_path):
    tuned = tuned_apart("t5-bare", "lora", tasks=None)
    path = petune.export(tuned, tmp_path / "bare")
    plain = T.AutoModel.from_pretrained(path).eval()
    np.testing.assert_allclose(plain_mean_pool(plain, TEXTS), petune.encode(tuned, Tok(), TEXTS), atol=1e-5)
    frozen = petune.attach(tiny("t5"), "none")
    plain = T.AutoModelForSeq2SeqLM.from_pretrained(petune.export(frozen, tmp_path / "none")).eval()
    np.testing.assert_allclose(plain_mean_pool(plain, TEXTS), petune.encode(frozen, Tok(), TEXTS), atol=1e-6)


@pytest.mark.parametrize("method,options,match", [("adapter", {"d": 8}, "non-linear"),
                                                  ("prompt", {"num_virtual_tokens": 3}, "soft prompt")])
def test_export_refuses_what_transformers_cannot_load(tmp_path, method, options, match):
    tuned = petune.attach(tiny("t5"), method, **options)
    with pytest.raises(ValueError, match=match) as error:
        petune.export(tuned, tmp_path / "x")
    assert "petune.save" in str(error.value)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_export_errors(tmp_path):
    tuned = tuned_apart("t5", "lora", tasks=["x", "y"])
    with pytest.raises(ValueError, match="one module per task"):
        petune.export(tuned, tmp_path / "x")
    with pytest.raises(ValueError, match="pooling"):
        petune.export(tuned, tmp_path / "x", task="x", pooling="decoder")
    petune.vision.add_visual(tuned, 6)
    with pytest.raises(ValueError, match="visual embedding"):
        petune.export(tuned, tmp_path / "x", task="x")
