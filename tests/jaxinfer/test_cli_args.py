"""The command line refuses arguments it cannot honour, and `train --resume` restarts from the
model the run began with. Training itself is replaced by a stand-in that records what the CLI
hands it, so these tests take seconds."""

import hashlib
import json
import logging
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import jaxinfer
import jaxinfer.train
from jaxinfer import cli
from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.train.loop import CHECKPOINTS_DIR, TRAIN_CONFIG_FILE
from jaxinfer.train.loop import train as real_train
from jaxinfer.train.resume import data_fingerprint, model_config_changes
from jaxinfer.files import write_json
from jaxinfer.train.run_files import DATA_FILE


@pytest.mark.parametrize("argv", [
    ["generate", "x", "--batch-size", "0"],
    ["generate", "x", "--max-new-tokens", "-3"],
    ["generate", "x", "--page-size", "0"],
    ["train", "--out", "r", "--corpus", "c", "--steps", "0"],
    ["train", "--out", "r", "--corpus", "c", "--held-out", "1.5"],
    ["train", "--out", "r", "--corpus", "c", "--held-out", "0"],  # split_held_out's (0, 1)
    ["train", "--out", "r", "--corpus", "c", "--seed", "-1"],
    ["train", "--out", "r", "--corpus", "c", "--warmup", "-2"],
    ["train", "--out", "r", "--corpus", "c", "--vocab-size", "-5"],
    ["train", "--out", "r", "--corpus", "c", "--vocab-size", "0"],
    ["train", "--out", "r", "--corpus", "c", "--vocab-size", "256"],  # under the 256 bytes + 1
])
def test_out_of_range_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


class _Stop(Exception):
    """Ends the CLI's train command where training would begin."""


@pytest.fixture
def handed_to_train(monkeypatch):
    """Replaces jaxinfer.train.train: accepts the run (on_start) and writes what the real one
    writes before its first step, and records (model, config, resume) of each call."""
    calls = []

    def fake_train(model, train_tokens, eval_tokens, config, run_dir, *, resume=False,
                   on_start=None, **_):
        if on_start is not None:
            on_start()
        (run_dir / "config.json").write_text(
            json.dumps(model.config.to_hf_config()))
        write_json(run_dir / DATA_FILE, data_fingerprint(train_tokens, eval_tokens))
        config.save(run_dir / TRAIN_CONFIG_FILE)
        calls.append((model, config, resume))
        raise _Stop

    monkeypatch.setattr(jaxinfer.train, "train", fake_train)
    return calls


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_resume_before_the_first_checkpoint_restarts_from_the_init_model(tmp_path,
                                                                         handed_to_train):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    run = tmp_path / "run"
    init = str(jaxinfer.default_model_dir())
    with pytest.raises(_Stop):
        cli.main(["train", "--corpus", str(corpus), "--init", init, "--out", str(run),
                  "--steps", "3", "--seq-len", "16", "--lr", "1e-4"])
    with pytest.raises(_Stop):  # killed before any checkpoint: no checkpoints/ in the run
        cli.main(["train", "--out", str(run), "--resume", "--steps", "5"])
    (_, fresh_config, fresh_resume), (model, config, resume) = handed_to_train
    assert not fresh_resume and resume
    for got, want in zip(_params(model), _params(jaxinfer.load_pretrained(init)), strict=True):
        np.testing.assert_array_equal(got, want)
    # --steps extends the run; every other setting is the run's own
    assert (config.steps, config.seq_len, config.learning_rate) == (5, 16, 1e-4)
    assert fresh_config.steps == 3


