"""Bad checkpoints and bad arguments fail early with an error that names the problem.

Each test also checks where the exception was raised: inside jaxinfer's own validation, never from
deep inside JAX/XLA or safetensors, so the user sees one clear message instead of a tracer dump.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxinfer

JAXINFER_DIR = Path(jaxinfer.__file__).parent
VOCAB = 64
CONTEXT = 32
CONFIG = jaxinfer.LlamaConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=CONTEXT,
)


def assert_raised_by_jaxinfer(excinfo: pytest.ExceptionInfo) -> None:
    """The innermost frame of the traceback is jaxinfer code (its own check), not a library's."""
    raised_in = Path(str(excinfo.traceback[-1].path)).resolve()
    assert JAXINFER_DIR.resolve() in raised_in.parents, f"raised in {raised_in}"


@pytest.fixture(scope="module")
def model():
    return jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def saved_dir(model, tmp_path_factory) -> Path:
    return jaxinfer.save_pretrained(model, tmp_path_factory.mktemp("saved"))


@pytest.fixture(scope="module")
def sharded_dir(model, tmp_path_factory) -> Path:
    return jaxinfer.save_pretrained(model, tmp_path_factory.mktemp("sharded"), max_shard_bytes=8_000)


@pytest.fixture
def checkpoint(saved_dir, tmp_path) -> Path:
    """A fresh, writable copy of a valid checkpoint for a test to break."""
    return Path(shutil.copytree(saved_dir, tmp_path / "ckpt"))


def edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def prompt(batch: int = 2, seq: int = 5) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (batch, seq)), jnp.int32)


# ----------------------------------------------------------------- checkpoints
def test_sanity_valid_checkpoint_loads(checkpoint):
    """The breakages below start from a checkpoint that loads."""
    assert jaxinfer.load_pretrained(checkpoint).config == CONFIG


def test_missing_directory_is_file_not_found(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=r"no_such_model.*does not exist") as excinfo:
        jaxinfer.load_pretrained(missing)
    assert_raised_by_jaxinfer(excinfo)


def test_file_instead_of_directory_is_file_not_found(checkpoint):
    with pytest.raises(FileNotFoundError, match=r"config\.json is not a directory; expected a "
                                                r"Hugging Face model directory"):
        jaxinfer.load_pretrained(checkpoint / "config.json")


