"""Methods side by side on the offline real tasks: quality, trainable parameters, time, memory.

    python benchmarks/run.py [--seeds 0 1 2] [--max-articles 600] [--max-questions 300] [--epochs 1]
    python benchmarks/run.py --quick              # a few minutes: 1 seed, tiny subsets
    accelerate launch benchmarks/run.py ...        # also works (runs are launched one by one)

Rows: frozen (zero-shot), full fine-tuning, prompt tuning (20 tokens), one bottleneck adapter
(reduction factor 8, shared by all tasks), one adapter per task, (IA)^3, LoRA r=8. Each
(method, seed) runs in its own process (clean peak RSS) on the tasks of recipes/offline.py and
writes benchmarks/runs/<method>-<seed>.json; the frozen run's ranx runs are kept so every row is
tested against it (Fisher's randomization test, p ≤ 0.01). Then the table (RESULTS.md, LaTeX),
results.json and plots (PNG) are written. Timings are never asserted in tests.
The learning rates in ROWS come from lab/lr_sweep.py (lab/LR_SWEEP.md), which runs
rows with ``--lr`` and ``--eval-split val``: the validation split, so that test is never used to choose.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = {  # name: (method, options, tasks mode, lr)
    "frozen": (None, {}, None, None),
    "full fine-tuning": ("full", {}, "single", 5e-5),
    "prompt tuning": ("prompt", {"num_virtual_tokens": 20}, "single", 3e-2),
    "adapter (single)": ("adapter", {"reduction_factor": 8}, "single", 1e-3),
    "adapter (per task)": ("adapter", {"reduction_factor": 8}, "multi", 3e-3),
    "(IA)^3": ("ia3", {}, "single", 1e-2),
    "LoRA r=8": ("lora", {"r": 8, "alpha": 16}, "single", 2e-3),
}
SLUG = {name: name.lower().replace(" ", "-").replace("(", "").replace(")", "").replace("^", "").replace("=", "")
        for name in ROWS}


def register_full_finetuning():
    import petune

    if "full" not in petune.methods():
        @petune.register_method("full")
        def full(model):
            """Full fine-tuning: every base parameter trainable (the reference point)."""
            for p in model.parameters():
                p.requires_grad_(True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def encode_throughput(model, tokenizer, texts, max_length) -> float:
    from petune.embed import encode

    encode(model, tokenizer, texts[:8], max_length=max_length, progress=False)  # warm-up
    start = time.perf_counter()
    encode(model, tokenizer, texts, max_length=max_length, progress=False)
    return len(texts) / (time.perf_counter() - start)


def run_one(name: str, seed: int, args) -> dict:
    """Train and score one row with one seed (in this process)."""
    import torch

    from petune.jobs import offline
    from petune.jobs.common import load_model
    import petune
    from petune.train import Trainer

    register_full_finetuning()
    method, options, mode, lr = ROWS[name]
    if method is not None and args.lr:
        lr = args.lr
    argv = [*data_options(args), "--seed", str(seed), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--train-passage-length", str(args.passage_length),
            "--eval-length", str(args.eval_length), "--output-dir", str(args.work / SLUG[name])]
    rargs = offline.parse_options(argv)
    torch.manual_seed(seed)
    model, tokenizer = load_model(None)
    data = offline.build_data(rargs)
    texts = [data["news"].docs[a] for a in list(data["news"].docs)[:args.throughput_texts]]
    out = {"row": name, "seed": seed, "method": method, "options": options, "tasks_mode": mode, "lr": lr}
    if method is None:
        result = offline.evaluate_model(model, tokenizer, data, rargs, task_for=lambda t: None)
        out.update(trainable=0, trainable_percent=0.0, saved_bytes=0, step_seconds_median=None,
                   encode_texts_per_s=encode_throughput(model, tokenizer, texts, rargs.eval_length))
    else:
        multi = mode == "multi"
        tuned = petune.attach(model, method, tasks=["news", "topic", "qa"], shared=not multi, **options)
        report = tuned.trainable_report()
        d_model = petune.models.d_model(tuned.base_model)
        tasks = offline.build_tasks(rargs, data, tokenizer, d_model)
        history = Trainer(tuned, tasks, epochs=rargs.epochs, lr=lr, seed=seed, progress=False, log_with=None).fit()
        result = offline.evaluate_model(tuned, tokenizer, data, rargs, task_for=lambda t: t if multi else None)
        saved = petune.save(tuned, args.work / SLUG[name] / f"tuned-{seed}")
        out.update(trainable=report.trainable, trainable_percent=report.percent, saved_bytes=dir_bytes(saved),
                   step_seconds_median=statistics.median(history["step_seconds"]), steps=len(history["step_seconds"]),
                   encode_texts_per_s=encode_throughput(tuned, tokenizer, texts, rargs.eval_length))
        if method in ("lora", "ia3") and not multi:  # peft can fold these into the base weights
            merged = tuned.model.merge_and_unload()
            out["encode_texts_per_s_merged"] = encode_throughput(merged, tokenizer, texts, rargs.eval_length)
    out["runs"] = {t: result[t].to_dict() for t in ("news", "qa")}
    out["topic"] = result["topic"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def significant_win(report, other: str, metric: str = "mrr@10") -> bool:
    """``system`` beats ``other`` on ``metric`` with p ≤ 0.01 (the report's Fisher test)."""
    better = report.results["system"][metric] > report.results[other][metric]
    return better and report.comparisons["system", other][metric]["p_value"] <= 0.01


def data_options(args) -> list[str]:
    """recipes/offline.py options that fix the benchmark's data: --max-articles, --max-questions,
    --body-chars and the scored --eval-split."""
    return ["--max-articles", str(args.max_articles), "--max-questions", str(args.max_questions),
            "--body-chars", str(args.body_chars), "--eval-split", args.eval_split]


def scored_data(args) -> dict:
    """recipes/offline.py's data (``build_data``) at :func:`data_options`: what every run of these
    options is scored on."""
    from petune.jobs import offline

    return offline.build_data(offline.parse_options(data_options(args)))


def summarise(args) -> None:
    """Read benchmarks/runs/*.json; write RESULTS.md, results.tex, results.json and the plots."""
    import numpy as np

    from petune.jobs import offline
    from petune.score import compare, make_run

    data = scored_data(args)
    runs = {}
    for f in sorted(args.work.glob("*.json")):
        if f.name == "meta.json":
            continue
        r = json.loads(f.read_text())
        runs.setdefault(r["row"], []).append(r)
    if "frozen" not in runs:
        raise SystemExit("no frozen run found: run the benchmark first")
    frozen = runs["frozen"][0]
    tests = {task: (data["news"] if task == "news" else data["chat"]).subset(offline.test_queries(data, task))
             for task in ("news", "qa")}
    bm25_runs = {task: data["bm25"][task].search(tests[task].queries, k=100) for task in tests}  # same for every row
    table = {}
    for name in ROWS:
        if name not in runs:
            continue
        rows = runs[name]
        entry = {"seeds": [r["seed"] for r in rows], "lr": rows[0]["lr"], "trainable": rows[0]["trainable"],
                 "trainable_percent": rows[0]["trainable_percent"], "saved_mib": rows[0]["saved_bytes"] / 2**20}
        for task in ("news", "qa"):
            test = tests[task]
            mrr, rec, wins_frozen, wins_bm25 = [], [], 0, 0
            for r in rows:
                report = compare(test.qrels, {"system": make_run(r["runs"][task]),
                                              "frozen": make_run(frozen["runs"][task]), "BM25": bm25_runs[task]},
                                 metrics=["mrr@10", "recall@10"])
                mrr.append(report.results["system"]["mrr@10"])
                rec.append(report.results["system"]["recall@10"])
                wins_frozen += name != "frozen" and significant_win(report, "frozen")
                wins_bm25 += significant_win(report, "BM25")
            entry[task] = {"mrr@10": (float(np.mean(mrr)), float(np.std(mrr))),
                           "recall@10": (float(np.mean(rec)), float(np.std(rec))),
                           "significant_vs_frozen": f"{wins_frozen}/{len(rows)}",
                           "significant_vs_bm25": f"{wins_bm25}/{len(rows)}",
                           "bm25_mrr@10": report.results["BM25"]["mrr@10"]}
        acc = [r["topic"]["accuracy"] for r in rows]
        f1 = [r["topic"]["macro_f1"] for r in rows]
        entry["topic"] = {"accuracy": (float(np.mean(acc)), float(np.std(acc))),
                          "macro_f1": (float(np.mean(f1)), float(np.std(f1)))}
        steps = [r["step_seconds_median"] for r in rows if r.get("step_seconds_median")]
        entry["step_seconds_median"] = float(np.median(steps)) if steps else None
        entry["peak_rss_mib"] = float(max(r["peak_rss_mib"] for r in rows))
        entry["encode_texts_per_s"] = float(np.mean([r["encode_texts_per_s"] for r in rows]))
        merged = [r["encode_texts_per_s_merged"] for r in rows if "encode_texts_per_s_merged" in r]
        entry["encode_texts_per_s_merged"] = float(np.mean(merged)) if merged else None
        table[name] = entry
    meta = json.loads((args.work / "meta.json").read_text()) if (args.work / "meta.json").exists() else {}
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2))
    write_markdown(table, meta, out)
    write_latex(table, out)
    plot(table, out)


