"""The serving experiments run in --quick mode and write their JSON records, so neither rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def run_quick(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"experiments.{name}", "--quick", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["jax_version"]
    assert Path(record["png"]).exists()
    return record


@pytest.mark.slow  # loads the embedded model and compiles three generation loops: ~25-70 s
def test_bench_speculative_quick_reproduces_greedy(tmp_path):
    rows = run_quick("bench_speculative", tmp_path)["rows"]
    assert {r["drafter"].split(" (")[0] for r in rows} == {"draft model", "prompt lookup"}
    assert all(r["matches_greedy"] for r in rows)
    assert all(0.0 <= r["acceptance_rate"] <= 1.0 and r["speedup"] > 0 for r in rows)


@pytest.mark.slow  # a subprocess compiling 3 attention programs per setting: 15-40 s, shared CPU
def test_bench_prefix_quick_hydragen_matches_per_sequence(tmp_path):
    rows = run_quick("bench_prefix", tmp_path)["rows"]
    assert len(rows) == 2
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)  # the same attention, reordered sums
    assert all(r["hydragen_kv_MiB"] < r["per_sequence_kv_MiB"] for r in rows)
