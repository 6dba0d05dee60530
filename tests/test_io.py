import json

import pytest
import torch

import petune
from conftest import batch, first_output, tiny

CASES = [("adapter", dict(d=8), "t5"), ("adapter", dict(reduction_factor=4, placement="houlsby"), "bert2bert"),
         ("lora", dict(r=4), "bart"), ("ia3", {}, "t5"), ("prompt", dict(num_virtual_tokens=3), "bart")]


def perturbed(tuned):
    with torch.no_grad():
        for p in tuned.tuned_parameters().values():
            p.add_(0.3 * torch.randn_like(p))
    return tuned


def outputs(tuned, task=None):
    with torch.no_grad():
        return first_output(tuned(**batch(), task=task))


@pytest.mark.parametrize("method,options,arch", CASES)
def test_round_trip_is_bit_identical(tmp_path, method, options, arch):
    torch.manual_seed(3)
    tuned = perturbed(petune.attach(tiny(arch), method, tasks=["qa", "topic"], **options))
    petune.save(tuned, tmp_path / "run")
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["model.safetensors", "petune.json"]
    config = json.loads((tmp_path / "run" / "petune.json").read_text())
    assert config["method"] == method and config["tasks"] == ["qa", "topic"]

    loaded = petune.load(tiny(arch), tmp_path / "run")
    for task in ("qa", "topic"):
        assert torch.equal(outputs(tuned, task), outputs(loaded, task))
    assert loaded.trainable_report().as_dict() == tuned.trainable_report().as_dict()
    # saved file holds only the tuned parameters
    from safetensors import safe_open
    with safe_open(tmp_path / "run" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(tuned.tuned_parameters())


def test_load_into_an_attached_model(tmp_path):
    tuned = perturbed(petune.attach(tiny("t5"), "lora", r=2))
    petune.save(tuned, tmp_path / "a")
    other = petune.attach(tiny("t5"), "lora", r=2)
    assert petune.load(other, tmp_path / "a") is other
    assert torch.equal(outputs(tuned), outputs(other))


def test_save_replaces_atomically_and_refuses_foreign_dirs(tmp_path):
    tuned = perturbed(petune.attach(tiny("t5"), "ia3"))
    petune.save(tuned, tmp_path / "run")
    perturbed(tuned)
    petune.save(tuned, tmp_path / "run")  # overwrite a previous save
    assert torch.equal(outputs(petune.load(tiny("t5"), tmp_path / "run")), outputs(tuned))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp dirs left behind

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a petune directory"):
        petune.save(tuned, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_previous_save(tmp_path, monkeypatch):
    tuned = perturbed(petune.attach(tiny("t5"), "ia3"))
    petune.save(tuned, tmp_path / "run")
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    perturbed(tuned)
    with pytest.raises(OSError, match="disk full"):
        petune.save(tuned, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_load_errors_leave_model_untouched(tmp_path):
    petune.save(petune.attach(tiny("t5"), "lora", r=2), tmp_path / "lora")

    with pytest.raises(FileNotFoundError, match="not a petune save"):
        petune.load(tiny("t5"), tmp_path / "missing")

    bart = tiny("bart")
    with pytest.raises(ValueError, match="another base model"):
        petune.load(bart, tmp_path / "lora")
    assert all(p.requires_grad for p in bart.parameters())  # nothing attached

    with pytest.raises(ValueError, match="holds parameters for"):
        petune.load(petune.attach(tiny("t5"), "ia3"), tmp_path / "lora")  # another method
    with pytest.raises(ValueError, match="holds parameters for"):
        petune.load(petune.attach(tiny("t5"), "lora", r=4), tmp_path / "lora")  # another shape

    config = json.loads((tmp_path / "lora" / "petune.json").read_text())
    config["parameters"] = dict(list(config["parameters"].items())[1:])
    (tmp_path / "lora" / "petune.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="inconsistent"):
        petune.load(tiny("t5"), tmp_path / "lora")


def test_save_needs_a_tuned_model(tmp_path):
    with pytest.raises(TypeError, match="TunedModel"):
        petune.save(tiny("t5"), tmp_path / "x")
