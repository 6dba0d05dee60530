"""Every built-in method on every seq2seq architecture transformers 4.57 builds without downloads:
forward + backward, only the method's parameters change after an optimizer step, save / load is
bit-identical, petune.encode works. The support matrix in docs/methods.md is generated from these
lists (`python tests/test_architectures.py` prints it; a test checks docs/methods.md carries it)."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import petune
from conftest import SEQ2SEQ, batch, tiny_seq2seq
from petune.models import ADAPTERS_SUPPORTED, describe, find_layout
from test_embed import TEXTS, CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "prompt": ("prompt", dict(num_virtual_tokens=3)),
    "adapter (Pfeiffer)": ("adapter", dict(d=8)),
    "adapter (Houlsby)": ("adapter", dict(d=8, placement="houlsby")),
    "ia3": ("ia3", {}),
    "lora": ("lora", dict(r=4)),
}
#: architecture × method pairs that cannot work, with the reason (documented in docs/methods.md)
EXCEPTIONS: dict[tuple[str, str], str] = {}


def forward(model, seed=0):
    """A teacher-forced forward with a loss. decoder_input_ids are given explicitly: FSMT builds
    them from input_ids, never from labels, which fails when prompt tuning passes inputs_embeds."""
    b = batch(seed)
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["labels"],
                 labels=b["labels"])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_every_method_on_every_architecture(arch, method, tmp_path):
    name, options = METHODS[method]
    model = tiny_seq2seq(arch)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = petune.attach(model, name, **options)
    params = tuned.tuned_parameters()
    assert params and all(p.requires_grad for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}

    tuned.train()
    loss = forward(tuned).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    torch.optim.SGD(params.values(), lr=0.1).step()
    assert any(not torch.equal(p, before[n]) for n, p in params.items())  # the method moved
    now = dict(tuned.base_model.named_parameters())
    for n, value in base.items():  # the base did not (names as in the bare model)
        match = [k for k in now if k == n or k.endswith("." + n) or k.replace(".base_layer", "") == n]
        assert match, n
        assert torch.equal(now[match[0]], value), n

    tuned.eval()
    path = petune.save(tuned, tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = petune.load(tiny_seq2seq(arch), path).eval()
    with torch.no_grad():
        assert torch.equal(forward(tuned).logits, forward(loaded).logits)
    vecs = petune.encode(loaded, CharTokenizer(), TEXTS)
    assert vecs.shape[0] == len(TEXTS) and np.isfinite(vecs).all()
    np.testing.assert_array_equal(vecs, petune.encode(tuned, CharTokenizer(), TEXTS))


@pytest.mark.parametrize("arch", [a for a in SEQ2SEQ if a not in ADAPTERS_SUPPORTED])
def test_petune_bottleneck_counts_and_tasks(arch):
    """Where the adapters library has no support: the library's parameter formula
    (2·d_model·d + d + d_model per adapter; one per layer, two with Houlsby), one module per task,
    gradients only into the active task's module."""
    layers = len(find_layout(tiny_seq2seq(arch)).layers)
    per_adapter = 2 * 32 * 8 + 8 + 32
    for placement, per_layer in (("pfeiffer", 1), ("houlsby", 2)):
        tuned = petune.attach(tiny_seq2seq(arch), "adapter", d=8, placement=placement, tasks=["a", "b"])
        assert tuned.trainable_report().per_task == {"a": layers * per_layer * per_adapter,
                                                     "b": layers * per_layer * per_adapter}
    tuned.eval()
    outputs = {}
    with torch.no_grad():
        for task in "ab":
            tuned.use_task(task)
            outputs[task] = forward(tuned, 1).logits
    assert not torch.equal(outputs["a"], outputs["b"])  # the two tasks' modules differ
    forward(tuned).loss.backward()
    grads = {t: sum(float(p.grad.abs().sum()) for p in tuned.task_parameters(t).values() if p.grad is not None)
             for t in "ab"}
    assert grads["a"] == 0 and grads["b"] > 0


def test_structural_targets_equal_peft_tables():
    """Found by structure, the defaults equal peft's table where peft has one (T5, mT5, BART: LoRA)."""
    from peft.utils import constants as c

    from petune.models import structural_targets

    for arch, key in (("t5", "t5"), ("mt5", "mt5"), ("bart", "bart")):
        found = structural_targets(tiny_seq2seq(arch), "lora")["target_modules"]
        assert found == c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[key]
    assert structural_targets(tiny_seq2seq("t5"), "ia3") == {"target_modules": ["k", "v", "wo"],
                                                             "feedforward_modules": ["wo"]}


def test_describe_and_unknown_layout_error():
    text = describe(tiny_seq2seq("led"))
    assert "self_attn.longformer_self_attn.query" in text and "lora: {'target_modules': ['query', 'q_proj'" in text
    model = tiny_seq2seq("t5")
    for block in list(model.encoder.block) + list(model.decoder.block):
        attention = block.layer[0].SelfAttention
        attention.zz = attention.q  # the query projection under a name no family uses
        attention.q = torch.nn.Identity()
    with pytest.raises(ValueError, match="Linear modules present: .*'zz'"):
        find_layout(model)


def support_matrix() -> str:
    """docs/methods.md's table: one row per architecture of SEQ2SEQ, one column per method."""
    lines = ["| architecture | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for arch in SEQ2SEQ:
        cells = [f"❌ {EXCEPTIONS[arch, m]}" if (arch, m) in EXCEPTIONS else "✅" for m in METHODS]
        source = "adapters" if arch in ADAPTERS_SUPPORTED else "petune"
        lines.append(f"| `{arch}` (bottleneck: {source}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_readme_carries_the_support_matrix():
    assert support_matrix() in (ROOT / "docs" / "methods.md").read_text(), "run python tests/test_architectures.py"


if __name__ == "__main__":
    sys.stdout.write(support_matrix() + "\n")
