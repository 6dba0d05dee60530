"""The learning rate of each benchmark method, chosen on the validation split.

    python lab/lr_sweep.py [--rows NAME ...] [--lrs LR ...] [--seed 0]
    python lab/lr_sweep.py --quick          # a few minutes: tiny subsets (benchmarks/run.py --quick)

Every tuned row of benchmarks/run.py but full fine-tuning (the reference point, kept at 5e-5)
is trained with each learning rate of ``GRID`` (the rate it had before this sweep, a third of
it and three times it), one seed, the benchmark's sizes and tasks, and scored on the
**validation** split (run.py --eval-split val; test is never read).
Each run is its own run.py process, its JSON kept in --work (lr-<lr>/), so an interrupted sweep
resumes where it stopped. The table (lab/LR_SWEEP.md unless --write) gives validation
MRR@10 of both retrieval tasks, their mean (what chooses, ties to the lower learning rate) and
topic kNN accuracy, with the frozen model as a reference row, and marks the choice per method;
benchmarks/run.py ROWS takes the chosen rates.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARK = HERE.parent / "benchmarks" / "run.py"


def _load_benchmark():
    """benchmarks/run.py, whose rows this sweep trains (loaded from its file)."""
    spec = importlib.util.spec_from_file_location("benchmark_run", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()

#: learning rates tried per method: the rate set before cosine similarity was the default, ÷3 and ×3
GRID = {
    "prompt tuning": [0.01, 0.03, 0.09],
    "adapter (single)": [0.00033, 0.001, 0.003],
    "adapter (per task)": [0.00033, 0.001, 0.003],
    "(IA)^3": [0.0033, 0.01, 0.03],
    "LoRA r=8": [0.00067, 0.002, 0.006],
}
SWEPT = list(GRID)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=SWEPT, choices=SWEPT, metavar="NAME",
                        help=f"methods to sweep (default: all of {SWEPT})")
    parser.add_argument("--lrs", type=float, nargs="+", help="these learning rates for every row instead of GRID's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="benchmarks/run.py --quick sizes")
    parser.add_argument("--work", type=Path, default=HERE / "lr_sweep_runs", help="per-run JSON files")
    parser.add_argument("--write", type=Path, default=HERE / "LR_SWEEP.md")
    args = parser.parse_args(argv)
    if args.lrs and any(not lr > 0 for lr in args.lrs):
        parser.error(f"--lrs must be positive, got {args.lrs}")
    return args


def run_file(args, name: str, lr: float | None) -> Path:
    return args.work / (f"lr-{lr:g}" if lr else "frozen") / f"{bench.SLUG[name]}-{args.seed}.json"


def train_and_score(args, name: str, lr: float | None) -> dict:
    """One run.py process on the validation split (skipped when its JSON is already there);
    ``lr`` None for the frozen row (the reference, untrained)."""
    path = run_file(args, name, lr)
    if not path.exists():
        cmd = [sys.executable, str(BENCHMARK), "--one", name, "--seeds", str(args.seed),
               *(["--lr", str(lr)] if lr else []), "--eval-split", "val", "--work", str(path.parent)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    return json.loads(path.read_text())


def validation_scores(args, results: dict[tuple[str, float | None], dict]) -> dict[tuple[str, float | None], dict]:
    """Validation MRR@10 per retrieval task (ranx), their mean, and topic kNN accuracy, per run."""
    from ranx import Qrels, Run, evaluate

    from petune.jobs import offline

    data = bench.scored_data(bench.parse_args(["--eval-split", "val", *(["--quick"] if args.quick else [])]))
    qrels = {task: Qrels((data["news"] if task == "news" else data["chat"]).subset(
        offline.test_queries(data, task)).qrels) for task in ("news", "qa")}
    out = {}
    for key, r in results.items():
        scores = {task: float(evaluate(qrels[task], Run(r["runs"][task]), "mrr@10")) for task in qrels}
        out[key] = {**scores, "mean": (scores["news"] + scores["qa"]) / 2, "topic": r["topic"]["accuracy"]}
    return out


def chosen(scores: dict[tuple[str, float | None], dict], name: str) -> float:
    """The learning rate with the best mean validation MRR@10 (ties: the lower rate)."""
    rates = sorted(lr for n, lr in scores if n == name and lr)
    return max(rates, key=lambda lr: (round(scores[name, lr]["mean"], 6), -lr))


def table(args, scores) -> str:
    names = list(dict.fromkeys(n for n, lr in scores if lr))
    lines = ["| method | lr | news MRR@10 | qa MRR@10 | mean | topic kNN acc | |",
             "|---|---|---|---|---|---|---|"]
    if ("frozen", None) in scores:
        s = scores["frozen", None]
        lines.append(f"| frozen | – | {s['news']:.3f} | {s['qa']:.3f} | {s['mean']:.3f} | {s['topic']:.3f} | "
                     "reference, untrained |")
    for name in names:
        best = chosen(scores, name)
        for lr in sorted(lr for n, lr in scores if n == name):
            s = scores[name, lr]
            in_rows = lr == bench.ROWS[name][3]
            mark = ", ".join((["**chosen**"] if lr == best else []) + (["in ROWS"] if in_rows else []))
            lines.append(f"| {name} | {lr:g} | {s['news']:.3f} | {s['qa']:.3f} | {s['mean']:.3f} | "
                         f"{s['topic']:.3f} | {mark} |")
    sizes = bench.parse_args(["--quick"] if args.quick else [])
    return "\n".join([
        "# Benchmark learning rates, chosen on the validation split", "",
        f"Command: `{args.command}`  ",
        f"Validation split of the benchmark's data ({sizes.max_articles} BBC articles, {sizes.max_questions} "
        f"ChatterBot questions, batch {sizes.batch_size}, {sizes.epochs} epoch(s)); seed {args.seed}; each "
        "method's rate before the sweep, a third of it and three times it (GRID in the script). Chosen: "
        "the best mean of news and qa MRR@10 (ties: the lower rate); benchmarks/run.py ROWS takes it. "
        "Full fine-tuning is not swept (5e-5, the reference point).", "",
        *lines, ""])


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = shlex.join(["python", "lab/lr_sweep.py", *(sys.argv[1:] if argv is None else argv)])
    results = {("frozen", None): train_and_score(args, "frozen", None)}
    results.update({(name, lr): train_and_score(args, name, lr)
                    for name in args.rows for lr in (args.lrs or GRID[name])})
    scores = validation_scores(args, results)
    text = table(args, scores)
    args.write.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