def _fresh_run(tmp_path, *flags: str) -> tuple:
    """(corpus, run) of a run begun from the embedded model (stopped where training begins)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                  "--out", str(run), "--steps", "3", "--seq-len", "16", *flags])
    return corpus, run


def _file_states(run) -> dict:
    """path -> (content hash, mtime) of every file under `run`."""
    return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                      p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_refuses_changed_settings_through_the_library(tmp_path, handed_to_train,
                                                            monkeypatch, capsys):
    """Changed settings are refused in flag terms, naming what --resume may change, before any
    file changes (run.json's remat included); so are flags that pick the run's data or model."""
    _, run = _fresh_run(tmp_path)
    before = _file_states(run)
    monkeypatch.setattr(jaxinfer.train, "train", real_train)
    assert cli.main(["train", "--out", str(run), "--resume", "--lr", "1.0",
                     "--batch-size", "2", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert (f"--resume continues the run in {run} with its settings; only --steps, --eval-every, "
            f"--checkpoint-every and --remat may change; got other values for --batch-size: "
            f"16 -> 2; --lr: 0.003 -> 1.0") in err
    assert "learning_rate" not in err and "batch_size" not in err
    assert cli.main(["train", "--out", str(run), "--resume", "--remat", "full",
                     "--batch-size", "4"]) == 2
    assert "got other values for --batch-size: 16 -> 4" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(run), "--resume", "--remat", "dots",
                     "--corpus", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert _file_states(run) == before
    assert cli.main(["train", "--out", str(run), "--resume", "--held-out", "0.1"]) == 2
    assert "--held-out cannot change them" in capsys.readouterr().err
    assert len(handed_to_train) == 1  # the refused resumes never reached the stand-in


def test_a_fresh_run_refused_by_the_library_writes_no_file(tmp_path, monkeypatch, capsys):
    """...and leaves the loggers and the unraisable hook that the CLI mutes while it trains as
    they were: only a failed checkpoint write keeps them muted."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    before = (sys.unraisablehook, [lg.level for lg in loggers])
    corpus = tmp_path / "corpus.txt"  # long enough for a held-out window of the model's context
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text())
    run = tmp_path / "run"
    context = jaxinfer.load_pretrained(jaxinfer.default_model_dir()).config.max_position_embeddings
    assert cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                     "--out", str(run), "--seq-len", str(context + 1)]) == 2
    assert f"max_position_embeddings ({context}); got {context + 1}" in capsys.readouterr().err
    assert not run.exists()
    assert (sys.unraisablehook, [lg.level for lg in loggers]) == before


@pytest.mark.parametrize("flags, message, library_name", [
    (("--lr", "-1"), "error: --lr must be a finite number > 0; got -1.0", "learning_rate"),
    (("--weight-decay", "-1"), "error: --weight-decay must be a finite number >= 0; got -1.0",
     "weight_decay"),
    (("--document-separator", "-1"), "error: --document-separator must be a token id >= 0; "
     "got -1", "document_separator"),
    (("--seq-len", "1024"), "error: --seq-len must be at most the model's "
     "max_position_embeddings", "seq_len"),
], ids=["lr", "weight-decay", "document-separator", "seq-len"])
def test_refused_training_settings_name_the_flags_not_the_config_fields(
        tmp_path, handed_to_train, capsys, flags, message, library_name):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    assert cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                     "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and library_name not in err
    assert not handed_to_train and not (tmp_path / "run").exists()


@pytest.mark.parametrize("parent", [".", "sweep/seed=0"])
def test_resume_below_the_runs_step_is_an_error(parent, tmp_path, handed_to_train, monkeypatch,
                                                capsys):
    """The error names --steps, and a flag's name in the run's path ("seed=0") stays a path."""
    (tmp_path / parent).mkdir(parents=True, exist_ok=True)
    _, run = _fresh_run(tmp_path / parent)
    checkpointer = TrainStateCheckpointer(run / CHECKPOINTS_DIR)
    checkpointer.save(2, {"x": np.zeros(2)})
    checkpointer.wait()
    monkeypatch.setattr(jaxinfer.train, "train", real_train)
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: --steps must be at least the run's current step 2" in err
    assert str(run) in err


def test_remat_reaches_the_model_and_the_resumed_run(tmp_path, handed_to_train):
    _, run = _fresh_run(tmp_path, "--remat", "dots")
    assert json.loads((run / "run.json").read_text())["remat"] == "dots"
    with pytest.raises(_Stop):
        cli.main(["train", "--out", str(run), "--resume"])
    (fresh_model, _, _), (resumed_model, _, _) = handed_to_train
    assert fresh_model.config.remat == resumed_model.config.remat == "dots"
    with pytest.raises(_Stop):  # a resume may change it: it saves memory, results are the same
        cli.main(["train", "--out", str(run), "--resume", "--remat", "full"])
    assert handed_to_train[-1][0].config.remat == "full"
    assert json.loads((run / "run.json").read_text())["remat"] == "full"


