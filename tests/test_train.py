import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import petune
from conftest import tiny
from petune.train import (ClassificationCollator, ClassificationLoss, DPRLoss, MultiTaskLoader, PairCollator,
                          PairLoss, RetrievalCollator, Seq2SeqCollator, Seq2SeqLoss, Task, Trainer, dpr_loss,
                          false_negatives, task_order, text_key)
from test_cached import tuned_model
from test_embed import CharTokenizer as Tok

ROOT = Path(__file__).resolve().parent.parent


def retrieval_data(n=16):
    return [{"query": f"question {i}", "positive": f"passage number {i} " * 2, "negatives": [f"unrelated {i + 7}"]}
            for i in range(n)]


def tasks_for(model_d=32, n=16):
    return [Task("ret", retrieval_data(n), RetrievalCollator(Tok()), DPRLoss(), batch_size=4),
            Task("cls", [{"text": f"text {i}", "label": i % 3} for i in range(n)],
                 ClassificationCollator(Tok(), [0, 1, 2]), ClassificationLoss(model_d, 3), batch_size=4)]


# -- round-robin ------------------------------------------------------------------------------
def test_task_order_exact_sequences():
    counts = {"a": 3, "b": 2, "c": 1}
    assert task_order(counts, "proportional", seed=0, epoch=0) == ["b", "a", "a", "a", "c", "b"]
    assert task_order(counts, "proportional", seed=0, epoch=1) == ["a", "b", "c", "a", "b", "a"]
    assert task_order(counts, "cycle") == ["a", "b", "c"] * 3
    assert task_order(counts, "balanced", seed=0) == ["a", "c", "b"]
    assert sorted(task_order(counts, "balanced", batches_per_task=2)) == ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(ValueError, match=r"\['c'\] have no batches"):
        task_order({"a": 1, "c": 0})
    with pytest.raises(ValueError, match="mode must be one of"):
        task_order(counts, "random")


def test_loader_every_epoch_yields_and_cycle_restarts():
    loaders = {"a": DataLoader(list(range(6)), batch_size=2), "b": DataLoader(list(range(10, 12)), batch_size=2)}
    mtl = MultiTaskLoader(loaders, "proportional", seed=3)
    epochs = []
    for epoch in range(2):
        mtl.set_epoch(epoch)
        epochs.append([(t, b.tolist()) for t, b in mtl])
    assert all(len(e) == 4 for e in epochs), "an epoch came out empty"
    assert [t for t, _ in epochs[0]] != [t for t, _ in epochs[1]]
    assert sorted(x for t, b in epochs[1] for x in b) == [0, 1, 2, 3, 4, 5, 10, 11]
    cycle = list(MultiTaskLoader(loaders, "cycle"))
    assert [t for t, _ in cycle] == ["a", "b"] * 3
    assert [b.tolist() for t, b in cycle if t == "b"] == [[10, 11]] * 3  # the short task restarts
    skipped = list(MultiTaskLoader(loaders, "cycle").iterate(start=4))
    assert [(s, t) for s, t, _ in skipped] == [(4, "a"), (5, "b")]


class SeededLoader:
    """A loader whose shuffle follows ``set_epoch``, as Accelerate's seedable sampler does."""

    def __init__(self, data, batch_size):
        self.data, self.batch_size, self.epoch = list(data), batch_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.data) // self.batch_size

    def __iter__(self):
        perm = np.random.default_rng(self.epoch).permutation(self.data).tolist()
        for i in range(len(self)):
            yield perm[i * self.batch_size:(i + 1) * self.batch_size]


