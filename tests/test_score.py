import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from petune.score import (BM25, DenseIndex, compare, evaluate, knn_predict, knn_scores, make_qrels, make_run,
                          p_values, report_latex, report_markdown)
from petune.score.significance import fisher_randomization_test


def rand(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def brute_force(docs, queries, k):
    sims = queries @ docs.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, 1)


@pytest.mark.parametrize("factory,normalise", [("Flat", False), ("L2norm,Flat", True)])
def test_flat_equals_numpy_brute_force(factory, normalise):
    docs, queries = rand(200, 16, 0), rand(20, 16, 1)
    index = DenseIndex(docs, [f"d{i}" for i in range(200)], factory=factory)
    run = index.search(queries, [f"q{i}" for i in range(20)], k=10)
    if normalise:
        docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    order, sims = brute_force(docs, queries, 10)
    for qi in range(20):
        got = run[f"q{qi}"]
        assert sorted(got, key=lambda d: -got[d]) == [f"d{j}" for j in order[qi]]
        np.testing.assert_allclose(sorted(got.values(), reverse=True), sims[qi], rtol=1e-5)


def test_approximate_factories_and_save_load(tmp_path):
    docs, queries = rand(500, 16, 0), rand(5, 16, 1)
    ids = [f"d{i}" for i in range(500)]
    for factory in ("HNSW32", "IVF8,PQ4"):
        run = DenseIndex(docs, ids, factory=factory).search(queries, list("abcde"), k=5)
        assert all(len(run[q]) == 5 for q in "abcde")
    index = DenseIndex(docs, ids)
    index.save(tmp_path / "idx")
    again = DenseIndex.load(tmp_path / "idx")
    assert again.ids == ids and len(again) == 500
    assert again.search(queries, list("abcde"), k=3).to_dict() == index.search(queries, list("abcde"), k=3).to_dict()


def test_index_errors():
    docs = rand(10, 8, 0)
    index = DenseIndex(docs, range(10))
    with pytest.raises(ValueError, match="dimension 4 but the index holds 8-d"):
        index.search(rand(2, 4, 1), ["a", "b"])
    bad = rand(2, 8, 1)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        index.search(bad, ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        DenseIndex(np.zeros((0, 8), np.float32), [])
    with pytest.raises(ValueError, match="3 ids for 10"):
        DenseIndex(docs, ["a", "b", "c"])
    with pytest.raises(ValueError, match="faiss cannot build"):
        DenseIndex(docs, range(10), factory="Nonsense42")
    with pytest.warns(UserWarning, match="larger than the collection"):
        run = index.search(rand(1, 8, 2), ["q"], k=50)
    assert len(run["q"]) == 10


def test_evaluate_known_values_and_coverage_warnings():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d9": 1}}
    run = make_run({"q1": {"d1": 0.9, "d2": 0.5}, "q2": {"d1": 0.9, "d2": 0.5}, "q4": {"d1": 1.0}})
    with pytest.warns(UserWarning) as record:
        scores = evaluate(qrels, run, ["mrr@10", "precision@1", "hit_rate@20"])
    text = " ".join(str(w.message) for w in record)
    assert "1 of 3 judged queries are missing" in text and "1 queries of the run have no judgements" in text
    # q1 rank 1, q2 rank 2, q3 missing (0): MRR = (1 + 0.5 + 0) / 3
    assert scores["mrr@10"] == pytest.approx(0.5)
    assert scores["precision@1"] == pytest.approx(1 / 3)
    assert scores["hit_rate@20"] == pytest.approx(2 / 3)
    assert set(run.keys()) == {"q1", "q2", "q4"}  # the caller's run is not modified
    with pytest.raises(ValueError, match="missing from run"):
        evaluate(qrels, run, "mrr@10", strict=True)
    with pytest.raises(ValueError, match="do not match"):
        evaluate({"x": {"d1": 1}}, run, "mrr@10")
    with pytest.raises(ValueError, match="no positive"):
        make_qrels({"q": {"d": 0}})


def test_runs_and_qrels_equal_ranx_own_and_share_one_compile_per_id_width():
    from numba import typeof
    from ranx import Qrels, Run
    from ranx.data_structures.common import create_and_sort

    from petune.score.retrieval import _id_width

    data = {"q2": {"doc-7": 0.5, "d1": 0.9, "a-much-longer-document-id-x": 0.7}, "q1": {"d1": 0.1}}
    ours, theirs = make_run(data, name="r"), Run(data, name="r")
    assert ours.name == "r" and ours.sorted
    assert ours.to_dict() == theirs.to_dict()  # same scores, same (sorted) order
    assert list(ours.keys()) == list(theirs.keys())
    # ranx types a run by its longest id ([unichr x 27] here), so every kernel downstream compiles
    # again per id length; ours share one type per width class
    assert typeof(ours.run) == typeof(make_run({"q": {"d" * 20: 1.0}}).run) != typeof(theirs.run)
    qrels = {"q1": {"d1": 1}, "q2": {"doc-7": 2}}
    assert make_qrels(qrels).to_dict() == Qrels(qrels).to_dict()
    assert evaluate(qrels, ours, "mrr@10") == evaluate(qrels, theirs, "mrr@10")
    assert [_id_width([["x" * n]]) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]
    assert _id_width([[]]) == 16 and len(make_run({}).to_dict()) == 0
    # ids of 3 and of 11 characters fall in one width: one compiled signature, not two
    make_run({"q": {"abc": 1.0}})
    compiled = len(create_and_sort.signatures)
    make_run({"q": {"abcdefghijk": 1.0}})
    assert len(create_and_sort.signatures) == compiled


def test_compare_fisher_report():
    rng = np.random.default_rng(0)
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(60)}
    good = make_run({f"q{i}": {f"d{i}": 2.0, f"d{i + 1}": 1.0} for i in range(60)})
    bad = make_run({f"q{i}": {f"d{i + 1}": 2.0, f"d{i + 2}": 1.5, f"d{i}": float(rng.random())} for i in range(60)})
    report = compare(qrels, {"good": good, "bad": bad}, metrics=["mrr@10", "precision@1"])
    assert report.stat_test == "fisher" and report.max_p == 0.01
    p = report.comparisons["good", "bad"]["mrr@10"]["p_value"]
    assert 0 <= p <= 0.01
    assert p_values(report) == {"good vs bad": {m: report.comparisons["good", "bad"][m]["p_value"]
                                                for m in ("mrr@10", "precision@1")}}
    md = report_markdown(report)
    assert "| a | good | 1.000ᵇ |" in md and "Fisher" in md
    assert "\\begin{table" in report_latex(report)