def test_remat_reaches_a_hyena_model_and_a_resume_may_change_it(tmp_path, handed_to_train):
    config = jaxinfer.HyenaConfig(vocab_size=4096, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, max_position_embeddings=32,
                                  filter_hidden_size=16, filter_emb_dim=5)
    init = jaxinfer.save_pretrained(jaxinfer.HyenaForCausalLM(config, rngs=nnx.Rngs(0)),
                                    tmp_path / "hyena")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        cli.main(["train", "--corpus", str(corpus), "--init", str(init), "--tokenizer",
                  str(jaxinfer.default_model_dir()), "--out", str(run), "--steps", "3",
                  "--seq-len", "16", "--remat", "full"])
    with pytest.raises(_Stop):
        cli.main(["train", "--out", str(run), "--resume", "--remat", "dots"])
    (fresh_model, _, _), (resumed_model, _, _) = handed_to_train
    assert isinstance(resumed_model, jaxinfer.HyenaForCausalLM)
    assert (fresh_model.config.remat, resumed_model.config.remat) == ("full", "dots")
    # remat is a run setting: the resumed model's architecture is the run's config.json
    assert model_config_changes(run, resumed_model.config.to_hf_config()) == []


def test_an_unknown_remat_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", "r", "--remat", "some"])
    assert "invalid choice: 'some'" in capsys.readouterr().err


def test_a_run_setting_in_the_config_file_is_an_error_not_dropped(tmp_path, handed_to_train,
                                                                 capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 16,
                                  "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "remat": "full"}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning\n")
    assert cli.main(["train", "--corpus", str(corpus), "--config", str(config), "--tokenizer",
                     str(jaxinfer.default_model_dir()), "--out", str(tmp_path / "run")]) == 2
    assert (f"--config {config}: run settings are not keys of a model's config.json; got remat "
            f"(give it as --remat)") in capsys.readouterr().err
    assert not handed_to_train


def test_a_run_record_without_its_corpus_is_a_clear_error(tmp_path, handed_to_train, capsys):
    _, run = _fresh_run(tmp_path)
    (run / "run.json").write_text('{"held_out": 0.05}')
    assert cli.main(["train", "--out", str(run), "--resume"]) == 2
    assert f"{run / 'run.json'} lacks ['corpus']; give --corpus" in capsys.readouterr().err


def test_convert_in_place_rewrites_the_weights_and_keeps_the_tokenizer(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(jaxinfer.default_model_dir(), model_dir)
    assert cli.main(["convert", str(model_dir), str(model_dir), "--dtype", "bfloat16"]) == 0
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (model_dir / "tokenizer.json").exists()
    reloaded = jaxinfer.load_pretrained(model_dir, dtype="bfloat16")
    source = jaxinfer.load_pretrained(jaxinfer.default_model_dir(), dtype="bfloat16")
    for got, want in zip(_params(reloaded), _params(source), strict=True):
        np.testing.assert_array_equal(got, want)  # float32 -> bfloat16 rounds the same way


def test_resume_with_checkpoints_needs_no_init_directory(tmp_path, handed_to_train):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    init, run = tmp_path / "init", tmp_path / "run"
    shutil.copytree(jaxinfer.default_model_dir(), init)
    with pytest.raises(_Stop):
        cli.main(["train", "--corpus", str(corpus), "--init", str(init), "--out", str(run),
                  "--steps", "3", "--seq-len", "16"])
    checkpointer = TrainStateCheckpointer(run / CHECKPOINTS_DIR)
    checkpointer.save(2, {"x": np.zeros(2)})
    checkpointer.wait()
    shutil.rmtree(init)  # moved away after the run began: the checkpoint holds the weights
    with pytest.raises(_Stop):
        cli.main(["train", "--out", str(run), "--resume"])
    model, config, resume = handed_to_train[-1]
    assert resume and type(model).__name__ == "LlamaForCausalLM" and config.seq_len == 16


def test_a_fresh_run_over_checkpoints_is_refused_before_it_writes(tmp_path, handed_to_train,
                                                                 capsys):
    run = tmp_path / "run"
    checkpointer = TrainStateCheckpointer(run / CHECKPOINTS_DIR)
    checkpointer.save(5, {"x": np.zeros(2)})
    checkpointer.wait()
    (run / "run.json").write_text("old")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    assert cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                     "--out", str(run)]) == 2
    assert "already holds a run's checkpoints (step 5)" in capsys.readouterr().err
    assert (run / "run.json").read_text() == "old" and not (run / "tokenizer.json").exists()
    assert not handed_to_train


