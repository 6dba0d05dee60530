"""VL-T5 / VL-BART checkpoints (petune.vision.vl): tiny random checkpoints written with the published
key layout load with every key accounted for, and the encoder computes what VL-T5's
``VisualEmbedding`` + ``JointEncoder`` (and VL-BART's) compute — checked against their equations,
written out here from the same weights, to 1e-5."""

import math
import warnings

import numpy as np
import pytest
import torch
import transformers as T
from torch.nn import functional as F

import petune
from petune.vision import add_visual, from_vl_bart, from_vl_t5, image_batch

FEAT, D, VOCAB, REGIONS = 12, 16, 60, 36  # 36 regions per image, as VL-T5
T5_CONFIG = dict(vocab_size=VOCAB, d_model=D, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16)
# 40 positions: 7 text tokens + 36 regions do not fit, and need not (only the text takes positions)
BART_CONFIG = dict(vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=40,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, scale_embedding=True)


def _random(shape, g):
    return torch.randn(shape, generator=g) * 0.5


def vl_checkpoint(family="t5", seed=0, additional_layers=0, vocab_size=VOCAB):
    """A state dict as VL-T5 / VL-BART save it (``model.state_dict()``): the language model's keys,
    ``encoder.visual_embedding.*`` with the object-order embedding as the shared word embeddings, and
    (T5) the 2021 decoder bias key transformers no longer has. Norm weights are random, not ones."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if family == "t5":
        model, root = T.T5ForConditionalGeneration(T.T5Config(**{**T5_CONFIG, "vocab_size": vocab_size})), ""
    else:
        model, root = T.BartForConditionalGeneration(T.BartConfig(**{**BART_CONFIG, "vocab_size": vocab_size})), \
            "model."
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if "layer_norm" in k or "layernorm" in k:  # random norms, so that a norm left out shows
            state[k] = state[k] + _random(state[k].shape, g) * 0.2
    v = f"{root}encoder.visual_embedding."
    linear = lambda name, i, o: {f"{v}{name}.weight": _random((o, i), g), f"{v}{name}.bias": _random((o,), g)}  # noqa
    feat = {**linear("feat_embedding.0", FEAT, D)}
    norm = (lambda name: {f"{v}{name}.weight": 1 + _random((D,), g) * 0.2}) if family == "t5" else \
        (lambda name: {f"{v}{name}.weight": 1 + _random((D,), g) * 0.2, f"{v}{name}.bias": _random((D,), g)})
    feat.update(norm("feat_embedding.1"))
    for i in range(additional_layers):  # VL-Adapter's Linear + ReLU + norm blocks
        feat.update(linear(f"feat_embedding.{2 + 3 * i}", D, D))
        feat.update(norm(f"feat_embedding.{4 + 3 * i}"))
    state.update(feat)
    state.update(linear("absolute_vis_pos_embedding.0", 5, D))
    state.update(norm("absolute_vis_pos_embedding.1"))
    state[f"{v}img_order_embedding.weight"] = _random((2, D), g)
    state[f"{v}obj_order_embedding.weight"] = state[f"{root}shared.weight"]
    if family == "t5":
        state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = _random((8, 4), g)
    return state


def write_vl_fixture(root, family="t5"):
    """What a VL-T5 user brings, tiny: ``root/Epoch30.pth`` (a checkpoint whose vocabulary covers the
    packaged MiniLM tokenizer) and ``root/base`` (its text model's configuration and that tokenizer,
    standing in for t5-base / facebook/bart-base). Returns ``(checkpoint, base)``."""
    from petune.data.packaged import minilm_path

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = T.AutoTokenizer.from_pretrained(minilm_path())
    config = (T.T5Config(**{**T5_CONFIG, "vocab_size": len(tokenizer)}) if family == "t5" else
              T.BartConfig(**{**BART_CONFIG, "vocab_size": len(tokenizer)}))
    config.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    torch.save(vl_checkpoint(family, vocab_size=len(tokenizer)), root / "Epoch30.pth")
    return root / "Epoch30.pth", root / "base"


def load(family="t5", state=None, **options):
    state = vl_checkpoint(family) if state is None else state
    if family == "t5":
        return from_vl_t5(state, base=T.T5Config(**T5_CONFIG), **options)
    return from_vl_bart(state, base=T.BartConfig(**BART_CONFIG), **options)


def inputs(seed=0, batch=3, length=7, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 10, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 3:] = 0
    mask[2, length - 1:] = 0
    ids[mask == 0] = pad
    rng = np.random.default_rng(seed)
    regions = []
    for _ in range(batch):
        xy = rng.uniform(0, 0.6, (REGIONS, 2))
        wh = rng.uniform(0.05, 0.4, (REGIONS, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)  # (x1, y1, x2, y2) fractions
        regions.append({"features": rng.standard_normal((REGIONS, FEAT)).astype(np.float32), "boxes": boxes})
    return ids, mask, regions


# -- the published equations, written out ---------------------------------------------------------
def rms(x, w, eps=1e-6):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def layer_norm(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def visual_reference(s, v, feats, boxes, norm):
    """VL-T5's VisualEmbedding.forward (individual_vis_layer_norm, use_vis_order_embedding)."""
    lin = lambda x, name: x @ s[f"{v}{name}.weight"].T + s[f"{v}{name}.bias"]  # noqa
    area = (boxes[..., 3] - boxes[..., 2]) * (boxes[..., 1] - boxes[..., 0])  # its get_area, on (x1, y1, x2, y2)
    pos = torch.cat([boxes, area[..., None]], -1)
    n = feats.shape[1]
    words = s[f"{v}obj_order_embedding.weight"]
    return (norm(lin(feats, "feat_embedding.0"), "feat_embedding.1") +
            norm(lin(pos, "absolute_vis_pos_embedding.0"), "absolute_vis_pos_embedding.1") +
            s[f"{v}img_order_embedding.weight"][0] + words[words.shape[0] - torch.arange(n) - 1])


