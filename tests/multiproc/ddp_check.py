"""Run under 2 processes (torchrun / accelerate launch); writes results to $CHECK_OUT/rank<r>.json.

Checks: the task order is the same on every process; the gathered DPR and InfoNCE losses,
averaged over processes, equal the single-process losses on the same global batch (with false
negatives found across processes too), and so do their
gradients (raw embeddings, and a LoRA + visual embedding model on image–text pairs); a Trainer run
leaves identical tuned parameters on every process and the process group usable afterwards;
encode_sharded gives the single-process embeddings in input order (counts not divisible by the
number of processes included), on the main process or on all, with one task per text, and
through its cache.
"""

import json
import os

import numpy as np
import torch
from accelerate.utils import gather, reduce

import petune  # noqa: E402
from conftest import tiny  # noqa: E402
from petune.dist import process_state  # noqa: E402
from petune.train import (DPRLoss, PairCollator, PairLoss, RetrievalCollator, Task, Trainer,  # noqa: E402
                          dpr_loss, false_negatives, info_nce, task_order)
from test_embed import CharTokenizer as Tok  # noqa: E402


def grad_vs_single_process(q_all, p_all, n_local, rank, world) -> float:
    """Gradients of the gathered DPR loss, summed over processes (each process's block receives
    every process's part), equal ``world`` × the single-process gradient of the same global batch."""
    q = q_all[rank * n_local:(rank + 1) * n_local].clone().requires_grad_(True)
    p = p_all[rank * 2 * n_local:(rank + 1) * 2 * n_local].clone().requires_grad_(True)
    dpr_loss(q, p).backward()
    q1, p1 = q_all.clone().requires_grad_(True), p_all.clone().requires_grad_(True)
    dpr_loss(q1, p1, gather=False).backward()
    want_q = q1.grad[rank * n_local:(rank + 1) * n_local]
    want_p = p1.grad[rank * 2 * n_local:(rank + 1) * 2 * n_local]
    return max(float((q.grad / world - want_q).abs().max()), float((p.grad / world - want_p).abs().max()))


def masked_vs_single_process(q_all, p_all, n_local, rank, world) -> tuple[float, float]:
    """False negatives found across processes: query 0 (rank 0) and the first query of the last
    rank share their text, so each one's positive is the other's false negative."""
    n, m = world * n_local, p_all.shape[0] // (world * n_local)
    query_keys = torch.arange(n) + 100
    query_keys[-n_local] = 100
    passage_keys = torch.arange(n * m) + 1000
    relevant = passage_keys[::m].view(-1, 1)
    mine, rows = slice(rank * n_local, (rank + 1) * n_local), slice(rank * n_local * m, (rank + 1) * n_local * m)
    local = dpr_loss(q_all[mine], p_all[rows], false_negative=false_negatives(
        query_keys[mine], gather(query_keys[mine]), gather(passage_keys[rows]), relevant[mine]))
    single = dpr_loss(q_all, p_all, gather=False,
                      false_negative=false_negatives(query_keys, query_keys, passage_keys, relevant))
    return gather(local.detach().reshape(1)).mean().item(), single.item()


def model_grad_vs_single_process(rank, world, mini_batch_size=None) -> tuple[float, float]:
    """Image–text matching (PairLoss, LoRA + visual embedding): the gradient averaged over processes,
    as the Trainer does, equals the single-process gradient of the same global batch (with
    ``mini_batch_size``, the processes' loss is cached; the single-process one is not)."""
    torch.manual_seed(0)
    tuned = petune.attach(tiny("t5"), "lora")
    petune.vision.add_visual(tuned, 6)
    params = list(tuned.tuned_parameters().values())
    with torch.no_grad():  # LoRA's B starts at zero: move it so every parameter gets a gradient
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    examples = [{"a": "", "image_a": torch.randn(6, generator=g).numpy(), "b": f"text {i} " + "ab" * i}
                for i in range(4 * world)]
    collate, loss = PairCollator(Tok(), prefix_a="match: "), PairLoss(mini_batch_size=mini_batch_size)
    tuned.eval()  # no dropout: the cached and uncached forwards see the same model
    loss(tuned, collate(examples[rank * 4:(rank + 1) * 4])).backward()
    params = [p for p in params if p.grad is not None]  # the decoder's LoRA takes no part in encoding
    distributed = [reduce(p.grad, "mean") for p in params]
    for p in params:
        p.grad = None
    loss.gather, loss.mini_batch_size = False, None
    loss(tuned, collate(examples)).backward()
    diff = max(float((d - p.grad).abs().max()) for d, p in zip(distributed, params))
    return diff, float(sum(p.grad.norm() for p in params))


