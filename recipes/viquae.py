"""ViQuAE passage retrieval: DPR-style tuning of an encoder-decoder with a petune method.

    accelerate launch recipes/viquae.py --model t5-base --method adapter --reduction-factor 8
    accelerate launch recipes/viquae.py --dataset-path viquae/dataset --kb-path viquae/kb \
        --passages-path viquae/passages --index-factory "IVF65536,PQ64"

Data: PaulLerner/viquae_dataset / viquae_wikipedia / viquae_passages from the Hugging Face Hub,
or local copies saved with ``save_to_disk`` (--dataset-path, --kb-path, --passages-path). If
neither loads, the job exits with status 2 and says what is missing and how to get it.

Steps (following meerqat, Lerner et al. 2022):
1. relevant passages: passages of the provenance article containing the normalised original or
   alternative answer; questions with none are reported and dropped;
2. BM25 (bm25s, k1=0.5, b=0.3) over all passages: top-100 minus relevant = hard negatives (BM25
   order) for training, and the BM25 baseline run on the test split;
3. DPR training: one relevant + one hard negative passage per question, in-batch negatives
   (optionally first on --first-stage-dataset, e.g. TriviaQA in the same schema);
4. passages encoded, FAISS index (--index-factory, Flat inner product by default), test questions
   searched; ranx MRR@100, P@1, P@20, Hit@20 vs BM25 (and the frozen model with --compare-frozen),
   Fisher's randomization test p ≤ 0.01; report.md / report.json and the tuned parameters
   (petune.save) in --output-dir.

Passages are never held as one list. From --store-from passages on (100,000 by default; see
docs/scaling.md), each process encodes its chunks of them straight to an embedding store on disk
(petune.encode_to_store, under --cache-dir, keyed by the model's weights: a killed run continues
where it stopped), the index is built from the store (exact search chunk by chunk for "Flat",
trained on a sample and filled chunk by chunk otherwise) and BM25 is built from a stream. Below
that size the passages are encoded in memory and gathered (the faster path for small collections).

With --images-dir DIR the questions are multimodal (question + image → passage, as ViQuAE
means them): each question's image (the dataset's ``image`` column, files in DIR) goes through
EfficientNet-Lite0 (features cached in --cache-dir), and a visual embedding
(petune.vision.add_visual) trained with the method puts it beside the question's tokens.
Passages stay text. Without it the recipe is text-only. With --region-features FILE the images'
features come from a region file instead (VL-T5's boxes36 HDF5 layout, keyed by the ``image``
column's file name, with or without its extension), and --vl-t5 / --vl-bart CHECKPOINT start from
a published VL-T5 / VL-BART checkpoint with VL-T5's forward (docs/vision.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import petune  # noqa: E402
from petune.jobs.common import (DEFAULT_LR, JobError, add_index_args, add_method_args, add_mini_batch_arg,  # noqa: E402
                                add_run_args, add_sides_arg, cache_dir, dense_run, job_main, method_options,
                                sides_option, start_run, write_report)
from petune.jobs.vl import add_visual_from_args, add_vl_args, check_vl_args, load_base, region_features  # noqa
from petune.data import viquae  # noqa: E402
from petune.dist import main_process_first  # noqa: E402
from petune.score import BM25, compare, p_values, report_markdown, save_runs  # noqa: E402
from petune.score.runs import RUNS_DIR  # noqa: E402
from petune.train import DPRLoss, RetrievalCollator, Task, Trainer  # noqa: E402

STAGES = ("first_stage", "viquae")

log = logging.getLogger("petune.recipes.viquae")
METRICS = ["mrr@100", "precision@1", "precision@20", "hit_rate@20"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-path", help="local copy of PaulLerner/viquae_dataset (save_to_disk)")
    parser.add_argument("--kb-path", help="local copy of PaulLerner/viquae_wikipedia")
    parser.add_argument("--passages-path", help="local copy of PaulLerner/viquae_passages")
    parser.add_argument("--first-stage-dataset", help="optional first training stage (e.g. TriviaQA) in the "
                        "ViQuAE question schema, searched against the same KB; a path or hub id")
    parser.add_argument("--first-stage-epochs", type=int, default=1)
    parser.add_argument("--model", help="seq2seq model name or path (default: the packaged MiniLM BERT2BERT)")
    add_method_args(parser)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    add_mini_batch_arg(parser, rows="questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bm25-k1", type=float, default=0.5)
    parser.add_argument("--bm25-b", type=float, default=0.3)
    parser.add_argument("--hard-negatives-k", type=int, default=100, help="BM25 depth mined for hard negatives")
    add_index_args(parser)
    parser.add_argument("--question-length", type=int, default=64)
    parser.add_argument("--passage-length", type=int, default=256)
    parser.add_argument("--compare-frozen", action="store_true", help="also score the frozen model (encodes "
                        "the passages twice)")
    parser.add_argument("--images-dir", help="folder of ViQuAE's question images: multimodal queries "
                        "(question + image); without it, text only")
    parser.add_argument("--output-dir", default="runs/viquae")
    add_sides_arg(parser)
    add_vl_args(parser)
    add_run_args(parser, checkpoint_every=200)
    args = parser.parse_args(argv)
    args.lr = args.lr or DEFAULT_LR[args.method]
    return args


def training_examples(split, qrels, negatives, passages, images=None):
    """One example per question: its first relevant passage, its first BM25 hard negative and the
    list of all its relevant passages (and its image features, ``images[qid]``, when given)."""
    examples, skipped = [], 0
    for qid, question in zip(viquae.question_ids(split), split["input"]):
        if qid not in qrels:
            continue
        if not negatives.get(qid):
            skipped += 1
            continue
        relevant = [passages[int(p)]["passage"] for p, r in qrels[qid].items() if r > 0]
        # every relevant passage is named, so DPRLoss never pushes one away as an in-batch negative
        examples.append({"query": question, "positive": relevant[0],
                         "negatives": [passages[int(negatives[qid][0])]["passage"]], "relevant": relevant})
        if images is not None:
            examples[-1]["image"] = images[qid]
    return examples, skipped


@job_main(parse_args)
def main(job):
    args, state, out_dir, started, _ = job
    cache = cache_dir(args)
    dataset = viquae.load("dataset", args.dataset_path)
    kb = viquae.load("kb", args.kb_path)
    passages = viquae.load("passages", args.passages_path)
    first_stage = viquae.load("dataset", args.first_stage_dataset) if args.first_stage_dataset else None
    missing = [s for s in ("train", "test") if s not in dataset]
    if missing:
        raise JobError(f"the ViQuAE dataset has no {missing} split(s); it has {list(dataset)}")
    check_vl_args(args)
    images = None
    if args.region_features:  # {question id: {"features": [regions, feat_dim], "boxes": [regions, 4]}}
        images = region_features(args, {q: name for s in ("train", "test") for q, name in
                                         zip(viquae.question_ids(dataset[s]), viquae.image_names(dataset[s]))})
    elif args.images_dir:
        paths = {s: viquae.image_paths(dataset[s], args.images_dir) for s in ("train", "test")}
        images = {}
        with main_process_first():  # extracted and cached once, read by the other processes
            for split_paths in paths.values():
                feats = petune.vision.extract_features(list(split_paths.values()), cache_dir=cache)
                images.update(zip(split_paths, feats))

    cited = viquae.provenance_ids(dataset["train"], dataset["test"], *([first_stage["train"]] if first_stage else []))
    links = viquae.article_passages(kb, passages, cited)  # only the articles the questions cite
    qrels, dropped = {}, {}
    for split in ("train", "test"):
        qrels[split], dropped[split] = viquae.relevant_passages(dataset[split], kb, passages, links)
        log.info("%s: %d questions with relevant passages, %d without (dropped)", split, len(qrels[split]),
                 len(dropped[split]))
    # the data is loaded and checked: only now is the output dir touched (old checkpoints removed)
    resume_from = start_run(args, out_dir, [out_dir / s / "checkpoints" for s in STAGES], state)
    bm25 = BM25(passages, column="passage", k1=args.bm25_k1, b=args.bm25_b, cache_dir=cache)

    def mine(split, split_qrels):
        questions = {q: t for q, t in zip(viquae.question_ids(split), split["input"]) if q in split_qrels}
        k = min(args.hard_negatives_k, len(passages))
        # the main process searches (building the index) and caches the run; the others then read
        # it from the cache instead of each building an index over the whole knowledge base
        with main_process_first():
            return bm25.hard_negatives(questions, split_qrels, k=k)

    torch.manual_seed(args.seed)
    model, tokenizer, pretrained = load_base(args)
    test_ids = list(qrels["test"])
    test_questions = {q: t for q, t in zip(viquae.question_ids(dataset["test"]), dataset["test"]["input"])
                      if q in qrels["test"]}
    frozen_run = None
    if args.compare_frozen:
        frozen_run = dense_run(model, tokenizer, passages, test_questions, args, cache,
                               query_length=args.question_length)

    tuned = petune.attach(model, args.method, sides=sides_option(args), **method_options(args))
    if args.region_features:
        add_visual_from_args(tuned, args, pretrained, next(iter(images.values()))["features"].shape[-1])
    elif images is not None:
        petune.vision.add_visual(tuned, backbone=petune.vision.DEFAULT_BACKBONE)
    if state.is_main_process:
        print(tuned.trainable_report())
    collate = RetrievalCollator(tokenizer, query_max_length=args.question_length,
                                passage_max_length=args.passage_length)
    stages = []
    if first_stage is not None:
        fs_qrels, fs_dropped = viquae.relevant_passages(first_stage["train"], kb, passages, links)
        stages.append(("first_stage", first_stage["train"], fs_qrels, args.first_stage_epochs))
    stages.append(("viquae", dataset["train"], qrels["train"], args.epochs))
    histories, skipped_no_negative = {}, {}
    for name, split, split_qrels, epochs in stages:
        examples, skipped_no_negative[name] = training_examples(
            split, split_qrels, mine(split, split_qrels), passages, images if name == "viquae" else None)
        if not examples:
            raise JobError(f"no training examples for {name} (no question has both a relevant passage and a "
                           "BM25 hard negative)")
        loss = DPRLoss(mini_batch_size=args.mini_batch_size)
        task = Task(name, examples, collate, loss, batch_size=min(args.batch_size, len(examples)), drop_last=True)
        histories[name] = Trainer(tuned, [task], epochs=epochs, lr=args.lr, seed=args.seed,
                                  output_dir=out_dir / name, checkpoint_every=args.checkpoint_every
                                  ).fit(resume_from=resume_from)

    test = dataset["test"]
    label = f"{args.method} + images" if images is not None else args.method
    tuned_run = dense_run(tuned, tokenizer, passages, test_questions, args, cache, images=images,
                          query_length=args.question_length, keep_store=args.keep_tuned_store)
    if state.is_main_process:
        questions = dict(zip(viquae.question_ids(test), test["input"]))
        runs = {"BM25": bm25.search({q: questions[q] for q in test_ids}, k=min(100, len(passages)))}
        if frozen_run is not None:
            runs["frozen" if images is None else "frozen (text only)"] = frozen_run
        runs[label] = tuned_run
        save_runs(out_dir / RUNS_DIR, qrels["test"], runs)  # paired comparisons later: compare(qrels, files)
        report = compare(qrels["test"], runs, metrics=METRICS)
        petune.save(tuned, out_dir / "tuned")
        summary = {
            "command": job.command,
            "method": args.method, "options": method_options(args), "sides": args.sides, "lr": args.lr,
            "epochs": args.epochs,
            "images": images is not None, "region_features": args.region_features,
            "vl_checkpoint": args.vl_t5 or args.vl_bart,
            "visual_mode": tuned.petune_visual.mode if images is not None else None,
            "trainable": tuned.trainable_report().as_dict(), "index_factory": args.index_factory,
            "passage_store": len(passages) >= args.store_from,
            "questions": {s: {"with_relevant": len(qrels[s]), "dropped_no_relevant": len(dropped[s])}
                          for s in qrels},
            "skipped_no_hard_negative": skipped_no_negative,
            "steps": {k: len(h["loss"]) for k, h in histories.items()},
            "scores": {run: dict(v) for run, v in report.results.items()},
            "p_values": p_values(report),
            "total_seconds": round(time.time() - started, 1),
        }
        markdown = "\n".join([
            f"# petune ViQuAE recipe — {label}", "", f"`{summary['command']}`", "",
            f"Test: {len(qrels['test'])} questions with a relevant passage ({len(dropped['test'])} dropped), "
            f"{len(passages)} passages, index `{args.index_factory}`.", "",
            report_markdown(report), ""])
        write_report(out_dir, markdown, summary)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