def t5_bucket(relative, num_buckets, max_distance):
    """T5's bidirectional relative position bucket (Raffel et al., 2020)."""
    num_buckets //= 2
    out = (relative > 0).long() * num_buckets
    n = relative.abs()
    exact = num_buckets // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    return out + torch.where(n < exact, n, large.clamp(max=num_buckets - 1))


def attention(x, mask, bias, wq, wk, wv, wo, heads, scale=1.0, bq=None, bk=None, bv=None, bo=None):
    b, n, _ = x.shape
    proj = lambda w, bias_: (x @ w.T + (0 if bias_ is None else bias_)).view(b, n, heads, -1).transpose(1, 2)  # noqa
    q, k, v = proj(wq, bq) * scale, proj(wk, bk), proj(wv, bv)
    scores = q @ k.transpose(-1, -2) + bias + (1 - mask[:, None, None, :]) * -1e9
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return out @ wo.T + (0 if bo is None else bo)


def vl_t5_encoder_reference(s, ids, mask, regions):
    """VL-T5's JointEncoder: [text (padded to L); 36 regions], relative bias on text ↔ text only."""
    feats = torch.from_numpy(np.stack([r["features"] for r in regions]))
    boxes = torch.from_numpy(np.stack([r["boxes"] for r in regions]))
    vis = visual_reference(s, "encoder.visual_embedding.", feats, boxes,
                           lambda x, name: rms(x, s[f"encoder.visual_embedding.{name}.weight"]))
    x = torch.cat([s["shared.weight"][ids], vis], 1)
    length, total = ids.shape[1], ids.shape[1] + vis.shape[1]
    full_mask = torch.cat([mask.float(), torch.ones(vis.shape[:2])], 1)
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    bucket = t5_bucket(rel, T5_CONFIG["relative_attention_num_buckets"], T5_CONFIG["relative_attention_max_distance"])
    bias = torch.zeros(1, T5_CONFIG["num_heads"], total, total)
    bias[0, :, :length, :length] = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][
        bucket].permute(2, 0, 1)
    for i in range(T5_CONFIG["num_layers"]):
        p = f"encoder.block.{i}.layer."
        h = rms(x, s[p + "0.layer_norm.weight"])
        x = x + attention(h, full_mask, bias, *(s[f"{p}0.SelfAttention.{w}.weight"] for w in "qkvo"),
                          heads=T5_CONFIG["num_heads"])
        h = rms(x, s[p + "1.layer_norm.weight"])
        x = x + torch.relu(h @ s[p + "1.DenseReluDense.wi.weight"].T) @ s[p + "1.DenseReluDense.wo.weight"].T
    return rms(x, s["encoder.final_layer_norm.weight"])


