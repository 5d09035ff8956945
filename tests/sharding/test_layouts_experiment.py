"""experiments/bench_layouts runs in --quick mode (in this process, whose 8 CPU devices conftest
set up) and writes its JSON record and bar chart: a sharded train step and its single-device peer
both run, and the ratio column is against that peer."""

from __future__ import annotations

import json

import pytest

from experiments import bench_layouts


@pytest.mark.slow  # ~25 s: two train-step compiles (one sharded) on 2 shared cores
def test_bench_layouts_quick_mode_writes_results(tmp_path):
    out = tmp_path / "bench_layouts.json"
    bench_layouts.main(["--quick", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["experiment"] == "bench_layouts" and record["quick"] is True
    assert record["jax_version"] and out.with_suffix(".png").exists()
    rows = {r["layout"]: r for r in record["rows"]}
    assert set(rows) == {"single (llama)", *bench_layouts.QUICK_LAYOUTS}
    assert all(r["median_ms"] > 0 and r["peak_MB"] > 0 for r in rows.values())
    assert rows["single (llama)"]["vs_single"] == 1.0
    tp_sp = rows["tp_sp"]
    assert tp_sp["vs_single"] == tp_sp["steps_per_s"] / rows["single (llama)"]["steps_per_s"]
    assert tp_sp["tokens_per_s"] == pytest.approx(tp_sp["steps_per_s"] * record["batch"]
                                                  * record["seq"])
