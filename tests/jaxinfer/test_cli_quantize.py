"""`jaxinfer quantize`: the embedded model in, an HF GPTQ checkpoint out that loads and runs."""

import json

import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer import cli
from jaxinfer.quant import QuantizedLinear

# The embedded model: hidden 256, intermediate 688 = 16 * 43, so 16 is the largest power-of-two
# group size dividing every layer's in_features.
GROUP = 16
IDS = np.array([[5, 17, 300, 42, 7, 99, 1000, 3]], np.int32)


@nnx.jit
def _logits(model, ids):
    """Jitted: the eager forward of a quantized model compiles op by op (~30 s on 2 cores)."""
    return model(ids)


def _load_checked(out, bits):
    """The written checkpoint's model, after checking its config, tokenizer and layer types."""
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == bits
    assert (out / "tokenizer.json").exists()
    model = jaxinfer.load_pretrained(out)
    assert isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)
    assert model.layers[0].mlp.down_proj.bits == bits
    return model


def test_quantize_rtn_8bit_writes_loadable_gptq_checkpoint(tmp_path, capsys):
    out = tmp_path / "q8"
    assert cli.main(["quantize", str(jaxinfer.default_model_dir()), str(out), "--method", "rtn",
                     "--bits", "8", "--group-size", "-1"]) == 0
    assert "rtn 8-bit" in capsys.readouterr().out
    model = _load_checked(out, 8)
    float_model = jaxinfer.load_pretrained(jaxinfer.default_model_dir())
    for block, float_block in zip(model.layers, float_model.layers):
        for got, want in ((block.self_attn.q_proj, float_block.self_attn.q_proj),
                          (block.mlp.down_proj, float_block.mlp.down_proj)):
            w = np.asarray(want.kernel[...])
            # Symmetric RTN (the default --sym): each weight within half a step (2 max|w| / 255)
            # of its float value, plus the float16 rounding of the scale on disk (relative
            # 2**-11, times |q - zero| <= 128 steps: 0.0625 step).
            step = 2 * np.abs(w).max(0) / 255
            err = np.abs(np.asarray(got.weight.dequantize()) - w)
            assert np.all(err <= (0.5 + 128 * 2.0 ** -11) * step + 1e-7)


def _tiny_model_dir(tmp_path):
    """(directory, model) of a one-layer float model saved with the embedded tokenizer: GPTQ on
    the command line in seconds (the embedded model's GPTQ runs in experiments/quant_quality's
    quick test). Every linear layer is 64 x 64, so GPTQ compiles one program, not one per shape."""
    config = jaxinfer.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4, max_position_embeddings=128)
    float_model = jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    model_dir = jaxinfer.save_pretrained(
        float_model, tmp_path / "float",
        tokenizer=jaxinfer.load_tokenizer(jaxinfer.default_model_dir()))
    return model_dir, float_model


def test_quantize_gptq_4bit_with_calibration_file(tmp_path, capsys):
    model_dir, float_model = _tiny_model_dir(tmp_path)
    text = tmp_path / "calibration.txt"
    text.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:20000])
    out = tmp_path / "q4"
    assert cli.main(["quantize", str(model_dir), str(out), "--bits", "4", "--group-size",
                     str(GROUP), "--calibration", str(text), "--n-samples", "2",
                     "--seq-len", "64"]) == 0
    assert f"2 x 64 tokens from {text}" in capsys.readouterr().out
    model = _load_checked(out, 4)
    got, want = np.asarray(_logits(model, IDS)), np.asarray(_logits(float_model, IDS))
    # The checkpoint holds this model, not noise: the logits' RMS error relative to their spread
    # is what 4-bit groups of 16 give (each weight off by up to 1/30 of its group's range;
    # measured 0.10), where another random model would give about sqrt(2).
    centered = want - want.mean()
    assert np.sqrt(np.mean((got - want) ** 2) / np.mean(centered ** 2)) < 0.3


def test_quantize_gptq_without_calibration_calibrates_on_the_embedded_corpus_head(
        tmp_path, capsys, monkeypatch):
    model_dir, _ = _tiny_model_dir(tmp_path)
    seen = {}
    real_quantize = jaxinfer.quantize

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real_quantize(model, **kwargs)
    monkeypatch.setattr(jaxinfer, "quantize", spy)
    out = tmp_path / "q4"
    assert cli.main(["quantize", str(model_dir), str(out), "--bits", "4", "--group-size",
                     str(GROUP), "--n-samples", "2", "--seq-len", "64"]) == 0
    corpus = jaxinfer.assets.corpus_sample_path()
    assert f"2 x 64 tokens from {corpus}" in capsys.readouterr().out
    # The calibration chunks are the corpus's opening text, in order.
    ids = np.asarray(seen["calibration"])
    assert ids.shape == (2, 64)
    text = jaxinfer.load_tokenizer(model_dir).decode(ids.ravel().tolist())
    assert " ".join(corpus.read_text().split()).startswith(" ".join(text.split()))
    assert isinstance(jaxinfer.load_pretrained(out).layers[0].self_attn.q_proj, QuantizedLinear)