def test_resume_on_another_corpus_is_refused_naming_it(tmp_path, handed_to_train, capsys):
    corpus, run = _fresh_run(tmp_path)
    before = _file_states(run)
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    assert cli.main(["train", "--out", str(run), "--resume", "--corpus", str(other)]) == 2
    err = capsys.readouterr().err
    assert (f"--resume continues the run in {run} on the data it began with (corpus "
            f"{corpus.absolute()}); --corpus {other} gives other tokens: train_tokens:") in err
    corpus.write_text(corpus.read_text() + "And it was so.\n")  # edited after the run began
    assert cli.main(["train", "--out", str(run), "--resume"]) == 2
    assert f"its corpus {corpus.absolute()}, changed since, gives other tokens" in (
        capsys.readouterr().err)
    assert _file_states(run) == before
    assert len(handed_to_train) == 1


def test_resume_after_the_runs_tokenizer_changed_names_the_tokenizer(tmp_path, handed_to_train,
                                                                    capsys):
    """run.json records tokenizer.json's sha256, so that a changed tokenizer is told from a
    changed corpus; a run begun before that record names both."""
    corpus, run = _fresh_run(tmp_path)
    tokenizer_file = run / "tokenizer.json"
    record = json.loads((run / "run.json").read_text())
    assert record["tokenizer_sha256"] == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    original = tokenizer_file.read_text()
    tokenizer = json.loads(original)
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-1000]  # other tokens
    tokenizer_file.write_text(json.dumps(tokenizer))
    assert cli.main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"its {tokenizer_file}, changed since, gives other tokens" in err
    assert "its corpus" not in err
    del record["tokenizer_sha256"]  # as a run begun before the record leaves run.json
    write_json(run / "run.json", record)
    assert cli.main(["train", "--out", str(run), "--resume"]) == 2
    assert (f"its corpus {corpus.absolute()} or its {tokenizer_file}, changed since, gives "
            f"other tokens") in capsys.readouterr().err
    assert len(handed_to_train) == 1
    tokenizer_file.write_text(original)  # the accepted resume records the hash it lacked
    with pytest.raises(_Stop):
        cli.main(["train", "--out", str(run), "--resume"])
    assert json.loads((run / "run.json").read_text())["tokenizer_sha256"] == hashlib.sha256(
        original.encode()).hexdigest()


def test_resume_with_packing_on_a_run_without_it_names_the_setting(tmp_path, handed_to_train,
                                                                  capsys):
    """The settings are compared before the corpus is split, so the refusal is the resume's,
    not the held-out split's 'separator does not occur'."""
    _, run = _fresh_run(tmp_path)
    assert cli.main(["train", "--out", str(run), "--resume", "--document-separator", "0"]) == 2
    assert "got other values for --document-separator: None -> 0" in capsys.readouterr().err


