"""The benchmark scripts run end to end in their --quick sizes (timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import script

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # 51 s: a harness over the offline job's rows, which the default run tests end to end
def test_benchmark_quick_writes_tables_and_plots(tmp_path):
    """run.py in this process, each row in a process of its own (as the benchmark runs them)."""
    script("benchmarks/run.py").main(["--quick", "--max-articles", "60", "--max-questions", "40", "--rows", "frozen",
                                      "LoRA r=8", "--work", str(tmp_path / "runs"),
                                      "--results-dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    lora, frozen = results["rows"]["LoRA r=8"], results["rows"]["frozen"]
    assert lora["trainable"] > 0 and frozen["trainable"] == 0
    assert 0 < lora["news"]["mrr@10"][0] <= 1 and lora["step_seconds_median"] > 0
    assert lora["encode_texts_per_s_merged"] > 0  # LoRA merges through peft
    assert lora["saved_mib"] > 0 and lora["peak_rss_mib"] > 0
    for name in ("RESULTS.md", "results.tex", "quality_vs_params.png", "cost.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert "| LoRA r=8 |" in (tmp_path / "out" / "RESULTS.md").read_text()


@pytest.mark.slow  # a timing harness (16 s); the code it times is tested in test_train / test_embed
def test_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--methods", "lora",
           "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["lora"]
    for kind in ("step", "encode"):
        r = result[kind]
        assert 0 < r["low"] <= r["ratio"] <= r["high"] and r["pairs"] == 2
        assert r["verdict"] in ("met", "not met", "undecided")


@pytest.mark.slow  # a timing harness (16 s); routing itself is tested in test_routing.py
def test_routing_quick(tmp_path):
    """benchmarks/routing.py --quick: routing and export ratios for every method (embeddings are
    checked equal inside the script before any timing)."""
    out = tmp_path / "routing.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--quick", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {"LoRA r=8", "(IA)^3", "prompt tuning", "adapter"}
    assert all(0 < m["routing"]["low"] <= m["routing"]["ratio"] <= m["routing"]["high"] for m in methods.values())
    assert {n for n, m in methods.items() if "export" in m} == {"LoRA r=8", "(IA)^3"}


def test_stats_interval_and_verdict():
    stats = script("benchmarks/stats.py")
    abba, ratio_ci, verdict = stats.abba, stats.ratio_ci, stats.verdict

    assert [abba(k)[0] for k in range(4)] == ["petune", "direct", "petune", "direct"]
    ci = ratio_ci([1.0, 1.02, 0.98, 1.01, 0.99, 1.0])
    assert ci["low"] < 1.0 < ci["high"] and ci["half_width_percent"] < 2 and ci["pairs"] == 6
    assert ratio_ci([1.0, 1.02, 0.98, 1.01]) == ratio_ci([1.0, 1.02, 0.98, 1.01])  # seeded
    assert verdict(ci, 1.05) == "met" and verdict(ci, 0.9) == "not met" and verdict(ci, 1.0) == "undecided"
    assert verdict(ci, 0.9, higher_is_better=True) == "met"


@pytest.mark.lab
def test_lr_sweep_quick_trains_each_rate_on_validation(tmp_path):
    """lab/lr_sweep.py --quick: one run.py process per learning rate, each recorded with that
    rate and scored on the validation queries only; the table marks one choice."""
    from petune.jobs import offline

    benchmark = script("benchmarks/run.py")
    cmd = [sys.executable, str(ROOT / "lab" / "lr_sweep.py"), "--quick", "--rows", "LoRA r=8",
           "--lrs", "0.002", "0.006", "--work", str(tmp_path / "runs"), "--write", str(tmp_path / "LR.md")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = benchmark.scored_data(benchmark.parse_args(["--quick", "--eval-split", "val"]))
    for lr in (0.002, 0.006):
        run = json.loads((tmp_path / "runs" / f"lr-{lr:g}" / "lora-r8-0.json").read_text())
        assert run["lr"] == lr
        assert set(run["runs"]["news"]) == set(offline.test_queries(data, "news"))  # validation, not test
        assert set(run["runs"]["qa"]) == set(offline.test_queries(data, "qa"))
    table = (tmp_path / "LR.md").read_text()
    assert table.count("| LoRA r=8 |") == 2 and table.count("**chosen**") == 1 and "| frozen | – |" in table


@pytest.mark.lab
def test_lr_sweep_chooses_best_mean_and_lower_rate_on_ties():
    chosen = script("lab/lr_sweep.py").chosen

    scores = {("m", 0.001): {"mean": 0.5}, ("m", 0.003): {"mean": 0.6}, ("m", 0.01): {"mean": 0.6},
              ("other", 0.1): {"mean": 0.9}}
    assert chosen(scores, "m") == 0.003
    assert chosen({("m", 0.003): {"mean": 0.4}, ("m", 0.001): {"mean": 0.45}}, "m") == 0.001


@pytest.mark.slow  # 14 s; the store, index and BM25 pieces it times have their own tests in the default run
def test_kb_scale_quick_measures_stages_and_renders_its_section(tmp_path):
    out = tmp_path / "kb_scale.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kb_scale.py"), "--quick", "--stages", "encode", "exact_search",
           "bm25_index", "--work", str(tmp_path / "work"), "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())["rows"]["2000"]
    assert set(row) == {"encode", "exact_search", "bm25_index"}
    assert row["encode"]["peak"] >= row["encode"]["base"] > 0 and row["bm25_index"]["index_bytes"] > 0
    assert (tmp_path / "work" / "store-2000" / "manifest.json").exists()


def test_cached_loss_section_renders_the_committed_measurements():
    """benchmarks/RESULTS.md's cached-loss table comes from benchmarks/cached_loss.json as committed."""
    cached_loss = script("benchmarks/cached_loss.py")
    result = json.loads((ROOT / "benchmarks" / "cached_loss.json").read_text())
    lines = cached_loss.section(result)
    assert {r["batch"] for r in result["rows"]} == {32, 128, 512}
    assert "| 512 | – | – |" in "\n".join(lines)  # the plain B = 512 is not run, and says why
    assert "\n".join(lines[:9]) in (ROOT / "benchmarks" / "RESULTS.md").read_text()


