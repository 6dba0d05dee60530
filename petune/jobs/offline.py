"""The offline real-data job's building blocks (``recipes/offline.py`` runs them): its options
(:class:`OfflineOptions`), the real data with splits and BM25 hard negatives (:func:`build_data`),
the three tasks (:func:`build_tasks`), the evaluation encoding (:func:`evaluate_model`) and the
scoring against BM25 (:func:`score`). The benchmarks and the lab build on the same pieces.

Tasks, trained together by petune's round-robin loop:
  news   BBC News headline → article retrieval (DPR loss: in-batch + one BM25 hard negative)
  topic  BBC News topic classification (cross-entropy head on pooled encoder states)
  qa     ChatterBot question → answer retrieval (DPR loss: in-batch + one BM25 hard negative;
         the smallest task, seen twice per epoch: --repeat qa=2)
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.packaged import bbc_news, bbc_retrieval, chatterbot_qa, split_ids
from ..embed import POOLINGS, encode_sharded
from ..score import BM25, DenseIndex, compare, knn_scores, p_values, report_markdown, save_runs
from ..train import ClassificationCollator, ClassificationLoss, DPRLoss, RetrievalCollator, Task
from ..tuned import TunedModel
from .common import (DEFAULT_LR, add_distill_args, add_method_args, add_mini_batch_arg, add_mining_args, add_run_args,
                     add_sides_arg, distill_options, encode_side)

log = logging.getLogger("petune.recipes.offline")
METRICS = ["mrr@10", "precision@1", "recall@10", "ndcg@10"]
TASKS = ("news", "topic", "qa")


@dataclass
class OfflineOptions:
    """The offline job's options, as :func:`parse_options` reads them from a command line (the
    parser holds the defaults and the help; ``python recipes/offline.py --help`` lists them)."""

    model: str | None
    method: str
    tasks_mode: str
    d: int | None
    reduction_factor: float | None
    placement: str
    r: int
    alpha: float
    num_virtual_tokens: int
    lr: float
    epochs: int
    batch_size: int
    mini_batch_size: int | None
    repeat: dict[str, int]
    seed: int
    split_seed: int
    body_chars: int
    train_passage_length: int
    hard_negatives: dict[str, int]
    similarity: str
    scale: float
    pooling: str
    mask_false_negatives: bool
    eval_length: int
    eval_split: str
    output_dir: str
    max_articles: int | None
    max_questions: int | None
    quick: bool
    resume: bool
    checkpoint_every: int
    cache_dir: str | None
    mine_negatives: int = 0
    mine_ranks: tuple[int, int] = (0, 30)
    mine_margin: float = 0.05
    mine_every: int = 1
    distill: str | None = None
    teacher: str | None = None
    teacher_kind: str = "bi-encoder"
    teacher_length: int = 256
    distill_weight: float = 1.0
    contrastive_weight: float = 1.0
    student_temperature: float | None = None
    teacher_temperature: float | None = None
    collective_timeout: float | None = None
    verbose: bool = False
    sides: str = "both"


def parse_options(argv=None, description: str | None = None) -> OfflineOptions:
    """:class:`OfflineOptions` from command-line arguments (``argv``; ``None``: ``sys.argv``).

    Raises:
        SystemExit: bad arguments (argparse's message).
    """
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="seq2seq model name or path (default: the packaged MiniLM BERT2BERT)")
    add_method_args(parser)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch (every task)")
    add_mini_batch_arg(parser)
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
                        help="the split scored: val for choosing settings (lab/SWEEP.md), test for reporting")
    parser.add_argument("--output-dir", default="runs/offline")
    parser.add_argument("--max-articles", type=int, help="use a random subset of BBC articles (by --split-seed)")
    parser.add_argument("--max-questions", type=int, help="use the first N ChatterBot questions")
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run on small subsets "
                        "(300 articles, 200 questions unless --max-articles / --max-questions say otherwise)")
    add_sides_arg(parser)
    add_mining_args(parser)
    add_distill_args(parser)
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
    short = {t: k for t, k in args.hard_negatives.items() if 0 < k < args.mine_negatives}
    if args.mine_negatives < 0 or short:
        parser.error(f"--mine-negatives {args.mine_negatives} must be 0 … each retrieval task's --hard-negatives "
                     f"(a task with 0 is not mined), got {args.hard_negatives}")
    args.mine_ranks = tuple(args.mine_ranks)
    return OfflineOptions(**vars(args))


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
def build_data(opts: OfflineOptions, cache=None):
    """Real data, splits, BM25 hard negatives (runs cached in ``cache``). Returns a dict of
    everything the job needs."""
    articles = bbc_news()
    chat = chatterbot_qa()
    if opts.max_articles and opts.max_articles < len(articles):
        rng = np.random.default_rng(opts.split_seed)
        articles = [articles[i] for i in sorted(rng.choice(len(articles), opts.max_articles, replace=False))]
    if opts.max_questions and opts.max_questions < len(chat.queries):
        chat = chat.subset(sorted(chat.queries, key=lambda q: int(q[1:]))[:opts.max_questions])
        chat.docs = {d: chat.docs[d] for d in sorted({d for q in chat.qrels.values() for d in q})}
    news = bbc_retrieval(articles, max_chars=opts.body_chars)
    by_id = {a["id"]: a for a in articles}
    train_a, val_a, test_a = split_ids(list(by_id), seed=opts.split_seed)
    train_q, val_q, test_q = split_ids(list(chat.queries), seed=opts.split_seed)

    # BM25 hard negatives from the training documents only (test articles stay unseen)
    n_news, n_qa = opts.hard_negatives["news"], opts.hard_negatives["qa"]
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
        "articles": by_id, "topics": topics, "eval_split": opts.eval_split,
        "splits": {"news": (train_a, val_a, test_a), "qa": (train_q, val_q, test_q)},
        "news": news, "chat": chat,
        "news_train": examples(news_train, news_negs, n_news, lambda q: news_train.qrels[q]),
        "qa_train": examples(chat_train, chat_negs, n_qa, lambda q: chat_train.qrels[q]),
        "topic_train": [{"text": news.docs[a], "label": by_id[a]["topic"]} for a in train_a],
        "bm25": {"news": BM25(news.docs, k1=0.5, b=0.3, cache_dir=cache), "qa": chat_bm25},
    }


def retrieval_loss(opts: OfflineOptions) -> DPRLoss:
    """The DPR loss of --similarity: inner product, or cosine times --scale."""
    return DPRLoss(opts.pooling, scale=opts.scale if opts.similarity == "cosine" else None,
                   mask_false_negatives=opts.mask_false_negatives, mini_batch_size=opts.mini_batch_size,
                   **distill_options(opts))


def retrieval_passages(data, task: str) -> list[str]:
    """The passages a retrieval task's hard negatives come from: the training articles (news; the
    test articles stay unseen) or every answer (qa)."""
    if task == "news":
        return [data["news"].docs[a] for a in data["splits"]["news"][0]]
    return list(data["chat"].docs.values())


def add_teacher(opts: OfflineOptions, data, teacher, cache=None) -> None:
    """With ``--distill``, every retrieval example gets its teacher scores (computed once, cached)."""
    from ..train.teacher import add_teacher_scores

    if opts.distill:
        for task in ("news", "qa"):
            data[f"{task}_train"] = add_teacher_scores(data[f"{task}_train"], teacher, cache_dir=cache)


def add_miners(opts: OfflineOptions, tasks: list[Task], data, tokenizer, teacher, out_dir, cache=None,
               multi: bool = True) -> list:
    """With ``--mine-negatives``, each retrieval task with hard negatives trains on a
    :class:`~petune.train.mining.MinedNegatives` set; returns their miners (the Trainer's
    ``on_epoch_start``). Each round encodes the task's passages with its module's passage side as
    the job scores them: a query-side model's are the frozen model's (read from ``cache``), the
    other models' are encoded again."""
    from ..train.mining import MinedNegatives, NegativeMiner, memory_index

    if not opts.mine_negatives:
        return []
    miners = []
    normalize = opts.similarity == "cosine"
    for task in tasks:
        if task.name not in ("news", "qa") or opts.hard_negatives[task.name] == 0:
            continue
        passages = retrieval_passages(data, task.name)
        row = {text: i for i, text in enumerate(passages)}
        module = task.name if multi else None
        task.dataset = MinedNegatives(task.dataset, opts.mine_negatives, lambda rows, p=passages: [p[r] for r in rows])

        def index_for(model, passages=passages, module=module):
            return memory_index(model, tokenizer, passages, max_length=opts.eval_length, normalize=normalize,
                                pooling=opts.pooling, task=module, side=encode_side(model, "passage"),
                                cache_dir=_frozen_cache(model, "passage", cache))

        miners.append(NegativeMiner(
            task.dataset, tokenizer, index_for,
            [{row[t] for t in e["relevant"] if t in row} for e in task.dataset.examples],
            positive_rows=[row.get(e["positive"]) for e in task.dataset.examples], ranks=opts.mine_ranks,
            relative_margin=opts.mine_margin if opts.mine_margin >= 0 else None, every=opts.mine_every,
            seed=opts.seed, directory=Path(out_dir) / "mined" / task.name, teacher=teacher, query_length=64,
            passage_length=opts.eval_length, normalize=normalize, pooling=opts.pooling, task=module))
    return miners


