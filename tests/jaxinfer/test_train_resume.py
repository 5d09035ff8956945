"""Resuming a run: what train(resume=True) accepts, the run files a crash can leave behind, and
errors that name the file or parameter at fault. No step is trained: a run's checkpoint is the
initial state saved at its last step, so resuming it restores and finishes at once."""

import dataclasses
import hashlib
import json
import logging
import os
import re
import stat

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.files import write_atomic, write_json
from jaxinfer.train import TrainConfig, train
from jaxinfer.train.loop import CHECKPOINTS_DIR, METRICS_FILE, TRAIN_CONFIG_FILE, initial_state
from jaxinfer.train.resume import data_fingerprint
from jaxinfer.train.run_files import DATA_FILE, read_history

VOCAB = 32
CONFIG = TrainConfig(steps=2, batch_size=2, seq_len=8, warmup_steps=1, eval_every=2,
                     eval_batches=1, checkpoint_every=1)
TOKENS = np.arange(400, dtype=np.int32) % VOCAB


def tiny_model(hidden_size: int = 16) -> jaxinfer.LlamaForCausalLM:
    config = jaxinfer.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size,
                                  intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=16)
    return jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def records(steps: int) -> list[dict]:
    return [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(1, steps + 1)]


def finished_run(run_dir, model=None, config=CONFIG, data=True):
    """A run directory as train() leaves it after config.steps steps on TOKENS (without
    training); data=False: as runs begun before data.json was written leave it."""
    model = tiny_model() if model is None else model
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(model.config.to_hf_config()))
    if data:
        write_json(run_dir / DATA_FILE, data_fingerprint(TOKENS, TOKENS[:100]))
    config.save(run_dir / TRAIN_CONFIG_FILE)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n"
                                                for r in records(config.steps)))
    checkpointer = TrainStateCheckpointer(run_dir / CHECKPOINTS_DIR)
    _, state = initial_state(model, config)
    checkpointer.save(config.steps, {**state, "step": jnp.int32(config.steps),
                                     "data_position": jnp.int32(config.steps)})
    checkpointer.wait()
    checkpointer.close()
    return run_dir


def resume(run_dir, model=None, config=CONFIG, tokens=TOKENS):
    return train(tiny_model() if model is None else model, tokens, tokens[:100], config,
                 run_dir, resume=True, progress=False)


