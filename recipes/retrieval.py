"""Retrieval on your own collection: a BEIR directory in, a tuned encoder and a report out.

    python recipes/retrieval.py --beir my-data --method lora
    python recipes/retrieval.py --beir my-data --train-file pairs.jsonl --model t5-base --method adapter
    accelerate launch --multi_gpu --num_processes 8 recipes/retrieval.py --hub BeIR/scifact ...

Data: a BEIR directory (corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv; docs/your-data.md)
or a hub id in BEIR's convention (--hub BeIR/scifact, qrels in BeIR/scifact-qrels). Everything is
checked before anything is trained; a problem exits with status 2 naming the file, the line and
the fix, and nothing is written.

Steps:
1. training examples: each query of qrels/train.tsv with each of its relevant documents, and/or
   the lines of --train-file (Tevatron / sentence-transformers shapes); BM25 hard negatives (the
   top --bm25-depth documents minus the relevant ones, BM25 order); every relevant document of a
   query is left out of its in-batch and hard negatives (false negatives masked);
2. DPR-style contrastive training of the method (cosine similarity by default, in-batch
   negatives, --hard-negatives per example), on 1 or N processes;
3. model selection on dev when qrels/dev.tsv exists: after every epoch the dev queries rerank
   their BM25 top --dev-candidates plus their relevant documents; the best epoch's parameters
   are kept;
4. test: BM25, the frozen model and the tuned one over the whole corpus (on-disk store from
   --store-from documents on), ranx MRR@10, nDCG@10, Recall@100, Fisher's randomization test
   p ≤ 0.01; report.md / report.json, the tuned parameters with a model card in --output-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from petune.atomic import atomic_write
from petune.dist import main_process_first
from petune.jobs.common import (DEFAULT_LR, JobError, add_distill_args, add_index_args, add_method_args,
                                add_mini_batch_arg, add_mining_args, add_run_args, add_sides_arg, cache_dir,
                                check_distill_args, dense_run, distill_options, encode_settings, encode_side,
                                job_main, load_model, method_options, mining_index, sides_option, start_run,
                                teacher_from_args, write_model_card, write_report)

log = logging.getLogger("petune.recipes.retrieval")
METRICS = ["mrr@10", "ndcg@10", "recall@100"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--beir", help="a BEIR directory: corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv")
    data.add_argument("--hub", help="a hub id in BEIR's convention (BeIR/scifact + BeIR/scifact-qrels)")
    parser.add_argument("--train-file", help="training examples, JSON lines: {query, positive(s), negative(s)} or "
                        "Tevatron's {query, positive_passages, negative_passages}")
    parser.add_argument("--model", help="seq2seq model name or path (default: the packaged MiniLM BERT2BERT)")
    add_method_args(parser)
    add_sides_arg(parser)
    parser.add_argument("--lr-search", type=float, nargs="+", metavar="LR", help="train once per learning rate and "
                        "keep the one (and its epoch) with the best dev MRR@10: a search on this collection's own dev "
                        "split (needs qrels/dev.tsv; costs one training per rate); the report lists each rate's dev "
                        "scores")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch and process")
    add_mini_batch_arg(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--similarity", default="cosine", choices=["cosine", "dot"],
                        help="cosine: normalised embeddings, scores times --scale in the loss; dot: inner product")
    parser.add_argument("--scale", type=float, default=20.0, help="cosine scale in the loss (1 / temperature)")
    parser.add_argument("--hard-negatives", type=int, default=1, help="BM25 hard negatives per training example")
    parser.add_argument("--bm25-depth", type=int, default=100, help="BM25 depth mined for hard negatives")
    parser.add_argument("--bm25-k1", type=float, default=1.2)
    parser.add_argument("--bm25-b", type=float, default=0.75)
    parser.add_argument("--dev-candidates", type=int, default=100, help="BM25 depth of each dev query's candidates")
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--passage-length", type=int, default=256)
    parser.add_argument("--train-passage-length", type=int, default=128, help="passage tokens during training")
    parser.add_argument("--query-prefix", default="", help="prepended to every query (e.g. 'query: ')")
    parser.add_argument("--passage-prefix", default="", help="prepended to every document (e.g. 'passage: ')")
    add_mining_args(parser)
    add_distill_args(parser)
    add_index_args(parser)
    parser.add_argument("--output-dir", default="runs/retrieval")
    add_run_args(parser, checkpoint_every=200)
    args = parser.parse_args(argv)
    if args.lr is not None and args.lr_search:
        parser.error("give --lr or --lr-search, not both")
    args.lr = args.lr or DEFAULT_LR[args.method]
    if not 0 <= args.mine_negatives <= args.hard_negatives:
        parser.error(f"--mine-negatives {args.mine_negatives} must be 0 … --hard-negatives ({args.hard_negatives})")
    return args


def load_data(args, state):
    """The checked collection (the main process converts the corpus to Arrow first) and the
    training file's examples."""
    from petune.data.beir import beir_from_hub, load_beir, read_training_file

    extra = read_training_file(args.train_file) if args.train_file else []  # checked before anything is written
    root = args.beir
    with main_process_first():
        if args.hub:  # written whole or not at all (beir_from_hub): a directory there is complete
            root = Path(cache_dir(args)) / "beir" / args.hub.replace("/", "--")
            if not root.is_dir():
                beir_from_hub(args.hub, root)
        data = load_beir(root, cache_dir=Path(cache_dir(args)) / "datasets",
                         required=("test",) if args.train_file else ("train", "test"))
    return data, extra