def test_missing_config_json_is_named(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json") as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


def test_unsupported_model_type_is_named(checkpoint):
    edit_config(checkpoint, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match=r"model_type.*'gpt2'") as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


def test_missing_model_type_is_named(checkpoint):
    edit_config(checkpoint, lambda c: c.pop("model_type"))
    with pytest.raises(ValueError, match=r"model_type.*None"):
        jaxinfer.load_pretrained(checkpoint)


def test_malformed_config_json_is_invalid_json(checkpoint):
    (checkpoint / "config.json").write_text('{"model_type": "llama", "vocab_size": 64,')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON") as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


def test_binary_config_json_is_named(checkpoint):
    (checkpoint / "config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"config\.json is not a UTF-8 text \(JSON\) file"):
        jaxinfer.load_pretrained(checkpoint)


def test_config_json_that_is_not_an_object_is_rejected(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"JSON object; got list"):
        jaxinfer.load_pretrained(checkpoint)


def test_config_missing_required_field_is_named(checkpoint):
    edit_config(checkpoint, lambda c: c.pop("hidden_size"))
    with pytest.raises(ValueError, match=r"missing required field.*hidden_size") as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


BAD_CONFIG_VALUES = {  # id: (config.json key, value, what the error must name)
    "rope_theta_string": ("rope_theta", "x", "rope_theta"),
    "negative_rms_norm_eps": ("rms_norm_eps", -1.0, "rms_norm_eps"),
    "odd_head_dim": ("head_dim", 7, "head_dim"),
    "string_eos": ("eos_token_id", "13", "eos_token_id"),
    "eos_outside_vocab": ("eos_token_id", VOCAB, "eos_token_id"),
    "string_tie_word_embeddings": ("tie_word_embeddings", "no", "tie_word_embeddings"),
    "nan_rope_factor": ("rope_scaling", {"rope_type": "linear", "factor": math.nan}, "factor"),
}


@pytest.mark.parametrize("key,value,field", list(BAD_CONFIG_VALUES.values()),
                         ids=list(BAD_CONFIG_VALUES))
def test_bad_config_json_value_is_named_before_any_weights_load(checkpoint, key, value, field):
    """Values that used to load and then give NaN logits or fail inside RoPE or the engine."""
    edit_config(checkpoint, lambda c: c.update({key: value}))
    with pytest.raises((ValueError, TypeError), match=rf"config\.json: .*{field}") as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


def test_unsupported_load_dtype_is_named(checkpoint):
    with pytest.raises(ValueError, match=r"dtype must be one of .*'float16'"):
        jaxinfer.load_pretrained(checkpoint, dtype="float16")


def test_missing_weights_file_is_named(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


def _rewrite_weights(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(checkpoint, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*" + re.escape(name)) as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


def test_checkpoint_for_a_different_config_names_the_missing_layer(checkpoint):
    """config.json says 3 layers, the weights hold 2: the layer-2 tensors are reported missing."""
    edit_config(checkpoint, lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"model\.layers\.2\."):
        jaxinfer.load_pretrained(checkpoint)


def test_wrongly_shaped_tensor_names_tensor_and_both_shapes(checkpoint):
    name = "model.layers.0.self_attn.k_proj.weight"  # HF layout [out, in] = [2 * 8, 32]
    _rewrite_weights(checkpoint, lambda t: t.update({name: np.zeros((17, 32), np.float32)}))
    with pytest.raises(ValueError, match=re.escape(name) + r".*\[17, 32\].*\[16, 32\]") as excinfo:
        jaxinfer.load_pretrained(checkpoint)
    assert_raised_by_jaxinfer(excinfo)


def test_vocab_size_mismatch_names_embedding_tensor(checkpoint):
    edit_config(checkpoint, lambda c: c.update(vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*\[64, 32\].*\[65, 32\]"):
        jaxinfer.load_pretrained(checkpoint)


def test_transposed_tensor_is_a_shape_error_not_silent(checkpoint):
    """A [in, out] kernel where HF stores [out, in] is rejected rather than loaded transposed."""
    name = "model.layers.0.mlp.up_proj.weight"  # HF [64, 32]
    _rewrite_weights(checkpoint, lambda t: t.update({name: np.ascontiguousarray(t[name].T)}))
    with pytest.raises(ValueError, match=re.escape(name) + r".*\[32, 64\].*\[64, 32\]"):
        jaxinfer.load_pretrained(checkpoint)


def test_unexpected_tensor_is_ignored_with_a_warning_naming_it(checkpoint, caplog):
    _rewrite_weights(checkpoint, lambda t: t.update({"model.extra.weight": np.ones(3, np.float32)}))
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        loaded = jaxinfer.load_pretrained(checkpoint)
    assert "model.extra.weight" in caplog.text
    assert loaded.config == CONFIG


def test_missing_shard_file_is_named(sharded_dir, tmp_path):
    directory = Path(shutil.copytree(sharded_dir, tmp_path / "ckpt"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (directory / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shards[-1])) as excinfo:
        jaxinfer.load_pretrained(directory)
    assert_raised_by_jaxinfer(excinfo)


def test_malformed_shard_index_is_named(sharded_dir, tmp_path):
    directory = Path(shutil.copytree(sharded_dir, tmp_path / "ckpt"))
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json.*weight_map"):
        jaxinfer.load_pretrained(directory)


# ----------------------------------------------------------------- input_ids
def test_prompt_longer_than_context_in_forward(model):
    ids = jnp.zeros((1, CONTEXT + 1), jnp.int32)
    with pytest.raises(ValueError, match=r"33 tokens.*exceeds.*32.*max_position_embeddings") as excinfo:
        model(ids)
    assert_raised_by_jaxinfer(excinfo)


def test_prompt_plus_new_tokens_longer_than_context_in_generate(model):
    ids = prompt(seq=CONTEXT - 4)
    with pytest.raises(ValueError, match=r"28 tokens plus 5 new tokens exceeds.*max_position_embeddings") \
            as excinfo:
        jaxinfer.generate(model, ids, max_new_tokens=5)
    assert_raised_by_jaxinfer(excinfo)


def test_prompt_plus_new_tokens_exactly_filling_context_is_allowed(model):
    out = jaxinfer.generate(model, prompt(seq=CONTEXT - 4), max_new_tokens=4)
    assert out.shape == (2, CONTEXT)


@pytest.mark.parametrize("bad_id", [-1, VOCAB, VOCAB + 100], ids=["negative", "vocab_size", "far_above"])
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_token_id_outside_vocab_is_named(model, bad_id, entry):
    ids = np.array(prompt())
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\) \(vocab_size\); found token id {bad_id}") \
            as excinfo:
        if entry == "forward":
            model(jnp.asarray(ids))
        else:
            jaxinfer.generate(model, ids, max_new_tokens=2)
    assert_raised_by_jaxinfer(excinfo)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 5), ()], ids=["1d", "3d", "scalar"])
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_input_ids_that_are_not_2d_are_rejected(model, shape, entry):
    ids = jnp.ones(shape, jnp.int32)
    with pytest.raises(ValueError, match=r"2-D \[batch, seq\].*" + re.escape(str(shape))) as excinfo:
        if entry == "forward":
            model(ids)
        else:
            jaxinfer.generate(model, ids, max_new_tokens=2)
    assert_raised_by_jaxinfer(excinfo)


def test_float_input_ids_are_rejected(model):
    with pytest.raises(ValueError, match=r"integer token ids; got dtype float32"):
        model(jnp.ones((1, 4), jnp.float32))


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)], ids=["no_sequences", "no_tokens"])
def test_empty_input_ids_are_rejected(model, shape):
    with pytest.raises(ValueError, match=r"at least one sequence and one token"):
        jaxinfer.generate(model, jnp.ones(shape, jnp.int32), max_new_tokens=2)


# ----------------------------------------------------------------- generate arguments
@pytest.mark.parametrize("value", [-1, 2.5, True, "3"], ids=["negative", "float", "bool", "str"])
def test_invalid_max_new_tokens_is_named(model, value):
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 0; got") as excinfo:
        jaxinfer.generate(model, prompt(), max_new_tokens=value)
    assert_raised_by_jaxinfer(excinfo)


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, "1.0", None],
                         ids=["negative", "nan", "inf", "str", "none"])
