"""How tests run an experiment: its --quick mode as `python -m experiments.<name>` would run it,
then its JSON record, so that no experiment rots."""

from __future__ import annotations

import json
import runpy
import sys
import warnings
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).parents[1]


def run_quick(name: str, out: Path, *extra: str) -> dict:
    """`python -m experiments.<name> --quick --out <out> [extra]` -> the record it wrote, checked
    for the fields every record carries.

    The module runs as __main__ inside the test process rather than in a subprocess: the command
    line and the code path are the same, and the run shares the process's imports and compiled
    programs (a subprocess per experiment cost seconds of start-up each)."""
    argv = [str(ROOT / "experiments" / f"{name}.py"), "--quick", "--out", str(out), *extra]
    with mock.patch.object(sys, "argv", argv), warnings.catch_warnings():
        # another experiment may have imported this one as a library (bench_engine_features
        # imports bench_speculative); running it again as __main__ is what we want
        warnings.filterwarnings("ignore", "'experiments.", RuntimeWarning)
        runpy.run_module(f"experiments.{name}", run_name="__main__", alter_sys=True)
    record = json.loads(Path(out).read_text())
    assert record["quick"] is True and record["jax_version"], record
    return record
