"""experiments/bench_sequence_parallel runs in --quick mode, checks its outputs against the
single-device run and writes its JSON record and PNG; its HLO collective counter matches hand
counts on a program of one collective of each kind, and the Megatron-SP formula its terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import sharding
from experiments import bench_sequence_parallel
from experiments.bench_layouts import FAST_COMPILE
from tests.experiment_runs import run_quick

F32_ATOL = 1e-5  # forward outputs vs single device: online softmax reorders float32 sums


@pytest.mark.slow  # ~30 s of compiles alone on 2 cores
def test_bench_sequence_parallel_quick_mode_writes_results(tmp_path):
    out = tmp_path / "bench_sequence_parallel.json"
    record = run_quick("bench_sequence_parallel", out)
    assert record["experiment"] == "bench_sequence_parallel" and out.with_suffix(".png").exists()
    rows = record["rows"]
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (impl, mode) for impl in ("single", "ring", "ulysses") for mode in ("fwd", "fwd_bwd")}
    assert all("error" not in r and r["median_ms"] > 0 for r in rows), rows
    assert all(r["max_abs_diff"] < F32_ATOL for r in rows if r["mode"] == "fwd")
    sharded = [r for r in rows if r["impl"] != "single"]
    assert all(r["comm_elements"] > 0 for r in sharded)
    # the formula and the compiled program's collectives agree (module docstring: the ring's
    # forward+backward program shares its first K/V hop between the two passes)
    for r in sharded:
        if r["mode"] == "fwd" or r["impl"] == "ulysses":
            assert r["hlo_comm_elements"] == r["comm_elements"], r
        else:
            assert r["comm_elements"] > r["hlo_comm_elements"] >= r["comm_elements"] * 3 // 4, r
    # the per-layer sweep: every scheme's compiled collectives send what its formula says;
    # Megatron-SP all-gathers and reduce-scatters explicitly (sharding.tensor_parallel)
    comm = record["comm_rows"]
    assert {r["impl"] for r in comm} == set(bench_sequence_parallel.COMM_IMPLS)
    for r in comm:
        assert r["hlo_comm_elements"] == r["comm_elements"], r
    assert any(r["impl"] == "tp_sp" and "reduce-scatter" in r["hlo_collectives"] for r in comm)
    assert all(r["vs_megatron_sp"] == 1 for r in comm if r["impl"] in ("tp", "tp_sp"))


def test_hlo_collective_counts_match_hand_counted_sends():
    """Each collective kind, over groups of 4 of a (data=2, tensor=4) mesh, counted from the
    compiled HLO as the bandwidth-optimal algorithms send it (per device, local block 4 x 4 = 16
    elements): all-gather 64 * 3/4, all-reduce 2 * 16 * 3/4, reduce-scatter 4 * 3, permute 16,
    all-to-all 16 * 3/4."""
    mesh = sharding.make_mesh(data=2, tensor=4)

    def body(x):  # x [4, 4]: this device's block
        return (jax.lax.all_gather(x, "tensor", axis=1, tiled=True),
                jax.lax.psum(x, "tensor"),
                jax.lax.psum_scatter(x, "tensor", scatter_dimension=1, tiled=True),
                jax.lax.ppermute(x, "tensor", [(i, (i + 1) % 4) for i in range(4)]),
                jax.lax.all_to_all(x, "tensor", 1, 0, tiled=True))

    spec = PartitionSpec("data", "tensor")
    collectives = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec,
                                        check_vma=False))
    x = jax.device_put(jnp.ones((8, 16), jnp.float32), NamedSharding(mesh, spec))
    hlo = collectives.lower(x).compile(compiler_options=FAST_COMPILE).as_text()
    ops = bench_sequence_parallel.hlo_collectives(hlo, num_devices=8)
    assert ops == {"all-gather": [1, 48], "all-reduce": [1, 24], "reduce-scatter": [1, 12],
                   "collective-permute": [1, 16], "all-to-all": [1, 12]}, ops
    assert bench_sequence_parallel.hlo_collective_elements(hlo, 8) == 112


def test_megatron_sp_formula_is_two_gathers_and_two_scatters_of_the_residual():
    # b=2, S=64, D=32 over P=4: each of 4 collectives sends 3/4 of 2 * 64 * 32 = 4096 elements
    assert bench_sequence_parallel.megatron_sp_elements(
        batch=2, seq=64, hidden=32, num_shards=4) == 4 * 3072
    assert bench_sequence_parallel.megatron_sp_elements(
        batch=2, seq=64, hidden=32, num_shards=4, backward=True) == 8 * 3072
