"""Training: the loss falls, gradient accumulation is exact, the schedule is the one logged, and a
killed run resumes on the same curve."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxinfer
from jaxinfer import cli
from jaxinfer.assets import corpus_sample_path
from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.tokenizer import train_bpe
from jaxinfer.train import TokenWindows, TrainConfig, split_held_out, tokenize_corpus, train
from jaxinfer.train.loop import TRAIN_CONFIG_FILE
from jaxinfer.train import loop
from jaxinfer.train.optimizer import (learning_rate_schedule, make_optimizer,
                                      make_optimizer_and_schedule)
from jaxinfer.train.step import train_step_with_losses, training_loss

# Same program, same inputs, same CPU: a resumed run must match bit for bit; the margin only
# absorbs a different XLA thread schedule.
RESUME_RTOL = 1e-6
# Accumulating two half-batches sums the same per-token terms in another order (float32):
# ~1e-6 relative; a wrong scale of the gradient (summed instead of averaged) is off by 100%.
ACCUM_RTOL, ACCUM_ATOL = 1e-4, 1e-7


@pytest.fixture(scope="module")
def corpus_tokens():
    text = corpus_sample_path().read_text()
    tokenizer = train_bpe(text.splitlines(), vocab_size=320)
    return split_held_out(tokenize_corpus(text, tokenizer), 0.1), tokenizer.get_vocab_size()


def tiny_model(vocab_size: int, seed: int = 0, layers: int = 2) -> jaxinfer.LlamaForCausalLM:
    config = jaxinfer.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64)
    return jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def test_loss_decreases_on_small_corpus_and_the_input_model_is_left_unchanged(corpus_tokens,
                                                                             tmp_path):
    (train_tokens, eval_tokens), vocab = corpus_tokens
    config = TrainConfig(steps=30, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=5,
                         eval_every=15, checkpoint_every=30)
    model = tiny_model(vocab)
    before = jax.tree.map(np.array, nnx.state(model))
    result = train(model, train_tokens, eval_tokens, config, tmp_path, progress=False)
    losses = [r["loss"] for r in result.history]
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert losses[0] > np.log(vocab) - 0.5  # starts near uniform
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    assert evals[-1] < evals[0]
    after = nnx.state(model)
    assert all(np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_gradient_accumulation_gives_the_full_batch_gradient():
    """grad_accum=2 of 4 rows hands the optimizer the gradient of the mean loss over all 8 rows:
    the gradient of training_loss on the full batch (jax.grad, no accumulation), not its sum
    over micro-batches nor a scaled copy. The optimizer here returns its gradient as its state,
    so the comparison sees the gradient itself (an Adam update would hide a constant factor)."""
    graphdef, params = nnx.split(tiny_model(64, layers=1))
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, state, p=None: (g, g))
    batch = jax.random.randint(jax.random.key(2), (8, 17), 0, 64)  # [batch, seq + 1]
    want_loss, want_grads = jax.jit(jax.value_and_grad(
        lambda p: training_loss(graphdef, p, batch)[0]))(params)
    out = train_step_with_losses(graphdef, keep, params, keep.init(params),
                                 batch.reshape(2, 4, 17))
    np.testing.assert_allclose(out.loss, want_loss, rtol=ACCUM_RTOL)
    for got, want in zip(jax.tree.leaves(out.opt_state), jax.tree.leaves(want_grads),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=ACCUM_RTOL, atol=ACCUM_ATOL)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_recomputes_layers_and_keeps_loss_and_gradients(remat):
    """`remat` changes what the backward pass stores, never what it computes."""
    batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 64)  # [batch, seq + 1]
    results = []
    for mode in ("none", remat):
        model = tiny_model(64)
        model.config = dataclasses.replace(model.config, remat=mode)
        graphdef, params = nnx.split(model)
        grad_fn = jax.value_and_grad(lambda p: training_loss(graphdef, p, batch)[0])
        # one rematerialized call per decoder layer, and none without remat
        assert str(jax.make_jaxpr(grad_fn)(params)).count("remat") == (
            0 if mode == "none" else model.config.num_hidden_layers)
        results.append(jax.jit(grad_fn)(params))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # same ops, reordered fusions


def test_a_remat_model_captured_by_a_transform_runs():
    """remat is functional (`remat_call`): a model that jit or scan captures, rather than merges
    inside, runs its layers under remat (nnx.remat raised TraceContextError there)."""
    model = tiny_model(64)
    model.config = dataclasses.replace(model.config, remat="full")
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, 64)  # [batch, seq]
    want = model(ids)
    np.testing.assert_allclose(jax.jit(lambda x: model(x))(ids), want, rtol=1e-6, atol=1e-6)
    _, scanned = jax.lax.scan(lambda c, row: (c, model(row[None])[0]), 0, ids)
    np.testing.assert_allclose(scanned, want, rtol=1e-6, atol=1e-6)


def test_mixtral_honours_remat_too():
    """MixtralConfig inherits `remat`; its forward must apply it, not ignore it."""
    config = jaxinfer.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, max_position_embeddings=32,
                                    num_local_experts=2, num_experts_per_tok=1, remat="full")
    graphdef, params = nnx.split(jaxinfer.MixtralForCausalLM(config, rngs=nnx.Rngs(0)))
    batch = jnp.zeros((1, 9), jnp.int32)
    grads = jax.grad(lambda p: training_loss(graphdef, p, batch)[0])
    assert str(jax.make_jaxpr(grads)(params)).count("remat") == config.num_hidden_layers


def test_batches_are_a_function_of_position():
    windows = TokenWindows(np.arange(1000, dtype=np.int32), seq_len=8, batch_size=4, seed=3)
    np.testing.assert_array_equal(windows.batch(5), windows.batch(5))
    assert not np.array_equal(windows.batch(5), windows.batch(6))
    rows = windows.batch(0)
    np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # contiguous windows


def test_windows_start_anywhere_a_window_fits_so_the_last_token_is_a_target():
    """12 tokens, windows of 9: starts 0..3. The last, 3, is the only one ending in token 11."""
    windows = TokenWindows(np.arange(12, dtype=np.int32), seq_len=8, batch_size=64)
    starts = {int(row[0]) for position in range(4) for row in windows.batch(position)}
    assert starts == {0, 1, 2, 3}
    TokenWindows(np.arange(9, dtype=np.int32), seq_len=8, batch_size=1).batch(0)  # one fits
    with pytest.raises(ValueError, match=r"corpus has 8 tokens; need at least seq_len \+ 1"):
        TokenWindows(np.arange(8, dtype=np.int32), seq_len=8, batch_size=1)


class Crash(Exception):
    pass


def test_killed_run_resumes_on_the_same_loss_curve(corpus_tokens, tmp_path):
    (train_tokens, eval_tokens), vocab = corpus_tokens
    config = TrainConfig(steps=8, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=2,
                         eval_every=4, checkpoint_every=3)
    model = tiny_model(vocab)
    straight = train(model, train_tokens, eval_tokens, config, tmp_path / "a", progress=False)

    def crash_after_step_5(record):
        if record["step"] == 5:
            raise Crash

    with pytest.raises(Crash):
        train(model, train_tokens, eval_tokens, config, tmp_path / "b", progress=False,
              on_step=crash_after_step_5)
    resumed = train(model, train_tokens, eval_tokens, config, tmp_path / "b", progress=False,
                    resume=True)
    assert [r["step"] for r in resumed.history] == list(range(1, 9))  # step 4, 5 were redone from 3
    np.testing.assert_allclose([r["loss"] for r in resumed.history],
                               [r["loss"] for r in straight.history], rtol=RESUME_RTOL)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.model)),
                    jax.tree.leaves(nnx.state(straight.model))):
        np.testing.assert_allclose(a, b, rtol=RESUME_RTOL, atol=1e-7)


@pytest.mark.parametrize("field, value", [
    ("clip_norm", 0.0), ("warmup_steps", -5), ("weight_decay", -1.0), ("learning_rate", 0.0),
    ("steps", 0), ("seed", -1)])
def test_config_values_that_would_break_training_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay"])
def test_infinite_learning_rate_or_weight_decay_is_refused(field):
    """Either makes every parameter NaN after the first update."""
    with pytest.raises(ValueError, match=f"{field} must be a finite number >=? 0; got inf"):
        TrainConfig(**{field: float("inf")})


def test_config_values_of_the_wrong_type_are_refused():
    with pytest.raises(TypeError, match="batch_size must be an integer; got '8'"):
        TrainConfig(batch_size="8")


def test_numpy_scalars_become_python_numbers_that_the_config_file_holds(tmp_path):
    config = TrainConfig(steps=np.int64(5), learning_rate=np.float64(1e-3),
                         document_separator=np.int64(0))
    assert (type(config.steps), type(config.learning_rate), type(config.document_separator)
            ) == (int, float, int)
    config.save(tmp_path / TRAIN_CONFIG_FILE)
    assert TrainConfig.load(tmp_path / TRAIN_CONFIG_FILE) == config


def test_windows_longer_than_the_models_context_are_refused_before_any_file(tmp_path):
    tokens = np.arange(300, dtype=np.int32) % 64
    with pytest.raises(ValueError, match=r"seq_len must be at most the model's "
                                         r"max_position_embeddings \(64\); got 65"):
        train(tiny_model(64), tokens, tokens, TrainConfig(steps=1, seq_len=65), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()


# Adam with a constant gradient g: both bias-corrected moments are exact (m = g, v = g^2), so
# the update is -lr g / (|g| + eps); with g = 1 that is -lr to float32 rounding.
ADAM_UNIT_RTOL = 1e-6


def test_updates_follow_the_schedule_the_optimizer_returns_and_warmup_0_starts_at_peak():
    """make_optimizer_and_schedule's schedule (what the loop logs as lr) is the one the updates
    use, step by step; without warmup the first update is already at the peak."""
    peak = 0.5
    for warmup in (0, 2):
        tx, schedule = make_optimizer_and_schedule(learning_rate=peak, total_steps=6,
                                                   warmup_steps=warmup, weight_decay=0.0,
                                                   clip_norm=100.0)
        params = {"w": jnp.zeros(3)}
        state, ones = tx.init(params), {"w": jnp.ones(3)}
        for step in range(6):
            updates, state = tx.update(ones, state, params)
            np.testing.assert_allclose(updates["w"], -float(schedule(step)), rtol=ADAM_UNIT_RTOL)
        np.testing.assert_allclose(float(schedule(0)), peak if warmup == 0 else 0.0,
                                   rtol=ADAM_UNIT_RTOL)
    np.testing.assert_allclose(float(schedule(2)), peak, rtol=ADAM_UNIT_RTOL)  # warmup 2


def test_equal_optimizer_settings_give_one_object_however_they_are_spelled():
    """tx is a static argument of the jitted steps: a second object would compile them again."""
    config = TrainConfig(steps=7, warmup_steps=2, learning_rate=0.25)
    kw = dict(learning_rate=0.25, total_steps=7, warmup_steps=2, weight_decay=config.weight_decay,
              clip_norm=config.clip_norm)
    tx = make_optimizer(**kw)
    assert make_optimizer_and_schedule(**kw)[0] is tx
    assert make_optimizer(**kw, min_lr_ratio=0.1) is tx  # the default, spelled out
    assert loop._optimizer(config)[0] is tx  # what train() runs
    assert make_optimizer(**{**kw, "min_lr_ratio": 0.2}) is not tx


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="jaxinfer.train.optimizer"):
        learning_rate_schedule(1e-3, total_steps=30, warmup_steps=29)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="jaxinfer.train.optimizer"):
        learning_rate_schedule(1e-3, total_steps=30, warmup_steps=30)
    assert len(caplog.records) == 1
    assert "warmup_steps (30) >= total steps (30)" in caplog.records[0].getMessage()


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    tokens = np.arange(200, dtype=np.int32) % 70  # ids up to 69 for a 64-token model
    with pytest.raises(ValueError, match=r"train_tokens must lie in \[0, 64\).*from 0 to 69"):
        train(tiny_model(64), tokens, tokens % 64, TrainConfig(steps=1, seq_len=8),
              tmp_path, progress=False)


def test_a_fresh_run_refuses_a_directory_holding_checkpoints(tmp_path):
    checkpointer = TrainStateCheckpointer(tmp_path / "checkpoints")
    checkpointer.save(10, {"x": jnp.zeros(2)})
    checkpointer.wait()
    (tmp_path / TRAIN_CONFIG_FILE).write_text("the old run's")
    tokens = np.arange(200, dtype=np.int32) % 64
    with pytest.raises(ValueError, match=r"already holds a run's checkpoints \(step 10\)"):
        train(tiny_model(64), tokens, tokens, TrainConfig(steps=1, seq_len=8), tmp_path,
              progress=False)
    assert (tmp_path / TRAIN_CONFIG_FILE).read_text() == "the old run's"
    assert not (tmp_path / "config.json").exists()


@pytest.mark.slow
def test_cli_train_survives_sigkill_and_resumes(tmp_path):
    """The real thing: SIGKILL a `jaxinfer train` process once a checkpoint exists, then
    --resume. The uninterrupted reference and the resume run in this process (`cli.main`, the
    command's own code path); only the killed run needs a process of its own."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_sample_path().read_text()[:60000])
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama", "vocab_size": 300, "hidden_size": 32, '
                      '"intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, '
                      '"num_key_value_heads": 1, "max_position_embeddings": 64}')
    args = ["train", "--corpus", str(corpus), "--config", str(config), "--steps", "16",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "8", "--checkpoint-every", "4",
            "--vocab-size", "300"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    # The child inherits the suite's XLA flags and persistent compilation cache (conftest), so it
    # loads the programs this process just compiled: the same executables, less time.
    run_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "jaxinfer.cli", *args, "--out", str(run_b)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_b / "checkpoints" / "8").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_b / "model").exists()  # killed mid-run, not after it finished
    assert cli.main(["train", "--out", str(run_b), "--resume"]) == 0

    def losses(run):
        import json
        return [json.loads(line)["loss"]
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses(run_b), losses(tmp_path / "a"), rtol=RESUME_RTOL)
