"""petune's overhead: the same training steps and encode pass through petune and written directly
against peft / adapters / transformers, in the same process, reported as ratios with 95 % intervals.

    python benchmarks/overhead.py [--blocks 24] [--steps 6] [--encode-pairs 80] [--threads N] [--quick]

Training: DPR loss (in-batch + one hard negative) on BBC headline → article batches with the
offline MiniLM BERT2BERT; petune = attach + Trainer (Accelerate, round-robin loader, task
switching, NaN checks, clipping, scheduler); direct = peft.get_peft_model / adapters.init + a
hand-written loop with the same optimizer, clipping and scheduler. Both sides run the **same
batches in the same order**: the direct loop replays the example order the Trainer's seeded
loader used, and collates them itself, so both pay tokenisation. A block is one Trainer run of
``--steps`` + 1 steps with the direct loop's steps **interleaved one by one** (the direct step
runs in the Trainer's evaluation hook, which the Trainer leaves out of its step times), so a
slowdown of the shared machine hits neighbouring steps of both sides alike; each side's first
step (one-off costs) is dropped and the block's ratio is petune's median step time over direct's
(medians: a stalled step does not decide a block). Blocks alternate which side steps first
(ABBA). Encoding: ``petune.encode`` vs the same
length-sorted batches through the model's encoder, in ABBA pairs of short passes (many short
pairs give a narrower interval than few long ones on a noisy machine).
Each ratio is the geometric mean over blocks / pairs with a 95 % percentile-bootstrap interval
(``benchmarks/stats.py``). torch threads are pinned (``--threads``, default: every core).
Targets: step ratio ≤ 1.05, encode ratio ≤ 1.10 (petune time / direct time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from encode_throughput import bare_encode  # noqa: E402
from stats import abba, ratio_ci, timed_pairs, verdict  # noqa: E402

import petune  # noqa: E402
from petune.data.packaged import bbc_news, minilm_encoder_decoder, minilm_path  # noqa: E402
from petune.embed import encode, mean_pool  # noqa: E402
from petune.train import DPRLoss, RetrievalCollator, Task, Trainer  # noqa: E402


STEP_TARGET, ENCODE_TARGET = 1.05, 1.10


def examples(n):
    articles = bbc_news()[:n + 1]
    return [{"i": i, "query": a["headline"], "positive": a["body"][:500], "negatives": [articles[i + 1]["body"][:500]]}
            for i, a in enumerate(articles[:n])]


class Recorded:
    """A collate that remembers the example order it was given (the Trainer's loader order)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, batch):
        self.batches.append([e["i"] for e in batch])
        return self.collate(batch)


def attach_direct(model, method):
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                task_type=TaskType.SEQ_2_SEQ_LM))
    import adapters

    adapters.init(model)
    model.add_adapter("x", config=adapters.SeqBnConfig(reduction_factor=8))
    model.train_adapter("x")
    return model