def _refuse_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_default_group_size_on_the_embedded_model_is_refused_naming_the_ones_that_fit(
        tmp_path, capsys, monkeypatch, method):
    """--group-size 128 (the default) does not divide the embedded model's intermediate size
    688: refused from config.json, before the model is loaded or calibration text tokenized."""
    monkeypatch.setattr(jaxinfer, "load_pretrained", _refuse_loading)
    monkeypatch.setattr(jaxinfer, "load_tokenizer", _refuse_loading)
    assert cli.main(["quantize", str(jaxinfer.default_model_dir()), str(tmp_path / "q"),
                     "--method", method]) == 2
    assert ("jaxinfer quantize: error: --group-size 128 must divide every layer's in_features; "
            "layers[0].down_proj [in=688, out=256] has 688. Group sizes that divide them all: "
            "1, 2, 4, 8, 16; or -1 (one group per output channel)") in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_group_size_below_1_other_than_minus_1_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", "model", "out", "--group-size", value])
    assert exit_info.value.code == 2
    assert f"--group-size: must be an integer >= 1 or -1 (per channel); got {value}" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("extra, message", [
    (["--bits", "3"], "--bits 3 cannot be written as a GPTQ checkpoint of this model: "
                      "layers[0].gate_proj [in=256, out=688]"),
    (["--no-sym", "--checkpoint-format", "gptq"], "--checkpoint-format gptq (v1)"),
    ([], "out_dir must be a directory"),
    ([], "cannot write"),
], ids=["bits-3-packing", "asym-v1", "out-is-a-file", "out-not-writable"])
def test_quantize_refuses_bad_output_options_before_loading_the_model(
        tmp_path, capsys, monkeypatch, extra, message):
    from jaxinfer.checkpoint import hf_write

    out = tmp_path / "q"
    if message.startswith("out_dir"):
        out.write_text("")
    if message == "cannot write":
        monkeypatch.setattr(hf_write.os, "access", lambda path, mode: False)
    monkeypatch.setattr(jaxinfer, "load_pretrained", _refuse_loading)
    assert cli.main(["quantize", str(jaxinfer.default_model_dir()), str(out), "--method", "rtn",
                     "--group-size", "16"] + extra) == 2
    assert message in capsys.readouterr().err


def test_quantize_writes_every_source_file_beside_the_checkpoint(tmp_path, capsys):
    model_dir, _ = _tiny_model_dir(tmp_path)
    extras = {"chat_template.jinja": "{{ x }}", "special_tokens_map.json": "{}",
              "tokenizer_config.json": "{}", "generation_config.json": '{"eos_token_id": 0}',
              "merges.txt": "#merges"}
    for name, text in extras.items():
        (model_dir / name).write_text(text)
    # full-size weights in other formats stay behind: stale gigabytes beside a 4-bit checkpoint
    for name in ("pytorch_model.bin", "consolidated.safetensors"):
        (model_dir / name).write_bytes(b"w" * 2**20)
    out = tmp_path / "q"
    assert cli.main(["quantize", str(model_dir), str(out), "--method", "rtn", "--bits", "8",
                     "--group-size", str(GROUP)]) == 0
    assert {name: (out / name).read_text() for name in extras} == extras
    assert not (out / "pytorch_model.bin").exists()
    assert not (out / "consolidated.safetensors").exists()
    reported = float(capsys.readouterr().out.split("MiB of safetensors")[0].split("(")[-1])
    assert reported == pytest.approx((out / "model.safetensors").stat().st_size / 2**20, abs=0.01)
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_quantize_short_calibration_text_warns_how_many_samples_it_gives(tmp_path, capsys):
    model_dir, _ = _tiny_model_dir(tmp_path)
    text = tmp_path / "short.txt"
    text.write_text(jaxinfer.assets.corpus_sample_path().read_text()[:3000])
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "q"), "--group-size", str(GROUP),
                     "--calibration", str(text), "--n-samples", "128", "--seq-len", "64"]) == 0
    out, err = capsys.readouterr()
    n = int(out.split("calibration: ")[1].split(" x ")[0])
    assert 1 <= n < 128
    assert "--n-samples 128 asked for more chunks" in err
    assert f"calibrating on the {n} available" in err


def test_quantize_calibration_errors_name_the_flags_and_the_file(tmp_path, capsys):
    model_dir, _ = _tiny_model_dir(tmp_path)
    binary, short = tmp_path / "binary.txt", tmp_path / "short.txt"
    binary.write_bytes(b"\xff\xfe not utf-8")
    short.write_text("In the beginning")
    for calibration, message in ((binary, f"--calibration file {binary} is not UTF-8"),
                                 (tmp_path / "missing.txt", "--calibration file"),
                                 (short, "fewer than one chunk of --seq-len 64")):
        assert cli.main(["quantize", str(model_dir), str(tmp_path / "q"), "--group-size",
                         str(GROUP), "--calibration", str(calibration), "--seq-len", "64"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", str(model_dir), str(tmp_path / "q"), "--n-samples", "0"])
    assert "--n-samples: must be an integer >= 1" in capsys.readouterr().err
