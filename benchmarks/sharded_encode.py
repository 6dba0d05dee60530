"""Encode time of the offline recipe's test collection with 1 and with N processes (encode_sharded).

    python benchmarks/sharded_encode.py [--configs 1x1 1x2 2x1] [--repeats 1]   → benchmarks/sharded_encode.json

The collection is what the offline recipe encodes per system: every BBC article (2,089, cut to
1,000 characters, 256 tokens) and every ChatterBot answer (871), with the frozen MiniLM BERT2BERT.
Each configuration PxT runs P processes of T torch threads each under `torch.distributed.run`;
the embeddings of every configuration are compared with the first one's. 1x1 vs 2x1 is the
per-device scaling (one GPU per process); 1x2 vs 2x1 splits the same cores two ways.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def texts():
    from petune.data.packaged import bbc_retrieval, chatterbot_qa

    return list(bbc_retrieval(max_chars=1000).docs.values()) + list(chatterbot_qa().docs.values())


def child(out: Path, repeats: int, threads: int) -> None:
    """Runs inside torch.distributed.run: time encode_sharded on every process, write on rank 0."""
    import numpy as np
    import torch

    import petune
    from petune.data.packaged import minilm_encoder_decoder, minilm_path
    from petune.dist import process_state
    from transformers import AutoTokenizer

    state = process_state()
    torch.set_num_threads(threads)
    model, tok = minilm_encoder_decoder().to(state.device), AutoTokenizer.from_pretrained(minilm_path())
    data = texts()
    seconds = []
    for _ in range(repeats):
        state.wait_for_everyone()
        start = time.perf_counter()
        vecs = petune.encode_sharded(model, tok, data, max_length=256, progress=False)
        state.wait_for_everyone()
        seconds.append(time.perf_counter() - start)
    if state.is_main_process:
        np.save(out.with_suffix(".npy"), vecs)
        out.write_text(json.dumps({"processes": state.num_processes, "threads_per_process": torch.get_num_threads(),
                                   "texts": len(data), "seconds": seconds}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="PROCESSESxTHREADS")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per configuration (best is kept)")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "sharded_encode.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(Path(args.child), args.repeats, args.threads)

    import numpy as np

    rows, vecs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            n, threads = config.split("x")
            out = Path(tmp) / f"{config}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, __file__,
                   "--repeats", str(args.repeats), "--threads", threads, "--child", str(out)]
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                                 "OMP_NUM_THREADS": threads})
            rows.append(json.loads(out.read_text()))
            vecs[config] = np.load(out.with_suffix(".npy"))
    base = min(rows[0]["seconds"])
    for config, row in zip(args.configs, rows):
        row["best_seconds"] = round(min(row["seconds"]), 2)
        row["texts_per_second"] = round(row["texts"] / row["best_seconds"], 1)
        row["speedup_vs_first"] = round(base / row["best_seconds"], 3)
        row["max_abs_diff_vs_first"] = float(np.abs(vecs[config] - vecs[args.configs[0]]).max())
    result = {"command": "python benchmarks/sharded_encode.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2))
    for row in rows:
        print(f"{row['processes']} process(es) x {row['threads_per_process']} thread(s): {row['best_seconds']} s "
              f"({row['texts_per_second']} texts/s, x{row['speedup_vs_first']}), max |diff| "
              f"{row['max_abs_diff_vs_first']:.2e}")


if __name__ == "__main__":
    main()
