"""petune's overhead: the same training steps and encode pass through petune and written directly
against peft / adapters / transformers, in the same process, reported as ratios.

    python benchmarks/overhead.py [--steps 12] [--repeats 2] [--quick]

Training: DPR loss (in-batch + one hard negative) on BBC headline → article batches with the
offline MiniLM BERT2BERT; petune = attach + Trainer (Accelerate, round-robin loader, task
switching, NaN checks, clipping, scheduler); direct = peft.get_peft_model / adapters.init +
a hand-written loop with the same optimizer, clipping, scheduler and batches. Encoding: petune.encode
vs the same length-sorted batches through the model's encoder. Medians over steps, sides
interleaved. Targets: step ratio ≤ 1.05, encode ratio ≤ 1.10 (petune time / direct time).
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
sys.path.insert(0, str(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from encode_throughput import bare_encode  # noqa: E402

import petune  # noqa: E402
from petune.data.packaged import bbc_news, minilm_encoder_decoder, minilm_path  # noqa: E402
from petune.embed import encode, mean_pool  # noqa: E402
from petune.train import DPRLoss, RetrievalCollator, Task, Trainer  # noqa: E402


def examples(n):
    articles = bbc_news()[:n + 1]
    return [{"query": a["headline"], "positive": a["body"][:500], "negatives": [articles[i + 1]["body"][:500]]}
            for i, a in enumerate(articles[:n])]


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


def direct_steps(method, data, collate, steps, batch_size, lr):
    """The hand-written loop: what a user would write without petune."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = attach_direct(minilm_encoder_decoder(), method)
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = base.get_encoder()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    times = []
    it = iter(loader)
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(it)
        q = mean_pool(encoder(**batch["query"]).last_hidden_state, batch["query"]["attention_mask"])
        p = mean_pool(encoder(**batch["passages"]).last_hidden_state, batch["passages"]["attention_mask"])
        labels = torch.arange(q.shape[0]) * (p.shape[0] // q.shape[0])
        loss = F.nll_loss(F.log_softmax(q @ p.T, dim=1), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return times, model


def petune_steps(method, data, collate, steps, batch_size, lr):
    torch.manual_seed(0)
    options = {"r": 8, "alpha": 16} if method == "lora" else {"reduction_factor": 8}
    tuned = petune.attach(minilm_encoder_decoder(), method, **options)
    task = Task("news", data, collate, DPRLoss(), batch_size=batch_size, drop_last=True)
    history = Trainer(tuned, [task], epochs=1, lr=lr, warmup_ratio=0.0, max_steps=steps, progress=False,
                      log_with=None).fit()
    return history["step_seconds"], tuned


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--encode-texts", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["lora", "adapter"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(HERE / "overhead.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.encode_texts, args.batch_size = 3, 1, 32, 4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    collate = RetrievalCollator(tok, query_max_length=32, passage_max_length=96)
    data = examples(args.steps * args.batch_size)
    texts = [a["body"][:1500] for a in bbc_news()[: args.encode_texts]]
    results = {}
    for method in args.methods:
        step = {"petune": [], "direct": []}
        enc = {"petune": [], "direct": []}
        for _ in range(args.repeats):
            t, tuned = petune_steps(method, data, collate, args.steps, args.batch_size, 1e-3)
            step["petune"] += t[1:]  # the first step pays one-off costs on both sides
            t, direct = direct_steps(method, data, collate, args.steps, args.batch_size, 1e-3)
            step["direct"] += t[1:]
            tuned.eval()
            direct.eval()
            for side in ("direct", "petune"):
                start = time.perf_counter()
                if side == "petune":
                    encode(tuned, tok, texts, batch_size=32, progress=False)
                else:
                    base = direct.get_base_model() if hasattr(direct, "get_base_model") else direct
                    bare_encode(base, tok, texts, 32, 256)
                enc[side].append(time.perf_counter() - start)
        results[method] = {
            "step_seconds_median": {k: statistics.median(v) for k, v in step.items()},
            "step_ratio": statistics.median(step["petune"]) / statistics.median(step["direct"]),
            "encode_seconds_min": {k: min(v) for k, v in enc.items()},
            "encode_ratio": min(enc["petune"]) / min(enc["direct"]),
        }
    results["meta"] = {"command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
                       "steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size}
    print(json.dumps(results, indent=2))
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
