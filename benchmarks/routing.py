"""Serving throughput: one task per row (routing) vs one call per task, and exported (merged) vs tuned.

    python benchmarks/routing.py [--n 48] [--pairs 12] [--threads N] [--quick]

Model: the offline MiniLM BERT2BERT with three tasks, one module per task, each module moved
away from its initialisation (so LoRA's zero B does not make the tasks equal). Texts: BBC bodies
(600 characters), tasks dealt round the rows (a mixed stream).

- routing: ``petune.encode(..., task=[one per text])`` against the same texts split by task, one
  ``encode`` call per task; ratio = split time / routed time (> 1: routing is faster).
- export (LoRA, (IA)^3): ``petune.encode`` of ``petune.export``'s merged model loaded with
  transformers alone against the tuned model on one task; ratio = tuned time / merged time.

Each ratio: ABBA pairs of passes, geometric mean with a 95 % bootstrap interval
(benchmarks/stats.py); embeddings are checked equal first. torch threads are pinned.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stats import ratio_ci, timed_pairs  # noqa: E402

import petune  # noqa: E402
from petune.data.packaged import bbc_news, minilm_encoder_decoder, minilm_path  # noqa: E402

TASKS = ["news", "topic", "qa"]
METHODS = {"LoRA r=8": ("lora", {"r": 8}), "(IA)^3": ("ia3", {}), "prompt tuning": ("prompt", {}),
           "adapter": ("adapter", {"reduction_factor": 8})}


def tuned_model(method, options):
    torch.manual_seed(0)
    tuned = petune.attach(minilm_encoder_decoder(), method, tasks=TASKS, **options)
    with torch.no_grad():
        for p in tuned.tuned_parameters().values():
            p.add_(0.02 * torch.randn_like(p))
    return tuned.eval()


def split_by_task(tuned, tokenizer, texts, rows, **options):
    out = np.empty((len(texts), tuned.config.encoder.hidden_size), np.float32)
    for task in TASKS:
        idx = [i for i, r in enumerate(rows) if r == task]
        out[idx] = petune.encode(tuned, tokenizer, [texts[i] for i in idx], task=task, **options)
    return out


def interval(seconds, numerator, denominator) -> dict:
    return ratio_ci([n / d for n, d in zip(seconds[numerator], seconds[denominator])])


def measure(name, method, method_options, tokenizer, texts, rows, options, pairs) -> dict:
    """One method's routing ratio, and export ratio where it exports."""
    from transformers import AutoModelForSeq2SeqLM

    tuned = tuned_model(method, method_options)
    routed = petune.encode(tuned, tokenizer, texts, task=rows, **options)
    assert np.allclose(routed, split_by_task(tuned, tokenizer, texts, rows, **options), atol=1e-4), name
    seconds = timed_pairs(lambda: petune.encode(tuned, tokenizer, texts, task=rows, **options),
                          lambda: split_by_task(tuned, tokenizer, texts, rows, **options), pairs)
    entry = {"routing": {**interval(seconds, "direct", "petune"),
                         "median_seconds": {"routed": statistics.median(seconds["petune"]),
                                            "split": statistics.median(seconds["direct"])}}}
    if method in ("lora", "ia3"):
        with tempfile.TemporaryDirectory() as tmp:
            merged = AutoModelForSeq2SeqLM.from_pretrained(petune.export(tuned, Path(tmp) / "m", task="news"))
        merged.eval()
        want = petune.encode(tuned, tokenizer, texts, task="news", **options)
        assert np.allclose(petune.encode(merged, tokenizer, texts, **options), want, atol=1e-4), name
        seconds = timed_pairs(lambda: petune.encode(merged, tokenizer, texts, **options),
                              lambda: petune.encode(tuned, tokenizer, texts, task="news", **options), pairs)
        entry["export"] = {**interval(seconds, "direct", "petune"),
                           "median_seconds": {"merged": statistics.median(seconds["petune"]),
                                              "tuned": statistics.median(seconds["direct"])}}
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48, help="texts per pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=12, help="ABBA pairs of passes per ratio")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (pinned)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the intervals are too wide to judge")
    parser.add_argument("--output", default="benchmarks/routing.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.pairs = 12, 2
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = [a["body"][:600] for a in bbc_news()[: args.n]]
    rows = [TASKS[i % len(TASKS)] for i in range(len(texts))]
    options = dict(batch_size=args.batch_size, max_length=args.max_length, progress=False)
    result = {"command": "python benchmarks/routing.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "texts": args.n, "batch_size": args.batch_size, "max_length": args.max_length, "pairs": args.pairs,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads", "methods": {}}
    for name, (method, method_options) in METHODS.items():
        result["methods"][name] = measure(name, method, method_options, tokenizer, texts, rows, options, args.pairs)
        print(name, json.dumps(result["methods"][name]), flush=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
