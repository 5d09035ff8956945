"""HF GPTQ checkpoints: save_pretrained writes AutoGPTQ's layout, load_pretrained reads it back
(and reads a checkpoint the test builds from the format description), unsupported ones fail clearly.

Layout expected by AutoGPTQ / transformers (research brief "Checkpoint format"), per quantized
linear module with K = in_features, N = out_features, b = bits, G = group_size (-1 -> K):
qweight int32 [K*b/32, N] (bit stream along K, LSB first), qzeros int32 [K/G, N*b/32] (along N;
v1 "gptq" stores zero - 1), scales float16 [K/G, N], g_idx int32 [K]; no ``<module>.weight``.
"""

import json
import logging
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxinfer
from jaxinfer.checkpoint.gptq_config import GPTQConfig, GPTQLayerSpec, gptq_config_for
from jaxinfer.models.layers import Linear
from jaxinfer.quant import QuantizedLinear
from tests.jaxinfer.quant.test_gptq_format import _stream_pack  # the independent packer

CONFIG = jaxinfer.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GROUP = 32
# Re-running the same dequantized weights with rows stored in another within-group order (load
# re-derives the act-order permutation from g_idx) only reorders float32 sums.
LOGIT_ATOL = 1e-5


def _module(model, dotted):
    layer, parent, name = dotted.split(".")
    return getattr(getattr(model.layers[int(layer)], parent), name)


def _ids():
    return jnp.asarray(np.random.default_rng(3).integers(0, 16, (2, 24)), jnp.int32)


@nnx.jit
def _logits(m, ids):
    return m(ids)


def _with_fp16_scales(model):
    """A copy whose QuantizedLinear scales are rounded to float16, as the checkpoint stores them."""
    out = nnx.clone(model)
    for _, node in nnx.iter_graph(out):
        if isinstance(node, QuantizedLinear):
            node.scales.value = node.scales.value.astype(jnp.float16)
    return out


@pytest.fixture(scope="module")
def model():
    return jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def rtn4(model):
    return jaxinfer.quantize(model, method="rtn", bits=4, group_size=GROUP)


@pytest.fixture(scope="module")
def gptq_act_order(model):
    calibration = jnp.asarray(np.random.default_rng(1).integers(0, 16, (4, 32)), jnp.int32)
    return jaxinfer.quantize(model, method="gptq", bits=4, group_size=GROUP, act_order=True,
                             calibration=calibration)


def _assert_round_trip(quantized, tmp_path, **save_kw):
    jaxinfer.save_pretrained(quantized, tmp_path, **save_kw)
    loaded = jaxinfer.load_pretrained(tmp_path)
    expected = _with_fp16_scales(quantized)
    for i in range(CONFIG.num_hidden_layers):
        for name in LINEARS:
            got, want = _module(loaded, f"{i}.{name}"), _module(expected, f"{i}.{name}")
            assert isinstance(got, QuantizedLinear), name
            assert (got.bits, got.group_size) == (want.bits, want.group_size), name
            np.testing.assert_array_equal(np.asarray(got.weight.dequantize()),
                                          np.asarray(want.weight.dequantize()), err_msg=name)
    ids = _ids()
    np.testing.assert_allclose(np.asarray(_logits(loaded, ids)),
                               np.asarray(_logits(expected, ids)), rtol=0, atol=LOGIT_ATOL)
    return loaded


@pytest.mark.slow
def test_gptq_act_order_model_round_trips_through_hf_checkpoint(gptq_act_order, tmp_path):
    loaded = _assert_round_trip(gptq_act_order, tmp_path)
    assert _module(loaded, "0.self_attn.q_proj").perm is not None  # act-order survived
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["sym"] is True


@pytest.mark.parametrize("bits, sym, checkpoint_format",
                         [(2, True, "gptq"), (3, False, "gptq_v2"),
                          pytest.param(8, True, "gptq", marks=pytest.mark.slow)])