def routed_sharded_vs_single_process(texts) -> float:
    """encode_sharded with one task per text: each process takes its rows' tasks."""
    torch.manual_seed(5)
    tuned = petune.attach(tiny("t5"), "lora", tasks=["p", "q"])
    with torch.no_grad():
        for p in tuned.tuned_parameters().values():
            p.add_(0.3 * torch.randn_like(p))
    rows = ["p", "q", "q", "p", "q", "p", "p"][:len(texts)]
    everywhere = petune.encode_sharded(tuned, Tok(), texts, task=rows, gather_to="all")
    return float(np.abs(everywhere - petune.encode(tuned, Tok(), texts, task=rows)).max())


def main():
    state = process_state()
    rank, world = state.process_index, state.num_processes
    out = {"rank": rank, "world": world}
    out["order"] = task_order({"a": 5, "b": 3, "c": 2}, "proportional", seed=7, epoch=1)

    # the global batch, identical everywhere; each process takes its share
    g = torch.Generator().manual_seed(0)
    n_local, m, d = 3, 2, 8
    q_all = torch.randn(world * n_local, d, generator=g)
    p_all = torch.randn(world * n_local * m, d, generator=g)
    q = q_all[rank * n_local:(rank + 1) * n_local].clone().requires_grad_(True)
    p = p_all[rank * n_local * m:(rank + 1) * n_local * m].clone().requires_grad_(True)
    local = dpr_loss(q, p)
    local.backward()
    out["dpr_mean_over_processes"] = gather(local.detach().reshape(1)).mean().item()
    out["dpr_single_process"] = dpr_loss(q_all, p_all, gather=False).item()
    out["dpr_local_grad_nonzero"] = bool(p.grad.abs().sum() > 0)
    a, b = q_all[:, :4], p_all[: world * n_local, :4]
    la = info_nce(a[rank * n_local:(rank + 1) * n_local], b[rank * n_local:(rank + 1) * n_local], torch.tensor(10.0))
    out["nce_mean_over_processes"] = gather(la.reshape(1)).mean().item()
    out["nce_single_process"] = info_nce(a, b, torch.tensor(10.0), gather=False).item()
    out["dpr_grad_max_diff"] = grad_vs_single_process(q_all, p_all, n_local, rank, world)
    out["masked_mean_over_processes"], out["masked_single_process"] = masked_vs_single_process(
        q_all, p_all, n_local, rank, world)
    out["itm_grad_max_diff"], out["itm_grad_norm"] = model_grad_vs_single_process(rank, world)
    out["itm_cached_grad_max_diff"], _ = model_grad_vs_single_process(rank, world, mini_batch_size=2)

    # a short two-process training run: parameters must stay identical across processes
    torch.manual_seed(100 + rank)  # different random inits per process: the Trainer broadcasts rank 0's
    tuned = petune.attach(tiny("t5"), "lora", tasks=["ret"])
    data = [{"query": f"q{i}", "positive": f"passage {i} " * 3, "negatives": [f"other {i + 1}"]} for i in range(16)]
    history = Trainer(tuned, [Task("ret", data, RetrievalCollator(Tok()), DPRLoss(), batch_size=2)], epochs=1,
                      lr=1e-2, progress=False, log_with=None).fit()
    out["steps"] = len(history["loss"])
    out["param_checksum"] = float(sum(p.detach().double().sum() for p in tuned.tuned_parameters().values()))
    state.wait_for_everyone()  # the process group survives Trainer.fit (accelerate's end_training destroys it)
    out["gather_after_fit"] = gather(torch.tensor([float(rank)])).tolist()

    # sharded encoding: every process encodes its block; compare with this process's own full encode
    texts = [f"text number {i} " + "x" * (i % 5) for i in range(7)]  # 7 rows on 2 processes: padded
    full = petune.encode(tuned, Tok(), texts)
    out["sharded"] = {}
    for n in (7, 1):
        main = petune.encode_sharded(tuned, Tok(), texts[:n])
        everywhere = petune.encode_sharded(tuned, Tok(), texts[:n], gather_to="all")
        out["sharded"][n] = {"main_is_none": main is None,
                             "main_max_diff": None if main is None else float(np.abs(main - full[:n]).max()),
                             "main_rows": None if main is None else len(main),
                             "all_max_diff": float(np.abs(everywhere - full[:n]).max()), "all_rows": len(everywhere)}
    out["routed_max_diff"] = routed_sharded_vs_single_process(texts)
    cache = os.path.join(os.environ["CHECK_OUT"], "cache")
    first = petune.encode_sharded(tuned, Tok(), texts, cache_dir=cache, gather_to="all")
    second = petune.encode_sharded(tuned, Tok(), texts, cache_dir=cache, gather_to="all")
    out["cache_files"] = len(os.listdir(cache)) if rank == 0 else None
    out["cached_equal"] = bool(np.array_equal(first, second)) and float(np.abs(first - full).max()) < 1e-5
    with open(os.path.join(os.environ["CHECK_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
