"""The quantization experiments run in --quick mode and write their JSON record and PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.experiment_runs import run_quick

# float32 on CPU: every backend computes the same dequantized products, only summed in another
# order (the pallas kernel per group, scales applied late), so results agree to a few float32
# ulps of the output.
F32_MAX_REL_ERR = 1e-5


def _run_quick(name: str, out: Path) -> dict:
    record = run_quick(name, out)
    assert record["experiment"] == name
    assert record["rows"] and out.with_suffix(".png").exists()
    return record


@pytest.mark.slow
def test_bench_quant_matmul_quick_checks_every_backend_and_width_against_reference(tmp_path):
    record = _run_quick("bench_quant_matmul", tmp_path / "bench_quant_matmul.json")
    rows = record["rows"]
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    assert {(r["impl"], r["bits"]) for r in rows if r["impl"] != "dense"} == {
        (impl, bits) for impl in ("pallas", "xla") for bits in (2, 3, 4, 8)}
    assert max(r["max_rel_err"] for r in rows) < F32_MAX_REL_ERR
    assert all(r["speedup_vs_dense"] > 0 and r["weight_GBps"] > 0 for r in rows)


@pytest.mark.slow
def test_quant_perplexity_quick_reports_perplexity_and_kl_of_float_and_mixed_2_4_rtn_and_gptq(
        tmp_path):
    record = _run_quick("quant_perplexity", tmp_path / "quant_perplexity.json")
    rows = {(r["method"], r["bits"]): r for r in record["rows"]}
    assert set(rows) == {("float", 32), ("rtn", "2/4"), ("gptq", "2/4")}
    # Mixed 2/4 keeps this model usable: perplexity within 2x of float (measured 1.01-1.04x).
    float_ppl = rows["float", 32]["perplexity"]
    for method in ("rtn", "gptq"):
        assert 0.5 * float_ppl < rows[method, "2/4"]["perplexity"] < 2 * float_ppl, rows
        # Groups of 16, ~1/4 at 4 bits: 0.25 (4 + 20/16) + 0.75 (2 + 18/16) = 3.66.
        assert 3.6 < rows[method, "2/4"]["bits_per_weight"] < 3.7
    # Measured 25.68 vs 26.27 (float 25.32); KL to float 0.0142 vs 0.0262.
    assert rows["gptq", "2/4"]["perplexity"] < rows["rtn", "2/4"]["perplexity"], rows
    assert rows["float", 32]["kl"] == 0
    assert 0 < rows["gptq", "2/4"]["kl"] < rows["rtn", "2/4"]["kl"], rows
    assert rows["gptq", "2/4"]["gptq_lower_kl"] and rows["gptq", "2/4"]["gptq_lower_ppl"]