def build_tasks(opts: OfflineOptions, data, tokenizer, d_model: int) -> list[Task]:
    """The three training tasks: news and qa retrieval (DPR loss, in-batch + --hard-negatives BM25 ones),
    topic classification (a linear head on pooled ``[batch, d_model]`` states); --batch-size,
    --train-passage-length and --repeat apply."""
    retrieval = RetrievalCollator(tokenizer, query_max_length=64, passage_max_length=opts.train_passage_length)
    topic = ClassificationCollator(tokenizer, data["topics"], max_length=opts.train_passage_length)
    return [Task("news", data["news_train"], retrieval, retrieval_loss(opts), batch_size=opts.batch_size,
                 drop_last=True, repeat=opts.repeat["news"]),
            Task("topic", data["topic_train"], topic, ClassificationLoss(d_model, len(data["topics"]), opts.pooling),
                 batch_size=opts.batch_size, repeat=opts.repeat["topic"]),
            Task("qa", data["qa_train"], retrieval, retrieval_loss(opts), batch_size=opts.batch_size,
                 drop_last=True, repeat=opts.repeat["qa"])]


# -- scoring ---------------------------------------------------------------------------------
def embed_docs(model, tokenizer, texts, task, opts: OfflineOptions, cache=None, side: str = "passage"):
    """Documents as the job scores them: --eval-length tokens, --pooling, normalised under cosine
    similarity; ``[n, d_model]`` on the main process (``None`` on the others, ``encode_sharded``);
    ``task`` names the module (``None``: frozen), ``side`` the side of a model with asymmetric
    sides (``--sides``): passages, or for topic kNN the query side the classification head trains."""
    return encode_sharded(model, tokenizer, texts, task=task, max_length=opts.eval_length,
                          normalize=opts.similarity == "cosine", pooling=opts.pooling,
                          cache_dir=_frozen_cache(model, side, cache), side=encode_side(model, side))


