"""The Hyena experiments run in --quick mode and write their JSON records, so neither rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow  # each compiles a few small programs: ~20-70 s on a shared 2-core CPU
@pytest.mark.parametrize("name", ["associative_recall", "bench_fftconv"])
def test_experiment_quick_mode_writes_results(name, tmp_path):
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"experiments.{name}", "--quick", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["jax_version"]
    rows = record["rows"]
    assert rows and all("error" not in r for r in rows), rows
    assert Path(record["png"]).exists()
    if name == "associative_recall":
        assert {r["model"] for r in rows} == {"hyena", "llama"}
        assert all(0.0 <= r["query_acc"] <= 1.0 for r in rows)
    else:
        assert {r["impl"] for r in rows if "median_ms" in r} == {"xla", "pallas", "jnp_fft"}
        assert all(r["temp_MiB"] is not None for r in rows)
