"""Every experiment runs in --quick mode and writes its JSON record, so none of them rots."""

import pytest

from tests.experiment_runs import run_quick


@pytest.mark.slow
@pytest.mark.parametrize("name", ["build_default_model", "bench_generate", "quant_quality"])
def test_experiment_quick_mode_writes_results(name, tmp_path):
    record = run_quick(name, tmp_path / f"{name}.json")
    if name == "quant_quality":  # 4-bit per channel, embedded model, held-out KJV text
        kl = {r["method"]: r["kl"] for r in record["rows"]}
        # Measured with 4 calibration chunks: KL 0.00097 (GPTQ) vs 0.0026 (RTN); 0.5 leaves margin.
        assert kl["gptq"] < 0.5 * kl["rtn"], kl