def vl_bart_encoder_reference(s, ids, mask, regions):
    """VL-BART's JointEncoder: positions and the embedding LayerNorm on text only, then the regions."""
    feats = torch.from_numpy(np.stack([r["features"] for r in regions]))
    boxes = torch.from_numpy(np.stack([r["boxes"] for r in regions]))
    v = "model.encoder.visual_embedding."
    vis = visual_reference(s, v, feats, boxes, lambda x, name: layer_norm(x, s[f"{v}{name}.weight"],
                                                                           s[f"{v}{name}.bias"]))
    e = "model.encoder."
    positions = s[e + "embed_positions.weight"][torch.arange(ids.shape[1]) + 2]  # BART's offset of 2
    text = s["model.shared.weight"][ids] * math.sqrt(D) + positions
    text = layer_norm(text, s[e + "layernorm_embedding.weight"], s[e + "layernorm_embedding.bias"])
    x = torch.cat([text, vis], 1)
    full_mask = torch.cat([mask.float(), torch.ones(vis.shape[:2])], 1)
    heads = BART_CONFIG["encoder_attention_heads"]
    for i in range(BART_CONFIG["encoder_layers"]):
        p = f"{e}layers.{i}."
        a = lambda w, kind: s[f"{p}self_attn.{w}_proj.{kind}"]  # noqa
        out = attention(x, full_mask, 0, a("q", "weight"), a("k", "weight"), a("v", "weight"), a("out", "weight"),
                        heads=heads, scale=(D // heads) ** -0.5, bq=a("q", "bias"), bk=a("k", "bias"),
                        bv=a("v", "bias"), bo=a("out", "bias"))
        x = layer_norm(x + out, s[p + "self_attn_layer_norm.weight"], s[p + "self_attn_layer_norm.bias"])
        h = F.gelu(x @ s[p + "fc1.weight"].T + s[p + "fc1.bias"]) @ s[p + "fc2.weight"].T + s[p + "fc2.bias"]
        x = layer_norm(x + h, s[p + "final_layer_norm.weight"], s[p + "final_layer_norm.bias"])
    return x


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_checkpoint_encoder_equals_the_published_forward(family):
    state = vl_checkpoint(family)
    model, visual = load(family, {"module." + k: v for k, v in state.items()})  # DDP-saved, as VL-T5 reads it
    tuned = add_visual(petune.attach(model, "none"), pretrained=visual).eval()
    pad = 0 if family == "t5" else 1
    ids, mask, regions = inputs(pad=pad)
    with torch.no_grad():
        states, joined = tuned.encoder_states(ids, mask, images=image_batch(regions))
        reference = (vl_t5_encoder_reference if family == "t5" else vl_bart_encoder_reference)(state, ids, mask,
                                                                                               regions)
    encoder = tuned.base_model.get_encoder()  # the encoder is itself again after the call
    assert all("compute_bias" not in vars(m) and not m._forward_hooks for m in encoder.modules())
    length = ids.shape[1]
    for b, n in enumerate(mask.sum(1).tolist()):  # petune: [text, regions, padding]; VL-T5: [text, padding, regions]
        assert joined[b].tolist() == [1] * (n + REGIONS) + [0] * (joined.shape[1] - n - REGIONS)
        torch.testing.assert_close(states[b, :n], reference[b, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states[b, n:n + REGIONS], reference[b, length:], atol=1e-5, rtol=1e-5)
    # petune's default mode on the same weights computes something else (positions over the regions)
    default = add_visual(petune.attach(load(family)[0], "none"), FEAT).eval()
    default.petune_visual.default.features[0].load_state_dict(visual.feat_embedding[0].state_dict())
    few = image_batch([{k: v[:4] for k, v in r.items()} for r in regions])  # within BART's 40 positions
    with torch.no_grad():
        other, _ = default.encoder_states(ids, mask, images=few)
        own, _ = tuned.encoder_states(ids, mask, images=few)
    assert not torch.allclose(other[0, :3], own[0, :3], atol=1e-3)


def test_every_key_is_accounted_for():
    state = vl_checkpoint("t5")
    model, visual = load("t5", state)
    assert visual.options == {"n_images": 2, "use_vis_order_embedding": True, "individual_vis_layer_norm": True,
                              "use_vis_layer_norm": True, "additional_layers": 0, "norm": "rms", "eps": 1e-6}
    assert model.config.vocab_size == VOCAB
    torch.testing.assert_close(model.get_input_embeddings().weight, state["shared.weight"])
    extra = {**state, "answer_head.0.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"no parameter for: \['answer_head.0.weight'\]"):
        load("t5", extra)
    missing = {k: v for k, v in state.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    with pytest.raises(ValueError, match=r"does not give: \['encoder.block.1.layer.1.DenseReluDense.wo.weight'\]"):
        load("t5", missing)
    no_norm = {k: v for k, v in state.items() if k != "encoder.visual_embedding.absolute_vis_pos_embedding.1.weight"}
    with pytest.raises(ValueError, match=r"absolute_vis_pos_embedding.1.weight"):
        load("t5", no_norm)
    odd = {**state, "encoder.visual_embedding.obj_order_embedding.weight": state["shared.weight"] + 1}
    with pytest.raises(ValueError, match="one matrix"):
        load("t5", odd)
    with pytest.raises(ValueError, match="not a VL-T5 checkpoint"):
        load("t5", T.T5ForConditionalGeneration(T.T5Config(**T5_CONFIG)).state_dict())
    with pytest.raises(ValueError, match="n_images=3 but its keys say 2"):
        load("t5", state, n_images=3)
    assert load("t5", state, pos_dim=4, feat_dim=FEAT)[1].feat_dim == FEAT
    with pytest.raises(ValueError, match="needs a T5 base"):
        from_vl_t5(state, base=T.BartConfig(**BART_CONFIG))
    bart = load("bart", vl_checkpoint("bart", additional_layers=1))[1]  # VL-Adapter's extra visual layers
    assert bart.options["additional_layers"] == 1 and bart.options["norm"] == "layer"


def test_checkpoint_file_loads_and_save_load_round_trip(tmp_path):
    torch.save(vl_checkpoint("t5"), tmp_path / "Epoch30.pth")
    model, visual = from_vl_t5(tmp_path / "Epoch30.pth", base=T.T5Config(**T5_CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = add_visual(petune.attach(model, "lora", r=2), pretrained=visual).eval()
    ids, mask, regions = inputs()
    batch = image_batch(regions)
    with torch.no_grad():
        before, _ = tuned.encoder_states(ids, mask, images=batch)
        petune.save(tuned, tmp_path / "tuned")
        again = petune.load(from_vl_t5(tmp_path / "Epoch30.pth", base=T.T5Config(**T5_CONFIG)).model,
                            tmp_path / "tuned").eval()
        after, _ = again.encoder_states(ids, mask, images=batch)
    assert again.petune_visual.mode == "vl-t5"
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_vl_t5(tmp_path / "missing.pth", base=T.T5Config(**T5_CONFIG))


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method,options", [("prompt", {"num_virtual_tokens": 3}), ("adapter", {"d": 4}),
                                            ("ia3", {}), ("lora", {"r": 2})])
def test_every_method_trains_a_step_on_a_loaded_checkpoint(family, method, options):
    model, visual = load(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = add_visual(petune.attach(model, method, **options), pretrained=visual)
    ids, mask, regions = inputs(pad=0 if family == "t5" else 1)
    batch = image_batch(regions)
    labels = ids[:, :4].clone()
    params = [p for p in tuned.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = tuned(input_ids=ids, attention_mask=mask, labels=labels, images=batch).loss
    loss.backward()
    torch.optim.AdamW(params, lr=1e-2).step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, params) if b.grad is not None)
    assert tuned.petune_visual.default.feat_embedding[0].weight.grad is not None
    # the method's own parameters got gradients too
    assert any(p.grad is not None for n, p in tuned.named_parameters() if p.requires_grad and "petune_" not in n)


def test_generate_with_vqa_prefix_and_fresh_vl_mode():
    model, visual = load("t5")
    tuned = add_visual(petune.attach(model, "lora", r=2), pretrained=visual).eval()
    ids, mask, regions = inputs()
    ids[:, 0] = 7  # "vqa:" as a token of the tiny vocabulary
    out = tuned.generate(input_ids=ids, attention_mask=mask, images=image_batch(regions), max_new_tokens=4,
                         do_sample=False)
    assert out.shape[0] == 3 and out.shape[1] <= 5
    # the fresh "vl-t5" mode (VL-T5's architecture from a text-only T5, the "raw" start)
    fresh = add_visual(petune.attach(T.T5ForConditionalGeneration(T.T5Config(**T5_CONFIG)), "none"), FEAT,
                       mode="vl-t5")
    assert fresh.petune_visual.default.n_images == 2
    fresh.encoder_states(ids, mask, images=image_batch(regions))
    mbart = T.MBartForConditionalGeneration(T.MBartConfig(**BART_CONFIG))  # BART's rule on mBART's encoder
    fresh = add_visual(petune.attach(mbart, "none"), FEAT, mode="vl-t5").eval()
    ids[ids == 0] = 1
    states, _ = fresh.encoder_states(ids, mask, images=image_batch(regions))
    assert fresh.petune_visual.default.layer_norm is None and torch.isfinite(states).all()
    pegasus = T.PegasusForConditionalGeneration(T.PegasusConfig(**{**BART_CONFIG, "scale_embedding": False}))
    with pytest.raises(ValueError, match="defined for t5, mt5, umt5, bart, mbart"):
        add_visual(petune.attach(pegasus, "none"), FEAT, mode="vl-t5")
    with pytest.raises(ValueError, match="leave mode out"):
        add_visual(petune.attach(load("t5")[0], "none"), pretrained=visual, mode="petune")
    with pytest.raises(ValueError, match="feat_dim=7, but the pretrained visual embedding has 12"):
        add_visual(petune.attach(load("t5")[0], "none"), 7, pretrained=visual)


def write_boxes36(path, ids, seed=0, regions=REGIONS, feat_dim=FEAT):
    """A region file in VL-T5's ``*_boxes36.h5`` layout: pixels, with each image's size."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for image_id in ids:
            w, h = rng.integers(200, 640, 2)
            xy = rng.uniform(0, 0.5, (regions, 2)) * [w, h]
            wh = rng.uniform(0.1, 0.5, (regions, 2)) * [w, h]
            f[f"{image_id}/features"] = rng.standard_normal((regions, feat_dim)).astype(np.float32)
            f[f"{image_id}/boxes"] = np.concatenate([xy, xy + wh], 1).astype(np.float32)
            f[f"{image_id}/img_w"], f[f"{image_id}/img_h"] = w, h
    return path


def test_region_files_h5_npz_and_clip_grids(tmp_path):
    import h5py

    from petune.vision import RegionFeatures

    regions = RegionFeatures(write_boxes36(tmp_path / "train_boxes36.h5", ["17", "42"]), feat_dim=FEAT)
    with h5py.File(tmp_path / "train_boxes36.h5") as f:
        pixels, w, h = f["42/boxes"][()], f["42/img_w"][()], f["42/img_h"][()]
    entry = regions["42"]
    assert entry["features"].shape == (REGIONS, FEAT) and "17" in regions and "99" not in regions
    np.testing.assert_allclose(entry["boxes"], pixels / [w, h, w, h], rtol=1e-6)
    assert RegionFeatures(tmp_path / "train_boxes36.h5", max_regions=2)["17"]["features"].shape == (2, FEAT)
    with pytest.raises(KeyError, match="'99'"):
        regions["99"]
    with pytest.raises(ValueError, match=r"expected \[regions, 7\]"):
        RegionFeatures(tmp_path / "train_boxes36.h5", feat_dim=7)["17"]
    # a folder of per-image files: VL-Adapter's CLIP grids (no boxes: zeros, as it feeds them), and .npz
    folder = tmp_path / "clip"
    folder.mkdir()
    with h5py.File(folder / "5.h5", "w") as f:
        f["5/features"] = np.ones((4, FEAT), dtype=np.float32)
    np.savez(folder / "6.npz", features=np.ones((3, FEAT), np.float32),
             boxes=np.array([[0, 0, 10, 20]] * 3, np.float32), img_w=10, img_h=40)
    clip = RegionFeatures(folder)
    assert clip["5"]["boxes"].tolist() == [[0.0] * 4] * 4
    assert clip["6"]["boxes"].tolist() == [[0.0, 0.0, 1.0, 0.5]] * 3
    np.savez(folder / "7.npz", features=np.ones((2, FEAT), np.float32),
             boxes=np.array([[0, 0, 10, 20], [5, 30, 2, 40]], np.float32), img_w=10, img_h=40)
    with pytest.raises(ValueError, match=r"box 1 has x2 < x1.*\(x1, y1, x2, y2\)"):
        clip["7"]
    np.savez(folder / "8.npz", features=np.ones((1, FEAT), np.float32), boxes=np.array([[0, 0, 10, 20]], np.float32))
    with pytest.raises(ValueError, match="outside the image; give them in pixels with img_w"):
        clip["8"]
    with pytest.raises(FileNotFoundError):
        RegionFeatures(tmp_path / "nowhere.h5")
