"""The attention experiments run in --quick mode and write their JSON record (and PNG)."""

from __future__ import annotations


import pytest

from tests.experiment_runs import run_quick


@pytest.mark.slow
@pytest.mark.parametrize("name", ["attention_memory", "bench_attention", "bench_sparse_attention"])
def test_attention_experiment_quick_mode_writes_results(name, tmp_path):
    out = tmp_path / f"{name}.json"
    record = run_quick(name, out)
    assert record["experiment"] == name
    assert record["rows"] and out.with_suffix(".png").exists()
    if name == "attention_memory":
        assert record["linear_checks"]["xla"]["linear"], record["linear_checks"]


@pytest.mark.slow
def test_tune_attention_quick_mode_checks_every_variant_against_the_reference(tmp_path):
    record = run_quick("tune_attention", tmp_path / "tune_attention.json")
    rows = record["forward"] + record["backward"] + record["paged_decode"]
    assert rows and all("error" not in r for r in rows), rows
    assert max(r["max_rel_err"] for r in rows) < 1e-5  # float32 on CPU: reordered sums only


def test_bench_attention_measures_the_mosaic_gpu_kernels_only_on_a_gpu():
    """The Mosaic GPU variants (and jax's own, their peer) are GPU rows: interpreted on a CPU
    they would time the interpreter for minutes."""
    from experiments import bench_attention

    gpu, cpu = bench_attention.default_impls("gpu"), bench_attention.default_impls("cpu")
    assert {"pallas_mgpu", "pallas_mgpu_1wg", "jax_mgpu", "jax_nn_cudnn"} <= set(gpu)
    assert not {"pallas_mgpu", "pallas_mgpu_1wg", "jax_mgpu"} & set(cpu)