def texts_of(corpus, rows) -> dict[int, str]:
    """``{row: passage}`` for the given corpus rows (random access into the Arrow file)."""
    rows = sorted(set(int(r) for r in rows))
    return dict(zip(rows, corpus.select(rows)["passage"])) if rows else {}


def rows_of(corpus, ids) -> dict[str, int]:
    """``{document id: row}`` for the given ids, in one streamed pass over the ``_id`` column."""
    from petune.data.stream import column_rows

    wanted = set(ids)
    return {d: row for row, d in enumerate(column_rows(corpus, "_id")) if d in wanted}


def ids_of(corpus, runs: dict) -> dict:
    """Runs over corpus rows (``ranx.Run`` or dicts) with their documents named by ``_id``."""
    from petune.score import make_run

    runs = {name: (r.to_dict() if hasattr(r, "to_dict") else r) for name, r in runs.items()}
    rows = sorted({int(d) for run in runs.values() for docs in run.values() for d in docs})
    name = dict(zip(rows, corpus.select(rows)["_id"])) if rows else {}
    return {k: make_run({q: {name[int(d)]: s for d, s in docs.items()} for q, docs in run.items()}, name=k)
            for k, run in runs.items()}


def training_examples(data, extra, bm25, args, state) -> tuple[list[dict], int, int]:
    """One example per (query, relevant document) of qrels/train.tsv and per (query, positive) of
    the training file, each with ``--hard-negatives`` negatives (a file's own first, then BM25's,
    never one of the query's relevant texts) and the list of all its query's relevant texts. A
    query BM25 finds too few negatives for (one sharing no word with the rest of the corpus) gets
    random documents of the corpus for the rest (DPR's random negatives; drawn from ``--seed`` and
    the query, the same on every process). Returns ``(examples, queries given random negatives,
    examples dropped)``: only a corpus too small to give a query its negatives drops examples.
    Examples of qrels carry their query's ``"relevant_rows"`` (never mined as negatives) and their
    ``"positive_row"``; those of a training file with teacher scores carry its ``"scores"``."""
    train = data.qrels.get("train", {})
    relevant = {q: [d for d, s in docs.items() if s > 0] for q, docs in train.items()}
    row = rows_of(data.corpus, {d for docs in relevant.values() for d in docs})
    queries = {q: data.queries[q] for q in relevant}
    queries.update({f"file-{i}": e["query"] for i, e in enumerate(extra)})
    with main_process_first():  # the main process builds the index; the others read its cached runs
        run = bm25.search(queries, k=min(args.bm25_depth, len(data.corpus))).to_dict() if queries else {}
    k = args.hard_negatives
    wanted = {}  # query key → (positives: rows or texts, candidate negatives: texts then rows, rows to avoid)
    for q, docs in relevant.items():
        wanted[q] = ([row[d] for d in docs], [], {row[d] for d in docs})
    from_file = {f"file-{i}" for i in range(len(extra))}  # their positives are texts: compared as texts
    for i, e in enumerate(extra):
        wanted[f"file-{i}"] = (list(e["positives"]), list(e["negatives"]), set())
    for key, (positives, candidates, avoid) in wanted.items():
        ranked = sorted(run.get(key, {}).items(), key=lambda item: -item[1])
        candidates += [int(d) for d, _ in ranked if int(d) not in avoid][:k + len(positives)]  # room to filter
    texts = texts_of(data.corpus, sorted({r for p, c, _ in wanted.values() for r in [*p, *c] if isinstance(r, int)}))
    resolve = lambda items: [texts[x] if isinstance(x, int) else x for x in items]  # noqa: E731
    chosen, short = {}, {}
    for key, (positives, candidates, avoid) in wanted.items():
        positive_texts, negatives = resolve(positives), resolve(candidates)
        if key in from_file:
            negatives = list(dict.fromkeys(t for t in negatives if t not in positive_texts))
        negatives = negatives[:k]
        chosen[key] = (positive_texts, negatives)
        if len(negatives) < k:
            rows = random_documents(len(data.corpus), f"{args.seed}:{key}", k - len(negatives) + len(positives),
                                    avoid | {c for c in candidates if isinstance(c, int)})
            if rows is not None:
                short[key] = rows
    more = texts_of(data.corpus, sorted({r for rows in short.values() for r in rows})) if short else {}
    examples, dropped = [], 0
    for key, (positives, negatives) in chosen.items():
        if key in short:
            fill = [more[r] for r in short[key] if more[r] not in positives and more[r] not in negatives]
            negatives = negatives + fill[:k - len(negatives)]
        if len(negatives) < k:
            dropped += len(positives)
            continue
        if key in from_file:
            own = extra[int(key[5:])]
            keys = [{"scores": own["scores"]} if "scores" in own else {} for _ in positives]
        else:  # rows of the corpus: mined negatives leave them out, and read the positive's vector by its row
            keys = [{"relevant_rows": sorted(wanted[key][2]), "positive_row": r} for r in wanted[key][0]]
        examples += [{"query": queries[key], "positive": positive, "negatives": negatives, "relevant": positives,
                      **more_keys} for positive, more_keys in zip(positives, keys)]
    return examples, len(short), dropped


