"""experiments/bench_serving runs in --quick mode and writes its JSON record, so it never rots."""

from pathlib import Path

import pytest

from tests.experiment_runs import run_quick


@pytest.mark.slow
def test_bench_serving_quick_mode_writes_results(tmp_path):
    record = run_quick("bench_serving", tmp_path / "bench_serving.json")
    assert all(row["tok_s"] > 0 for row in record["rows"])
    assert record["peer"]["engine_over_peer"] > 0
    assert Path(record["png"]).exists()
