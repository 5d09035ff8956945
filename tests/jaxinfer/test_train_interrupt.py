"""Ctrl-C and failing saves during training: a KeyboardInterrupt saves the last completed step and
the resumed run continues the uninterrupted run's curve; a second one during that save leaves the
previous checkpoint to resume from; one that jax wraps in a ValueError, or that lands inside
orbax's save, is still an interrupt; a checkpoint that cannot be written is one OSError naming the
directory, in the library and in the CLI, which alone keeps the CLI's mute of orbax's noise."""

import dataclasses
import json
import logging
import pickle
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.nnx import graphlib

import jaxinfer
import jaxinfer.train
from jaxinfer import cli, cli_train
from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.train import CheckpointWriteError, TrainConfig, TrainingInterrupted, train
from jaxinfer.train import loop as train_loop
from jaxinfer.train.loop import CHECKPOINTS_DIR, METRICS_FILE
from jaxinfer.train.resume import latest_checkpoint_step

# Same program, same inputs, same CPU: a resumed run must match bit for bit; the margin only
# absorbs a different XLA thread schedule.
RESUME_RTOL = 1e-6
VOCAB = 64
CONFIG = TrainConfig(steps=6, batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=2,
                     eval_every=3, eval_batches=1, checkpoint_every=4)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 3000).astype(np.int32)
EVAL_TOKENS = np.random.default_rng(1).integers(0, VOCAB, 300).astype(np.int32)


def tiny_model() -> jaxinfer.LlamaForCausalLM:
    config = jaxinfer.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=32)
    return jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def run(run_dir, **kwargs):
    return train(tiny_model(), TOKENS, EVAL_TOKENS, CONFIG, run_dir, progress=False, **kwargs)


def interrupt_after(step: int):
    """An on_step hook that presses Ctrl-C once `step` is done (a KeyboardInterrupt)."""
    def hook(record):
        if record["step"] == step:
            raise KeyboardInterrupt
    return hook


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return run(tmp_path_factory.mktemp("straight") / "run")


def assert_same_curve(resumed, straight):
    assert [r["step"] for r in resumed.history] == list(range(1, CONFIG.steps + 1))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in resumed.history],
                                   [r[key] for r in straight.history], rtol=RESUME_RTOL)
    np.testing.assert_allclose([r["eval_loss"] for r in resumed.history if "eval_loss" in r],
                               [r["eval_loss"] for r in straight.history if "eval_loss" in r],
                               rtol=RESUME_RTOL)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.model)),
                    jax.tree.leaves(nnx.state(straight.model)), strict=True):
        np.testing.assert_allclose(a, b, rtol=RESUME_RTOL, atol=1e-7)


def test_an_interrupt_saves_the_last_step_and_the_resume_continues_the_curve(tmp_path,
                                                                             straight):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as interrupted:  # checkpoint_every=4: none at 5
        run(run_dir, on_step=interrupt_after(5))
    assert interrupted.value.step == 5 and latest_checkpoint_step(run_dir) == 5
    assert isinstance(interrupted.value, KeyboardInterrupt)
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert_same_curve(run(run_dir, resume=True), straight)


def test_a_second_interrupt_during_that_save_leaves_the_previous_checkpoint(tmp_path, straight,
                                                                           monkeypatch):
    """Ctrl-C again while the interrupted run saves its step: the save stops and the run
    resumes from its last complete checkpoint, on the same curve."""
    run_dir = tmp_path / "run"

    def interrupted_save(checkpointer, done):
        raise KeyboardInterrupt  # the second Ctrl-C, as the save begins

    with pytest.raises(TrainingInterrupted):  # the first: run and saved on schedule
        run(run_dir, on_step=interrupt_after(4))
    monkeypatch.setattr(train_loop, "_save", interrupted_save)
    with pytest.raises(KeyboardInterrupt) as second:
        run(run_dir, resume=True, on_step=interrupt_after(5))
    assert not isinstance(second.value, TrainingInterrupted)
    assert latest_checkpoint_step(run_dir) == 4
    monkeypatch.undo()
    assert_same_curve(run(run_dir, resume=True), straight)


def test_an_interrupt_jax_wraps_while_comparing_the_static_graphdef_is_an_interrupt(
        tmp_path, straight, monkeypatch):
    """From a process's second train() on, each step's dispatch compares the GraphDef with the
    cached step's; jax re-raises a Ctrl-C landing in that __eq__ as a ValueError. It must still
    save the last completed step."""
    armed = []
    compare = graphlib.GraphDef.__eq__

    def interrupted_eq(self, other):
        if armed:
            armed.clear()
            raise KeyboardInterrupt  # what SIGINT's handler raises there
        return compare(self, other)

    def arm_after_2(record):
        if record["step"] == 2:
            armed.append(True)

    monkeypatch.setattr(graphlib.GraphDef, "__eq__", interrupted_eq)
    run_dir = tmp_path / "run"  # `straight` trained the same step first: it is cached
    with pytest.raises(TrainingInterrupted) as interrupted:
        run(run_dir, on_step=arm_after_2)
    assert not armed  # the trap went off (in step 3's dispatch)
    assert interrupted.value.step == 2 and latest_checkpoint_step(run_dir) == 2
    monkeypatch.undo()
    assert_same_curve(run(run_dir, resume=True), straight)


