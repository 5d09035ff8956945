"""Every experiment runs in --quick mode and writes its JSON record, so none of them rots; a
--quick run given no --out leaves the committed records alone."""

import argparse
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import experiments.common as common
from experiments.common import (QUICK_RESULTS, RESULTS, add_speedups, copy_bandwidth, error_text,
                                parse_experiment_args, record_timing, spread_text, time_calls,
                                time_interleaved, with_backward)
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


class _FakeClock:
    """perf_counter for experiments.common: time moves only when a fake call says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _recording_calls(clock: _FakeClock, seconds: dict[str, float], order: list[str]) -> dict:
    """Zero-argument calls that log their name in `order` and take `seconds[name]` on `clock`."""
    def make(name):
        def call():
            order.append(name)
            clock.now += seconds[name]
            return jnp.zeros(())
        return call
    return {name: make(name) for name in seconds}


def test_time_interleaved_runs_the_calls_in_turn_after_warmup_rounds(monkeypatch):
    clock, order = _FakeClock(), []
    monkeypatch.setattr(common, "time", clock)
    calls = _recording_calls(clock, {"a": 1.0, "b": 2.0, "c": 4.0}, order)
    times = time_interleaved(calls, 3, warmup=2)
    assert order == ["a", "b", "c"] * (2 + 3)  # rounds of one call each, never a's reps in a row
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [4.0] * 3}  # each call's own seconds


def test_time_interleaved_with_repetitions_per_call_drops_a_call_after_its_last():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    times = time_interleaved(calls, {"a": 3, "b": 1, "c": 2}, warmup=0)
    assert order == ["a", "b", "c", "a", "c", "a"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 1, "c": 2}


def test_time_interleaved_with_no_calls_times_nothing():
    assert time_interleaved({}, 3) == {}


def test_record_timing_writes_median_min_max_ms_and_returns_the_median_seconds():
    row = {"impl": "xla"}
    assert record_timing(row, [0.003, 0.001, 0.010, 0.002]) == pytest.approx(0.0025)
    assert row.keys() == {"impl", "median_ms", "min_ms", "max_ms"}
    assert (row["median_ms"], row["min_ms"], row["max_ms"]) == pytest.approx((2.5, 1.0, 10.0))


def test_spread_text_is_min_dash_max_to_three_decimals_after_scaling():
    assert spread_text([0.25, 0.5, 0.125]) == "0.125-0.500"
    assert spread_text([0.00125, 0.002], 1e3) == "1.250-2.000"


def test_error_text_keeps_the_type_and_the_first_line_cut_to_200_characters():
    assert error_text(ValueError("bad shape\nlong XLA dump")) == "ValueError: bad shape"
    assert error_text(MemoryError()) == "MemoryError: "  # no message at all
    assert error_text(RuntimeError("\n  out of memory\n")) == "RuntimeError: out of memory"
    assert error_text(RuntimeError("x" * 500)) == "RuntimeError: " + "x" * 200


def test_add_speedups_divides_the_peer_median_by_the_rows_among_rows_of_the_same_key():
    rows = [
        {"S": 256, "impl": "peer", "median_ms": 4.0},
        {"S": 256, "impl": "xla", "median_ms": 2.0},
        {"S": 256, "impl": "pallas", "error": "OOM"},  # failed: no ratio
        {"S": 512, "impl": "xla", "median_ms": 8.0},  # its peer failed: no ratio
        {"S": 512, "impl": "peer", "error": "OOM"},
        {"S": 1024, "impl": "xla", "median_ms": 3.0},  # no peer row (yet): no ratio
    ]
    add_speedups(rows, ("S",), ["peer", "absent"])
    ratios = [{k: v for k, v in r.items() if k.startswith("speedup_vs_")} for r in rows]
    assert ratios == [{"speedup_vs_peer": 1.0}, {"speedup_vs_peer": 2.0}, {}, {}, {}, {}]
    rows.append({"S": 1024, "impl": "peer", "median_ms": 6.0})  # the peer finishes later
    add_speedups(rows, ("S",), ["peer"])
    assert rows[5]["speedup_vs_peer"] == 2.0


def test_add_speedups_matches_peers_by_the_named_field_across_several_key_fields():
    rows = [{"impl": impl, "mode": mode, "path": path, "median_ms": ms}
            for impl, mode, path, ms in [("xla", "fwd", "ragged", 1.0),
                                         ("xla", "fwd", "per_token", 3.0),
                                         ("xla", "bwd", "ragged", 2.0),
                                         ("xla", "bwd", "per_token", 5.0),
                                         ("pallas", "fwd", "ragged", 0.5)]]
    add_speedups(rows, ("impl", "mode"), ["per_token"], name_field="path")
    assert [r.get("speedup_vs_per_token") for r in rows] == [3.0, 1.0, 2.5, 1.0, None]


def test_copy_bandwidth_counts_every_arrays_bytes_read_and_written_over_the_median_call(
        monkeypatch):
    class TickingClock:  # every reading 0.25 s after the last: each timed call takes 0.25 s
        now = 0.0

        def perf_counter(self):
            self.now += 0.25
            return self.now

    monkeypatch.setattr(common, "time", TickingClock())
    arrays = [jnp.zeros(1000, jnp.float32), jnp.zeros(256, jnp.int8)]  # 4000 + 256 bytes
    assert copy_bandwidth(arrays, 3) == pytest.approx(2 * 4256 / 0.25)
