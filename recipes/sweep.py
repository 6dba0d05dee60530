"""Choose the offline recipe's defaults on the validation split: one `recipes/offline.py
--eval-split val` run per setting, then a table in recipes/SWEEP.md.

    python recipes/sweep.py [--only NAME ...] [--output-dir runs/sweep]

Test numbers are never read here: every run scores the validation split (BBC: 208 headlines,
ChatterBot: 75 questions), and recipes/RESULTS.md reports the test split once, for the chosen
settings. Settings whose run already has a report in --output-dir are not rerun (delete the
folder to rerun one); every run shares one --cache-dir, so the frozen embeddings and the BM25
runs are computed once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: name → offline.py options on top of its defaults (the first row is the defaults themselves)
SETTINGS = {
    "defaults": [],
    "no false-negative mask": ["--no-mask-false-negatives"],
    "cosine, scale 20": ["--similarity", "cosine"],
    "cosine, scale 20, lr 5e-3": ["--similarity", "cosine", "--lr", "5e-3"],
    "cosine, scale 20, 3 hard negatives": ["--similarity", "cosine", "--hard-negatives", "3"],
    "cosine, scale 20, LoRA r=8": ["--similarity", "cosine", "--method", "lora"],
    "cosine, scale 20, 2 epochs": ["--similarity", "cosine", "--epochs", "2"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run(name: str, args) -> dict:
    out = args.output_dir / slug(name)
    report = out / "report.json"
    if not report.exists():
        cmd = [sys.executable, str(ROOT / "recipes" / "offline.py"), "--eval-split", "val", *SETTINGS[name],
               "--output-dir", str(out), "--cache-dir", str(args.output_dir / "cache")]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(report.read_text())


def row(name: str, r: dict) -> str:
    res, label = r["results"], next(k for k in r["results"]["news"]["scores"] if k not in ("BM25", "frozen"))
    news, qa, topic = res["news"]["scores"], res["qa"]["scores"], res["topic"]
    p_bm25 = res["news"]["p_values"].get(f"{label} vs BM25", res["news"]["p_values"].get(f"BM25 vs {label}"))
    return (f"| {name} | {news[label]['mrr@10']:.3f} | {news['BM25']['mrr@10']:.3f} | {news['frozen']['mrr@10']:.3f} "
            f"| {p_bm25:.3f} | {qa[label]['mrr@10']:.3f} | {qa['frozen']['mrr@10']:.3f} "
            f"| {topic[label]['accuracy']:.3f} | {topic['frozen']['accuracy']:.3f} | {r['train_seconds']:.0f} "
            f"| {r['total_seconds']:.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--write", type=Path, default=ROOT / "recipes" / "SWEEP.md",
                        help="the table of every setting with a report in --output-dir")
    args = parser.parse_args(argv)
    for name in args.only or SETTINGS:
        run(name, args)
    done = {n: json.loads((args.output_dir / slug(n) / "report.json").read_text())
            for n in SETTINGS if (args.output_dir / slug(n) / "report.json").exists()}
    lines = [
        "# Offline recipe: settings chosen on the validation split", "",
        "Command: `python recipes/sweep.py` (each row is `python recipes/offline.py --eval-split val "
        "OPTIONS`; the options are in `recipes/sweep.py`). Validation split only: BBC headline → article "
        "and ChatterBot question → answer MRR@10, BBC topic kNN accuracy. p: Fisher's randomization test "
        "of the tuned model against BM25 on BBC.", "",
        "| setting | BBC tuned | BBC BM25 | BBC frozen | p vs BM25 | ChatterBot tuned | ChatterBot frozen "
        "| topic tuned | topic frozen | train s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[row(n, r) for n, r in done.items()], ""]
    args.write.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