def direct_stepper(model, data, collate, order, lr):
    """The hand-written loop a user would write without petune, over the batches ``order`` (lists
    of example indices), one step per ``next()``: yields each step's seconds, fetching and
    collating included."""
    from transformers import get_linear_schedule_with_warmup

    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = base.get_encoder()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_linear_schedule_with_warmup(opt, 0, len(order))
    batches = iter(torch.utils.data.DataLoader(data, batch_sampler=order, collate_fn=collate))
    for _ in order:
        start = time.perf_counter()
        batch = next(batches)
        q = mean_pool(encoder(**batch["query"]).last_hidden_state, batch["query"]["attention_mask"])
        p = mean_pool(encoder(**batch["passages"]).last_hidden_state, batch["passages"]["attention_mask"])
        labels = torch.arange(q.shape[0]) * (p.shape[0] // q.shape[0])
        loss = F.nll_loss(F.log_softmax(q @ p.T, dim=1), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        yield time.perf_counter() - start


def petune_steps(tuned, data, collate, steps, batch_size, lr, between=None):
    """One Trainer run of ``steps`` steps: per-step seconds and the example order its loader used
    (the same in every run: the seed is fixed). ``between()`` runs after each step, in the
    Trainer's evaluation hook, whose time the Trainer leaves out of its step times."""
    recorded = Recorded(collate)
    task = Task("news", data, recorded, DPRLoss(), batch_size=batch_size, drop_last=True)
    hook = None if between is None else (lambda trainer: between() or {})
    history = Trainer(tuned, [task], epochs=1, lr=lr, warmup_ratio=0.0, max_steps=steps, progress=False,
                      log_with=None, seed=0, eval_fn=hook, eval_every=1 if hook else None).fit()
    return history["step_seconds"], recorded.batches[:steps]


def interleaved_block(tuned, direct, data, collate, order, args, direct_first: bool) -> dict[str, list[float]]:
    """One block: petune and direct steps alternate one by one (p d p d ..., or d p d p ... when
    ``direct_first``), so a slowdown of the machine hits both sides' neighbouring steps alike.
    Each side's first step is dropped (one-off costs). Returns each side's step seconds."""
    stepper = direct_stepper(direct, data, collate, order, 1e-3)
    direct_seconds = [next(stepper)] if direct_first else []

    def direct_step():
        if len(direct_seconds) < len(order):
            direct_seconds.append(next(stepper))

    petune_seconds, used = petune_steps(tuned, data, collate, args.steps + 1, args.batch_size, 1e-3, direct_step)
    assert used == order, "both sides must run the same batches"
    return {"petune": petune_seconds[1:], "direct": direct_seconds[1:]}


def models(method):
    torch.manual_seed(0)
    options = {"r": 8, "alpha": 16} if method == "lora" else {"reduction_factor": 8}
    tuned = petune.attach(minilm_encoder_decoder(), method, **options)
    torch.manual_seed(0)
    return tuned, attach_direct(minilm_encoder_decoder(), method)


def measure(method, args, tok, collate, data, texts) -> dict:
    tuned, direct = models(method)
    _, order = petune_steps(tuned, data, collate, args.steps + 1, args.batch_size, 1e-3)  # the Trainer's order
    interleaved_block(tuned, direct, data, collate, order, args, direct_first=False)  # warm-up
    block_ratios, step_seconds = [], {"petune": [], "direct": []}
    for k in range(args.blocks):
        timings = interleaved_block(tuned, direct, data, collate, order, args, direct_first=abba(k)[0] == "direct")
        for side in timings:
            step_seconds[side] += timings[side]
        block_ratios.append(statistics.median(timings["petune"]) / statistics.median(timings["direct"]))
    tuned.eval()
    direct.eval()
    base = direct.get_base_model() if hasattr(direct, "get_base_model") else direct
    encode_seconds = timed_pairs(lambda: encode(tuned, tok, texts, batch_size=32, progress=False),
                                 lambda: bare_encode(base, tok, texts, 32, 256), args.encode_pairs)
    encode_ratios = [p / d for p, d in zip(encode_seconds["petune"], encode_seconds["direct"])]
    step, enc = ratio_ci(block_ratios), ratio_ci(encode_ratios)
    return {"step": {**step, "target": STEP_TARGET, "verdict": verdict(step, STEP_TARGET),
                     "median_seconds": {k: statistics.median(v) for k, v in step_seconds.items()},
                     "block_ratios": block_ratios},
            "encode": {**enc, "target": ENCODE_TARGET, "verdict": verdict(enc, ENCODE_TARGET),
                       "median_seconds": {k: statistics.median(v) for k, v in encode_seconds.items()},
                       "pair_ratios": encode_ratios}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=24, help="training blocks per method (ABBA)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per block and side (+1 dropped)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encode-pairs", type=int, default=80)
    parser.add_argument("--encode-texts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (pinned)")
    parser.add_argument("--methods", nargs="+", default=["lora", "adapter"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: intervals too wide to judge")
    parser.add_argument("--output", default=str(HERE / "overhead.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.steps, args.encode_pairs, args.encode_texts, args.batch_size = 2, 2, 2, 16, 4
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    collate = RetrievalCollator(tok, query_max_length=32, passage_max_length=96)
    data = examples((args.steps + 1) * args.batch_size)
    texts = [a["body"][:1500] for a in bbc_news()[: args.encode_texts]]
    started = time.perf_counter()
    results = {method: measure(method, args, tok, collate, data, texts) for method in args.methods}
    results["meta"] = {"command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
                       "threads": {"torch": torch.get_num_threads(), **{v: os.environ.get(v) for v in (
                                   "OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
                       "blocks": args.blocks, "steps": args.steps, "batch_size": args.batch_size,
                       "encode_pairs": args.encode_pairs, "encode_texts": args.encode_texts,
                       "seconds": round(time.perf_counter() - started)}
    for method in args.methods:
        for kind in ("step", "encode"):
            r = results[method][kind]
            print(f"{method:8} {kind:6} {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                  f"(±{r['half_width_percent']:.1f} %, n={r['pairs']}) target ≤ {r['target']}: {r['verdict']}")
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