def test_invalid_temperature_is_named(model, value):
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0; got") as excinfo:
        jaxinfer.generate(model, prompt(), max_new_tokens=2, temperature=value)
    assert_raised_by_jaxinfer(excinfo)


@pytest.mark.parametrize("value", [0, -3, 2.0, True], ids=["zero", "negative", "float", "bool"])
def test_invalid_top_k_is_named(model, value):
    with pytest.raises(ValueError, match=r"top_k must be None or an integer >= 1; got") as excinfo:
        jaxinfer.generate(model, prompt(), max_new_tokens=2, temperature=1.0, top_k=value)
    assert_raised_by_jaxinfer(excinfo)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, math.nan, "0.9"],
                         ids=["zero", "negative", "above_one", "nan", "str"])
def test_invalid_top_p_is_named(model, value):
    with pytest.raises(ValueError, match=r"top_p must be None or a number in \(0, 1\]; got") as excinfo:
        jaxinfer.generate(model, prompt(), max_new_tokens=2, temperature=1.0, top_p=value)
    assert_raised_by_jaxinfer(excinfo)


@pytest.mark.parametrize("value", [1.5, "0", None], ids=["float", "str", "none"])
def test_invalid_seed_is_named(model, value):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\]; got"):
        jaxinfer.generate(model, prompt(), max_new_tokens=2, temperature=1.0, seed=value)


# ----------------------------------------------------------------- numbers: one rule everywhere
def test_numpy_scalar_arguments_generate_what_python_scalars_do(model):
    """NumPy scalars are numbers like any other (numbers.Integral / numbers.Real). The shapes of
    test_prompt_plus_new_tokens_exactly_filling_context_is_allowed: one compiled function."""
    ids = prompt(seq=CONTEXT - 4)
    want = jaxinfer.generate(model, ids, max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9,
                             seed=3)
    got = jaxinfer.generate(model, ids, max_new_tokens=np.int64(4), temperature=np.float32(0.7),
                            top_k=np.int64(5), top_p=np.float64(0.9), seed=np.uint32(3))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("field, value", [
    ("temperature", np.float32(math.nan)), ("temperature", np.float64(math.inf)),
    ("temperature", True), ("temperature", np.float32(-0.5)), ("top_k", np.bool_(True)),
    ("top_k", np.float32(5.0)), ("top_k", np.int64(0)), ("top_p", np.float32(math.nan)),
    ("top_p", np.float64(1.5)), ("seed", 2**32 + 5), ("seed", -1),
], ids=["nan", "inf", "bool", "negative", "np_bool", "float_top_k", "zero_top_k", "nan_top_p",
        "top_p_above_one", "seed_past_uint32", "negative_seed"])
def test_every_entry_point_refuses_a_sampling_value_with_the_same_message(model, field, value):
    """generate, speculative_generate and SamplingParams (the engine's) apply one set of rules."""
    messages = []
    for call in (lambda: jaxinfer.generate(model, prompt(), max_new_tokens=2, **{field: value}),
                 lambda: jaxinfer.speculative_generate(model, prompt(), 2, lookup_ngram=2,
                                                       **{field: value}),
                 lambda: jaxinfer.SamplingParams(**{field: value})):
        with pytest.raises(ValueError, match=rf"{field} must be .*; got") as excinfo:
            call()
        assert_raised_by_jaxinfer(excinfo)
        messages.append(str(excinfo.value))
    assert messages[0] == messages[1] == messages[2].removeprefix("SamplingParams.")
