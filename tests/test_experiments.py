"""Every experiment runs in --quick mode and writes its JSON record, so none of them rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["build_default_model", "bench_generate", "quant_quality"])
def test_experiment_quick_mode_writes_results(name, tmp_path):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["jax_version"]