def random_documents(size: int, seed: str, k: int, exclude: set) -> list[int] | None:
    """``k`` distinct random rows of a ``size``-row corpus outside ``exclude`` (``random.Random(seed)``,
    the same on every process); ``None`` when the corpus has too few."""
    import random

    if size - len(exclude) < k:
        return None
    rng, rows = random.Random(seed), []
    while len(rows) < k:
        r = rng.randrange(size)
        if r not in exclude and r not in rows:
            rows.append(r)
    return rows


def training_set(examples, data, tokenizer, teacher, args, cache, out_dir):
    """The training examples, and with ``--mine-negatives`` the :class:`~petune.train.mining.MinedNegatives`
    wrapper and its :class:`~petune.train.mining.NegativeMiner` (else ``None``): its rounds search the
    collection as the test run does and are written to ``out_dir/mined``. Call it once per
    training (each trains on the negatives its own model mines)."""
    if not args.mine_negatives:
        return examples, None
    from petune.train.mining import MinedNegatives, NegativeMiner

    def passage_text(rows):
        found = texts_of(data.corpus, rows)
        return [found[r] for r in rows]

    normalize = args.similarity == "cosine"
    dataset = MinedNegatives(examples, args.mine_negatives, passage_text)
    miner = NegativeMiner(
        dataset, tokenizer, lambda model: mining_index(model, tokenizer, data.corpus, args, cache,
                                                       passage_prefix=args.passage_prefix, normalize=normalize),
        [set(e.get("relevant_rows", ())) for e in examples], positive_rows=[e.get("positive_row") for e in examples],
        ranks=tuple(args.mine_ranks),
        relative_margin=args.mine_margin if args.mine_margin >= 0 else None, every=args.mine_every, seed=args.seed,
        directory=out_dir / "mined", teacher=teacher, query_length=args.query_length,
        passage_length=args.passage_length, query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
        normalize=normalize)
    return dataset, miner


