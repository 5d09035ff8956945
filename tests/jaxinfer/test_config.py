"""LlamaConfig: HF config.json interop (transformers 4.x and 5.x spellings) and validation."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest

import jaxinfer
from jaxinfer import HyenaConfig, LlamaConfig, RopeScaling
from jaxinfer.models.mixtral_config import MixtralConfig

transformers = pytest.importorskip("transformers")
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3 = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)

CONFIGS = {
    "llama_default_rope": LlamaConfig(**BASE, bos_token_id=1, eos_token_id=2),
    "llama3_scaled_tied_multi_eos": LlamaConfig(
        **BASE, rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=True,
        eos_token_id=(2, 7)),
    "llama_linear_rope_biases": LlamaConfig(
        **BASE, rope_scaling=RopeScaling(rope_type="linear", factor=2.0), qkv_bias=True,
        o_bias=True, mlp_bias=True),
    "llama_head_dim_not_hidden_over_heads": LlamaConfig(**{**BASE, "num_attention_heads": 8}, head_dim=16),
    "mistral_sliding_window": LlamaConfig(**BASE, model_type="mistral", sliding_window=32,
                                          rms_norm_eps=1e-5),
    "mistral_no_window": LlamaConfig(**BASE, model_type="mistral"),
    "qwen2": LlamaConfig(**BASE, model_type="qwen2", qkv_bias=True, rope_theta=1e6,
                         tie_word_embeddings=True),
    "qwen2_sliding_window_every_layer": LlamaConfig(**BASE, model_type="qwen2", qkv_bias=True,
                                                    sliding_window=32),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_hf_round_trip_preserves_config(config):
    hf = config.to_hf_config()
    assert json.loads(json.dumps(hf)) == hf  # serializable as config.json
    assert LlamaConfig.from_hf_config(hf) == config


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_round_trip_through_transformers_config_preserves_config(config):
    """transformers parses our config.json and writes its own; reading that back gives the same."""
    hf = config.to_hf_config()
    parsed = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    assert type(parsed).__name__ == hf["architectures"][0].replace("ForCausalLM", "Config")
    assert parsed.num_key_value_heads == config.num_key_value_heads
    assert parsed.head_dim == config.head_dim
    assert LlamaConfig.from_hf_config(parsed.to_dict()) == config


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_transformers_default_config_is_read(model_type):
    """transformers' own defaults for each model type parse into the matching architecture."""
    hf = transformers.AutoConfig.for_model(model_type, **BASE).to_dict()
    config = LlamaConfig.from_hf_config(hf)
    assert config.model_type == model_type
    assert config.head_dim == BASE["hidden_size"] // BASE["num_attention_heads"]
    assert config.qkv_bias == (model_type == "qwen2")
    assert not config.o_bias and not config.mlp_bias
    assert config.rope_scaling is None
    # HF Mistral defaults to a 4096 window; Qwen2 keeps sliding_window off unless use_sliding_window
    assert config.sliding_window == (hf["sliding_window"] if model_type == "mistral" else None)


def test_config_is_hashable_and_equal_configs_hash_equal():
    """generate's jit takes the model structure (holding the config) as a static argument."""
    a = LlamaConfig(**BASE, eos_token_id=[2, 3])
    b = LlamaConfig(**BASE, eos_token_id=(2, 3))
    assert a == b and hash(a) == hash(b)
    assert a.eos_token_id == (2, 3)
    assert LlamaConfig(**BASE, eos_token_id=5).eos_token_id == (5,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.vocab_size = 3


# Only the keys without a transformers default; 32 heads so that Qwen2's default of 32 KV heads
# (and Mistral's 8) divide them.
REQUIRED_ONLY = dict(vocab_size=128, hidden_size=256, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=32)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "mixtral", "qwen2"])
def test_absent_keys_take_the_defaults_of_transformers(model_type):
    """A config.json that omits num_key_value_heads, max_position_embeddings, sliding_window,
    rope_theta, rms_norm_eps or the bos/eos token ids means what transformers' config class for
    its model type assumes (Mistral's 4096 window, 8 KV heads, ...)."""
    hf = transformers.AutoConfig.for_model(model_type, **REQUIRED_ONLY)
    parse = MixtralConfig if model_type == "mixtral" else LlamaConfig
    config = parse.from_hf_config({**REQUIRED_ONLY, "model_type": model_type})
    assert config.num_key_value_heads == hf.num_key_value_heads
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.sliding_window == getattr(hf, "sliding_window", None)
    assert config.rms_norm_eps == hf.rms_norm_eps
    theta = (hf.rope_parameters["rope_theta"] if TRANSFORMERS_MAJOR >= 5 else hf.rope_theta)
    assert config.rope_theta == theta
    assert config.bos_token_id == hf.bos_token_id
    assert config.eos_token_id == (() if hf.eos_token_id is None else (hf.eos_token_id,))


