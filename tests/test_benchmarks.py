"""The benchmark scripts run end to end in their --quick sizes (timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_writes_tables_and_plots(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--rows", "frozen", "LoRA r=8",
           "--work", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    lora, frozen = results["rows"]["LoRA r=8"], results["rows"]["frozen"]
    assert lora["trainable"] > 0 and frozen["trainable"] == 0
    assert 0 < lora["news"]["mrr@10"][0] <= 1 and lora["step_seconds_median"] > 0
    assert lora["encode_texts_per_s_merged"] > 0  # LoRA merges through peft
    assert lora["saved_mib"] > 0 and lora["peak_rss_mib"] > 0
    for name in ("RESULTS.md", "results.tex", "quality_vs_params.png", "cost.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert "| LoRA r=8 |" in (tmp_path / "out" / "RESULTS.md").read_text()


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
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from stats import abba, ratio_ci, verdict

    assert [abba(k)[0] for k in range(4)] == ["petune", "direct", "petune", "direct"]
    ci = ratio_ci([1.0, 1.02, 0.98, 1.01, 0.99, 1.0])
    assert ci["low"] < 1.0 < ci["high"] and ci["half_width_percent"] < 2 and ci["pairs"] == 6
    assert ratio_ci([1.0, 1.02, 0.98, 1.01]) == ratio_ci([1.0, 1.02, 0.98, 1.01])  # seeded
    assert verdict(ci, 1.05) == "met" and verdict(ci, 0.9) == "not met" and verdict(ci, 1.0) == "undecided"
    assert verdict(ci, 0.9, higher_is_better=True) == "met"