@pytest.mark.slow  # about 40 s: two sentence-transformers trainings and three encodings of the collection
def test_peer_quick_pairs_sentence_transformers_with_petune_runs(tmp_path):
    """benchmarks/peer.py: a sentence-transformers row trained on the recipe's examples, its
    learning rate chosen on dev, its test run saved and compared with a petune run from files."""
    from petune.score.runs import save_runs
    from test_your_data import bbc_beir

    root = bbc_beir(tmp_path / "bbc", n=30, chars=200)
    petune_dir = tmp_path / "petune-run"  # a petune report directory: report.json and runs/*.trec
    qrels = {q: docs for q, docs in __import__("petune.data.beir", fromlist=["load_beir"]).load_beir(
        root, cache_dir=tmp_path / "c").qrels["test"].items()}
    save_runs(petune_dir / "runs", qrels, {"lora": {q: {d: 1.0 for d in docs} for q, docs in qrels.items()}})
    (petune_dir / "report.json").write_text(json.dumps({"command": "recipes/retrieval.py ...", "total_seconds": 1.0,
                                                        "trainable": {"trainable": 10}, "dev": []}))
    out = tmp_path / "peer"
    script("benchmarks/peer.py").main(["--beir", str(root), "--rows", "frozen", "lora", "--lrs", "lora=1e-4,1e-3",
                                       "--batch-size", "4", "--max-length", "48", "--petune", str(petune_dir),
                                       "--output", str(out)])
    summary = json.loads((out / "peer.json").read_text())
    assert set(summary["scores"]) == {"st-frozen", "st-lora", "petune-petune-run-lora"}
    assert summary["rows"]["st-lora"]["lr"] in (1e-4, 1e-3) and 0 < summary["rows"]["st-lora"]["trainable"] < 10 ** 6
    assert summary["scores"]["petune-petune-run-lora"]["mrr@10"] == 1.0  # the relevant documents, first
    assert (out / "runs" / "st-lora.trec").exists() and "Fisher" in (out / "peer.md").read_text()
