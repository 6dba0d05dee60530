"""Mine hard negatives for a tiny training set with a tiny random T5 (LoRA), on as many processes as
it is launched with (python / torchrun), and write what each process's training set holds.

    python mining_check.py OUT_DIR

Each process writes ``OUT_DIR/rank-R.json``: every example's negatives after mining epoch 0
(the test in tests/test_mining.py compares the processes and a 1-process run).
"""

import json
import sys
from pathlib import Path

import torch

import petune
from conftest import tiny
from petune.dist import process_state
from petune.train.mining import MinedNegatives, NegativeMiner, memory_index
from test_embed import CharTokenizer

PASSAGES = [f"passage {i}: " + "lorem ipsum dolor "[: (7 * i) % 18] + "x" * (i % 11) for i in range(40)]
EXAMPLES = [{"query": f"query {i} " + "x" * (i % 11), "positive": PASSAGES[i],
             "negatives": [PASSAGES[(i + 20) % 40]] * 2} for i in range(12)]


def miner(out: Path):
    torch.manual_seed(0)
    model = petune.attach(tiny("t5"), "lora", r=2, sides="query")
    tokenizer = CharTokenizer()
    data = MinedNegatives(EXAMPLES, 1, lambda rows: [PASSAGES[r] for r in rows])
    return model, data, NegativeMiner(
        data, tokenizer, lambda m: memory_index(m, tokenizer, PASSAGES, side="passage", normalize=True, max_length=32),
        [{i} for i in range(len(EXAMPLES))], ranks=(0, 10), relative_margin=None, seed=3, directory=out / "mined")


def main(argv):
    torch.set_num_threads(1)
    out = Path(argv[0])
    model, data, mine = miner(out)

    class Trainer:  # what the hook reads
        pass

    trainer = Trainer()
    trainer.model = model
    mine(trainer, 0)
    rank = process_state().process_index
    (out / f"rank-{rank}.json").write_text(json.dumps([data[i]["negatives"] for i in range(len(data))]))


if __name__ == "__main__":
    main(sys.argv[1:])