def test_explicit_null_token_ids_stay_unset():
    """An id that config.json sets to null means no such token, not the class default."""
    config = LlamaConfig.from_hf_config({**REQUIRED_ONLY, "model_type": "llama",
                                         "bos_token_id": None, "eos_token_id": None})
    assert (config.bos_token_id, config.eos_token_id) == (None, ())


QWEN2_WINDOWS = {  # id: Qwen2 config keys (besides BASE, 2 layers)
    "use_sliding_window_false": dict(use_sliding_window=False, sliding_window=32),
    "max_window_layers_at_least_layers": dict(use_sliding_window=True, sliding_window=32,
                                              max_window_layers=2),
    "max_window_layers_absent": dict(use_sliding_window=True, sliding_window=32),
    "every_layer_slides": dict(use_sliding_window=True, sliding_window=32, max_window_layers=0),
    "explicit_layer_types_all_full": dict(use_sliding_window=True, sliding_window=32,
                                          max_window_layers=0,
                                          layer_types=["full_attention"] * 2),
    "upper_layers_slide": dict(use_sliding_window=True, sliding_window=32, max_window_layers=1),
    "explicit_layer_types_mixed": dict(use_sliding_window=True, sliding_window=32,
                                       layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("keys", list(QWEN2_WINDOWS.values()), ids=list(QWEN2_WINDOWS))
def test_qwen2_sliding_window_follows_transformers_layer_types(keys):
    """A Qwen2 config loads with transformers' window where its layers all attend alike (no
    window where none slides, however use_sliding_window is set), and is refused where only
    some layers slide."""
    hf = transformers.Qwen2Config(**BASE, **keys)
    windows = {hf.sliding_window if kind == "sliding_attention" else None
               for kind in hf.layer_types}
    config_json = {**BASE, "model_type": "qwen2", **keys}
    if len(windows) > 1:
        with pytest.raises(ValueError, match=r"config.json: qwen2 with a sliding window in only "
                                             r"some layers \(layers \[.*\] of 2"):
            LlamaConfig.from_hf_config(config_json)
        return
    assert LlamaConfig.from_hf_config(config_json).sliding_window == windows.pop()


def test_rope_scaling_writes_only_the_fields_of_its_type():
    """transformers warns about (and ignores) llama3's fields in a linear rope_parameters."""
    linear = LlamaConfig(**BASE, rope_scaling=RopeScaling(rope_type="linear", factor=2.0))
    hf = linear.to_hf_config()
    assert hf["rope_parameters"] == {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    llama3 = LlamaConfig(**BASE, rope_scaling=LLAMA3).to_hf_config()["rope_parameters"]
    assert llama3 == {"rope_type": "llama3", "rope_theta": 1e4, **LLAMA3_FIELDS}


def test_head_dim_defaults_to_hidden_over_heads():
    assert LlamaConfig(**BASE).head_dim == 16
    assert LlamaConfig.from_hf_config({**BASE, "model_type": "llama"}).head_dim == 16
    assert LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "head_dim": 32}).head_dim == 32


def test_missing_num_key_value_heads_means_multi_head():
    hf = {**BASE, "model_type": "llama"}
    del hf["num_key_value_heads"]
    assert LlamaConfig.from_hf_config(hf).num_key_value_heads == BASE["num_attention_heads"]


def test_from_json_file_reads_save_pretrained_output(tmp_path):
    config = CONFIGS["llama3_scaled_tied_multi_eos"]
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    assert LlamaConfig.from_json_file(tmp_path / "config.json") == config
    bf16 = LlamaConfig.from_json_file(tmp_path / "config.json", dtype="bfloat16")
    assert bf16 == config.replace(dtype="bfloat16", param_dtype="bfloat16")


# ----------------------------------------------------------------- rope spellings
LLAMA3_FIELDS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64}
ROPE_SPELLINGS = {
    "4x_rope_scaling_type": {"rope_theta": 500000.0,
                             "rope_scaling": {"type": "llama3", **LLAMA3_FIELDS}},
    "4x_rope_scaling_rope_type": {"rope_theta": 500000.0,
                                  "rope_scaling": {"rope_type": "llama3", **LLAMA3_FIELDS}},
    "5x_rope_parameters": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                               **LLAMA3_FIELDS}},
    # what transformers 5 writes after reading a 4.x file: both keys inside rope_parameters
    "5x_converted_from_4x": {"rope_parameters": {"type": "llama3", "rope_type": "llama3",
                                                 "rope_theta": 500000.0, **LLAMA3_FIELDS},
                             "rope_scaling": None},
}


