"""experiments/bench_sequence_parallel runs in --quick mode, checks its outputs against the
single-device run and writes its JSON record and PNG."""

from __future__ import annotations


import pytest

from tests.experiment_runs import run_quick

F32_ATOL = 1e-5  # forward outputs vs single device: online softmax reorders float32 sums


@pytest.mark.slow  # ~20 s of compiles alone on 2 cores
def test_bench_sequence_parallel_quick_mode_writes_results(tmp_path):
    out = tmp_path / "bench_sequence_parallel.json"
    record = run_quick("bench_sequence_parallel", out)
    assert record["experiment"] == "bench_sequence_parallel" and out.with_suffix(".png").exists()
    rows = record["rows"]
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (impl, mode) for impl in ("single", "ring", "ulysses") for mode in ("fwd", "fwd_bwd")}
    assert all("error" not in r and r["median_ms"] > 0 for r in rows), rows
    assert all(r["max_abs_diff"] < F32_ATOL for r in rows if r["mode"] == "fwd")
    sharded = [r for r in rows if r["impl"] != "single"]
    assert all(r["comm_elements"] > 0 for r in sharded)
    # the formula and the compiled program's collectives agree (module docstring: the ring's
    # forward+backward program shares its first K/V hop between the two passes)
    for r in sharded:
        if r["mode"] == "fwd" or r["impl"] == "ulysses":
            assert r["hlo_comm_elements"] == r["comm_elements"], r
        else:
            assert r["comm_elements"] > r["hlo_comm_elements"] >= r["comm_elements"] * 3 // 4, r