def _frozen_cache(model, side: str, cache):
    """``cache`` where ``side`` is the frozen model's (a plain model, a query-side model's
    passages), else ``None``: no later run has a tuned model's weights."""
    frozen = not isinstance(model, TunedModel) or model.is_frozen_side(encode_side(model, side))
    return cache if frozen else None


def embed_retrieval(model, tokenizer, collection, query_ids, task, opts: OfflineOptions, cache=None):
    """``(doc_ids, docs, query_ids, queries)`` of one retrieval collection as the job scores it:
    every document (:func:`embed_docs`) and the given queries (64 tokens, the same pooling and
    normalisation), ``[n, d_model]`` arrays; ``task`` names the module (``None``: frozen).
    ``encode_sharded``: the arrays arrive on the main process (``None`` on the others)."""
    doc_ids = list(collection.docs)
    docs = embed_docs(model, tokenizer, [collection.docs[d] for d in doc_ids], task, opts, cache)
    queries = encode_sharded(model, tokenizer, [collection.queries[q] for q in query_ids], task=task, max_length=64,
                             normalize=opts.similarity == "cosine", pooling=opts.pooling,
                             cache_dir=_frozen_cache(model, "query", cache), side=encode_side(model, "query"))
    return doc_ids, docs, list(query_ids), queries


def embed_all(model, tokenizer, data, opts: OfflineOptions, task_for, cache=None):
    """Embeddings of every scored query and every document, per retrieval task, plus topic vectors
    (``{article id: [d_model]}``: the training articles and the scored ones, what kNN reads).

    Every process encodes its share (``encode_sharded``); the embeddings arrive on the main
    process, which gets the dict (the others get ``None``)."""
    out = {}
    for name, collection in (("news", data["news"]), ("qa", data["chat"])):
        out[name] = embed_retrieval(model, tokenizer, collection, test_queries(data, name), task_for(name), opts,
                                    cache)
    topic_task = task_for("topic")
    if topic_task == task_for("news") and encode_side(model, "query") is None:  # one module: encoded already
        ids, topic = list(data["news"].docs), out["news"][1]
    else:  # only what kNN reads, by the side the topic head trained (a plain forward's: the query side)
        memory, scored = knn_articles(data)
        ids = [*memory, *scored]
        topic = embed_docs(model, tokenizer, [data["news"].docs[a] for a in ids], topic_task, opts, cache,
                           side="query")
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


def evaluate_model(model, tokenizer, data, opts: OfflineOptions, task_for, cache=None) -> dict | None:
    """One system's test results: ``{"news": Run, "qa": Run, "topic": {accuracy, macro_f1}}`` on the
    main process, ``None`` on the others (call it on every process: they share the encoding)."""
    emb = embed_all(model, tokenizer, data, opts, task_for, cache)
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


def score(data, systems: dict[str, dict], fuse_with_bm25: str | None = None, runs_dir=None):
    """Compare systems (``{name: evaluate_model(...)}``) with BM25 on the --eval-split; with
    ``fuse_with_bm25``, also that system fused with BM25 by reciprocal rank fusion (ranx, k=60),
    as an extra row named :func:`fused_name`. ``runs_dir``: every run and the qrels are written
    there as TREC files, one folder per collection (``runs_dir/news``, ``runs_dir/qa``), for
    paired comparisons across runs later (:func:`petune.score.compare` takes their paths).

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
        if runs_dir is not None:
            save_runs(Path(runs_dir) / name, test.qrels, runs)
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