@pytest.mark.parametrize("spelling", list(ROPE_SPELLINGS.values()), ids=list(ROPE_SPELLINGS))
def test_rope_spellings_of_transformers_4_and_5_give_the_same_config(spelling):
    config = LlamaConfig.from_hf_config({**BASE, "model_type": "llama", **spelling})
    assert config == LlamaConfig(**BASE, rope_theta=500000.0, rope_scaling=LLAMA3,
                                 bos_token_id=1, eos_token_id=2)  # transformers' Llama ids


@pytest.mark.parametrize("spelling", [
    {"rope_theta": 250000.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 250000.0}},
    {"rope_theta": 250000.0, "rope_scaling": None},
], ids=["4x_theta_only", "5x_default", "4x_null_scaling"])
def test_unscaled_rope_spellings_give_the_same_config(spelling):
    config = LlamaConfig.from_hf_config({**BASE, "model_type": "llama", **spelling})
    assert config.rope_theta == 250000.0
    assert config.rope_scaling is None


def test_linear_rope_scaling_spellings_agree():
    old = {"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 4.0}}
    new = {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}}
    a = LlamaConfig.from_hf_config({**BASE, "model_type": "llama", **old})
    b = LlamaConfig.from_hf_config({**BASE, "model_type": "llama", **new})
    assert a == b
    assert a.rope_scaling.rope_type == "linear" and a.rope_scaling.factor == 4.0


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="rope_parameters is transformers 5's")
def test_legacy_rope_keys_win_over_rope_parameters_as_in_transformers():
    """A hand-edited config.json with both spellings, disagreeing: transformers reads
    rope_theta and rope_scaling."""
    keys = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 7e4}}
    want = transformers.LlamaConfig(**BASE, **keys).rope_parameters
    config = LlamaConfig.from_hf_config({**BASE, "model_type": "llama", **keys})
    assert (config.rope_theta, config.rope_scaling.factor) == (want["rope_theta"], want["factor"])