def test_repeats_upsample_a_task_with_a_fresh_shuffle_per_pass():
    loaders = {"a": SeededLoader(range(6), 2), "b": SeededLoader(range(10, 14), 2)}
    mtl = MultiTaskLoader(loaders, "proportional", seed=1, repeats={"b": 3})
    passes = []
    for epoch in range(2):
        mtl.set_epoch(epoch)
        steps = list(mtl)
        assert sorted(t for t, _ in steps) == ["a"] * 3 + ["b"] * 6
        b = [x for t, batch in steps if t == "b" for x in batch]
        passes += [b[i:i + 4] for i in range(0, 12, 4)]
        assert sorted(x for t, batch in steps if t == "a" for x in batch) == list(range(6))
    assert all(sorted(p) == [10, 11, 12, 13] for p in passes), "every pass covers the task's data once"
    assert len({tuple(p) for p in passes}) == 6, "no two passes repeat an order"
    mtl.set_epoch(1)  # resuming mid-epoch replays the same batches
    assert [(t, b) for _, t, b in mtl.iterate(start=5)] == list(mtl)[5:]
    with pytest.raises(ValueError, match=r"repeats must be positive integers.*'b': 0"):
        MultiTaskLoader(loaders, repeats={"b": 0})
    with pytest.raises(ValueError, match=r"\['c'\] that have no loader"):
        MultiTaskLoader(loaders, repeats={"c": 2})
    with pytest.raises(ValueError, match="repeat must be a positive integer"):
        Task("ret", retrieval_data(), RetrievalCollator(Tok()), DPRLoss(), repeat=1.5)


def test_trainer_repeat_gives_a_task_more_steps():
    seen = []

    def recording(batch):
        seen.append(sorted(e["query"] for e in batch))
        return RetrievalCollator(Tok())(batch)

    tuned = petune.attach(tiny("t5"), "lora", tasks=["ret", "cls"])
    tasks = tasks_for(n=8)
    tasks[0] = Task("ret", retrieval_data(8), recording, DPRLoss(), batch_size=4, repeat=2)
    history = Trainer(tuned, tasks, epochs=1, lr=1e-2, progress=False, log_with=None).fit()
    assert sorted(t for _, t, _ in history["loss"]) == ["cls"] * 2 + ["ret"] * 4
    assert sorted(q for batch in seen[:2] for q in batch) == sorted(q for batch in seen[2:] for q in batch)
    assert seen[:2] != seen[2:], "Accelerate's seedable loader reshuffles for the second pass"


# -- losses -----------------------------------------------------------------------------------
def test_dpr_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.5, 0.0]])  # q0: p0 (+), p1; q1: p2 (+), p3
    scores = q @ p.T
    expected = -(torch.log_softmax(scores, 1)[0, 0] + torch.log_softmax(scores, 1)[1, 2]) / 2
    torch.testing.assert_close(dpr_loss(q, p), expected)
    with pytest.raises(ValueError, match="M rows per query"):
        dpr_loss(q, p[:3])


def test_text_key_is_stable_across_processes():
    # Python's hash() is salted per process; the key must not be (processes compare keys)
    assert text_key("Python.") == 4675728842040909187
    assert 0 <= text_key("") < 2 ** 63 and text_key("a") != text_key("b")


def test_collator_keys_and_false_negatives():
    examples = [{"query": "What language?", "positive": "Python.", "negatives": ["Sort of."]},
                {"query": "What language?", "positive": "I am written in Python.", "negatives": ["No."]},
                {"query": "Are you sentient?", "positive": "Sort of.", "negatives": ["Python."],
                 "relevant": ["Sort of.", "Even though I'm a construct..."]},
                {"query": "Who are you?", "positive": "A bot.", "negatives": ["Even though I'm a construct..."],
                 "relevant": []}]
    batch = RetrievalCollator(Tok())(examples)
    assert batch["passage_keys"].tolist() == [text_key(t) for t in ["Python.", "Sort of.", "I am written in Python.",
                                                                    "No.", "Sort of.", "Python.", "A bot.",
                                                                    "Even though I'm a construct..."]]
    assert batch["relevant_keys"].shape == (4, 2) and batch["relevant_keys"][0, 1] == -1
    false = false_negatives(batch["query_keys"], batch["query_keys"], batch["passage_keys"], batch["relevant_keys"])
    assert false.tolist() == [
        # same question, other answer (column 2) is relevant; its own positive (0) and the
        # "Python." hard negative of query 2 (5, same text as its positive) too
        [True, False, True, False, False, True, False, False],
        [True, False, True, False, False, False, False, False],
        # its listed relevant text, given as query 0's hard negative (1), and as query 3's (7)
        [False, True, False, False, True, False, False, True],
        [False, False, False, False, False, False, True, False]]


