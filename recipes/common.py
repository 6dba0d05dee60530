"""Helpers shared by the recipes: method options from the command line, model loading, reports."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

#: learning rates that work for each method on the offline recipe (AdamW); --lr overrides
DEFAULT_LR = {"prompt": 3e-2, "adapter": 2e-3, "ia3": 1e-2, "lora": 2e-3}


def add_method_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("method (petune.attach)")
    g.add_argument("--method", default="adapter", choices=["prompt", "adapter", "ia3", "lora"])
    g.add_argument("--tasks-mode", default="multi", choices=["single", "multi"],
                   help="multi: one module per task (VL-Adapter 'multiple'); single: one shared module")
    g.add_argument("--d", type=int, help="bottleneck adapter width (exclusive with --reduction-factor)")
    g.add_argument("--reduction-factor", type=float, help="bottleneck adapter reduction factor (default 8)")
    g.add_argument("--placement", default="pfeiffer", choices=["pfeiffer", "houlsby"])
    g.add_argument("--r", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    g.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt length")
    g.add_argument("--lr", type=float, help=f"learning rate (default per method: {DEFAULT_LR})")


def method_options(args) -> dict:
    if args.method == "adapter":
        if args.d is None and args.reduction_factor is None:
            return {"reduction_factor": 8, "placement": args.placement}
        size = {"d": args.d} if args.d is not None else {"reduction_factor": args.reduction_factor}
        return {**size, "placement": args.placement}
    if args.method == "lora":
        return {"r": args.r, "alpha": args.alpha}
    if args.method == "prompt":
        return {"num_virtual_tokens": args.num_virtual_tokens}
    return {}


def load_model(name_or_path: str | None):
    """(model, tokenizer): the packaged offline MiniLM BERT2BERT when ``name_or_path`` is None,
    else any Hugging Face seq2seq model (hub id or local path)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if name_or_path is None:
        from petune.data.packaged import minilm_encoder_decoder, minilm_path

        return minilm_encoder_decoder(), AutoTokenizer.from_pretrained(minilm_path())
    return AutoModelForSeq2SeqLM.from_pretrained(name_or_path), AutoTokenizer.from_pretrained(name_or_path)


def write_report(output_dir: Path, markdown: str, data: dict) -> None:
    """``report.md`` and ``report.json`` in ``output_dir``, each written to a temp file and renamed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.md", markdown), ("report.json", json.dumps(data, indent=2))):
        tmp = output_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, output_dir / name)
