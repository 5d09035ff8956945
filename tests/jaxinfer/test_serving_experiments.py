"""The serving experiments run in --quick mode and write their JSON records, so neither rots."""

from pathlib import Path

import pytest

from tests.experiment_runs import run_quick


def _run(name: str, tmp_path: Path) -> dict:
    record = run_quick(name, tmp_path / f"{name}.json")
    assert Path(record["png"]).exists()
    return record


@pytest.mark.slow  # loads the embedded model and compiles three generation loops: ~25-70 s
def test_bench_speculative_quick_reproduces_greedy(tmp_path):
    rows = _run("bench_speculative", tmp_path)["rows"]
    assert {r["drafter"].split(" (")[0] for r in rows} == {"draft model", "prompt lookup"}
    assert all(r["matches_greedy"] for r in rows)
    assert all(0.0 <= r["acceptance_rate"] <= 1.0 and r["speedup"] > 0 for r in rows)


@pytest.mark.slow  # a subprocess compiling 3 attention programs per setting: 15-40 s, shared CPU
def test_bench_prefix_quick_hydragen_matches_per_sequence(tmp_path):
    rows = _run("bench_prefix", tmp_path)["rows"]
    assert len(rows) == 2
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)  # the same attention, reordered sums
    assert all(r["hydragen_kv_MiB"] < r["per_sequence_kv_MiB"] for r in rows)