def test_an_empty_corpus_is_refused_before_a_tokenizer_is_trained(tmp_path, monkeypatch,
                                                                  capsys):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n \n")
    trained = []
    monkeypatch.setattr("jaxinfer.tokenizer.train_bpe", lambda *a, **k: trained.append(a))
    assert cli.main(["train", "--corpus", str(corpus), "--config", str(_config_file(tmp_path)),
                     "--vocab-size", "300", "--seq-len", "16", "--out", str(tmp_path / "run")]) == 2
    assert f"corpus {corpus} is empty: nothing to train on" in capsys.readouterr().err
    assert not trained and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, advice", [
    ((), "give a longer corpus, a smaller --seq-len or a larger --held-out"),
    (("--seq-len", "512"), "give a longer corpus or a smaller --seq-len"),
], ids=["held-out-part", "whole-corpus"])
def test_a_too_short_corpus_names_the_corpus_and_the_flags(tmp_path, handed_to_train, capsys,
                                                           flags, advice):
    corpus = tmp_path / "short.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:2000])
    assert cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                     "--out", str(tmp_path / "run"), "--seq-len", "64", *flags]) == 2
    err = capsys.readouterr().err
    assert f"corpus {corpus} is too short" in err and advice in err
    assert not handed_to_train and not (tmp_path / "run").exists()


TINY_CONFIGS = {  # the smallest model of each type `jaxinfer train --config` builds
    "llama": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
    "mixtral": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                    num_local_experts=4, num_experts_per_tok=2),
    "hyena": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  max_position_embeddings=64, filter_hidden_size=16, filter_emb_dim=5),
}


def _config_file(tmp_path, model_type: str = "llama", **changes):
    """A --config file of the tiny `model_type` model (vocab_size 300), with `changes`."""
    path = tmp_path / f"{model_type}.json"
    path.write_text(json.dumps({"model_type": model_type, "vocab_size": 300,
                                **TINY_CONFIGS[model_type], **changes}))
    return path