def near_threshold_runs(n=200, better=8, worse=3):
    """Two runs whose MRR@10 difference has a Fisher p-value near 0.01 (about 0.012): the
    relevant document at rank 2 in run a; in run b at rank 1 for ``better`` queries and at rank 3
    for ``worse``."""
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(n)}
    runs = {"a": {}, "b": {}}
    for i in range(n):
        others = [f"d{j}" for j in range(n) if j != i][:9]
        rank_b = 1 if i < better else 3 if i < better + worse else 2
        for name, rank in (("a", 2), ("b", rank_b)):
            order = others[:rank - 1] + [f"d{i}"] + others[rank - 1:]
            runs[name][f"q{i}"] = {d: float(10 - k) for k, d in enumerate(order)}
    return qrels, {name: make_run(run) for name, run in runs.items()}


def test_fisher_is_ranx_test_with_seeded_permutations():
    """The seam: same statistic and scheme as ranx's test (p agrees within sampling error at
    20,000 permutations), but the same seed always gives the same p-value."""
    from ranx import evaluate as ranx_evaluate
    from ranx.statistical_tests import fisher_randomization_test as ranx_fisher

    qrels, runs = near_threshold_runs()
    a, b = (ranx_evaluate(make_qrels(qrels), runs[n], "mrr@10", return_mean=False) for n in ("a", "b"))
    ours = fisher_randomization_test(a, b, n_permutations=20000, random_seed=3)
    theirs, _ = ranx_fisher(a, b, 20000, 0.01, 3)
    assert 0.005 < ours < 0.02 and abs(ours - theirs) < 0.005
    assert fisher_randomization_test(a, b, 20000, random_seed=3) == ours
    assert fisher_randomization_test(a, a, 500) == 1.0  # identical systems: every permutation ties
    with pytest.raises(ValueError, match="same length"):
        fisher_randomization_test(a, b[:-1])


def test_compare_p_values_identical_across_processes():
    """compare() in separate processes, with different numba thread counts, on runs whose p-value
    is near 0.01: identical p-values and marks (ranx's own Fisher test varies here)."""
    code = ("import json; from test_score import near_threshold_runs; "
            "from petune.score import compare, report_markdown; qrels, runs = near_threshold_runs(); "
            "r = compare(qrels, runs, metrics=['mrr@10', 'precision@1']); "
            "print(json.dumps([r.comparisons['a', 'b'][m]['p_value'] for m in r.metrics] + [report_markdown(r)]))")
    here = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "NUMBA_NUM_THREADS": threads, "PYTHONPATH": here})
             for threads in ("1", "2")]  # side by side: each mostly waits for its imports
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    assert 0.005 < outputs[0][0] < 0.02  # near the threshold, where a flip would show