def test_dpr_loss_leaves_false_negatives_out():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.5, 0.0]])
    false = torch.tensor([[True, False, False, True], [False, False, True, False]])  # p3 is relevant to q0
    scores = q @ p.T
    kept0 = torch.log_softmax(scores[0, :3], 0)[0]  # q0 without p3
    expected = -(kept0 + torch.log_softmax(scores, 1)[1, 2]) / 2
    torch.testing.assert_close(dpr_loss(q, p, false_negative=false), expected)
    assert dpr_loss(q, p, false_negative=false) < dpr_loss(q, p)


def test_dpr_loss_masks_duplicate_answers_on_a_model():
    """Two examples of one question with two answers: with the mask, neither answer is the
    other's negative, so the loss equals the loss of a batch without the duplicate question."""
    tuned = petune.attach(tiny("t5"), "lora")
    both = [{"query": "q same", "positive": "answer one"}, {"query": "q same", "positive": "answer two"},
            {"query": "q other", "positive": "third passage"}]
    collate = RetrievalCollator(Tok())
    masked, plain = DPRLoss()(tuned, collate(both)), DPRLoss(mask_false_negatives=False)(tuned, collate(both))
    q = petune.embed.pool_inputs(tuned, collate(both)["query"], "mean")
    p = petune.embed.pool_inputs(tuned, collate(both)["passages"], "mean")
    s = q @ p.T
    by_hand = -(torch.log_softmax(s[0, [0, 2]], 0)[0] + torch.log_softmax(s[1, [1, 2]], 0)[0]
                + torch.log_softmax(s[2], 0)[2]) / 3
    torch.testing.assert_close(masked, by_hand)
    assert plain > masked


@pytest.mark.multiproc
def test_two_processes_agree(tmp_path):
    """torchrun --nproc_per_node 2: same task order, gathered losses and their gradients equal
    single-process ones, identical parameters after a two-process Trainer run."""
    env = {**os.environ, "CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "multiproc" / "ddp_check.py")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["order"] == r1["order"]
    assert r0["dpr_mean_over_processes"] == pytest.approx(r0["dpr_single_process"], rel=1e-6)
    assert r0["nce_mean_over_processes"] == pytest.approx(r0["nce_single_process"], rel=1e-6)
    assert r0["masked_mean_over_processes"] == pytest.approx(r0["masked_single_process"], rel=1e-6)
    assert r0["dpr_local_grad_nonzero"] and r1["dpr_local_grad_nonzero"]
    # gathered copies send their gradient home: N processes give the single-process gradient
    assert r0["dpr_grad_max_diff"] < 1e-6 and r1["dpr_grad_max_diff"] < 1e-6
    assert r0["itm_grad_norm"] > 1e-3
    assert r0["itm_grad_max_diff"] < 1e-5 * max(1.0, r0["itm_grad_norm"]) and r1["itm_grad_max_diff"] < 1e-4
    # the cached loss (mini-batches of 2 of each process's 4 pairs) too: its all-gather sends gradients home
    assert r0["itm_cached_grad_max_diff"] < 1e-5 * max(1.0, r0["itm_grad_norm"])
    assert r1["itm_cached_grad_max_diff"] < 1e-4
    assert r0["steps"] == r1["steps"] == 4  # 16 examples / batch 2 / 2 processes
    assert r0["param_checksum"] == r1["param_checksum"]
    assert r0["gather_after_fit"] == [0.0, 1.0]  # the process group is still usable after fit()
    for n in ("7", "1"):  # encode_sharded == single-process encode, in input order, padding cut
        main, worker = r0["sharded"][n], r1["sharded"][n]
        assert main["main_rows"] == int(n) and main["main_max_diff"] < 1e-5 and not main["main_is_none"]
        assert worker["main_is_none"]
        assert main["all_rows"] == worker["all_rows"] == int(n)
        assert main["all_max_diff"] < 1e-5 and worker["all_max_diff"] < 1e-5
    assert r0["routed_max_diff"] < 1e-5 and r1["routed_max_diff"] < 1e-5
    assert r0["cache_files"] == 1 and r0["cached_equal"] and r1["cached_equal"]


# -- the loop ---------------------------------------------------------------------------------
METHODS = [("lora", dict(r=4)), ("ia3", {}), ("prompt", dict(num_virtual_tokens=4)), ("adapter", dict(d=8))]


@pytest.mark.parametrize("method,options", METHODS)
@pytest.mark.parametrize("multi", [False, True])
def test_trains_every_method_only_tuned_parameters(method, options, multi):
    model = tiny("t5")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = petune.attach(model, method, tasks=["ret", "cls"] if multi else None, **options)
    before = {n: p.detach().clone() for n, p in tuned.tuned_parameters().items()}
    history = Trainer(tuned, tasks_for(), epochs=1, lr=5e-2, progress=False, log_with=None).fit()
    assert len(history["loss"]) == 8 and history["skipped_steps"] == 0
    assert all(np.isfinite(loss) for _, _, loss in history["loss"])
    after = tuned.tuned_parameters()
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    if multi:  # each task's module moved
        for task in ("ret", "cls"):
            assert moved & set(tuned.task_parameters(task)), task
    else:
        assert moved
    now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
           for n, p in tuned.base_model.named_parameters()}
    for name, p in base.items():
        assert torch.equal(now[name], p), name


