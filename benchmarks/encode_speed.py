"""Faster CPU encoding of a frozen model: torch's dynamic int8 quantisation against float32, side by
side in one run — throughput and retrieval quality.

    python benchmarks/encode_speed.py        → benchmarks/encode_speed.json

Throughput: ABBA pairs of encode passes over 32 BBC bodies (max 256 tokens, batch 32, the length
of a knowledge-base passage) with the frozen MiniLM BERT2BERT, float32 and its copy through
``petune.embed.int8_copy`` (torch's ``quantize_dynamic``: ``nn.Linear`` → int8 weights,
activations quantised per batch; what ``petune.encode(..., quantize="int8")`` encodes with);
ratio = float32 time / int8 time, geometric mean over pairs with its 95 % bootstrap interval
(benchmarks/stats.py). Quality: MRR@10 of BBC headline → article on the offline job's
test split (209 headlines, all 2,089 articles cut to 1,000 characters, 256 tokens, mean pooling,
cosine), both models, with Fisher's randomization test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from petune import encode
from petune.embed import int8_copy
from petune.data.packaged import bbc_news, bbc_retrieval, minilm_encoder_decoder, minilm_path, split_ids
from petune.score import DenseIndex, compare, p_values

HERE = Path(__file__).resolve().parent


def quality(models: dict, tok) -> dict:
    articles = bbc_news()
    news = bbc_retrieval(articles, max_chars=1000)
    _, _, test = split_ids([a["id"] for a in articles], seed=0)
    qids = [f"q-{a}" for a in test]
    doc_ids = list(news.docs)
    runs = {}
    for name, model in models.items():
        docs = encode(model, tok, [news.docs[d] for d in doc_ids], max_length=256, normalize=True)
        q = encode(model, tok, [news.queries[i] for i in qids], max_length=64, normalize=True)
        runs[name] = DenseIndex(docs, doc_ids).search(q, qids, k=100)
    report = compare({q: news.qrels[q] for q in qids}, runs, metrics=["mrr@10", "recall@10"])
    return {"queries": len(qids), "documents": len(doc_ids),
            "scores": {run: dict(v) for run, v in report.results.items()}, "p_values": p_values(report)}


def section(r: dict) -> list[str]:
    """benchmarks/RESULTS.md's section for this benchmark."""
    c, q = r["speedup_int8"], r["quality"]
    fp, i8 = q["scores"]["float32"], q["scores"]["int8 dynamic"]
    p = q["p_values"]["float32 vs int8 dynamic"]
    return ["## Faster CPU encoding: int8 dynamic quantisation", "",
            f"`{r['command']}` ({r['machine']}, {r['threads']} threads; {r['pairs']} ABBA pairs of encode passes "
            "over 32 BBC bodies, max 256 tokens, batch 32, the frozen MiniLM BERT2BERT; ratio = float32 time / "
            "int8 time, geometric mean over pairs with its 95 % bootstrap interval. Quality: BBC headline → "
            f"article, the offline job's test split, {q['queries']} headlines over {q['documents']:,} articles).", "",
            "| | texts/s | MRR@10 | Recall@10 |", "|---|---|---|---|",
            f"| float32 | {r['texts_per_second']['float32']:.1f} | {fp['mrr@10']:.3f} | {fp['recall@10']:.3f} |",
            f"| int8 dynamic (`quantize=\"int8\"`) | {r['texts_per_second']['int8 dynamic']:.1f} | "
            f"{i8['mrr@10']:.3f} | {i8['recall@10']:.3f} |", "",
            f"Speed-up {c['ratio']:.2f} [{c['low']:.2f}, {c['high']:.2f}]; MRR@10 difference p = {p['mrr@10']:.2f} "
            f"(Fisher's randomization test). Kept: `petune.encode(..., quantize=\"int8\")`.", ""]


def main(argv=None):
    import stats  # benchmarks/stats.py (this script's folder is on sys.path)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=24, help="ABBA pairs of encode passes")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default=str(HERE / "encode_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    fp32 = minilm_encoder_decoder().eval()
    models = {"float32": fp32, "int8 dynamic": int8_copy(fp32)}
    texts = [a["body"] for a in bbc_news()[:32]]
    for model in models.values():  # warm up
        encode(model, tok, texts, max_length=256, batch_size=32, progress=False)
    # stats.timed_pairs names its sides "petune" and "direct": here float32 and int8
    seconds = stats.timed_pairs(lambda: encode(models["float32"], tok, texts, max_length=256, batch_size=32,
                                               progress=False),
                                lambda: encode(models["int8 dynamic"], tok, texts, max_length=256, batch_size=32,
                                               progress=False), args.pairs)
    ci = stats.ratio_ci([a / b for a, b in zip(seconds["petune"], seconds["direct"])])
    result = {
        "command": "python benchmarks/encode_speed.py", "pairs": args.pairs, "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "texts_per_second": {"float32": len(texts) / statistics.median(seconds["petune"]),
                             "int8 dynamic": len(texts) / statistics.median(seconds["direct"])},
        "speedup_int8": ci, "quality": quality(models, tok),
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