def test_llama_ignores_a_sliding_window_key_as_transformers_does():
    """transformers' Llama attention reads no window; one in config.json must not narrow it."""
    config = LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "sliding_window": 4})
    assert config.sliding_window is None


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4.x rejects this config")
def test_llama3_without_original_max_position_embeddings_follows_transformers():
    scaling = {k: v for k, v in LLAMA3_FIELDS.items() if k != "original_max_position_embeddings"}
    hf = {**BASE, "model_type": "llama",
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    # transformers fills in the missing field in place, so it gets a copy
    hf_kwargs = copy.deepcopy({k: v for k, v in hf.items() if k != "model_type"})
    hf_original = transformers.LlamaConfig(**hf_kwargs).rope_parameters[
        "original_max_position_embeddings"]
    assert hf_original == BASE["max_position_embeddings"]
    try:
        config = LlamaConfig.from_hf_config(hf)
    except ValueError as e:  # refusing the config is as good as matching transformers
        assert "original_max_position_embeddings" in str(e)
        return
    assert config.rope_scaling.original_max_position_embeddings == hf_original


# ----------------------------------------------------------------- to_hf_config is loss-free
# Switch combinations that LlamaConfig accepts but no transformers model type can express.
# to_hf_config must refuse them rather than write a config.json that silently drops the switch.
INEXPRESSIBLE = {  # id: (LlamaConfig changes, the switch an error must name)
    "mistral_with_qkv_bias": (dict(model_type="mistral", qkv_bias=True), "qkv_bias"),
    "mistral_with_mlp_bias": (dict(model_type="mistral", mlp_bias=True), "mlp_bias"),
    "qwen2_without_qkv_bias": (dict(model_type="qwen2"), "qkv_bias"),
    "llama_qkv_bias_without_o_bias": (dict(model_type="llama", qkv_bias=True), "o_bias"),
    "llama_with_sliding_window": (dict(model_type="llama", sliding_window=16), "sliding_window"),
}


@pytest.mark.parametrize("changes,switch", list(INEXPRESSIBLE.values()), ids=list(INEXPRESSIBLE))
def test_inexpressible_switches_are_refused_not_dropped(changes, switch):
    """Refusing (at construction or in to_hf_config) or a loss-free round trip are both fine."""
    try:
        config = LlamaConfig(**BASE, **changes)
        hf = config.to_hf_config()
    except ValueError as e:
        assert switch in str(e)
        return
    assert LlamaConfig.from_hf_config(hf) == config


# ----------------------------------------------------------------- validation
def test_heads_not_a_multiple_of_kv_heads_is_rejected():
    with pytest.raises(ValueError, match=r"num_attention_heads must be a multiple of "
                                         r"num_key_value_heads; got 6 and 4"):
        LlamaConfig(**{**BASE, "num_attention_heads": 6, "num_key_value_heads": 4}, head_dim=16)
    with pytest.raises(ValueError, match=r"multiple of num_key_value_heads"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "num_attention_heads": 4,
                                    "num_key_value_heads": 3})


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope", "su"])
def test_unsupported_rope_type_is_rejected_naming_the_key_read(rope_type):
    message = rf"^config.json: {{}} type '{rope_type}' is not supported; expected one of"
    with pytest.raises(ValueError, match=message.format("rope_parameters")):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama",
                                    "rope_parameters": {"rope_type": rope_type, "rope_theta": 1e4,
                                                        "factor": 2.0}})
    with pytest.raises(ValueError, match=message.format("rope_scaling")):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "rope_theta": 1e4,
                                    "rope_scaling": {"type": rope_type, "factor": 2.0}})


@pytest.mark.parametrize("factor", [0.0, -2.0])
def test_non_positive_rope_factor_is_rejected(factor):
    with pytest.raises(ValueError, match=rf"factor must be a finite number > 0; got {factor}"):
        RopeScaling(rope_type="linear", factor=factor)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_hidden_act_other_than_silu_is_rejected(act):
    with pytest.raises(ValueError, match=rf"hidden_act must be 'silu'.*'{act}'"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "hidden_act": act})


def test_unsupported_model_type_is_rejected():
    with pytest.raises(ValueError, match=r"model_type must be one of .*'gemma'"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "gemma"})
    with pytest.raises(ValueError, match=r"model_type must be one of .*'gpt2'"):
        LlamaConfig(**BASE, model_type="gpt2")


def test_missing_required_fields_are_listed():
    hf = {k: v for k, v in BASE.items() if k not in ("hidden_size", "num_hidden_layers")}
    with pytest.raises(ValueError, match=r"missing required field.*hidden_size.*num_hidden_layers"):
        LlamaConfig.from_hf_config({**hf, "model_type": "llama"})


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("hidden_size", -64), ("num_hidden_layers", 2.0),
    ("num_key_value_heads", True), ("max_position_embeddings", None),
])
def test_non_positive_integer_sizes_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer; got {value!r}"):
        LlamaConfig(**{**BASE, field: value})


