"""experiments/moe_placement runs in --quick mode and writes its JSON record and PNGs; on the
skewed traces the greedy placement beats round-robin on both balance and traffic, and the MILP
placement beats contiguous on traffic; the ratio columns are against contiguous and greedy."""

from __future__ import annotations

import json

from experiments import moe_placement


def test_moe_placement_quick_mode_writes_results(tmp_path):
    out = tmp_path / "moe_placement.json"
    moe_placement.main(["--quick", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["experiment"] == "moe_placement" and record["quick"] is True
    assert record["jax_version"]
    assert out.with_suffix(".png").exists()
    assert (tmp_path / "moe_placement_traffic.png").exists()
    rows = record["rows"]
    assert {r["method"] for r in rows} == set(moe_placement.METHODS)
    skewed = {r["method"]: r for r in rows if r["zipf"] == max(record["zipf"])}
    assert skewed["greedy"]["imbalance_mean"] < skewed["round_robin"]["imbalance_mean"]
    assert skewed["greedy"]["cross_transitions"] < skewed["round_robin"]["cross_transitions"]
    assert skewed["greedy"]["cross_transitions"] < skewed["lpt"]["cross_transitions"]
    assert skewed["ilp"]["cross_transitions"] < skewed["contiguous"]["cross_transitions"]
    assert skewed["contiguous"]["traffic_vs_contig"] == skewed["greedy"]["traffic_vs_greedy"] == 1
    assert skewed["ilp"]["imbalance_vs_greedy"] == (skewed["ilp"]["imbalance_mean"]
                                                    / skewed["greedy"]["imbalance_mean"])