def test_a_value_error_is_no_interrupt_unless_it_carries_one():
    assert not train_loop._is_interrupt(ValueError("KeyboardInterrupt is a word here"))
    wrapped = ValueError("static arguments should be comparable using __eq__. The error was:\n"
                         "Traceback (most recent call last):\n  File ...\nKeyboardInterrupt: ")
    assert train_loop._is_interrupt(wrapped)
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ValueError("converted") from e
    except ValueError as e:
        assert train_loop._is_interrupt(e)


@pytest.mark.parametrize("point", ["_add_checkpoint_info", "_get_old_steps_to_remove"])
def test_an_interrupt_inside_the_managers_save_leaves_the_step_committed_and_pruned(
        tmp_path, monkeypatch, point):
    """Ctrl-C inside orbax's CheckpointManager.save, after the write began but before the
    manager launched the thread that commits the step (renames its temporary directory) and
    prunes old steps: the manager's memory may hold the step (after _add_checkpoint_info) or not.
    Decided from disk, the step is written again, committed, and the run keeps the newest two
    checkpoints (TrainStateCheckpointer's max_to_keep), with no temporary directory left."""
    config = dataclasses.replace(CONFIG, checkpoint_every=2)  # saves at 2, 4 and 6
    original = getattr(ocp.CheckpointManager, point)
    saves = []

    def interrupted(self, *args, **kwargs):
        if saves == [2, 4, 6]:  # the first save of step 6
            saves.append("interrupted")
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    real_save = TrainStateCheckpointer.save

    def counted_save(self, step, state):
        saves.append(step)
        real_save(self, step, state)

    monkeypatch.setattr(ocp.CheckpointManager, point, interrupted)
    monkeypatch.setattr(TrainStateCheckpointer, "save", counted_save)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_model(), TOKENS, EVAL_TOKENS, config, run_dir, progress=False)
    assert saves == [2, 4, 6, "interrupted", 6]
    assert stopped.value.step == 6 == latest_checkpoint_step(run_dir)
    assert sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()) == ["4", "6"]


def test_training_interrupted_survives_a_pickle_round_trip(tmp_path):
    copy = pickle.loads(pickle.dumps(TrainingInterrupted(5, tmp_path)))
    assert isinstance(copy, TrainingInterrupted)
    assert (copy.step, copy.run_dir, str(copy)) == (5, tmp_path, str(TrainingInterrupted(5,
                                                                                     tmp_path)))


def test_a_checkpoint_that_cannot_be_written_is_an_oserror_naming_the_directory(tmp_path,
                                                                               monkeypatch):
    def disk_full(self, step, state):  # what orbax raises for tensorstore's ENOSPC
        raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device")

    monkeypatch.setattr(TrainStateCheckpointer, "save", disk_full)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=re.escape(f"could not write a checkpoint in "
                                                f"{(run_dir / CHECKPOINTS_DIR).absolute()}")
                       + ".*No space left on device"):
        run(run_dir)


def test_cli_prints_a_resume_hint_and_exits_130_on_ctrl_c(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:20000])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 16,
                                  "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "max_position_embeddings": 32}))
    run_dir = tmp_path / "run"

    def interrupted_train(*args, **kwargs):
        return train(*args, **kwargs, progress=False, on_step=interrupt_after(2))

    monkeypatch.setattr(jaxinfer.train, "train", interrupted_train)
    assert cli.main(["train", "--corpus", str(corpus), "--config", str(config), "--tokenizer",
                     str(jaxinfer.default_model_dir()), "--out", str(run_dir), "--steps", "3",
                     "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
                     "--checkpoint-every", "5"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 2; continue with `jaxinfer train --out {run_dir} --resume`" in err
    assert "Traceback" not in err and latest_checkpoint_step(run_dir) == 2


@pytest.fixture
def noise_settings():
    """The unraisable hook and the absl and asyncio levels the CLI's mute changes, as they were
    before the test, set back after it."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    before = (sys.unraisablehook, [lg.level for lg in loggers])
    yield lambda: (sys.unraisablehook, [lg.level for lg in loggers])
    sys.unraisablehook = before[0]
    for lg, level in zip(loggers, before[1]):
        lg.setLevel(level)


def test_cli_reports_a_failed_checkpoint_save_in_one_line(tmp_path, monkeypatch, capsys,
                                                          noise_settings):
    """The mute stays after a failed save (its futures log again as they are collected)."""
    def disk_full(self, step, state):
        raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device")

    before = noise_settings()
    monkeypatch.setattr(TrainStateCheckpointer, "save", disk_full)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                     "--out", str(run_dir), "--steps", "1", "--batch-size", "1", "--seq-len",
                     "8", "--eval-every", "5", "--warmup", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "it/s" not in line]  # less the progress bar
    assert err == [f"jaxinfer train: error: could not write a checkpoint in "
                   f"{(run_dir / CHECKPOINTS_DIR).absolute()} (is the disk full?); the run "
                   f"resumes from its last complete checkpoint: RESOURCE_EXHAUSTED: Failed "
                   f"writing: No space left on device"]
    hook, levels = noise_settings()
    assert hook is not before[0] and levels == [logging.CRITICAL] * 2


def test_checkpoint_noise_is_muted_while_the_cli_trains_and_restored_after(caplog):
    absl = logging.getLogger("absl")
    level = absl.level
    with caplog.at_level(logging.WARNING), cli_train._quiet_checkpoint_noise():
        absl.error("_SignalingThread.run() raised an exception")
    assert not caplog.records and absl.level == level