def test_knn_exact_labels_both_votes():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0.05]], np.float32)
    labels = ["x", "x", "y", "y", "z"]
    test = np.array([[1, 0.05], [0.05, 1], [-1, 0]], np.float32)
    assert list(knn_predict(train, labels, test, k=1)) == ["x", "y", "z"]
    # [-1, 0]: neighbours z (cos 0.999), y (0.0), y (-0.11): two y votes win the majority,
    # but z's exp(0.999 / 0.07) outweighs exp(0) + exp(-0.11 / 0.07) in the weighted vote
    assert list(knn_predict(train, labels, test, k=3, vote="majority")) == ["x", "y", "y"]
    assert list(knn_predict(train, labels, test, k=3, vote="weighted")) == ["x", "y", "z"]
    # majority ties (one x, one y among k=2): the nearest neighbour's label wins
    mid = np.array([[0.72, 0.7], [0.7, 0.72]], np.float32)  # nearest: x (0.790) / y (0.790)
    assert list(knn_predict(train, labels, mid, k=2, vote="majority")) == ["x", "y"]
    scores = knn_scores(train, labels, test, ["x", "y", "z"], k=1)
    assert scores == {"accuracy": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, n_train=5\]"):
        knn_predict(train, labels, test, k=6)
    with pytest.raises(ValueError, match="dimension"):
        knn_predict(train, labels, np.ones((1, 3), np.float32), k=1)


def test_bm25_run_and_hard_negatives():
    docs = {"d1": "the cat sat on the mat", "d2": "a cat and a dog played", "d3": "dogs chase the cat cat cat",
            "d4": "stock markets fell sharply"}
    bm25 = BM25(docs, k1=0.5, b=0.3)
    with pytest.warns(UserWarning, match="larger than the collection"):
        run = bm25.search({"q": "cat", "m": "markets"}, k=10)
    ranked = sorted(run["q"], key=lambda d: -run["q"][d])
    assert set(ranked) == {"d1", "d2", "d3"} and ranked[0] == "d3"  # tf saturates but still wins
    assert list(run["m"]) == ["d4"]  # zero-score documents are left out
    negatives = bm25.hard_negatives({"q": "cat", "m": "markets"}, {"q": {"d3": 1}, "m": {"d4": 1}}, k=4)
    assert negatives == {"q": ranked[1:], "m": []}
    assert bm25.hard_negatives({"q": "cat"}, {"q": {"d3": 1}}, k=4, n=1) == {"q": ranked[1:2]}
    with pytest.raises(ValueError, match="at least one document"):
        BM25({})


def test_runs_and_qrels_files_round_trip_and_compare_from_paths(tmp_path):
    """Runs saved as TREC files (a name with spaces kept as one tag field), qrels as TREC qrels;
    compare() takes their paths, another tool's TREC file and ranx JSON, and gives the p-values of
    the runs in memory."""
    from petune.score import compare, load_qrels, load_run, p_values, save_qrels, save_run, save_runs

    qrels = {f"q{i}": {f"d{i}": 1} for i in range(30)}
    rng = np.random.default_rng(0)
    runs = {name: make_run({f"q{i}": {f"d{j}": float(rng.random() + (j == i) * bonus) for j in range(12)}
                            for i in range(30)}, name=name)
            for name, bonus in (("BM25", 0.2), ("adapter (multi)", 1.0))}
    written = save_runs(tmp_path / "runs", qrels, runs)
    assert sorted(p.name for p in written.values()) == ["BM25.trec", "adapter_multi.trec", "qrels.trec"]
    first = (tmp_path / "runs" / "adapter_multi.trec").read_text().splitlines()[0].split()
    assert len(first) == 6 and first[1] == "Q0" and first[3] == "1" and first[5] == "adapter_(multi)"
    back = load_run(written["adapter (multi)"])
    assert back.name == "adapter_(multi)"
    for q, docs in runs["adapter (multi)"].to_dict().items():
        assert back.to_dict()[q] == pytest.approx(docs)
    assert load_qrels(written["qrels"]).to_dict() == qrels
    other = tmp_path / "other-tool.txt"  # a TREC run another tool wrote
    other.write_text("".join(f"q{i} Q0 d{i} 1 9.5 pyserini\nq{i} Q0 d{(i + 1) % 12} 2 3.0 pyserini\n"
                             for i in range(30)))
    save_run(runs["BM25"], tmp_path / "bm25.json")
    save_qrels(qrels, tmp_path / "qrels.json")
    in_memory = p_values(compare(qrels, runs, metrics=["mrr@10"]))
    from_files = compare(written["qrels"], {"BM25": tmp_path / "bm25.json", "pyserini": other,
                                            "adapter (multi)": written["adapter (multi)"]}, metrics=["mrr@10"])
    assert p_values(from_files)["BM25 vs adapter (multi)"] == in_memory["BM25 vs adapter (multi)"]
    assert from_files.results["pyserini"]["mrr@10"] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="no run file"):
        load_run(tmp_path / "nope.trec")