def file_states(run_dir) -> dict:
    """path -> (content hash, mtime) of every file under run_dir."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                          p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "new \ud800")  # a lone surrogate: UTF-8 cannot encode it
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    write_atomic(path, "new")
    assert path.read_text() == "new"


def test_written_files_keep_their_mode_or_take_the_umasks_not_owner_only(tmp_path):
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o604)
    umask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "new.json", "new")
        write_atomic(kept, "new")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640  # 0o666 & ~0o027
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_with_a_warning(tmp_path, caplog):
    run = finished_run(tmp_path / "run")
    text = (run / METRICS_FILE).read_text()
    (run / METRICS_FILE).write_text(text + '{"step": 3, "loss": 2.')  # killed mid-append
    with caplog.at_level(logging.WARNING, logger="jaxinfer.train.run_files"):
        result = resume(run)
    assert result.history == records(2)
    assert (run / METRICS_FILE).read_text() == text  # rewritten without the piece
    assert any(str(run / METRICS_FILE) in r.getMessage() and "cut short" in r.getMessage()
               for r in caplog.records)


def test_a_damaged_metrics_log_refuses_the_resume_before_any_file_changes(tmp_path):
    run = finished_run(tmp_path / "run")
    lines = (run / METRICS_FILE).read_text().splitlines(keepends=True)
    (run / METRICS_FILE).write_text('{"step": 1, oops\n' + "".join(lines[1:]))
    before = file_states(run)
    with pytest.raises(ValueError, match=re.escape(f"{run / METRICS_FILE} line 1 is not valid")):
        resume(run, config=dataclasses.replace(CONFIG, steps=4))
    assert file_states(run) == before


def test_a_resume_logs_no_orbax_warning(tmp_path, caplog):
    """Reading the checkpoint's shapes before restoring (restore_state) goes through the
    manager, which knows where orbax keeps its metadata: no 'Metadata file does not exist'."""
    run = finished_run(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        resume(run)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unreadable_metrics_line_before_the_last_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path} line 2 is not valid JSON")):
        read_history(path, 10)


@pytest.mark.parametrize("text, error, message", [
    ("{oops", ValueError, "is not valid JSON"),
    ('{"stepz": 3}', ValueError, r"unknown TrainConfig field\(s\) \['stepz'\]"),
    ('{"steps": "3"}', TypeError, "steps must be an integer; got '3'"),
], ids=["not-json", "unknown-key", "string-value"])
def test_a_bad_train_config_file_is_an_error_naming_it(tmp_path, text, error, message):
    path = tmp_path / TRAIN_CONFIG_FILE
    path.write_text(text)
    with pytest.raises(error, match=re.escape(str(path)) + ".*" + message):
        TrainConfig.load(path)


def test_resume_with_changed_settings_is_refused_before_any_file_changes(tmp_path):
    run = finished_run(tmp_path / "run")
    before = {p.name: p.read_text() for p in run.iterdir() if p.is_file()}
    changed = dataclasses.replace(CONFIG, batch_size=4, seed=1, steps=3)
    with pytest.raises(ValueError, match=r"except steps, eval_every, checkpoint_every; got other "
                                         r"values for batch_size: 2 -> 4; seed: 0 -> 1"):
        resume(run, config=changed)
    assert {p.name: p.read_text() for p in run.iterdir() if p.is_file()} == before


def test_resume_with_fewer_steps_than_the_run_has_made_is_refused(tmp_path):
    run = finished_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"steps must be at least the run's current step 2 .*"
                                         r"got 1"):
        resume(run, config=dataclasses.replace(CONFIG, steps=1))
    assert TrainConfig.load(run / TRAIN_CONFIG_FILE) == CONFIG


def test_resume_with_a_model_of_another_shape_names_the_parameters(tmp_path):
    """Without the run's config.json to compare architectures, the checkpoint's shapes are
    checked before anything is restored."""
    run = finished_run(tmp_path / "run")
    (run / "config.json").unlink()
    with pytest.raises(ValueError, match=r"the model does not match the run's checkpoint .*"
                                         r"embed_tokens.embedding: checkpoint \[32, 16\], "
                                         r"model \[32, 24\]"):
        resume(run, model=tiny_model(hidden_size=24))
    assert not (run / "config.json").exists()


@pytest.mark.parametrize("change, named", [
    ({"rope_theta": 500.0}, "rope_theta: 10000.0 -> 500.0"),  # same shapes, other model
    ({"hidden_size": 24}, "hidden_size: 16 -> 24"),
], ids=["rope-theta", "hidden-size"])
def test_resume_with_a_model_of_another_architecture_names_the_fields(tmp_path, change, named):
    run = finished_run(tmp_path / "run")
    before = file_states(run)
    model = jaxinfer.LlamaForCausalLM(tiny_model().config.replace(**change), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"a resumed run keeps its model's architecture \(.*"
                                         r"config.json\); the model differs in .*"
                                         + re.escape(named)):
        resume(run, model=model)
    assert file_states(run) == before


def test_resume_may_change_run_settings_of_the_model_such_as_remat(tmp_path):
    run = finished_run(tmp_path / "run")
    saved_config = json.loads((run / "config.json").read_text())
    model = jaxinfer.LlamaForCausalLM(tiny_model().config.replace(remat="full",
                                                                  attention_backend="xla"),
                                      rngs=nnx.Rngs(0))
    assert resume(run, model=model).history == records(2)
    assert json.loads((run / "config.json").read_text()) == saved_config


def test_resume_on_other_tokens_is_refused_before_any_file_changes(tmp_path):
    run = finished_run(tmp_path / "run")
    before = file_states(run)
    with pytest.raises(ValueError, match=r"a resumed run trains and evaluates on the data it "
                                         r"began with \(.*data.json\); got other data: "
                                         r"train_tokens: 400 tokens \(sha256 \w{12}\.\.\.\) -> "
                                         r"400 tokens \(sha256 \w{12}\.\.\.\); eval_tokens"):
        resume(run, tokens=TOKENS[::-1].copy())
    assert file_states(run) == before


def test_the_data_fingerprint_is_of_the_ids_not_their_integer_type(tmp_path):
    run = finished_run(tmp_path / "run")
    assert resume(run, tokens=TOKENS.astype(np.int64)).history == records(2)


def test_a_run_begun_without_a_data_record_resumes_and_gets_one(tmp_path):
    run = finished_run(tmp_path / "run", data=False)
    assert resume(run).history == records(2)
    assert json.loads((run / DATA_FILE).read_text()) == data_fingerprint(TOKENS, TOKENS[:100])


def tiny_hyena(**changes) -> jaxinfer.HyenaForCausalLM:
    config = jaxinfer.HyenaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, max_position_embeddings=16,
                                  filter_emb_dim=5, filter_hidden_size=8)
    return jaxinfer.HyenaForCausalLM(config.replace(**changes), rngs=nnx.Rngs(0))


def test_a_hyena_run_may_change_its_compute_dtype_not_its_storage_dtype(tmp_path):
    """HyenaConfig's config.json holds its compute dtype, a run setting (Llama's and Mixtral's
    hold only the storage dtype); the storage dtype, param_dtype, is the checkpoint's."""
    run = finished_run(tmp_path / "run", model=tiny_hyena())
    assert resume(run, model=tiny_hyena(dtype="bfloat16")).history == records(2)
    with pytest.raises(ValueError, match=r"the model differs in param_dtype: 'float32' -> "
                                         r"'bfloat16'$"):
        resume(run, model=tiny_hyena(param_dtype="bfloat16"))
