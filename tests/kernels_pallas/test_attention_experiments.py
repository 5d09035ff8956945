"""The attention experiments run in --quick mode and write their JSON record (and PNG)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["attention_memory", "bench_attention", "bench_sparse_attention"])
def test_attention_experiment_quick_mode_writes_results(name, tmp_path):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--quick", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["experiment"] == name and record["quick"] is True and record["jax_version"]
    assert record["rows"] and out.with_suffix(".png").exists()
    if name == "attention_memory":
        assert record["linear_checks"]["xla"]["linear"], record["linear_checks"]


@pytest.mark.slow
def test_tune_attention_quick_mode_checks_every_variant_against_the_reference(tmp_path):
    out = tmp_path / "tune_attention.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.tune_attention", "--quick", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["forward"] + record["backward"] + record["paged_decode"]
    assert rows and all("error" not in r for r in rows), rows
    assert max(r["max_rel_err"] for r in rows) < 1e-5  # float32 on CPU: reordered sums only
