"""LlamaConfig: HF config.json interop (transformers 4.x and 5.x spellings) and validation."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

import jaxinfer
from jaxinfer import LlamaConfig, RopeScaling
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
    rope_theta, rms_norm_eps or the bos/eos token ids means what transformers' config class for its model type assumes
    (Mistral's 4096 window, 8 KV heads, ...)."""
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
        LlamaConfig(**{**BASE, "num_attention_heads": 6, "num_key_value_heads": 4})
    with pytest.raises(ValueError, match=r"multiple of num_key_value_heads"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "num_attention_heads": 4,
                                    "num_key_value_heads": 3})


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope", "su"])
def test_unsupported_rope_type_is_rejected(rope_type):
    message = rf"^config.json: rope_scaling type '{rope_type}' is not supported; expected one of"
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama",
                                    "rope_parameters": {"rope_type": rope_type, "rope_theta": 1e4,
                                                        "factor": 2.0}})
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama", "rope_theta": 1e4,
                                    "rope_scaling": {"type": rope_type, "factor": 2.0}})


@pytest.mark.parametrize("factor", [0.0, -2.0])
def test_non_positive_rope_factor_is_rejected(factor):
    with pytest.raises(ValueError, match=rf"factor must be positive; got {factor}"):
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
    with pytest.raises(ValueError, match=rf"sliding_window must be positive or None; got {window}"):
        LlamaConfig(**BASE, model_type="mistral", sliding_window=window)


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_unsupported_dtype_is_rejected(field):
    with pytest.raises(ValueError, match=rf"{field} must be one of .*'float16'"):
        LlamaConfig(**BASE, **{field: "float16"})
    with pytest.raises(ValueError, match=r"dtype must be one of .*'int8'"):
        LlamaConfig.from_hf_config({**BASE, "model_type": "llama"}, dtype="int8")


def test_public_api_exports_config_types():
    assert jaxinfer.LlamaConfig is LlamaConfig and jaxinfer.RopeScaling is RopeScaling
