"""Classification on your own labelled texts: kNN on frozen vs tuned encoder embeddings.

    python recipes/classify.py --data tickets.csv --method lora
    python recipes/classify.py --train train.jsonl --test test.jsonl --loss contrastive

Data: csv / tsv (a header naming the columns) or JSON lines with a text and a label column
(--text-column, --label-column), a directory saved with ``datasets`` or a hub id. Either --data,
split 80 / 10 / 10 by --split-seed (the 10 % dev part is unused), or --train and --test. Checked
first: a missing column, an empty text or label, a test text also in training or a test label
never seen in training exits with status 2 naming the file, the line and the fix.

Training (the method only): --loss classification (cross-entropy of a linear head on pooled
encoder states) or contrastive (InfoNCE between two texts of the same label, in-batch
negatives). Scoring: kNN with a weighted vote (DINO: k neighbours, cosine, exp(sim / 0.07)) over
the training embeddings, frozen and tuned; accuracy and macro-F1 in report.md / report.json; the
tuned parameters with a model card in --output-dir.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time

from petune.jobs.common import (DEFAULT_LR, JobError, add_method_args, add_run_args, cache_dir, job_main, load_model,
                                method_options, start_run, write_model_card, write_report, encode_settings)

log = logging.getLogger("petune.recipes.classify")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="one file / dataset, split 80 / 10 / 10 by --split-seed")
    parser.add_argument("--train", help="training rows (with --test)")
    parser.add_argument("--test", help="test rows (with --train)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--model", help="seq2seq model name or path (default: the packaged MiniLM BERT2BERT)")
    add_method_args(parser)
    parser.add_argument("--loss", default="classification", choices=["classification", "contrastive"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours")
    parser.add_argument("--output-dir", default="runs/classify")
    add_run_args(parser, checkpoint_every=200)
    args = parser.parse_args(argv)
    if bool(args.data) == bool(args.train or args.test) or bool(args.train) != bool(args.test):
        parser.error("give --data, or --train and --test")
    args.lr = args.lr or DEFAULT_LR[args.method]
    return args


def load_splits(args):
    from petune.data.labelled import check_splits, read_labelled, split_labelled

    columns = dict(text_column=args.text_column, label_column=args.label_column)
    if args.data:
        train, _, test = split_labelled(read_labelled(args.data, **columns), seed=args.split_seed)
    else:
        train, test = read_labelled(args.train, **columns), read_labelled(args.test, **columns)
    check_splits(train, test)
    return train, test


def pairs(train, seed: int) -> list[dict]:
    """Each training text with another text of its label (contrastive loss); labels with one text
    are left out."""
    rng = random.Random(seed)
    by_label = {}
    for text, label in zip(train.texts, train.labels):
        by_label.setdefault(label, []).append(text)
    out = []
    for texts in by_label.values():
        if len(texts) > 1:
            for i, text in enumerate(texts):
                j = rng.randrange(len(texts) - 1)
                out.append({"a": text, "b": texts[j + (j >= i)]})
    return out


@job_main(parse_args)
def main(job):
    import petune
    from petune.data.files import DataError
    from petune.embed import encode_sharded
    from petune.models import d_model
    from petune.score import knn_scores
    from petune.train import (ClassificationCollator, ClassificationLoss, PairCollator, PairLoss, Task,
                              Trainer)

    args, state, out_dir, started, _ = job
    train, test = load_splits(args)  # before anything is written in the output dir
    if args.k > len(train):
        raise DataError("train", 0, f"--k {args.k} is more than the {len(train)} training rows", "lower --k")
    resume_from = start_run(args, out_dir, [out_dir / "checkpoints"], state)
    import torch

    cache = cache_dir(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    labels = sorted(set(train.labels))

    def scores(m, use_cache):
        vecs = [encode_sharded(m, tokenizer, rows.texts, max_length=args.max_length, normalize=True,
                               cache_dir=cache if use_cache else None) for rows in (train, test)]
        return None if vecs[0] is None else knn_scores(vecs[0], train.labels, vecs[1], test.labels, k=args.k)

    frozen = scores(model, True)
    tuned = petune.attach(model, args.method, **method_options(args))
    if args.loss == "classification":
        examples = [{"text": t, "label": y} for t, y in zip(train.texts, train.labels)]
        collate = ClassificationCollator(tokenizer, labels, max_length=args.max_length)
        loss = ClassificationLoss(d_model(model), len(labels))
    else:
        examples = pairs(train, args.seed)
        if not examples:
            raise JobError("the contrastive loss needs labels with two or more training texts")
        collate, loss = PairCollator(tokenizer, max_length=args.max_length), PairLoss()
    task = Task("classify", examples, collate, loss, batch_size=min(args.batch_size, len(examples)),
                drop_last=args.loss == "contrastive")
    history = Trainer(tuned, [task], epochs=args.epochs, lr=args.lr, seed=args.seed, output_dir=out_dir,
                      checkpoint_every=args.checkpoint_every).fit(resume_from=resume_from)
    result = scores(tuned, False)
    if state.is_main_process:
        petune.save(tuned, out_dir / "tuned")
        command = job.command
        summary = {"command": command, "method": args.method, "options": method_options(args), "loss": args.loss,
                   "lr": args.lr, "epochs": args.epochs, "processes": state.num_processes, "k": args.k,
                   "trainable": tuned.trainable_report().as_dict(), "labels": labels,
                   "rows": {"train": len(train), "test": len(test)}, "steps": len(history["loss"]),
                   "scores": {"frozen": frozen, args.method: result},
                   "total_seconds": round(time.time() - started, 1)}
        table = "\n".join(["| run | kNN accuracy | macro-F1 |", "|---|---|---|",
                           *(f"| {name} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} |"
                             for name, s in summary["scores"].items())])
        markdown = "\n".join([f"# petune classification — {args.method}, {args.loss} loss", "", f"`{command}`", "",
                              f"{len(train)} training and {len(test)} test texts, {len(labels)} labels; kNN "
                              f"(k = {args.k}, weighted vote) over the training embeddings.", "", table, ""])
        write_report(out_dir, markdown, summary)
        write_model_card(out_dir / "tuned", tuned, command, table, base=args.model,
                         encodings={"texts": encode_settings(args.max_length, normalize=True)})
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
