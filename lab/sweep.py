"""Choose the offline recipe's defaults on the validation split: one `recipes/offline.py
--eval-split val` run per setting (lab/sweep_settings.json), then a table in lab/SWEEP.md; what
the table decided is written by hand in lab/DECISIONS.md.

    python lab/sweep.py [--only NAME ...] [--output-dir runs/sweep] [--table-only]

Test numbers are never read here: every run scores the validation split (BBC: 209 headlines,
ChatterBot: 75 questions), and recipes/RESULTS.md reports the test split once, for the chosen
settings. Settings whose run already has a report in --output-dir are not rerun (delete the
folder to rerun one); every run shares one --cache-dir, so the frozen embeddings and the BM25
runs are computed once. A setting with no report in --output-dir keeps its row from the table
already in --write, so a new setting can be run alone without losing the measured ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HERE = Path(__file__).resolve().parent
#: name → recipes/offline.py options, one row per setting (lab/sweep_settings.json: every row spells
#: out what it changes, so rows stay reproducible when the defaults move). Unless a row says
#: otherwise: adapter (one per task, reduction factor 8), lr 2e-3, 1 epoch, one BM25 hard negative,
#: false negatives masked, cosine scale 20.
SETTINGS: dict[str, list[str]] = json.loads((HERE / "sweep_settings.json").read_text())


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def report_path(output_dir: Path, name: str) -> Path:
    """Where the run of setting ``name`` leaves its report.json (its folder is its output dir)."""
    return output_dir / slug(name) / "report.json"


def run(name: str, args) -> dict:
    report = report_path(args.output_dir, name)
    if not report.exists():
        cmd = [sys.executable, str(ROOT / "recipes" / "offline.py"), "--eval-split", "val", *SETTINGS[name],
               "--output-dir", str(report.parent), "--cache-dir", str(args.output_dir / "cache")]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(report.read_text())


def row(name: str, r: dict) -> str:
    res = r["results"]
    label = next(k for k in res["news"]["scores"] if k not in ("BM25", "frozen") and not k.endswith("RRF"))
    news, qa, topic = res["news"]["scores"], res["qa"]["scores"], res["topic"]
    pv = res["news"]["p_values"]
    p_bm25 = pv.get(f"BM25 vs {label}", pv.get(f"{label} vs BM25"))["mrr@10"]
    p_text = "< 0.001" if p_bm25 < 0.001 else f"{p_bm25:.3f}"
    return (f"| {name} | {news[label]['mrr@10']:.3f} | {news['BM25']['mrr@10']:.3f} | {news['frozen']['mrr@10']:.3f} "
            f"| {p_text} | {qa[label]['mrr@10']:.3f} | {qa['frozen']['mrr@10']:.3f} "
            f"| {topic[label]['accuracy']:.3f} | {topic['frozen']['accuracy']:.3f} | {r['train_seconds']:.0f} "
            f"| {r['total_seconds']:.0f} |")


def kept_rows(table: Path) -> dict[str, str]:
    """The rows of an earlier ``table`` by setting name (settings still in SETTINGS only): a row whose
    run is not in --output-dir keeps its measured line, so one new row does not drop the others."""
    if not table.exists():
        return {}
    rows = {}
    for line in table.read_text().splitlines():
        name = line[2:].split(" | ", 1)[0] if line.startswith("| ") else None
        if name in SETTINGS:
            rows[name] = line
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--table-only", action="store_true", help="run nothing: write the table of what is there")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--write", type=Path, default=HERE / "SWEEP.md",
                        help="the table: every setting with a report in --output-dir, and the rows of "
                        "this file's earlier table for settings without one")
    args = parser.parse_args(argv)
    for name in [] if args.table_only else args.only or SETTINGS:
        run(name, args)
    rows = kept_rows(args.write)
    for n in SETTINGS:
        report = report_path(args.output_dir, n)
        if report.exists():
            rows[n] = row(n, json.loads(report.read_text()))
    lines = [
        "# Offline recipe: settings chosen on the validation split", "",
        "Command: `python lab/sweep.py` (each row is `python recipes/offline.py --eval-split val "
        "OPTIONS`; the options are in `lab/sweep_settings.json`). Validation split only: BBC headline → article "
        "and ChatterBot question → answer MRR@10, BBC topic kNN accuracy. p: Fisher's randomization test "
        "of the tuned model against BM25 on BBC.", "",
        "| setting | BBC tuned | BBC BM25 | BBC frozen | p vs BM25 | ChatterBot tuned | ChatterBot frozen "
        "| topic tuned | topic frozen | train s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[rows[n] for n in SETTINGS if n in rows], "",
        "What this table decided, and the settings tried outside it: [DECISIONS.md](DECISIONS.md)."]
    args.write.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