def test_rtn_model_round_trips_through_hf_checkpoint(model, tmp_path, bits, sym,
                                                     checkpoint_format):
    quantized = jaxinfer.quantize(model, method="rtn", bits=bits, group_size=GROUP, sym=sym)
    _assert_round_trip(quantized, tmp_path, checkpoint_format=checkpoint_format)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["sym"], qc["format"]) == (bits, sym, checkpoint_format)


def test_saved_tensors_have_autogptq_names_shapes_and_dtypes(rtn4, tmp_path):
    jaxinfer.save_pretrained(rtn4, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    b = 4
    for i in range(CONFIG.num_hidden_layers):
        for name in LINEARS:
            module = f"model.layers.{i}.{name}"
            k, n = _module(rtn4, f"{i}.{name}").shape
            groups = k // GROUP
            assert f"{module}.weight" not in tensors
            expect = {"qweight": ((k * b // 32, n), np.int32),
                      "qzeros": ((groups, n * b // 32), np.int32),
                      "scales": ((groups, n), np.float16), "g_idx": ((k,), np.int32)}
            for t, (shape, dtype) in expect.items():
                x = tensors[f"{module}.{t}"]
                assert (x.shape, x.dtype) == (shape, dtype), (module, t, x.shape, x.dtype)
            # Symmetric 4-bit in v1: every stored zero is 8 - 1, i.e. words 0x77777777.
            assert np.all(tensors[f"{module}.qzeros"].view(np.uint32) == 0x77777777)
            g_idx = tensors[f"{module}.g_idx"]
            np.testing.assert_array_equal(np.bincount(g_idx), np.full(groups, GROUP))
    assert "model.embed_tokens.weight" in tensors and "model.norm.weight" in tensors
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "checkpoint_format": "gptq"}
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == qc


def _hand_built_checkpoint(model, tmp_path, bits, excluded):
    """Save ``model`` as float, then swap each linear module (except ``excluded``, kept float by
    a "-:" dynamic rule) for random v1 GPTQ tensors with a desc_act g_idx. Returns
    {module: dequantized weight [K, N]} per the format's formula."""
    jaxinfer.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    rng = np.random.default_rng(5)
    weights = {}
    for i in range(CONFIG.num_hidden_layers):
        for name in LINEARS:
            module = f"model.layers.{i}.{name}"
            if module == excluded:
                continue
            n, k = tensors.pop(f"{module}.weight").shape  # HF stores [out, in]
            groups = k // GROUP
            q = rng.integers(0, 2 ** bits, (k, n))
            z = rng.integers(1, 2 ** bits, (groups, n))
            scales = rng.uniform(0.002, 0.02, (groups, n)).astype(np.float16)
            g_idx = (np.arange(k) // GROUP)[rng.permutation(k)].astype(np.int32)
            tensors.update({f"{module}.qweight": _stream_pack(q, bits),
                            f"{module}.qzeros": np.ascontiguousarray(
                                _stream_pack((z - 1).T, bits).T),
                            f"{module}.scales": scales, f"{module}.g_idx": g_idx})
            weights[module] = scales.astype(np.float32)[g_idx] * (q - z[g_idx])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": True,
        "sym": False, "checkpoint_format": "gptq",
        "dynamic": {"-:" + excluded.replace(".", r"\."): {}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return weights


@pytest.mark.parametrize("bits", [pytest.param(3, marks=pytest.mark.slow), 4])
def test_hand_built_gptq_checkpoint_loads_and_matches_dequantized_float_model(model, tmp_path,
                                                                              bits):
    excluded = "model.layers.1.mlp.down_proj"
    weights = _hand_built_checkpoint(model, tmp_path, bits, excluded)
    loaded = jaxinfer.load_pretrained(tmp_path)
    dense = nnx.clone(model)
    for module, w in weights.items():
        dotted = module.removeprefix("model.layers.")
        layer = _module(loaded, dotted)
        assert isinstance(layer, QuantizedLinear) and layer.bits == bits
        np.testing.assert_allclose(np.asarray(layer.weight.dequantize()), w, rtol=1e-6,
                                   atol=1e-7, err_msg=module)
        _module(dense, dotted).kernel.value = jnp.asarray(w)
    assert isinstance(_module(loaded, excluded.removeprefix("model.layers.")), Linear)
    ids = _ids()
    np.testing.assert_allclose(np.asarray(_logits(loaded, ids)),
                               np.asarray(_logits(dense, ids)), rtol=0, atol=LOGIT_ATOL)


def test_mixed_per_layer_bits_round_trip_with_dynamic_overrides(model, rtn4, tmp_path):
    mixed = nnx.clone(rtn4)
    two_bit = jaxinfer.quantize(model, method="rtn", bits=2, group_size=-1)
    for dotted in ("0.mlp.down_proj", "1.self_attn.v_proj"):
        layer, parent, name = dotted.split(".")
        setattr(getattr(mixed.layers[int(layer)], parent), name, _module(two_bit, dotted))
    jaxinfer.save_pretrained(mixed, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (4, GROUP)
    assert qc["dynamic"] == {r"+:model\.layers\.0\.mlp\.down_proj$": {"bits": 2, "group_size": -1},
                             r"+:model\.layers\.1\.self_attn\.v_proj$": {"bits": 2,
                                                                         "group_size": -1}}
    loaded = _assert_round_trip(mixed, tmp_path / "again")
    assert _module(loaded, "0.mlp.down_proj").bits == 2
    assert _module(loaded, "0.mlp.up_proj").bits == 4


def _partly_quantized_checkpoint(rtn4, path, kept):
    """rtn4 saved with every linear module but those named in ``kept`` (names inside a block)
    stored as a float ``weight`` (its dequantized value, float16 scales as saved) instead of GPTQ
    tensors, as transformers saves a model quantized with ``modules_in_block_to_quantize``.
    Returns the checkpoint as saved, loaded (every module quantized)."""
    jaxinfer.save_pretrained(rtn4, path)
    full = jaxinfer.load_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    for i in range(CONFIG.num_hidden_layers):
        for name in set(LINEARS) - set(kept):
            module = f"model.layers.{i}.{name}"
            for t in ("qweight", "qzeros", "scales", "g_idx"):
                del tensors[f"{module}.{t}"]
            w = np.asarray(_module(full, f"{i}.{name}").weight.dequantize())  # [in, out]
            # HF's [out, in]; safetensors.numpy writes a transposed view's raw buffer, so copy
            tensors[f"{module}.weight"] = np.ascontiguousarray(w.T)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return full


@pytest.mark.parametrize("declared", [True, False])
def test_partly_quantized_checkpoint_loads_float_modules_and_round_trips(rtn4, tmp_path, caplog,
                                                                         declared):
    kept = ("self_attn.q_proj", "mlp.down_proj")
    full = _partly_quantized_checkpoint(rtn4, tmp_path, kept)
    if declared:  # transformers' key; without it, float weights where qweight is absent load too
        _edit_config(tmp_path, modules_in_block_to_quantize=[[kept[0]], [kept[1]]])
    with caplog.at_level(logging.WARNING, logger="jaxinfer.checkpoint"):
        loaded = jaxinfer.load_pretrained(tmp_path)
    assert ("stores as float weights" in caplog.text) is not declared
    for i in range(CONFIG.num_hidden_layers):
        for name in LINEARS:
            want = QuantizedLinear if name in kept else Linear
            assert type(_module(loaded, f"{i}.{name}")) is want, name
    ids = _ids()
    np.testing.assert_allclose(np.asarray(_logits(loaded, ids)), np.asarray(_logits(full, ids)),
                               rtol=0, atol=LOGIT_ATOL)
    # Saved again, each float module gets a "-:" rule (GPTQModel's dynamic; vLLM matches these
    # against its fused qkv_proj / gate_up_proj, AutoGPTQ reads none) and, as every block keeps
    # the same modules float, modules_in_block_to_quantize (transformers / optimum).
    jaxinfer.save_pretrained(loaded, tmp_path / "again")
    qc = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"][r"-:model\.layers\.1\.mlp\.up_proj$"] == {}
    [written] = qc["modules_in_block_to_quantize"]  # one group, in the model's module order
    assert sorted(written) == sorted(kept)
    again = jaxinfer.load_pretrained(tmp_path / "again")
    assert type(_module(again, "1.mlp.up_proj")) is Linear
    np.testing.assert_array_equal(np.asarray(_logits(again, ids)), np.asarray(_logits(loaded, ids)))


def test_dynamic_overrides_ignore_quantize_time_keys_and_null_desc_act_is_false():
    # GPTQModel records its quantize-time settings in per-module overrides; they do not change
    # how tensors decode. transformers may write desc_act: null.
    config = GPTQConfig.from_dict({"bits": 4, "group_size": 128, "desc_act": None, "dynamic": {
        r"+:.*down_proj": {"bits": 8, "damp_percent": 0.05, "mse": 2.4, "static_groups": True,
                           "v2": True, "v2_alpha": 0.25, "act_group_aware": True,
                           "desc_act": None},
        r"-:.*\.1\..*": {"damp_percent": 0.1}}})
    assert config.desc_act is False
    assert config.layer_spec("model.layers.0.mlp.down_proj") == GPTQLayerSpec(
        bits=8, group_size=128, desc_act=False, sym=True)
    assert config.layer_spec("model.layers.1.mlp.up_proj") is None
    assert config.dynamic == {r"+:.*down_proj": {"bits": 8, "desc_act": False},
                              r"-:.*\.1\..*": {}}


def test_unknown_dynamic_override_key_is_ignored_with_a_warning(caplog):
    # A typo of a decoding key ("group_szie") must not pass silently; GPTQModel's known
    # quantize-time keys and a pack_dtype of int32 (the packing read here) do.
    quiet = {"damp_percent": 0.05, "damp_auto_increment": 0.01, "true_sequential": True,
             "v2_memory_device": "auto", "gptaq": None, "fail_safe": True, "pack_dtype": "int32"}
    with caplog.at_level(logging.WARNING, logger="jaxinfer.checkpoint.gptq_config"):
        GPTQConfig.from_dict({"bits": 4, "group_size": 128, "dynamic": {r"+:.*q_proj": quiet}})
        assert not caplog.records
        config = GPTQConfig.from_dict({"bits": 4, "group_size": 128, "dynamic": {
            r"+:.*down_proj": {"bits": 8, "group_szie": 32, "mse": 2.4},
            r"+:.*up_proj": {"group_szie": 32}}})
    [record] = caplog.records  # one warning per load, however many rules carry the key
    assert record.levelno == logging.WARNING
    assert ("dynamic: ignoring unknown per-module key(s) ['group_szie'] (in 2 rule(s), e.g. "
            "'+:.*down_proj')") in record.getMessage()
    assert config.layer_spec("model.layers.0.mlp.down_proj").group_size == 128


@pytest.mark.parametrize("changes, match", [
    (dict(dynamic={"+:.*": {"adapter": {"name": "lora", "rank": 8}}}),
     r"per-module \['adapter'\] would change how the module decodes"),
    (dict(dynamic={"+:.*": {"format": "gptq_v2"}}), r"per-module \['format'\]"),
    (dict(dynamic={"+:.*": {"pack_dtype": "int16"}}), r"per-module \['pack_dtype'\]"),
    (dict(modules_in_block_to_quantize="self_attn.q_proj"),
     "modules_in_block_to_quantize must be a list of lists of module names"),
])
def test_gptq_config_refuses_what_would_change_decoding(changes, match):
    with pytest.raises(ValueError, match=match):
        GPTQConfig.from_dict({"bits": 4, "group_size": 128, **changes})


def test_gptq_config_group_size_takes_numpy_ints_and_refuses_bools():
    config = GPTQConfig.from_dict({"bits": np.int32(4), "group_size": np.int64(64),
                                   "dynamic": {"+:.*up_proj": {"group_size": np.int64(32)}}})
    assert config.layer_spec("model.layers.0.mlp.up_proj").group_size == 32
    assert json.loads(json.dumps(config.to_dict()))["group_size"] == 64  # stored as Python ints
    for group_size in (True, 0, 32.0):
        with pytest.raises(ValueError, match=rf"group_size must be a positive int or -1 "
                                             rf"\(per channel\); got {group_size!r}"):
            GPTQConfig.from_dict({"bits": 4, "group_size": group_size})


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    (dict(bits=5), r"bits must be one of \(2, 3, 4, 8\); got 5"),
    (dict(quant_method="awq"), "quant_method 'awq' is not supported"),
    (dict(checkpoint_format="marlin", format="marlin"), "checkpoint format must be one of"),
    (dict(format="gptq_v2"), "format and checkpoint_format disagree"),
    (dict(bits=2), r"qweight' has shape \[(8|16), 64\]; bits=2, group_size=32 and the layer's "
                   r"\[in=(64|128), out=64\] imply \[(4|8), 64\]"),
    (dict(group_size=48), "group_size=48 does not divide in_features=(64|128)"),
    (dict(dynamic={"+:(": {"bits": 4}}), "not a valid regular expression"),
])
def test_unsupported_or_inconsistent_gptq_config_raises_clearly(rtn4, tmp_path, changes, match):
    jaxinfer.save_pretrained(rtn4, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        jaxinfer.load_pretrained(tmp_path)


def test_missing_gptq_tensor_is_named(rtn4, tmp_path):
    jaxinfer.save_pretrained(rtn4, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj"
                                         r"\.qzeros'\]"):
        jaxinfer.load_pretrained(tmp_path)


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


UP = "model.layers.0.mlp.up_proj"  # [in=64, out=128]; HF's float weight is [out, in]


def test_module_missing_only_qweight_raises_even_beside_a_float_weight(rtn4, tmp_path):
    # Its qzeros, scales and g_idx say it was quantized: a stray float weight must not load
    # in its place.
    jaxinfer.save_pretrained(rtn4, tmp_path)

    def edit(tensors):
        del tensors[f"{UP}.qweight"]
        tensors[f"{UP}.weight"] = np.zeros((128, 64), np.float32)

    _edit_tensors(tmp_path, edit)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.layers\.0\.mlp\.up_proj"
                                         r"\.qweight'\] .*holds \['model\.layers\.0\.mlp\.up_proj"
                                         r"\.qzeros'"):
        jaxinfer.load_pretrained(tmp_path)


@pytest.mark.parametrize("changes, named", [
    (dict(modules_in_block_to_quantize=[["self_attn.q_proj", "mlp.up_proj"]]),
     "modules_in_block_to_quantize entry 'mlp.up_proj'"),
    (dict(dynamic={r"-:.*\.1\.mlp\.up_proj": {}, "+:.*up_proj": {"bits": 4}}),
     "dynamic rule '+:.*up_proj'"),
    (dict(dynamic={"model.layers.0.mlp.up_proj": {"bits": 4}}),  # no prefix: "+:"
     "dynamic rule 'model.layers.0.mlp.up_proj'"),
])
def test_float_module_the_config_names_as_quantized_raises(rtn4, tmp_path, changes, named):
    # Only a module the config quantizes by default may fall back to a float weight.
    jaxinfer.save_pretrained(rtn4, tmp_path)

    def edit(tensors):
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            del tensors[f"{UP}.{t}"]
        tensors[f"{UP}.weight"] = np.zeros((128, 64), np.float32)

    _edit_tensors(tmp_path, edit)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=re.escape(f"names {UP} as quantized ({named}) but the "
                                                   f"checkpoint stores it as a float weight")):
        jaxinfer.load_pretrained(tmp_path)


def test_a_rule_of_quantize_time_settings_alone_names_no_module_as_quantized():
    # {".*": {"damp_percent": ...}} says how GPTQModel quantized, not which modules it did
    config = GPTQConfig.from_dict({"bits": 4, "group_size": 128, "dynamic": {
        ".*": {"damp_percent": 0.1}, "+:.*down_proj": {"bits": 8}}})
    assert config.names_as_quantized(UP) is None
    assert config.layer_spec(UP) is not None  # still quantized by default
    assert config.names_as_quantized("model.layers.0.mlp.down_proj") is None  # ".*" decides it
    named = GPTQConfig.from_dict({"bits": 4, "group_size": 128,
                                  "dynamic": {"+:.*down_proj": {"bits": 8}}})
    assert named.names_as_quantized("model.layers.0.mlp.down_proj") == (
        "dynamic rule '+:.*down_proj'")


def test_modules_in_block_to_quantize_is_written_only_when_every_block_agrees(rtn4):
    weights = {f"model.layers.{i}.{name}": _module(rtn4, f"{i}.{name}").weight
               for i in range(CONFIG.num_hidden_layers) for name in LINEARS}
    assert gptq_config_for(weights, "gptq").modules_in_block_to_quantize is None  # all quantized
    same = [f"model.layers.{i}.mlp.up_proj" for i in range(CONFIG.num_hidden_layers)]
    kept = {k: w for k, w in weights.items() if k not in same}
    config = gptq_config_for(kept, "gptq", same)
    assert config.modules_in_block_to_quantize == tuple(n for n in LINEARS if n != "mlp.up_proj")
    assert config.to_dict()["modules_in_block_to_quantize"] == [
        list(config.modules_in_block_to_quantize)]
    differ = {k: w for k, w in weights.items() if k != same[0]}
    assert gptq_config_for(differ, "gptq", same[:1]).modules_in_block_to_quantize is None


def test_v1_checkpoint_cannot_hold_zero_point_zero(model, tmp_path):
    quantized = jaxinfer.quantize(model, method="rtn", bits=2, group_size=GROUP, sym=False)
    zeros = _module(quantized, "0.mlp.up_proj").zeros  # an all-positive group would get zero 0
    zeros.value = zeros.value.at[0, 0].set(0)
    with pytest.raises(ValueError, match="cannot represent a zero point of 0"):
        jaxinfer.save_pretrained(quantized, tmp_path, checkpoint_format="gptq")
    jaxinfer.save_pretrained(quantized, tmp_path)  # the default falls back to v2
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "gptq_v2"


def test_quantize_config_json_alone_marks_a_gptq_checkpoint(rtn4, tmp_path):
    """AutoGPTQ's layout: quantize_config.json beside a config.json without quantization_config."""
    jaxinfer.save_pretrained(rtn4, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = jaxinfer.load_pretrained(tmp_path)
    assert _module(loaded, "1.mlp.gate_proj").bits == 4
    # Saving a float model over it removes the now stale quantize_config.json.
    jaxinfer.save_pretrained(jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(1)), tmp_path)
    assert not (tmp_path / "quantize_config.json").exists()
    assert isinstance(_module(jaxinfer.load_pretrained(tmp_path), "1.mlp.gate_proj"), Linear)


def _as_autogptq_dir(rtn4, path, base, sharded=False):
    """AutoGPTQ's own layout: config.json without quantization_config, quantize_config.json
    (with model_file_base_name = base unless base is None) and the weights as <base>.safetensors
    (or, sharded, the index as <base>.safetensors.index.json); returns the weights' name."""
    jaxinfer.save_pretrained(rtn4, path, max_shard_bytes=40_000 if sharded else None)
    config = json.loads((path / "config.json").read_text())
    qconfig = config.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(config))
    if base is not None:
        qconfig["model_file_base_name"] = base
    (path / "quantize_config.json").write_text(json.dumps(qconfig))
    name = base or f"gptq_model-4bit-{GROUP}g"
    if sharded:
        (path / "model.safetensors.index.json").rename(path / f"{name}.safetensors.index.json")
    else:
        (path / "model.safetensors").rename(path / f"{name}.safetensors")
    return name


@pytest.mark.parametrize("base, sharded", [("gptq_model-4bit-32g", False), ("my_weights", True),
                                           (None, False)])
def test_autogptq_model_file_base_name_names_the_weight_file(rtn4, tmp_path, base, sharded):
    """quantize_config.json's model_file_base_name names <base>.safetensors (or its index);
    without it, AutoGPTQ's default gptq_model-<bits>bit-<group_size>g."""
    _as_autogptq_dir(rtn4, tmp_path, base, sharded)
    loaded = jaxinfer.load_pretrained(tmp_path)
    want = _with_fp16_scales(rtn4)
    got, ref = _module(loaded, "1.mlp.gate_proj"), _module(want, "1.mlp.gate_proj")
    np.testing.assert_array_equal(np.asarray(got.weight.dequantize()),
                                  np.asarray(ref.weight.dequantize()))


def test_missing_weights_error_names_every_file_looked_for(rtn4, tmp_path):
    name = _as_autogptq_dir(rtn4, tmp_path, "gptq_model-4bit-32g")
    (tmp_path / f"{name}.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as info:
        jaxinfer.load_pretrained(tmp_path)
    for file in ("model.safetensors", "model.safetensors.index.json",
                 "gptq_model-4bit-32g.safetensors", "gptq_model-4bit-32g.safetensors.index.json"):
        assert file in str(info.value)


def test_bad_model_file_base_name_raises_naming_the_field(rtn4, tmp_path):
    _as_autogptq_dir(rtn4, tmp_path, "w")
    qconfig = json.loads((tmp_path / "quantize_config.json").read_text())
    qconfig["model_file_base_name"] = 7
    (tmp_path / "quantize_config.json").write_text(json.dumps(qconfig))
    with pytest.raises(ValueError, match="model_file_base_name must be a file name"):
        jaxinfer.load_pretrained(tmp_path)


def _assert_loads_rtn4(rtn4, path):
    loaded = jaxinfer.load_pretrained(path)
    got = _module(loaded, "1.mlp.gate_proj")
    ref = _module(_with_fp16_scales(rtn4), "1.mlp.gate_proj")
    np.testing.assert_array_equal(np.asarray(got.weight.dequantize()),
                                  np.asarray(ref.weight.dequantize()))


def test_quantize_config_base_name_is_read_when_config_json_quantization_config_lacks_it(
        rtn4, tmp_path):
    """transformers and optimum write config.json's quantization_config without
    model_file_base_name; AutoGPTQ keeps it in quantize_config.json, and so reads my_weights."""
    _as_autogptq_dir(rtn4, tmp_path, "my_weights")
    qconfig = json.loads((tmp_path / "quantize_config.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {k: v for k, v in qconfig.items()
                                     if k != "model_file_base_name"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_loads_rtn4(rtn4, tmp_path)


@pytest.mark.parametrize("base", ["../outside", 7])
def test_bad_model_file_base_name_does_not_refuse_model_safetensors(rtn4, tmp_path, base):
    """The base name is only checked where it is read: model.safetensors comes first."""
    jaxinfer.save_pretrained(rtn4, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["model_file_base_name"] = base
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_loads_rtn4(rtn4, tmp_path)


@pytest.mark.parametrize("damage", ["not json", "not utf-8", "a directory"])
def test_an_unreadable_quantize_config_beside_model_safetensors_is_ignored_with_a_warning(
        rtn4, tmp_path, caplog, damage):
    """config.json's quantization_config is the one read; quantize_config.json could only name
    the weights file, so a damaged one is a warning, not a failed load."""
    jaxinfer.save_pretrained(rtn4, tmp_path)
    file = tmp_path / "quantize_config.json"
    if file.exists():
        file.unlink()
    if damage == "a directory":
        file.mkdir()
    else:
        file.write_bytes(b"{bits: 4" if damage == "not json" else b"\xff\xfe{}")
    with caplog.at_level(logging.WARNING, logger="jaxinfer.checkpoint"):
        _assert_loads_rtn4(rtn4, tmp_path)
    assert "quantize_config.json cannot be read as JSON" in caplog.text


def test_model_safetensors_beside_autogptq_weights_warns_naming_the_file_loaded(
        rtn4, tmp_path, caplog):
    """model.safetensors wins, as in transformers, but AutoGPTQ would load my_weights: say so."""
    _as_autogptq_dir(rtn4, tmp_path, "my_weights")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "my_weights.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING, logger="jaxinfer.checkpoint"):
        _assert_loads_rtn4(rtn4, tmp_path)
    assert re.search(r"both model\.safetensors and AutoGPTQ's my_weights\.safetensors.*"
                     r"loading model\.safetensors", caplog.text)
