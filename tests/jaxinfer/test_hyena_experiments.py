"""The Hyena experiments run in --quick mode and write their JSON records, so neither rots;
bench_fftconv records an error without a message and covers N = 256 .. 1M on a GPU."""

from pathlib import Path

import pytest

from experiments import bench_fftconv
from tests.experiment_runs import run_quick


@pytest.mark.slow  # each compiles a few small programs: ~20-70 s on a shared 2-core CPU
@pytest.mark.parametrize("name", ["associative_recall", "bench_fftconv"])
def test_experiment_quick_mode_writes_results(name, tmp_path):
    record = run_quick(name, tmp_path / f"{name}.json")
    rows = record["rows"]
    assert rows and all("error" not in r for r in rows), rows
    assert Path(record["png"]).exists()
    if name == "associative_recall":
        assert {r["model"] for r in rows} == {"hyena", "llama"}
        assert all(0.0 <= r["query_acc"] <= 1.0 for r in rows)
        for r in rows:  # the learning curve: increasing steps, ending at the final accuracy
            steps = [step for step, _ in r["query_acc_curve"]]
            assert steps == sorted(set(steps)) and len(steps) > 1, steps
            assert r["query_acc_curve"][-1] == [record["settings"]["steps"], r["query_acc"]]
    else:
        assert {r["impl"] for r in rows if "median_ms" in r} == {"xla", "pallas", "jnp_fft"}
        assert all(r["temp_MiB"] is not None for r in rows)
        sweeps = record["sweeps"]
        timed = {(r["sweep"], r["impl"]) for r in sweeps if "median_ms" in r}
        assert {("freq_sparsity", "xla"), ("partial", "xla"), ("partial", "reference")} <= timed
        assert all("error" not in r for r in sweeps), sweeps
        # a short filter: the automatic overlap-save blocks and the unblocked transform, both
        # timed with their compiled temp memory; the blocks transform fewer samples at a
        # smaller FFT size
        partial = {r.get("block_fft_size"): r for r in sweeps
                   if (r["sweep"], r["impl"]) == ("partial", "xla")}
        assert set(partial) == {None, 0}, partial
        assert partial[None]["block_fft"] < partial[0]["block_fft"]
        assert partial[None]["fft_samples"] < partial[0]["fft_samples"]
        assert {"speedup_vs_unblocked", "temp_ratio_vs_unblocked"} <= partial[None].keys()
        errors = {r["value"]: r["rel_err_random"] for r in sweeps if r["sweep"] == "freq_sparsity"}
        assert errors[0.0] == 0.0 < errors[max(errors)]  # s = 0 is the exact convolution
        assert all(Path(png).exists() for png in record["sweep_pngs"])


def test_bench_fftconv_records_an_error_without_a_message():
    row = {"phase": "compile"}
    bench_fftconv.record_error(row, MemoryError())
    assert row == {"error": "MemoryError: "}


def test_bench_fftconv_gpu_lengths_span_256_to_1m_with_1k_to_32k_first():
    lengths = bench_fftconv.GPU_SEQ_LENS
    assert sorted(lengths) == [2**p for p in range(8, 21)]
    assert lengths[:6] == tuple(2**p for p in range(10, 16))