def dev_selection(tokenizer, data, bm25, args, out_dir, state):
    """``eval_fn`` for the Trainer: dev MRR@10 of the trainer's model reranking each dev query's
    BM25 top ``--dev-candidates`` plus its relevant documents; saves the best parameters seen by
    any training it is given to (``--lr-search``) in ``out_dir/best`` (main process). Its
    ``best`` dict holds the best score and ``lr`` (set ``current["lr"]`` before each training),
    also written to ``out_dir/best.json`` so that ``--resume`` compares with the best seen before
    the interruption. ``None`` without a dev split."""
    import petune
    from petune.score import DenseIndex, evaluate

    if "dev" not in data.qrels:
        return None
    dev = data.split_queries("dev")
    with main_process_first():
        run = bm25.search(dev, k=min(args.dev_candidates, len(data.corpus))).to_dict()
    row = rows_of(data.corpus, {d for docs in data.qrels["dev"].values() for d in docs})
    candidates = sorted({int(d) for docs in run.values() for d in docs} | set(row.values()))
    texts = texts_of(data.corpus, candidates)
    best, current = {"mrr@10": -1.0, "lr": None}, {"lr": None}
    if args.resume and (out_dir / "best.json").exists() and (out_dir / "best").exists():
        best.update(json.loads((out_dir / "best.json").read_text()))
    normalize = args.similarity == "cosine"
    frozen_docs = []  # a query-side model's candidates are the frozen model's: encoded once

    def evaluate_dev(trainer) -> dict:
        tuned = trainer.model
        sides = (encode_side(tuned, "query"), encode_side(tuned, "passage"))
        docs = frozen_docs[0] if frozen_docs else petune.encode(
            tuned, tokenizer, [texts[r] for r in candidates], max_length=args.passage_length,
            prefix=args.passage_prefix, normalize=normalize, progress=False, side=sides[1])
        if tuned.sides == "query":
            frozen_docs[:] = [docs]
        q = petune.encode(tuned, tokenizer, list(dev.values()), max_length=args.query_length,
                          prefix=args.query_prefix, normalize=normalize, progress=False, side=sides[0])
        found = DenseIndex(docs, [str(r) for r in candidates]).search(q, list(dev), k=min(100, len(candidates)))
        qrels = {q: {str(row[d]): s for d, s in docs.items()} for q, docs in data.qrels["dev"].items()}
        score = evaluate(qrels, found, "mrr@10")["mrr@10"]
        if score > best["mrr@10"]:
            best.update({"mrr@10": score, "lr": current["lr"]})
            if state.is_main_process:
                petune.save(tuned, out_dir / "best")
                # after the parameters it describes: a kill between the two leaves the older, lower score
                atomic_write(out_dir / "best.json", lambda f: f.write(json.dumps(best).encode()))
        state.wait_for_everyone()
        return {"dev_mrr@10": score}

    evaluate_dev.best, evaluate_dev.current = best, current
    return evaluate_dev


