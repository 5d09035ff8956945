"""How tests run an experiment: its --quick mode in a subprocess (as a user would), then its JSON
record, so that no experiment rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run_quick(name: str, out: Path, *extra: str, timeout: int = 900) -> dict:
    """`python -m experiments.<name> --quick --out <out> [extra]` -> the record it wrote, checked
    for the fields every record carries."""
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--quick", "--out",
                           str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(Path(out).read_text())
    assert record["quick"] is True and record["jax_version"], record
    return record
