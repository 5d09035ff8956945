"""experiments/bench_serving runs in --quick mode and writes its JSON record, so it never rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_bench_serving_quick_mode_writes_results(tmp_path):
    out = tmp_path / "bench_serving.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_serving", "--quick", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["jax_version"]
    assert all(row["tok_s"] > 0 for row in record["rows"])
    assert record["peer"]["engine_over_peer"] > 0
    assert Path(record["png"]).exists()