def pm(v, digits=3):
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def write_markdown(table, meta, out: Path):
    head = ("| method | trainable | % | saved (MiB) | news MRR@10 | news R@10 | qa MRR@10 | qa R@10 | "
            "topic kNN acc | topic macro-F1 | s/step | peak RSS (MiB) | encode texts/s (merged) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    def marks(name, e, task):
        every = f"{len(e['seeds'])}/"
        return (("†" if name != "frozen" and e[task]["significant_vs_frozen"].startswith(every) else "")
                + ("‡" if e[task]["significant_vs_bm25"].startswith(every) else ""))

    for name, e in table.items():
        enc = f"{e['encode_texts_per_s']:.1f}" + (f" ({e['encode_texts_per_s_merged']:.1f})"
                                                   if e["encode_texts_per_s_merged"] else "")
        step = f"{e['step_seconds_median']:.2f}" if e["step_seconds_median"] else "–"
        lines.append(f"| {name} | {e['trainable']:,} | {e['trainable_percent']:.3f} | {e['saved_mib']:.2f} | "
                     f"{pm(e['news']['mrr@10'])}{marks(name, e, 'news')} | {pm(e['news']['recall@10'])} | "
                     f"{pm(e['qa']['mrr@10'])}{marks(name, e, 'qa')} | {pm(e['qa']['recall@10'])} | "
                     f"{pm(e['topic']['accuracy'])} | {pm(e['topic']['macro_f1'])} | {step} | "
                     f"{e['peak_rss_mib']:.0f} | {enc} |")
    any_row = max(table.values(), key=lambda e: len(e["seeds"]))  # frozen runs once
    text = "\n".join([
        "# petune benchmark: methods side by side", "",
        f"Command: `{meta.get('command', 'python benchmarks/run.py')}`  ",
        f"Machine: {meta.get('machine', '?')}  ",
        f"Data: recipes/offline.py tasks, {meta.get('sizes', '')}; seeds {any_row['seeds']} "
        "(quality: mean ± std over seeds; frozen is deterministic and runs once).", "",
        *lines, "",
        "Learning rates (AdamW, linear warmup 10 % + decay; lab/LR_SWEEP.md): "
        + ", ".join(f"{n} {e['lr']:g}" for n, e in table.items() if e["lr"]) + ".  ",
        f"BM25 MRR@10 on the same {meta.get('split', 'test')} queries: news {any_row['news']['bm25_mrr@10']:.3f}, "
        f"qa {any_row['qa']['bm25_mrr@10']:.3f}.  ",
        "† significantly better than frozen, ‡ than BM25, on MRR@10 with every seed (Fisher's randomization "
        "test, p ≤ 0.01). s/step: median wall time of an optimizer step (all three tasks interleaved). "
        "Peak RSS: the whole run's process (training and scoring). Encode: petune.encode texts/s on "
        "document texts; in brackets after peft's merge_and_unload where the method can merge.", "",
        "![quality vs trainable parameters](quality_vs_params.png)", "",
        "![step time and peak memory](cost.png)", "", *overhead_section(out)])
    (out / "RESULTS.md").write_text(text)


def overhead_section(out: Path) -> list[str]:
    """The overhead and encode-throughput results, when their JSON files sit beside the results."""
    lines = []
    def interval(r):
        return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] (±{r['half_width_percent']:.1f} %)"

    runs = [f for f in ("overhead.json", "overhead-rerun.json") if (out / f).exists()]
    if runs:
        o = json.loads((out / runs[0]).read_text())
        m = o["meta"]
        lines += ["## petune's overhead", "",
                  f"`{m['command'].strip()}` ({m['machine']}; torch threads {m['threads']['torch']}; "
                  f"{m['blocks']} blocks per method of {m['steps']} timed steps per side, the two sides "
                  "interleaved step by step and the first side alternating ABBA, batch "
                  f"{m['batch_size']}; "
                  f"{m['encode_pairs']} ABBA pairs of encode passes over {m['encode_texts']} texts; "
                  f"{m['seconds'] / 60:.0f} minutes a run). Ratio = petune time / the same work written directly "
                  "against peft / adapters / transformers, same batches in the same order; geometric mean over "
                  "blocks (pairs) with its 95 % bootstrap interval (± its larger half width). A target is met "
                  "when the whole interval is at or below it. Run 2 is the same command with `--output "
                  "benchmarks/overhead-rerun.json`, right after run 1. Protocol: "
                  "`benchmarks/overhead.py`, `benchmarks/stats.py`.", "",
                  "| method | run | step, median s: petune / direct | step ratio [95 % CI] | ≤ 1.05 | "
                  "encode, median s: petune / direct | encode ratio [95 % CI] | ≤ 1.10 |",
                  "|---|---|---|---|---|---|---|---|"]
        results = [json.loads((out / f).read_text()) for f in runs]
        for method in (k for k in o if k != "meta"):
            for number, result in enumerate(results, 1):
                st, e = result[method]["step"], result[method]["encode"]
                lines.append(f"| {method} | {number} | {st['median_seconds']['petune']:.3f} / "
                             f"{st['median_seconds']['direct']:.3f} | {interval(st)} | {st['verdict']} | "
                             f"{e['median_seconds']['petune']:.2f} / {e['median_seconds']['direct']:.2f} | "
                             f"{interval(e)} | {e['verdict']} |")
        lines.append("")
    runs = [f for f in ("encode_throughput.json", "encode_throughput-rerun.json") if (out / f).exists()]
    if runs:
        results = [json.loads((out / f).read_text()) for f in runs]
        t = results[0]
        lines += ["## Encode throughput vs a bare Hugging Face encoder", "",
                  f"`{t['command'].strip()}` ({t['texts']} BBC bodies, batch {t['batch_size']}, max "
                  f"{t['max_length']} tokens; {t['pairs']} ABBA pairs; {t['machine']}). Throughput ratio = bare "
                  "time / petune time, geometric mean over pairs with its 95 % bootstrap interval; target ≥ 0.90. "
                  "Run 2: the same with `--output benchmarks/encode_throughput-rerun.json`, right after run 1.",
                  "", "| run | petune texts/s | bare texts/s | ratio [95 % CI] | ≥ 0.90 |", "|---|---|---|---|---|"]
        for number, r in enumerate(results, 1):
            c = r["ratio_petune_over_bare_throughput"]
            lines.append(f"| {number} | {r['texts_per_s']['petune']:.1f} | {r['texts_per_s']['bare']:.1f} | "
                         f"{interval(c)} | {c['verdict']} |")
        lines.append("")
    if (out / "routing.json").exists():
        r = json.loads((out / "routing.json").read_text())
        lines += ["## Serving: one task per row, and exported merged models", "",
                  f"`{r['command'].strip()}` ({r['texts']} BBC bodies, batch {r['batch_size']}, max "
                  f"{r['max_length']} tokens, three tasks dealt round the rows; {r['pairs']} ABBA pairs; "
                  f"{r['machine']}). Routing ratio = time of one `encode` call per task / time of one call with "
                  "`task=[...]` (above 1: routing is faster). Export ratio = tuned model's time / the merged "
                  "model's (`petune.export`, loaded with transformers alone). Geometric mean over pairs with "
                  "its 95 % bootstrap interval; embeddings checked equal before timing.", "",
                  "| method | routed s / split s | routing ratio [95 % CI] | merged s / tuned s | "
                  "export ratio [95 % CI] |", "|---|---|---|---|---|"]
        for method, e in r["methods"].items():
            ro, ex = e["routing"], e.get("export")
            lines.append(f"| {method} | {ro['median_seconds']['routed']:.2f} / {ro['median_seconds']['split']:.2f} "
                         f"| {interval(ro)} | " + (f"{ex['median_seconds']['merged']:.2f} / "
                                                   f"{ex['median_seconds']['tuned']:.2f} | {interval(ex)} |"
                                                   if ex else "not exportable (petune.save / petune.load) | |"))
        lines.append("")
    for name, module in (("kb_scale.json", "kb_scale"), ("encode_speed.json", "encode_speed"),
                         ("cached_loss.json", "cached_loss")):
        if (out / name).exists():  # each benchmark renders its own section
            lines += importlib.import_module(module).section(json.loads((out / name).read_text()))
    if (out / "sharded_encode.json").exists():
        t = json.loads((out / "sharded_encode.json").read_text())
        lines += ["## Sharded encoding: 1 vs several processes", "",
                  f"`{t['command'].strip()}` ({t['cpu_count']} CPU cores; the offline recipe's whole test collection: "
                  f"{t['rows'][0]['texts']:,} texts, every BBC article and ChatterBot answer, max 256 tokens, "
                  "frozen MiniLM; "
                  "`petune.encode_sharded` under `torch.distributed.run`; speed-up against the first row; "
                  "1 × 1 vs 2 × 1 is the scaling per device, as with one GPU per process; 1 × 2 vs 2 × 1 "
                  "splits the same cores two ways).", "",
                  "| processes × threads | seconds | texts/s | speed-up | max abs diff vs the first row |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['processes']} × {r['threads_per_process']} | {r['best_seconds']:.1f} | "
                  f"{r['texts_per_second']:.1f} | {r['speedup_vs_first']:.2f} | {r['max_abs_diff_vs_first']:.1e} |"
                  for r in t["rows"]]
        lines.append("")
    return lines