@pytest.mark.parametrize("model_type, model_class, kept", [
    ("mixtral", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("hyena", "HyenaForCausalLM", {"filter_emb_dim": 5}),
])
def test_a_fresh_run_builds_the_model_type_its_config_file_names(tmp_path, handed_to_train,
                                                                 model_type, model_class, kept):
    """As jaxinfer.train.train trains them and --resume rebuilds them from the run's
    config.json; the tokenizer sets the vocabulary."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        cli.main(["train", "--corpus", str(corpus), "--config",
                  str(_config_file(tmp_path, model_type)), "--tokenizer",
                  str(jaxinfer.default_model_dir()), "--out", str(run), "--steps", "3",
                  "--seq-len", "16"])
    with pytest.raises(_Stop):
        cli.main(["train", "--out", str(run), "--resume"])
    (fresh, _, _), (resumed, _, resume) = handed_to_train
    assert type(fresh).__name__ == type(resumed).__name__ == model_class and resume
    hf = fresh.config.to_hf_config()
    assert hf["vocab_size"] == jaxinfer.load_tokenizer(run).get_vocab_size() == 4096
    assert {key: hf[key] for key in kept} == kept
    for got, want in zip(_params(resumed), _params(fresh), strict=True):  # same seed, same init
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2"}, "model_type must be one of ('llama', 'mistral', 'qwen2', "
                             "'mixtral', 'hyena'); got 'gpt2'"),
    ({"model_type": "mixtral", "num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"model_type": "hyena", "filter_emb_dim": 4}, "filter_emb_dim"),
], ids=["unsupported", "mixtral", "hyena"])
def test_errors_in_the_config_file_name_the_file_given(tmp_path, handed_to_train, capsys,
                                                       changes, message):
    path = tmp_path / "small.json"
    model_type = changes["model_type"] if changes["model_type"] in TINY_CONFIGS else "llama"
    path.write_text(json.dumps({"vocab_size": 300, **TINY_CONFIGS[model_type], **changes}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning\n")
    assert cli.main(["train", "--corpus", str(corpus), "--config", str(path), "--tokenizer",
                     str(jaxinfer.default_model_dir()), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: --config {path}: " in err and message in err and "config.json" not in err
    assert not handed_to_train


@pytest.mark.parametrize("model_type, flags, message", [
    ("missing", (), "missing.json: cannot be read (No such file or directory)"),
    ("llama", ("--seq-len", "65"), "max_position_embeddings (64); got 65"),
    ("unsupported", (), "model_type must be one of"),
    ("hyena", ("--seq-len", "16", "--document-separator", "0"),
     "error: --document-separator 0 packs documents, which needs a model whose forward takes "
     "segment_ids (Llama, Mixtral); HyenaForCausalLM does not: leave out --document-separator"),
])
def test_refusals_of_the_flags_and_config_come_before_a_tokenizer_is_trained(
        tmp_path, monkeypatch, capsys, model_type, flags, message):
    if model_type == "missing":
        config = tmp_path / "missing.json"
    elif model_type == "unsupported":
        config = _config_file(tmp_path, model_type="llama")
        config.write_text(config.read_text().replace('"llama"', '"gpt2"'))
    else:
        config = _config_file(tmp_path, model_type)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    trained = []
    monkeypatch.setattr("jaxinfer.tokenizer.train_bpe", lambda *a, **k: trained.append(a))
    assert cli.main(["train", "--corpus", str(corpus), "--config", str(config), "--vocab-size",
                     "300", "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not trained and not (tmp_path / "run").exists()


@pytest.mark.parametrize("source", ["--tokenizer", "--init"])
def test_vocab_size_with_a_given_tokenizer_is_refused_not_ignored(tmp_path, handed_to_train,
                                                                  capsys, source):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:5000])
    model = (["--config", str(_config_file(tmp_path))] if source == "--tokenizer" else [])
    given = str(jaxinfer.default_model_dir())
    assert cli.main(["train", "--corpus", str(corpus), source, given, *model, "--vocab-size",
                     "400", "--out", str(tmp_path / "run")]) == 2
    assert (f"--vocab-size trains a new tokenizer, but {source} {given} gives one (and its "
            f"vocabulary size): give one of {source} and --vocab-size") in (
        capsys.readouterr().err)
    assert not handed_to_train and not (tmp_path / "run").exists()


def test_a_packed_run_resumed_on_other_data_is_refused_as_other_data(tmp_path, handed_to_train,
                                                                    capsys):
    """Not with the held-out split's 'separator does not occur' that the other corpus gives."""
    lines = jaxinfer.assets.corpus_sample_path().read_text()[:5000].splitlines()
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(line + "<|endoftext|>" * (n % 3 == 2)
                                for n, line in enumerate(lines)))
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                  "--out", str(run), "--steps", "3", "--seq-len", "16",
                  "--document-separator", "0"])
    other = tmp_path / "other.txt"
    other.write_text("\n".join(lines))
    assert cli.main(["train", "--out", str(run), "--resume", "--corpus", str(other)]) == 2
    err = capsys.readouterr().err
    assert (f"--resume continues the run in {run} on the data it began with (corpus "
            f"{corpus.absolute()}); --corpus {other} gives other tokens: the run's held-out "
            f"split fails on them (separator 0 does not occur") in err
    assert len(handed_to_train) == 1


@pytest.mark.parametrize("earlier_summary", [True, False], ids=["kept", "unknown"])
def test_resume_of_a_finished_run_without_its_metrics_log_writes_a_summary(
        tmp_path, handed_to_train, monkeypatch, capsys, earlier_summary):
    """A resume with nothing left to do gets no step record from jaxinfer.train.train when
    metrics.jsonl is lost: the summary keeps the losses of the run's earlier one, or says they
    are unknown."""
    _, run = _fresh_run(tmp_path)
    earlier = {"steps": 3, "final_train_loss": 4.5, "held_out_loss": 4.75,
               "held_out_perplexity": 115.6}
    if earlier_summary:
        write_json(run / "summary.json", earlier)

    def finished(model, *_, **__):  # the run is at its last step: no step runs
        return jaxinfer.train.TrainResult(model, [], 0.01)
    monkeypatch.setattr(jaxinfer.train, "train", finished)
    assert cli.main(["train", "--out", str(run), "--resume"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    losses = {key: summary[key] for key in earlier}
    assert losses == (earlier if earlier_summary else dict.fromkeys(earlier, None) | {"steps": 3})
    assert ("metrics.jsonl has no record of the run's steps: summary.json's losses are unknown"
            in capsys.readouterr().err) != earlier_summary
