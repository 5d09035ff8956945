"""experiments/bench_serving and bench_engine_features run in --quick mode and write their JSON
records, so they never rot."""

from pathlib import Path

import pytest

from tests.experiment_runs import run_quick


@pytest.mark.slow
def test_bench_serving_quick_mode_writes_results(tmp_path):
    """On a random model (the path a GPU session takes), which the peer loads from disk too."""
    record = run_quick("bench_serving", tmp_path / "bench_serving.json", "--random-model", "64", "2")
    assert record["settings"]["random_model"] == [64, 2]
    assert all(row["tok_s"] > 0 for row in record["rows"])
    assert record["peer"]["engine_over_peer"] > 0
    assert Path(record["png"]).exists()


@pytest.mark.slow
def test_bench_engine_features_quick_mode_writes_results(tmp_path):
    record = run_quick("bench_engine_features", tmp_path / "bench_engine_features.json")
    rows = {row["config"]: row for row in record["rows"]}
    assert set(rows) == {"no_prefix_cache", "prefix_cache", "hydragen", "int8_kv",
                         "no_speculation", "lookup", "draft_model"}
    assert all(row["tok_s"] > 0 for row in rows.values())
    # the shared prefix is computed once: every later request takes its full pages from the cache
    assert rows["no_prefix_cache"]["cached_tokens"] == 0 < rows["prefix_cache"]["cached_tokens"]
    # exact features reproduce the peer's greedy tokens
    assert rows["prefix_cache"]["same_outputs"] == rows["hydragen"]["same_outputs"] == 1.0
    for name in ("lookup", "draft_model"):
        assert rows[name]["same_outputs"] == 1.0 and 0.0 <= rows[name]["acceptance"] <= 1.0
    assert rows["int8_kv"]["kv_bytes_per_token"] < rows["prefix_cache"]["kv_bytes_per_token"]
    assert Path(record["png"]).exists()