@pytest.mark.parametrize("window", [0, -4])
def test_non_positive_sliding_window_is_rejected(window):
    with pytest.raises(ValueError, match=rf"sliding_window must be a positive int or None; "
                                         rf"got {window}"):
        LlamaConfig(**BASE, model_type="mistral", sliding_window=window)


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_unsupported_dtype_is_rejected(field):
    with pytest.raises(ValueError, match=rf"{field} must be one of .*'float16'"):
        LlamaConfig(**BASE, **{field: "float16"})
    with pytest.raises(ValueError, match=r"dtype must be one of .*'int8'"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama"}, dtype="int8")


def test_every_backend_the_attention_kernels_take_is_accepted():
    # the model passes attention_backend to flash, paged and ragged attention alike
    from kernels_pallas.attention import BACKENDS, checks
    assert "pallas_tpu" in BACKENDS
    assert set(BACKENDS) <= set(checks.FLASH_BACKENDS)
    for backend in BACKENDS:
        checks.check_scalars(False, None, None, False, backend)  # paged and ragged: BACKENDS
        checks.check_scalars(False, None, None, False, backend, backends=checks.FLASH_BACKENDS)
        assert LlamaConfig(**BASE, attention_backend=backend).attention_backend == backend
    with pytest.raises(ValueError, match=r"attention_backend must be one of .*got 'triton'"):
        LlamaConfig(**BASE, attention_backend="triton")


def test_public_api_exports_config_types():
    assert jaxinfer.LlamaConfig is LlamaConfig and jaxinfer.RopeScaling is RopeScaling


# ----------------------------------------------------------------- head_dim
def test_odd_head_dim_is_rejected_naming_where_it_came_from():
    """Rotary embeddings rotate pairs of channels; an odd head_dim used to fail inside RoPE with
    a broadcast error."""
    with pytest.raises(ValueError, match=r"^head_dim must be even \(rotary embeddings rotate "
                                         r"pairs\); got head_dim=7$"):
        LlamaConfig(**BASE, head_dim=7)
    derived = (r"^head_dim must be even \(rotary embeddings rotate pairs\); got head_dim=9 "
               r"\(hidden_size 18 // num_attention_heads 2\)$")
    with pytest.raises(ValueError, match=derived):
        LlamaConfig(**{**BASE, "hidden_size": 18, "num_attention_heads": 2,
                       "num_key_value_heads": 1})
    with pytest.raises(ValueError, match=derived):
        MixtralConfig(**{**BASE, "hidden_size": 18, "num_attention_heads": 2,
                         "num_key_value_heads": 1})
    with pytest.raises(ValueError, match=r"config.json: head_dim must be even.*head_dim=9"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "hidden_size": 18,
                                    "num_attention_heads": 2, "num_key_value_heads": 1})


def test_hidden_size_not_a_multiple_of_heads_needs_an_explicit_head_dim():
    """transformers' LlamaConfig refuses this shape; its Mistral/Qwen2 floor hidden / heads
    silently. Here it is refused unless head_dim says what the heads are."""
    shape = {**BASE, "num_attention_heads": 6, "num_key_value_heads": 2}  # 64 / 6
    with pytest.raises(ValueError, match=r"hidden_size must be a multiple of num_attention_heads "
                                         r"when head_dim is not given; got hidden_size 64 and "
                                         r"num_attention_heads 6"):
        LlamaConfig(**shape)
    with pytest.raises(ValueError, match=r"config.json: hidden_size must be a multiple"):
        LlamaConfig.from_hf_config({**shape, "model_type": "mistral"})
    assert LlamaConfig(**shape, head_dim=10).head_dim == 10


# ----------------------------------------------------------------- numeric fields
BAD_LLAMA_VALUES = [  # (field, value): the error must name the field
    ("rms_norm_eps", 0.0), ("rms_norm_eps", -1.0), ("rms_norm_eps", math.nan),
    ("rms_norm_eps", math.inf), ("rms_norm_eps", "1e-6"), ("rms_norm_eps", True),
    ("rope_theta", 0.0), ("rope_theta", -5.0), ("rope_theta", math.nan), ("rope_theta", math.inf),
    ("rope_theta", "10000"), ("rope_theta", None),
    ("sliding_window", 2.5),
    ("sliding_window", "4"), ("sliding_window", True),
    ("bos_token_id", -3), ("bos_token_id", 128), ("bos_token_id", "1"), ("bos_token_id", 1.0),
    ("bos_token_id", True),
    ("eos_token_id", "13"), ("eos_token_id", 999), ("eos_token_id", 128), ("eos_token_id", -1),
    ("eos_token_id", 13.0), ("eos_token_id", (13.0,)), ("eos_token_id", [2, "3"]),
    ("eos_token_id", (2, 128)), ("eos_token_id", True), ("eos_token_id", {2}),
    ("tie_word_embeddings", "no"), ("tie_word_embeddings", 1), ("tie_word_embeddings", None),
    ("qkv_bias", "yes"), ("o_bias", 0), ("mlp_bias", "false"),
    ("rope_scaling", 2.0), ("rope_scaling", "linear"),
]


