"""Every experiment runs in --quick mode and writes its JSON record, so none of them rots; a
--quick run given no --out leaves the committed records alone."""

import argparse
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import (QUICK_RESULTS, RESULTS, parse_experiment_args, time_calls,
                                with_backward)
from tests.experiment_runs import ROOT, run_quick


@pytest.mark.slow
@pytest.mark.parametrize("name", ["build_default_model", "bench_generate", "quant_quality"])
def test_experiment_quick_mode_writes_results(name, tmp_path):
    record = run_quick(name, tmp_path / f"{name}.json")
    if name == "quant_quality":  # 4-bit per channel, embedded model, held-out KJV text
        kl = {r["method"]: r["kl"] for r in record["rows"]}
        # Measured with 4 calibration chunks: KL 0.00097 (GPTQ) vs 0.0026 (RTN); 0.5 leaves margin.
        assert kl["gptq"] < 0.5 * kl["rtn"], kl


def _experiment_parser() -> argparse.ArgumentParser:
    """The two flags as every experiment declares them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "bench_x.json"))
    return parser


@pytest.mark.parametrize("argv, out", [
    ([], RESULTS / "bench_x.json"),
    (["--quick"], QUICK_RESULTS / "bench_x.json"),
    (["--quick", "--out", "/tmp/mine.json"], Path("/tmp/mine.json")),
    (["--quick", "--out", str(RESULTS / "bench_x.json")], RESULTS / "bench_x.json"),  # asked for
], ids=["full-run", "quick-run", "quick-run-with-out", "quick-run-onto-the-record"])
def test_a_quick_run_without_out_writes_beside_not_over_the_record(argv, out):
    parser = _experiment_parser()
    assert Path(parse_experiment_args(parser, argv).out) == out
    assert parser.get_default("out") == str(RESULTS / "bench_x.json")  # the parser is unchanged


def test_the_output_folder_exists_before_the_experiment_writes(tmp_path, monkeypatch):
    # a fresh clone has no results/quick/, and some experiments save a plot before their JSON
    monkeypatch.setattr("experiments.common.QUICK_RESULTS", tmp_path / "quick")
    out = Path(parse_experiment_args(_experiment_parser(), ["--quick"]).out)
    assert out.parent.is_dir()
    nested = tmp_path / "a" / "b" / "x.json"
    parse_experiment_args(_experiment_parser(), ["--out", str(nested)])
    assert nested.parent.is_dir()


def test_quick_results_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert f"{QUICK_RESULTS.relative_to(ROOT).as_posix()}/" in ignored


EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.py")
                     if re.search(r'"--quick"', p.read_text()) and '"--out"' in p.read_text())


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_with_quick_and_out_parses_through_the_shared_helper(path):
    source = path.read_text()
    assert "parse_experiment_args(parser" in source and "parser.parse_args(" not in source


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_time_calls_times_reps_calls_after_warmup_untimed_ones(warmup):
    calls = []

    def fn(x, y):
        calls.append((x, y))
        return jnp.asarray(x + y)

    times = time_calls(fn, (1, 2), 3, warmup=warmup)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls == [(1, 2)] * (warmup + 3)


def test_with_backward_returns_the_output_and_each_inputs_gradient_of_sum_out_times_ct():
    a, b, c, ct = (jnp.arange(4.0) + i for i in range(4))
    out, (da, db, dc) = with_backward(lambda a, b, c: a * b + c)(a, b, c, ct)
    # d/da sum((a b + c) ct) = b ct, d/db = a ct, d/dc = ct
    np.testing.assert_array_equal(out, a * b + c)
    np.testing.assert_array_equal(da, b * ct)
    np.testing.assert_array_equal(db, a * ct)
    np.testing.assert_array_equal(dc, ct)