def test_all_loss_kinds_run():
    tuned = petune.attach(tiny("t5"), "lora", tasks=["pair", "gen"])
    tasks = [Task("pair", [{"a": f"left {i}", "b": f"right {i}"} for i in range(8)], PairCollator(Tok()), PairLoss(),
                  batch_size=4),
             Task("gen", [{"source": f"copy {i}", "target": f"{i}"} for i in range(8)], Seq2SeqCollator(Tok()),
                  Seq2SeqLoss(), batch_size=4)]
    trainer = Trainer(tuned, tasks, epochs=2, lr=1e-2, progress=False, log_with=None)
    scale = tasks[0].loss.logit_scale.log_scale.detach().clone()
    history = trainer.fit()
    assert {t for _, t, _ in history["loss"]} == {"pair", "gen"}
    assert not torch.equal(tasks[0].loss.logit_scale.log_scale, scale)  # the temperature is learned


def test_loss_decreases_on_real_bbc_subset(minilm_bert2bert, minilm_tokenizer):
    """Headline → article retrieval on real BBC News with the real MiniLM BERT2BERT and LoRA."""
    from petune.data.packaged import bbc_news

    articles = bbc_news()[::40][:48]
    data = [{"query": a["headline"], "positive": a["body"][:300]} for a in articles]
    torch.manual_seed(0)
    tuned = petune.attach(minilm_bert2bert, "lora", r=8, tasks=["bbc"])
    task = Task("bbc", data, RetrievalCollator(minilm_tokenizer, passage_max_length=96), DPRLoss(), batch_size=16)
    history = Trainer(tuned, [task], epochs=4, lr=3e-3, warmup_ratio=0.0, progress=False, log_with=None).fit()
    losses = [loss for _, _, loss in history["loss"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) * 0.8, losses


def run_to_end(tmp_path, name, max_steps=None, resume=None):
    torch.manual_seed(0)
    tuned = petune.attach(tiny("t5"), "lora", tasks=["ret", "cls"])  # T5 dropout 0.1: RNG state matters
    trainer = Trainer(tuned, tasks_for(n=12), epochs=3, lr=1e-2, seed=5, output_dir=tmp_path / name,
                      checkpoint_every=4, max_steps=max_steps, progress=False, log_with=None)
    history = trainer.fit(resume_from=resume)
    return tuned, trainer, history


def test_resume_equals_uninterrupted(tmp_path):
    full, _, full_history = run_to_end(tmp_path, "full")
    _, first, _ = run_to_end(tmp_path, "split", max_steps=7)  # stops mid-epoch (6 batches per epoch)
    assert first.latest_checkpoint().name == "step-00000007"
    resumed, _, resumed_history = run_to_end(tmp_path, "split", resume="latest")
    assert len(resumed_history["loss"]) == len(full_history["loss"]) == 18
    for name, p in full.tuned_parameters().items():
        assert torch.equal(p, resumed.tuned_parameters()[name]), name
    assert resumed_history["loss"] == full_history["loss"]


def test_checkpoint_is_atomic_and_complete(tmp_path):
    _, trainer, _ = run_to_end(tmp_path, "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000016", "step-00000018"]  # keep_checkpoints=2, no temp dirs
    files = {p.name for p in (tmp_path / "run" / "checkpoints" / "step-00000018").iterdir()}
    assert {"tuned", "optimizer.bin", "trainer_state.json", "random_states_0.pkl"} <= files


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        Task("ret", [], RetrievalCollator(Tok()), DPRLoss())
    tuned = petune.attach(tiny("t5"), "lora", tasks=["ret"])
    with pytest.raises(ValueError, match=r"task 'cls' has no module.*attach with tasks=\['ret', 'cls'\]"):
        Trainer(tuned, tasks_for(), progress=False, log_with=None)
    nan_task = Task("ret", retrieval_data(), RetrievalCollator(Tok()), lambda m, b: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="NaN/inf at the first step"):
        Trainer(tuned, [nan_task], progress=False, log_with=None).fit()
    # a checkpoint of another method cannot be resumed
    _, trainer, _ = run_to_end(tmp_path, "lora", max_steps=4)
    other = petune.attach(tiny("t5"), "ia3", tasks=["ret", "cls"])
    with pytest.raises(ValueError, match="another run"):
        Trainer(other, tasks_for(n=12), seed=5, sampling="proportional", output_dir=tmp_path / "lora",
                progress=False, log_with=None).fit(resume_from="latest")


# -- optimiser groups per part and a first stage (the vision recipe's levers) -----------------------
def pair_task(n=8):
    g = torch.Generator().manual_seed(3)
    examples = [{"a": "", "image_a": torch.randn(6, generator=g).numpy(), "b": f"text {i} " + "ab" * i}
                for i in range(n)]
    return Task("itm", examples, PairCollator(Tok(), prefix_a="match: "), PairLoss(), batch_size=4)


def snapshot(tuned):
    return {k: p.detach().clone() for k, p in tuned.tuned_parameters().items()}


def moved(before, after, prefix):
    """Whether any parameter whose name starts (or, with "!", does not start) with prefix changed."""
    keep = (lambda k: not k.startswith(prefix[1:])) if prefix.startswith("!") else (lambda k: k.startswith(prefix))
    return any(not torch.equal(before[k], after[k]) for k in before if keep(k))


def test_param_groups_give_a_part_its_own_learning_rate():
    tuned = tuned_model("lora", {"r": 2})
    before = snapshot(tuned)
    trainer = Trainer(tuned, [pair_task()], epochs=1, lr=1e-2, param_groups={"visual": {"lr": 0.0}},
                      progress=False, log_with=None)
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups) == [0.0, 1e-2]
    trainer.fit()
    after = snapshot(tuned)
    assert not moved(before, after, "petune_visual.") and moved(before, after, "!petune_visual.")
    with pytest.raises(ValueError, match="no parameter group 'vision'.*'visual'"):
        Trainer(tuned_model("lora", {"r": 2}), [pair_task()], param_groups={"vision": {"lr": 1.0}})


def test_first_stage_trains_only_the_visual_embedding(tmp_path):
    tuned = tuned_model("lora", {"r": 2})
    before = snapshot(tuned)
    options = dict(epochs=3, lr=1e-2, first_stage_steps=2, progress=False, log_with=None,
                   output_dir=tmp_path, checkpoint_every=1)
    Trainer(tuned, [pair_task()], max_steps=2, **options).fit()
    stage_one = snapshot(tuned)
    assert moved(before, stage_one, "petune_visual.") and not moved(before, stage_one, "!petune_visual.")
    history = Trainer(tuned, [pair_task()], **options).fit(resume_from="latest")  # the second stage
    assert len(history["loss"]) == 6 and moved(stage_one, snapshot(tuned), "!petune_visual.")
    with pytest.raises(ValueError, match="another run.*first_stage"):  # another schedule does not resume it
        Trainer(tuned, [pair_task()], **{**options, "first_stage_steps": 1}).fit(resume_from="latest")
