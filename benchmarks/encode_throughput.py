"""Encode throughput: petune.encode vs a bare Hugging Face encoder forward, same texts and batch size.

    python benchmarks/encode_throughput.py [--n 32] [--batch-size 32] [--pairs 96] [--threads N] [--quick]

Both sides tokenise once up front, sort by length and pad per batch (the bare side is given the
same batches), run under torch.inference_mode and mean-pool; the ratio isolates petune's
overhead. Passes run in ABBA pairs (many short passes: on a noisy machine they give a narrower
interval than a few long ones, and per-call costs weigh more); the ratio (bare time / petune time = petune's throughput
relative to bare) is the geometric mean over pairs with a 95 % bootstrap interval
(benchmarks/stats.py). torch threads are pinned. Target: petune within 10 % of bare
(ratio ≥ 0.90). Model: the offline MiniLM BERT2BERT.
"""

import argparse
import json
import os
import platform
import statistics
import sys

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stats import ratio_ci, timed_pairs, verdict  # noqa: E402

from petune.data.packaged import bbc_news, minilm_encoder_decoder, minilm_path  # noqa: E402
from petune.embed import encode, mean_pool  # noqa: E402


def bare_encode(model, tokenizer, texts, batch_size, max_length):
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    order = np.argsort([-len(i) for i in encoded], kind="stable")
    out = np.empty((len(texts), model.config.encoder.hidden_size), np.float32)
    encoder = model.get_encoder()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            states = encoder(**batch).last_hidden_state
            out[idx] = mean_pool(states, batch["attention_mask"]).numpy()
    return out


TARGET = 0.90


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=96, help="ABBA pairs of passes")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (pinned)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the interval is too wide to judge")
    parser.add_argument("--output", default="benchmarks/encode_throughput.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.pairs = 32, 2
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = minilm_encoder_decoder()
    texts = [a["body"][:1500] for a in bbc_news()[: args.n]]
    vb = bare_encode(model, tokenizer, texts, args.batch_size, args.max_length)
    vp = encode(model, tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length, progress=False)
    assert np.allclose(vb, vp, atol=1e-5), "petune and bare embeddings differ"
    seconds = timed_pairs(
        lambda: encode(model, tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length, progress=False),
        lambda: bare_encode(model, tokenizer, texts, args.batch_size, args.max_length), args.pairs)
    timings = {"petune": seconds["petune"], "bare": seconds["direct"]}
    ratios = [d / p for p, d in zip(seconds["petune"], seconds["direct"])]
    ci = ratio_ci(ratios)
    result = {
        "command": "python benchmarks/encode_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "texts": args.n, "batch_size": args.batch_size, "max_length": args.max_length, "pairs": args.pairs,
        "texts_per_s": {k: args.n / statistics.median(v) for k, v in timings.items()},
        "median_s": {k: statistics.median(v) for k, v in timings.items()},
        "ratio_petune_over_bare_throughput": {**ci, "target": TARGET,
                                              "verdict": verdict(ci, TARGET, higher_is_better=True)},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    print(json.dumps(result, indent=2))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