@job_main(parse_args)
def main(job):
    import petune
    from petune.score import BM25, compare, p_values, report_markdown, save_runs
    from petune.score.runs import RUNS_DIR
    from petune.train import DPRLoss, RetrievalCollator, Task, Trainer

    args, state, out_dir, started, _ = job
    check_distill_args(args)
    data, extra = load_data(args, state)  # before anything is written in the output dir
    if args.lr_search and "dev" not in data.qrels:
        raise JobError("--lr-search chooses on the dev split: add qrels/dev.tsv, or give one --lr")
    resume_from = start_run(args, out_dir, [out_dir / "checkpoints", out_dir / "mined", out_dir / "search"], state)
    cache = cache_dir(args)
    bm25 = BM25(data.corpus, column="passage", k1=args.bm25_k1, b=args.bm25_b, cache_dir=cache)
    examples, filled, dropped = training_examples(data, extra, bm25, args, state)
    if not examples:
        raise JobError("no training example: add training queries (qrels/train.tsv or --train-file), or lower "
                       "--hard-negatives below the corpus size")
    log.info("%d training examples (%d queries given random negatives where BM25 found fewer than %d; %d examples "
             "dropped)", len(examples), filled, args.hard_negatives, dropped)
    teacher = teacher_from_args(args)
    if args.distill:
        from petune.train.teacher import add_teacher_scores

        try:
            examples = add_teacher_scores(examples, teacher, cache_dir=cache)
        except ValueError as e:
            raise JobError(str(e)) from None
    import torch

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    normalize = args.similarity == "cosine"
    test = data.split_queries("test")
    encode_options = dict(query_length=args.query_length, query_prefix=args.query_prefix,
                          passage_prefix=args.passage_prefix, normalize=normalize)
    frozen_run = dense_run(model, tokenizer, data.corpus, test, args, cache, **encode_options)
    collate = RetrievalCollator(tokenizer, query_max_length=args.query_length,
                                passage_max_length=args.train_passage_length, query_prefix=args.query_prefix,
                                passage_prefix=args.passage_prefix)
    select = dev_selection(tokenizer, data, bm25, args, out_dir, state)
    searched = {}  # --lr-search: each rate's dev scores
    for i, lr in enumerate(args.lr_search or [args.lr]):
        if i:  # every rate starts from the same pretrained weights and seed
            torch.manual_seed(args.seed)
            model, tokenizer = load_model(args.model)
        run_dir = out_dir / "search" / f"lr-{lr:g}" if args.lr_search else out_dir
        tuned = petune.attach(model, args.method, sides=sides_option(args), **method_options(args))
        if state.is_main_process and i == 0:
            print(tuned.trainable_report())
        loss = DPRLoss(scale=args.scale if normalize else None, mini_batch_size=args.mini_batch_size,
                       **distill_options(args))
        dataset, miner = training_set(examples, data, tokenizer, teacher, args, cache, run_dir)
        task = Task("retrieval", dataset, collate, loss, batch_size=min(args.batch_size, len(examples)),
                    drop_last=True)
        steps_per_epoch = max(1, len(examples) // (task.batch_size * state.num_processes))
        if select is not None:
            select.current["lr"] = lr
        history = Trainer(tuned, [task], epochs=args.epochs, lr=lr, seed=args.seed, output_dir=run_dir,
                          checkpoint_every=args.checkpoint_every, eval_fn=select,
                          eval_every=steps_per_epoch if select else None,
                          on_epoch_start=[miner] if miner else []).fit(resume_from=resume_from)
        searched[f"{lr:g}"] = [round(e["dev_mrr@10"], 4) for e in history["eval"]]
        if args.lr_search:
            log.info("--lr-search: lr %g, dev MRR@10 per epoch %s", lr, searched[f"{lr:g}"])
    if select is not None and (out_dir / "best").exists():
        petune.load(tuned, out_dir / "best")  # the dev-selected parameters (and rate)
    lr = select.best["lr"] if select is not None and args.lr_search else args.lr
    tuned_run = dense_run(tuned, tokenizer, data.corpus, test, args, cache, keep_store=args.keep_tuned_store,
                          **encode_options)
    if state.is_main_process:
        runs = {"BM25": bm25.search(test, k=min(100, len(data.corpus))), "frozen": frozen_run,
                args.method: tuned_run}
        named = ids_of(data.corpus, runs)
        save_runs(out_dir / RUNS_DIR, data.qrels["test"], named)  # paired comparisons later: compare(qrels, files)
        report = compare(data.qrels["test"], named, metrics=METRICS)
        petune.save(tuned, out_dir / "tuned")
        command = job.command
        summary = {
            "command": command, "data": str(data.root), "method": args.method, "options": method_options(args),
            "sides": args.sides,
            "lr": lr, "lr_search": searched if args.lr_search else None, "epochs": args.epochs,
            "processes": state.num_processes,
            "trainable": tuned.trainable_report().as_dict(),
            "corpus": len(data.corpus), "queries": {s: len(q) for s, q in data.qrels.items()},
            "training_examples": len(examples), "random_negatives": filled, "dropped_no_hard_negative": dropped,
            "mined_negatives": miner.history if miner else None,
            "distill": {**distill_options(args), "teacher": args.teacher} if args.distill else None,
            "dev": history["eval"], "steps": len(history["loss"]),
            "scores": {run: dict(v) for run, v in report.results.items()}, "p_values": p_values(report),
            "index_factory": args.index_factory, "passage_store": len(data.corpus) >= args.store_from,
            "total_seconds": round(time.time() - started, 1),
        }
        markdown = "\n".join([
            f"# petune retrieval — {args.method} on {data.root.name}", "", f"`{command}`", "",
            f"Test: {len(test)} queries over {len(data.corpus):,} documents; {len(examples)} training examples"
            + (f", dev MRR@10 per epoch {[round(e['dev_mrr@10'], 3) for e in history['eval']]}" if select else "")
            + ".", "", report_markdown(report), ""])
        write_report(out_dir, markdown, summary)
        write_model_card(out_dir / "tuned", tuned, command, report_markdown(report), base=args.model,
                         datasets=[args.hub] if args.hub else None, encodings={
                             "queries": encode_settings(args.query_length, args.query_prefix, normalize,
                                                        side=encode_side(tuned, "query")),
                             "passages": encode_settings(args.passage_length, args.passage_prefix, normalize,
                                                         side=encode_side(tuned, "passage"))})
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
