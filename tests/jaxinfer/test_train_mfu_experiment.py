"""experiments/bench_train_mfu: the model-FLOPs formula on hand-counted configs, its flag checks,
and its --quick run (the train step timed against a matmul peer in the same process)."""

import jax
import pytest
from flax import nnx

import jaxinfer
from experiments import bench_train_mfu as mfu
from tests.experiment_runs import run_quick

# vocab 10, hidden 8, 4 query heads and 2 KV heads of head_dim 2, MLP 12, 2 layers
TINY = dict(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
# per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, MLP 3*8*12 = 288, two norms 2*8 -> 496;
# 2 layers 992 + final norm 8 + LM head 8*10 = 1080
TINY_MATMUL_PARAMS = 1080


def _param_count(config) -> int:
    """Parameters of the model built from config (shapes only: nothing is initialised)."""
    model = nnx.eval_shape(lambda: jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_flop_formula_matches_hand_count():
    config = jaxinfer.LlamaConfig(**TINY)
    assert mfu.matmul_params(config) == TINY_MATMUL_PARAMS
    flops = mfu.model_flops_per_step(config, batch=3, seq=5)  # 15 tokens
    assert flops["dense"] == 6 * 1080 * 15 == 97_200
    assert flops["attention"] == 6 * 2 * 5 * 8 * 15 == 7_200  # 6 L T (Hq D) tokens, causal
    assert flops["total"] == 104_400


def test_matmul_params_are_the_model_params_but_the_embedding_table():
    assert _param_count(jaxinfer.LlamaConfig(**TINY)) - 10 * 8 == TINY_MATMUL_PARAMS
    biased = jaxinfer.LlamaConfig(**TINY, qkv_bias=True)  # + (8 + 4 + 4) per layer
    assert mfu.matmul_params(biased) == TINY_MATMUL_PARAMS + 2 * 16
    assert _param_count(biased) - 80 == 1112
    # tied: the one matrix is looked up (free) and multiplied (counted once)
    tied = jaxinfer.LlamaConfig(**TINY, tie_word_embeddings=True)
    assert mfu.matmul_params(tied) == TINY_MATMUL_PARAMS
    assert _param_count(tied) == TINY_MATMUL_PARAMS


@pytest.mark.parametrize("kind, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989),
                                          ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("cpu", None)])
def test_spec_peak_table_matches_device_kinds(kind, tflops):
    peak = mfu.spec_peak_flops(kind)
    assert peak == (None if tflops is None else tflops * 1e12)


@pytest.mark.parametrize("argv, message", [
    (["--batches", "4", "0"], "--batches must all be >= 1"),
    (["--seq", "0"], "--seq must be >= 1"),
    (["--hidden", "100", "--heads", "16"], "--hidden must be divisible by --heads"),
    (["--heads", "16", "--kv-heads", "6"], "--heads must be a multiple of --kv-heads"),
    (["--peak-tflops", "-1"], "--peak-tflops must be positive"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        mfu.parse_args(["--quick", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # ~12 s on 2 busy cores: a subprocess, imports and one train-step compile
def test_quick_run_records_mfu_against_the_matmul_peer(tmp_path):
    record = run_quick("bench_train_mfu", tmp_path / "mfu.json")
    assert record["experiment"] == "bench_train_mfu" and record["device_kind"]
    assert record["matmul_peer"]["flops_per_s"] > 0
    assert record["matmul_params"] + record["vocab"] * record["hidden"] == record["total_params"]
    (row,) = record["rows"]
    for field in ("median_ms", "tokens_per_s", "achieved_tflops", "peak_MB", "compile_s"):
        assert row[field] > 0, (field, row)
    assert row["peak_MB"] == pytest.approx(
        row["argument_MB"] + row["output_MB"] + row["temp_MB"] - row["alias_MB"])
    assert 0 < row["mfu_matmul"] < 1.5, row  # CPU timings are noisy; a step is never 1.5x a matmul
    assert row["tokens_per_step"] == record["batches"][0] * record["seq"]
    assert (tmp_path / "mfu.png").exists()


def test_sweep_records_a_batch_that_does_not_fit_and_goes_on(tmp_path, monkeypatch):
    """A batch past the device's memory becomes an "out of memory" row; the others are measured."""
    def measure(model, batch, args, options):
        if batch > 2:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")
        return {"batch": batch, "seq": args.seq, "tokens_per_step": batch * args.seq,
                "median_ms": 10.0 * batch, "achieved_tflops": 1e-3 * batch}

    monkeypatch.setattr(mfu, "measure", measure)
    monkeypatch.setattr(mfu, "matmul_peak", lambda *a: {"flops_per_s": 1e10})
    monkeypatch.setattr(mfu, "init_model", lambda config, options: nnx.eval_shape(
        lambda: jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0))))
    record = mfu.main(["--quick", "--batches", "1", "4", "2", "--peak-tflops", "0.01",
                       "--out", str(tmp_path / "mfu.json")])
    assert [r["batch"] for r in record["rows"]] == [1, 4, 2]
    assert record["rows"][1]["error"] == "out of memory" and "mfu_matmul" not in record["rows"][1]
    assert record["rows"][2]["mfu_matmul"] == pytest.approx(2e9 / 1e10)
    assert record["rows"][2]["mfu_spec"] == pytest.approx(2e9 / 1e10)
    assert record["spec_peak_source"] == "--peak-tflops"
