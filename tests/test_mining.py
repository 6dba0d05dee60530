"""Hard negatives mined from the collection while training: the window and margin, the training set
that takes them, the miner with the Trainer (resumed from its files), and the same negatives on
every process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from petune.train import DPRLoss, RetrievalCollator, Task, Trainer
from petune.train.mining import MinedNegatives, NegativeMiner, choose_negatives, memory_index
from test_embed import CharTokenizer

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE)}
sys.path.insert(0, str(HERE / "multiproc"))
from mining_check import EXAMPLES, PASSAGES, miner  # noqa: E402


def test_choose_negatives_window_margin_and_relevant():
    rows = np.array([[7, 3, 5, 1, 2, 4, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]])
    pick = lambda **kw: choose_negatives(rows, scores, [0], np.array([0.75]), [{3}], **kw)  # noqa: E731
    # relevant row 3 left out before ranks are counted: ranks 0.. = 7, 5, 1, 2, 4
    assert pick(count=9, ranks=(1, 4), relative_margin=None, seeds=["s"])[0] == [5, 1, 2]
    assert pick(count=9, ranks=(0, 9), relative_margin=0.1, seeds=["s"])[0] == [1, 2, 4]  # <= 0.675 only
    one = pick(count=1, ranks=(0, 9), relative_margin=None, seeds=["a"])[0]
    assert one == pick(count=1, ranks=(0, 9), relative_margin=None, seeds=["a"])[0]  # drawn from the seed
    assert len(one) == 3 and set(one) <= {7, 5, 1, 2, 4}  # two spares, in rank order
    assert len({tuple(pick(count=1, ranks=(0, 9), relative_margin=None, seeds=[s])[0]) for s in "abcdefgh"}) > 1


def test_mined_negatives_replace_the_last_ones_and_their_teacher_scores():
    examples = [{"query": "q", "positive": "p", "negatives": ["b1", "b2"], "teacher_scores": [1.0, 0.5, 0.4]}]
    data = MinedNegatives(examples, 1, lambda rows: [f"row {r}" for r in rows])
    assert data[0] is examples[0]  # before mining
    data.set_rows(np.array([[4]]), np.array([[0.9]], dtype=np.float32))
    assert data[0]["negatives"] == ["b1", "row 4"] and data[0]["teacher_scores"] == [1.0, 0.5, pytest.approx(0.9)]
    data.set_rows(np.array([[-1]]), np.array([[0.0]]))
    assert data[0]["negatives"] == ["b1", "b2"]  # none qualified: the example's own stays
    with pytest.raises(ValueError, match="need theirs too"):
        data.set_rows(np.array([[4]]))
    with pytest.raises(ValueError, match="must be 1 … 2"):
        MinedNegatives(examples, 3, str)


def test_miner_trains_with_the_trainer_and_resumes_from_its_files(tmp_path):
    model, data, mine = miner(tmp_path)
    tokenizer = CharTokenizer()
    loss = DPRLoss(scale=20.0)
    task = Task("retrieval", data, RetrievalCollator(tokenizer, 32, 32), loss, batch_size=4, drop_last=True)
    Trainer(model, [task], epochs=2, lr=1e-2, seed=0, output_dir=tmp_path / "run", on_epoch_start=[mine],
            progress=False, log_with=None).fit()
    assert [h["epoch"] for h in mine.history] == [0, 1] and not any(h.get("read") for h in mine.history)
    assert sorted(p.name for p in (tmp_path / "mined").iterdir()) == ["epoch-0000.npz", "epoch-0001.npz"]
    for i, e in enumerate(EXAMPLES):
        got = data[i]["negatives"]
        assert got[0] == e["negatives"][0] and got[1] != e["positive"]  # one BM25-given, one mined
        assert data.rows[i, 0] not in (-1, i)  # a row mined, never its relevant one
    # a rerun with the same settings reads each round back instead of mining
    model, again, mine2 = miner(tmp_path)
    mine2(type("T", (), {"model": model})(), 1)
    assert mine2.history[-1]["read"] and (again.rows == data.rows).all()
    # a damaged file is mined again, not trusted
    (tmp_path / "mined" / "epoch-0001.npz").write_bytes(b"PK\x03\x04 cut short")
    model, _, damaged = miner(tmp_path)
    damaged(type("T", (), {"model": model})(), 1)
    assert not damaged.history[-1].get("read") and damaged.history[-1]["mined"] > 0
    # other settings: the file is not trusted
    model, _, other = miner(tmp_path)
    other.ranks = (0, 5)
    other(type("T", (), {"model": model})(), 1)
    assert not other.history[-1].get("read")


def test_positives_read_from_the_index_give_the_same_negatives(tmp_path):
    """Positives that are rows of the collection are read from the index, not encoded again."""
    chosen = []
    for rows in (None, list(range(len(EXAMPLES)))):
        model, data, mine = miner(tmp_path / str(rows is None))
        mine.positive_rows = rows or [None] * len(EXAMPLES)
        mine.relative_margin = 0.01  # the positive's score decides: most candidates of this random model fail it
        mine(type("T", (), {"model": model})(), 0)
        chosen.append(data.rows.copy())
    assert (chosen[0] == chosen[1]).all() and 0 < (chosen[0] >= 0).sum() < len(EXAMPLES)


def test_miner_errors():
    _, data, _ = miner(Path("/nonexistent"))
    for bad, match in [({"ranks": (5, 5)}, "rank window"), ({"relative_margin": 1.0}, "relative_margin"),
                       ({"every": 0}, "every")]:
        with pytest.raises(ValueError, match=match):
            NegativeMiner(data, CharTokenizer(), memory_index, [set()] * len(data), **bad)


@pytest.mark.multiproc
def test_two_processes_train_on_the_same_mined_negatives(tmp_path):
    script = str(HERE / "multiproc" / "mining_check.py")
    one, two = tmp_path / "one", tmp_path / "two"
    for out, launch in ((one, [sys.executable, script]),
                        (two, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script])):
        out.mkdir()
        done = subprocess.run([*launch, str(out)], env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((two / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == json.loads((one / "rank-0.json").read_text())
    assert any(n[1] != e["negatives"][1] for n, e in zip(ranks[0], EXAMPLES))  # something was mined
    assert set(PASSAGES) >= {n[1] for n in ranks[0]}
