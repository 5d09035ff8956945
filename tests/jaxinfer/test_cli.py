"""The command line: generate on the embedded model, convert, and clear errors with exit code 2."""

import json

import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer import cli


def test_generate_uses_embedded_model_and_reports_speed(capsys):
    assert cli.main(["generate", "In the beginning", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("In the beginning")
    assert len(out.strip()) > len("In the beginning")
    assert "tokens/s" in err


def test_generate_continuation_is_the_greedy_continuation(capsys):
    model_dir = jaxinfer.default_model_dir()
    model, tok = jaxinfer.load_pretrained(model_dir), jaxinfer.load_tokenizer(model_dir)
    ids = np.array([tok.encode("And God said").ids], dtype=np.int32)
    expected = tok.decode(np.asarray(jaxinfer.generate(model, ids, max_new_tokens=6))[0].tolist())
    assert cli.main(["generate", "And God said", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_convert_to_sharded_bfloat16(tmp_path):
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(jaxinfer.default_model_dir()), str(dst), "--dtype", "bfloat16",
                     "--shard-size-mb", "2"]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (dst / "tokenizer.json").exists()
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    logits = nnx.jit(lambda model, ids: model(ids))  # one compile per dtype: eager takes ~5 s
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.int32)
    got = np.asarray(logits(jaxinfer.load_pretrained(dst, dtype="bfloat16"), ids), np.float32)
    # The converted files hold exactly the bfloat16 values the source rounds to when loaded in
    # bfloat16, and both models then run the same program on the same device: tolerance 0, so
    # any difference means the conversion changed a weight.
    source_bf16 = jaxinfer.load_pretrained(jaxinfer.default_model_dir(), dtype="bfloat16")
    np.testing.assert_array_equal(got, np.asarray(logits(source_bf16, ids), np.float32))
    # Against the float32 source (an oracle that shares no bfloat16 rounding with the above):
    # bfloat16 weights and activations (8-bit significands) moved these logits (|x| <= ~11) by
    # 0.093 at most when measured; a misplaced or mis-transposed tensor moves them by O(1).
    bf16_vs_f32_atol = 0.25
    source_f32 = jaxinfer.load_pretrained(jaxinfer.default_model_dir())
    np.testing.assert_allclose(got, np.asarray(logits(source_f32, ids)), rtol=0,
                               atol=bf16_vs_f32_atol)


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--model", "/nonexistent/model"], "does not exist"),
    (["generate", "x", "--model", str(jaxinfer.default_model_dir() / "config.json")],
     "config.json is not a directory; expected a Hugging Face model directory"),
    (["train", "--out", "/tmp/jaxinfer-no-such-run", "--resume"], "no run to resume"),
    (["train", "--out", "/tmp/x"], "--corpus is required"),
], ids=["missing-model", "model-is-a-file", "resume-without-run", "train-without-corpus"])
def test_errors_exit_2_with_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, shown", [
    ("generate", ["--max-new-tokens MAX_NEW_TOKENS, --max-tokens MAX_NEW_TOKENS",
                  "(default: 48)", "(default: 512)", "(default: float32)"]),
    # only --steps, --eval-every and --checkpoint-every may change on --resume
    ("train", ["sequences per micro-batch (default: 16; --resume keeps the run's)",
               "(default: 0.003; --resume keeps the run's)",
               "held-out evaluations (default: 100; on --resume: the run's unless given)"]),
    ("quantize", ["(default: 128)", "(default: gptq)", "(default: 0.01)"]),
], ids=["generate", "train", "quantize"])
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at any word
    for part in shown:
        assert part in text, (part, text)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_train_fine_tunes_from_hf_dir_and_writes_loadable_model(tmp_path, capsys):
    """Packing documents, too: each verse (line) of the corpus ends with the tokenizer's
    <|endoftext|> (id 0), given as --document-separator."""
    corpus = tmp_path / "corpus.txt"
    text = jaxinfer.assets.corpus_sample_path().read_text()[:40000]
    corpus.write_text("<|endoftext|>\n".join(text.splitlines()))
    run = tmp_path / "run"
    assert cli.main(["train", "--corpus", str(corpus), "--init", str(jaxinfer.default_model_dir()),
                     "--out", str(run), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                     "--eval-every", "2", "--checkpoint-every", "2", "--lr", "1e-4",
                     "--document-separator", "0"]) == 0
    assert json.loads((run / "train_config.json").read_text())["document_separator"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["held_out_perplexity"])
    # a KJV model fine-tuned on KJV text starts far below the uniform loss ln(4096) = 8.3
    assert summary["final_train_loss"] < 6.0
    tuned = jaxinfer.load_pretrained(run / "model")
    assert tuned.config.vocab_size == 4096 and (run / "model" / "tokenizer.json").exists()


def _tiny_source(tmp_path):
    """A tiny float model directory with the files a Hub download brings beside the weights."""
    config = jaxinfer.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=32)
    src = jaxinfer.save_pretrained(jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0)),
                                   tmp_path / "src")
    files = {"tokenizer.json": "{}", "tokenizer_config.json": '{"marker": "NEW"}',
             "generation_config.json": '{"eos_token_id": 0}', "chat_template.jinja": "{{ x }}",
             "special_tokens_map.json": "{}", "vocab.json": "{}", "merges.txt": "#merges",
             "tokenizer.model": "sentencepiece"}
    for name, text in files.items():
        (src / name).write_text(text)
    (src / "original").mkdir()  # subdirectories (e.g. consolidated weights) are not copied
    (src / "original" / "consolidated.pth").write_text("x")
    return src, files


def test_convert_writes_every_source_file_with_the_new_checkpoint_before_the_swap(
        tmp_path, monkeypatch):
    from jaxinfer.checkpoint import hf_write

    src, files = _tiny_source(tmp_path)
    dst = tmp_path / "dst"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    assert {name: (dst / name).read_text() for name in files} == files
    assert not (dst / "original").exists()
    # Over an older conversion: the source's files are in the new directory when it is swapped
    # in, so a crash or a failed copy can never pair the new weights with the old files.
    (dst / "tokenizer_config.json").write_text('{"marker": "OLD"}')
    staged = {}
    real_swap = hf_write._swap_into_place

    def spy_swap(staging, target):
        staged.update({p.name: p.read_text() for p in staging.iterdir()
                       if p.suffix != ".safetensors"})
        real_swap(staging, target)
    monkeypatch.setattr(hf_write, "_swap_into_place", spy_swap)
    assert cli.main(["convert", str(src), str(dst), "--dtype", "bfloat16"]) == 0
    assert staged["tokenizer_config.json"] == '{"marker": "NEW"}'
    assert json.loads(staged["config.json"])["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("size", ["inf", "nan", "0", "-1"])
def test_convert_shard_size_must_be_a_positive_finite_number(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", str(jaxinfer.default_model_dir()), str(tmp_path / "out"),
                  "--shard-size-mb", size])
    assert exit_info.value.code == 2
    assert "--shard-size-mb: must be a finite number > 0" in capsys.readouterr().err