def write_latex(table, out: Path):
    rows = []
    for name, e in table.items():
        label = name.replace("^", "\\^{}")
        rows.append(f"{label} & {e['trainable_percent']:.3f} & "
                    f"{e['news']['mrr@10'][0]:.3f} & {e['qa']['mrr@10'][0]:.3f} & {e['topic']['accuracy'][0]:.3f} \\\\")
    text = "\n".join(["\\begin{tabular}{lrrrr}", "\\toprule",
                      "Method & \\% params & News MRR@10 & QA MRR@10 & Topic kNN acc \\\\", "\\midrule", *rows,
                      "\\bottomrule", "\\end{tabular}", ""])
    (out / "results.tex").write_text(text)


def plot(table, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (task, metric, label) in zip(axes, [("news", "mrr@10", "BBC headline→article MRR@10"),
                                                ("qa", "mrr@10", "ChatterBot question→answer MRR@10"),
                                                ("topic", "accuracy", "BBC topic kNN accuracy")]):
        for name, e in table.items():
            x = max(e["trainable"], 1)
            ax.errorbar(x, e[task][metric][0], yerr=e[task][metric][1], fmt="o", capsize=3)
            ax.annotate(name, (x, e[task][metric][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if task in ("news", "qa"):
            bm25 = next(iter(table.values()))[task]["bm25_mrr@10"]
            ax.axhline(bm25, color="grey", linestyle="--", linewidth=1)
            ax.annotate("BM25", (1, bm25), fontsize=7, color="grey", xytext=(0, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (frozen plotted at 1)")
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_params.png", dpi=120)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in table if table[n]["step_seconds_median"]]
    a1.barh(names, [table[n]["step_seconds_median"] for n in names])
    a1.set_xlabel("median seconds per optimizer step")
    a2.barh(list(table), [table[n]["peak_rss_mib"] for n in table])
    a2.set_xlabel("peak RSS (MiB)")
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (lab/lr_sweep.py reads its sizes from here too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"subset of {list(ROWS)}")
    parser.add_argument("--max-articles", type=int, help="BBC articles (default 600; --quick: 120)")
    parser.add_argument("--max-questions", type=int, help="ChatterBot questions (default 300; --quick: 80)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--body-chars", type=int, default=600)
    parser.add_argument("--passage-length", type=int, default=96)
    parser.add_argument("--eval-length", type=int, default=128)
    parser.add_argument("--throughput-texts", type=int, default=128)
    parser.add_argument("--work", type=Path, default=HERE / "runs", help="per-run JSON files")
    parser.add_argument("--results-dir", type=Path, default=HERE, help="RESULTS.md, results.json/.tex, plots")
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny subsets: a few minutes")
    parser.add_argument("--one", help="(internal) run one row in this process")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--eval-split", default="test", choices=["test", "val"],
                        help="split scored (val: for choosing settings, lab/lr_sweep.py)")
    parser.add_argument("--lr", type=float, help="learning rate of every tuned row instead of ROWS' own")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.quick:
        args.seeds = [0]
        args.body_chars, args.passage_length, args.eval_length, args.throughput_texts = 300, 48, 64, 32
    args.max_articles = args.max_articles or (120 if args.quick else 600)
    args.max_questions = args.max_questions or (80 if args.quick else 300)
    return args


def main(argv=None):
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        seed = args.seeds[0]
        result = run_one(args.one, seed, args)
        (args.work / f"{SLUG[args.one]}-{seed}.json").write_text(json.dumps(result))
        return
    if not args.summary_only:
        import torch

        meta = {"command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                           f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
                           f"torch {torch.__version__}, Python {platform.python_version()}",
                "split": args.eval_split,
                "sizes": f"{args.max_articles} BBC articles, {args.max_questions} ChatterBot questions, "
                         f"{args.epochs} epoch(s), batch {args.batch_size}, passages {args.passage_length} tokens"}
        (args.work / "meta.json").write_text(json.dumps(meta))
        for name in args.rows:
            for seed in (args.seeds[:1] if name == "frozen" else args.seeds):
                started = time.time()
                cmd = [sys.executable, __file__, "--one", name, "--seeds", str(seed), "--work", str(args.work),
                       "--max-articles", str(args.max_articles), "--max-questions", str(args.max_questions),
                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                       "--body-chars", str(args.body_chars), "--passage-length", str(args.passage_length),
                       "--eval-length", str(args.eval_length), "--throughput-texts", str(args.throughput_texts),
                       "--eval-split", args.eval_split, *(["--lr", str(args.lr)] if args.lr else [])]
                subprocess.run(cmd, check=True)
                print(f"{name} seed {seed}: {time.time() - started:.0f} s", flush=True)
    summarise(args)
    print((args.results_dir / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
