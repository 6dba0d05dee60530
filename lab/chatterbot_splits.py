"""How much of ChatterBot's score is the split: the qa module alone, frozen vs tuned, over split seeds.

    python lab/chatterbot_splits.py [--split-seeds 0 1 2 3 4] [--quick] [offline.py options]

ChatterBot's validation and test splits hold 75 questions each, so which questions they draw
moves MRR@10 more than tuning does. For every --split-seed this script builds the offline recipe's
data (recipes/offline.py, same options and defaults), trains only the ChatterBot module (the qa
task: DPR loss, in-batch + BM25 hard negatives, --repeat qa=N passes) and scores the frozen and
the tuned model on that split's validation and test questions (all answers searched; cosine
unless --similarity dot). Repeated random sub-sampling, not k-fold: the splits of different
seeds overlap. Nothing here chooses a setting. Writes a table (--write, default
lab/CHATTERBOT_SPLITS.md) and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import petune  # noqa: E402
from petune.jobs import offline  # noqa: E402
from petune.jobs.common import cache_dir, load_model, method_options  # noqa: E402
from petune.score import DenseIndex, evaluate  # noqa: E402
from petune.train import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
METRICS = ["mrr@10", "precision@1", "recall@10"]


def qa_scores(model, tokenizer, data, args, task) -> dict[str, dict[str, float]]:
    """``{"val": {metric: value}, "test": {...}}`` of ChatterBot question → answer for one model
    (``task``: the module to encode with, ``None`` for the frozen model)."""
    chat, (val, test) = data["chat"], data["splits"]["qa"][1:]
    doc_ids, docs, _, queries = offline.embed_retrieval(model, tokenizer, chat, val + test, task, args)
    index, out = DenseIndex(docs, doc_ids), {}
    for split, query_ids, vectors in (("val", val, queries[:len(val)]), ("test", test, queries[len(val):])):
        run = index.search(vectors, query_ids, k=100)
        out[split] = evaluate({q: chat.qrels[q] for q in query_ids}, run, METRICS)
    return out


def one_split(args, split_seed: int) -> dict:
    """Frozen and tuned scores of one split seed (the training seed is --seed)."""
    args = argparse.Namespace(**{**vars(args), "split_seed": split_seed})
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    data = offline.build_data(args, cache_dir(args))
    frozen = qa_scores(model, tokenizer, data, args, None)
    tuned = petune.attach(model, args.method, tasks=["qa"], **method_options(args))
    task = next(t for t in offline.build_tasks(args, data, tokenizer, petune.models.d_model(tuned.base_model))
                if t.name == "qa")
    started = time.time()
    Trainer(tuned, [task], epochs=args.epochs, lr=args.lr, seed=args.seed).fit()
    return {"split_seed": split_seed, "questions": {s: len(q) for s, q in zip(("train", "val", "test"),
                                                                           data["splits"]["qa"])},
            "train_seconds": round(time.time() - started, 1), "frozen": frozen,
            "tuned": qa_scores(tuned, tokenizer, data, args, "qa")}


def table(rows: list[dict], command: str) -> str:
    """The markdown report: one line per split seed and split, then the mean gain."""
    lines = ["# ChatterBot: tuned vs frozen over split seeds", "",
             f"Command: `{command}`. The qa module alone, the offline recipe's defaults otherwise; "
             f"{rows[0]['questions']['train']} training, {rows[0]['questions']['val']} validation and "
             f"{rows[0]['questions']['test']} test questions per split seed. Gain: tuned − frozen MRR@10.", "",
             "| split seed | split | frozen MRR@10 | tuned MRR@10 | gain | frozen P@1 | tuned P@1 | frozen R@10 "
             "| tuned R@10 |", "|---|---|---|---|---|---|---|---|---|"]
    gains = []
    for r in rows:
        for split in ("val", "test"):
            f, t = r["frozen"][split], r["tuned"][split]
            gains.append(t["mrr@10"] - f["mrr@10"])
            lines.append(f"| {r['split_seed']} | {split} | {f['mrr@10']:.3f} | {t['mrr@10']:.3f} | {gains[-1]:+.3f} "
                         f"| {f['precision@1']:.3f} | {t['precision@1']:.3f} | {f['recall@10']:.3f} "
                         f"| {t['recall@10']:.3f} |")
    frozen = [r["frozen"][s]["mrr@10"] for r in rows for s in ("val", "test")]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    lines += ["", f"Mean gain over the {len(gains)} question sets: {statistics.mean(gains):+.3f} (standard "
              f"deviation {spread:.3f}); tuned ≥ frozen on {sum(g >= 0 for g in gains)} of {len(gains)}. Frozen "
              f"MRR@10 alone ranges {min(frozen):.3f}–{max(frozen):.3f} over the same sets.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--write", type=Path, default=HERE / "CHATTERBOT_SPLITS.md", help="the table (and .json)")
    own, rest = parser.parse_known_args(argv)
    args = offline.parse_options(rest)
    rows = []
    for split_seed in own.split_seeds:
        rows.append(one_split(args, split_seed))
        print(json.dumps(rows[-1]), flush=True)
    command = "python lab/chatterbot_splits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    own.write.write_text(table(rows, command.strip()))
    own.write.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1))
    print(own.write.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
