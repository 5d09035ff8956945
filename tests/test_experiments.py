"""Every experiment runs in --quick mode and writes its JSON record, so none of them rots."""

import pytest

from tests.experiment_runs import run_quick


@pytest.mark.slow
@pytest.mark.parametrize("name", ["build_default_model", "bench_generate", "quant_quality"])
def test_experiment_quick_mode_writes_results(name, tmp_path):
    record = run_quick(name, tmp_path / f"{name}.json")