@pytest.mark.parametrize("field,value", BAD_LLAMA_VALUES,
                         ids=[f"{f}={v!r}" for f, v in BAD_LLAMA_VALUES])
def test_bad_field_values_are_rejected_naming_the_field(field, value):
    """Each of these used to be stored and to fail later (NaN outputs, a string token id in the
    engine, "no" tying the embeddings) or to fail with an error that did not name the field."""
    with pytest.raises((ValueError, TypeError), match=rf"^{field} must be"):
        LlamaConfig(**BASE, model_type="mistral", **{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("rms_norm_eps", -1.0, r"rms_norm_eps must be a finite number > 0; got -1.0"),
    ("rope_theta", "10000", r"rope_theta must be a finite number > 0; got '10000'"),
    ("sliding_window", 2.5, r"sliding_window must be a positive int or None; got 2.5"),
    ("eos_token_id", 999, r"eos_token_id must be a token id \(an int in \[0, vocab_size 128\)\)"),
    ("tie_word_embeddings", "no", r"tie_word_embeddings must be a bool; got 'no'"),
])
def test_bad_field_errors_say_what_was_expected_and_got(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LlamaConfig(**BASE, model_type="mistral", **{field: value})


BAD_ROPE_SCALING = [  # (RopeScaling arguments, the field an error must name)
    (dict(rope_type="linear", factor=math.nan), "factor"),
    (dict(rope_type="linear", factor=math.inf), "factor"),
    (dict(rope_type="linear", factor="2"), "factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=math.nan), "low_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, high_freq_factor=math.inf), "high_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0),
     "high_freq_factor must be > low_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=0),
     "original_max_position_embeddings"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=8.5),
     "original_max_position_embeddings"),
]


@pytest.mark.parametrize("kwargs,field", BAD_ROPE_SCALING,
                         ids=[f"{k['rope_type']}-{f}-{list(k.values())[-1]!r}"
                              for k, f in BAD_ROPE_SCALING])
def test_bad_rope_scaling_values_are_rejected_naming_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=rf"^rope_scaling {field}"):
        RopeScaling(**kwargs)


def test_nan_rope_factor_error_says_finite():
    with pytest.raises(ValueError, match=r"rope_scaling factor must be a finite number > 0; "
                                         r"got nan"):
        RopeScaling(rope_type="linear", factor=math.nan)


