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