@pytest.mark.parametrize("key,value,field", [
    ("rope_theta", "x", "rope_theta"),
    ("rms_norm_eps", "x", "rms_norm_eps"),
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("attention_bias", "false", "qkv_bias"),
    ("mlp_bias", "true", "mlp_bias"),
    ("eos_token_id", "2", "eos_token_id"),
    ("bos_token_id", 128, "bos_token_id"),
    ("rope_scaling", {"rope_type": "linear", "factor": math.nan}, "rope_scaling factor"),
    ("rope_parameters", {"rope_type": "linear", "factor": math.nan}, "rope_parameters factor"),
])
def test_bad_config_json_values_are_named_with_the_file(key, value, field):
    with pytest.raises((ValueError, TypeError), match=rf"^config.json: {field} must be"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama", key: value})


def test_mixtral_config_json_values_are_checked():
    hf = {**BASE, "model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 1}
    with pytest.raises((ValueError, TypeError),
                       match=r"^config.json: output_router_logits must be a bool; "
                                        r"got 'false'"):
        MixtralConfig.from_hf_config({**hf, "output_router_logits": "false"})
    with pytest.raises((ValueError, TypeError), match=r"^config.json: rope_theta must be"):
        MixtralConfig.from_hf_config({**hf, "rope_theta": "1e6"})
    with pytest.raises(ValueError, match=r"capacity_factor must be a finite number > 0"):
        MixtralConfig.from_hf_config(hf, capacity_factor=math.inf)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    """Configs built from numpy values equal (and hash like) those built from Python ones, and
    still write a JSON config.json."""
    plain = LlamaConfig(**BASE, model_type="mistral", rms_norm_eps=1e-5, rope_theta=1e6,
                        sliding_window=32, bos_token_id=1, eos_token_id=(2, 3),
                        tie_word_embeddings=True,
                        rope_scaling=RopeScaling(rope_type="linear", factor=2.0))
    numpy = LlamaConfig(**{k: np.int64(v) for k, v in BASE.items()}, model_type="mistral",
                        rms_norm_eps=np.float64(1e-5), rope_theta=np.float32(1e6),
                        sliding_window=np.int32(32), bos_token_id=np.int64(1),
                        eos_token_id=[np.int64(2), np.int32(3)],
                        tie_word_embeddings=np.bool_(True),
                        rope_scaling=RopeScaling(rope_type="linear", factor=np.float64(2.0)))
    assert numpy == plain and hash(numpy) == hash(plain)
    assert type(numpy.hidden_size) is int and type(numpy.rope_theta) is float
    assert all(type(i) is int for i in numpy.eos_token_id)
    json.dumps(numpy.to_hf_config())


# ----------------------------------------------------------------- rope_scaling as a dict
def test_rope_scaling_dict_becomes_rope_scaling():
    """An HF-style dict used to be stored as is and fail in rope.py with AttributeError."""
    want = LlamaConfig(**BASE, rope_scaling=RopeScaling(rope_type="linear", factor=2.0))
    for spelling in ({"rope_type": "linear", "factor": 2.0}, {"type": "linear", "factor": 2.0}):
        config = LlamaConfig(**BASE, rope_scaling=spelling)
        assert config == want and hash(config) == hash(want)
        assert isinstance(config.rope_scaling, RopeScaling)
    llama3 = LlamaConfig(**BASE, rope_scaling={"rope_type": "llama3", **LLAMA3_FIELDS})
    assert llama3.rope_scaling == LLAMA3


SCALED = {name: config for name, config in CONFIGS.items() if config.rope_scaling is not None}


@pytest.mark.parametrize("config", list(SCALED.values()), ids=list(SCALED))
def test_config_round_trips_through_dataclasses_asdict(config):
    """asdict turns rope_scaling into a dict; building the config from that dict gives it back."""
    again = LlamaConfig(**dataclasses.asdict(config))
    assert again == config and hash(again) == hash(config)


def test_rope_scaling_dict_with_unknown_keys_is_rejected():
    with pytest.raises(ValueError, match=r"rope_scaling has unknown key\(s\) \['rope_theta'\]"):
        LlamaConfig(**BASE, rope_scaling={"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"rope_scaling factor must be a finite number > 0"):
        LlamaConfig(**BASE, rope_scaling={"rope_type": "linear", "factor": math.nan})


# ----------------------------------------------------------------- Hyena
HYENA = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             max_position_embeddings=16)
BAD_HYENA_VALUES = [
    ("filter_squash", math.nan), ("filter_squash", math.inf), ("filter_squash", "0"),
    ("filter_sine_freq", math.nan), ("filter_sine_freq", math.inf), ("filter_sine_freq", "x"),
    ("filter_decay_slow", math.inf), ("filter_decay_slow", math.nan),
    ("filter_decay_target", "0.5"), ("rms_norm_eps", -1.0), ("rms_norm_eps", math.nan),
    ("filter_inner_layers", True), ("tie_word_embeddings", "no"),
    ("bos_token_id", -1), ("eos_token_id", "2"), ("eos_token_id", 32), ("eos_token_id", (2.0,)),
]


@pytest.mark.parametrize("field,value", BAD_HYENA_VALUES,
                         ids=[f"{f}={v!r}" for f, v in BAD_HYENA_VALUES])
def test_bad_hyena_field_values_are_rejected_naming_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=rf"^{field}"):
        HyenaConfig(**HYENA, **{field: value})


def test_hyena_config_json_errors_name_the_file():
    hf = {**HYENA, "model_type": "hyena", "filter_squash": "0.1"}
    with pytest.raises(TypeError, match=r"^config.json: filter_squash must be a finite number"):
        HyenaConfig.from_hf_config(hf)
