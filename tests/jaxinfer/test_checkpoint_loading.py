"""How `load_pretrained` reads what a Hugging Face directory says, with transformers 5.x's
`from_pretrained` (PyTorch, CPU, float32, tiny random models) as the oracle: the RoPE keys of
config.json and their precedence, rope configs transformers refuses, tie_word_embeddings against
the tensors the checkpoint holds, hidden_act's alias "swish"; and the errors of a malformed
safetensors index.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jaxinfer  # noqa: E402
from jaxinfer.config_rope import ROPE_TYPE_FIELDS  # noqa: E402

if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the oracle's rules are transformers 5's", allow_module_level=True)

# float32 on both sides with "highest" matmul precision (conftest); only the summation order
# differs between torch and XLA, which moves O(1) logits by ~1e-6.
LOGITS_ATOL = 1e-4
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            # HF's default 0.02 gives near-uniform attention, which would hide rope mistakes
            initializer_range=0.2)
MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
IDS = np.random.default_rng(0).integers(3, BASE["vocab_size"], (2, 24)).astype(np.int32)


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def build_hf(config_class: str, seed: int = 0, **changes):
    """A tiny random HF model whose norm weights are perturbed (they start at 1)."""
    extra = MIXTRAL if config_class == "MixtralConfig" else {}
    config = getattr(transformers, config_class)(**{**BASE, **extra, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_load(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(IDS).long()).logits.float().numpy()


def jx_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)))


def rewrite_tensors(directory, change) -> None:
    path = directory / "model.safetensors"
    tensors = safetensors_numpy.load_file(path)
    change(tensors)
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})


def edit_config_json(directory, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------- RoPE keys of config.json
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A Llama saved by transformers (rope_parameters: default type, theta 1e4)."""
    directory = tmp_path_factory.mktemp("llama")
    build_hf("LlamaConfig").save_pretrained(directory, safe_serialization=True)
    return directory


LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
ROPE_EDITS = {  # id: the edit of config.json; transformers decides what it means
    "top_level_theta_beside_rope_parameters": lambda c: c.update(rope_theta=500.0),
    "legacy_scaling_with_type_key_replaces_rope_parameters":
        lambda c: c.update(rope_scaling={"type": "linear", "factor": 4.0}),
    "legacy_scaling_takes_theta_from_top_level":
        lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0),
    "legacy_scaling_keeps_its_own_theta":
        lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 300.0},
                           rope_theta=500.0),
    "rope_type_key_wins_over_type_key":
        lambda c: c.update(rope_scaling={"rope_type": "linear", "type": "llama3", "factor": 4.0}),
    "legacy_scaling_without_a_type_is_default":
        lambda c: c.update(rope_scaling={"factor": 2.0}),
    "llama3_top_level_original_max_position_embeddings_wins":
        lambda c: c.update(rope_parameters={**LLAMA3, "rope_theta": 1e4,
                                            "original_max_position_embeddings": 64},
                           original_max_position_embeddings=16),
    "llama3_top_level_original_max_position_embeddings_alone":
        lambda c: c.update(rope_parameters={**LLAMA3, "rope_theta": 1e4},
                           original_max_position_embeddings=16),
    "llama3_without_original_max_position_embeddings":
        lambda c: c.update(rope_parameters={**LLAMA3, "rope_theta": 1e4}),
    "linear_ignores_keys_only_llama3_reads": lambda c: c.update(rope_scaling={
        "type": "linear", "factor": 2.0, "original_max_position_embeddings": None,
        "low_freq_factor": None}),
    # transformers refuses these: a key its rope type requires is missing
    "linear_without_factor":
        lambda c: c.update(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}),
    "llama3_without_factor": lambda c: c.update(rope_parameters={
        **{k: v for k, v in LLAMA3.items() if k != "factor"},
        "rope_theta": 1e4, "original_max_position_embeddings": 16}),
    "llama3_without_low_and_high_freq_factors": lambda c: c.update(rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4,
        "original_max_position_embeddings": 16}),
    "legacy_linear_without_factor": lambda c: c.update(rope_scaling={"type": "linear"}),
}


@pytest.mark.parametrize("edit", list(ROPE_EDITS.values()), ids=list(ROPE_EDITS))
def test_rope_keys_mean_what_they_mean_to_transformers(llama_dir, tmp_path, edit):
    """The same rope theta, type and fields as the model transformers builds, and its logits; or,
    where transformers refuses the config, a ValueError naming config.json and the keys it
    misses."""
    directory = shutil.copytree(llama_dir, tmp_path / "ckpt")
    edit_config_json(directory, edit)
    try:
        hf_model = hf_load(directory)
    except KeyError as e:  # "Missing required keys in `rope_parameters` for ...: {'factor'}"
        missing = re.findall(r"'(\w+)'", str(e).rsplit(":", 1)[-1])
        assert missing
        with pytest.raises(ValueError, match=r"^config.json: .*missing required key") as excinfo:
            jaxinfer.load_pretrained(directory)
        assert all(key in str(excinfo.value) for key in missing)
        return
    model = jaxinfer.load_pretrained(directory)
    want = hf_model.config.rope_parameters
    assert model.config.rope_theta == want["rope_theta"]
    scaling = model.config.rope_scaling
    assert (scaling.rope_type if scaling else "default") == want["rope_type"]
    for field in ROPE_TYPE_FIELDS[want["rope_type"]]:  # what the type reads; the rest is inert
        if scaling is not None and field in want:
            assert getattr(scaling, field) == want[field], field
    np.testing.assert_allclose(jx_logits(model), hf_logits(hf_model), rtol=0, atol=LOGITS_ATOL)


# ----------------------------------------------------------------- hidden_act
def test_swish_activation_loads_as_silu_like_transformers(tmp_path):
    hf_model = build_hf("LlamaConfig", hidden_act="swish")
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = jaxinfer.load_pretrained(tmp_path)
    np.testing.assert_allclose(jx_logits(model), hf_logits(hf_model), rtol=0, atol=LOGITS_ATOL)
    # written back under its canonical name, which reads back as the same config
    hf = model.config.to_hf_config()
    assert hf["hidden_act"] == "silu"
    assert jaxinfer.LlamaConfig.from_hf_config(hf) == model.config


# ----------------------------------------------------------------- tie_word_embeddings
@pytest.mark.parametrize("config_class", ["LlamaConfig", "MixtralConfig"])
def test_tied_config_with_a_different_lm_head_loads_untied_as_transformers_does(
        tmp_path, caplog, config_class):
    """transformers warns, does not tie, and uses the checkpoint's lm_head."""
    build_hf(config_class, tie_word_embeddings=True).save_pretrained(tmp_path,
                                                                    safe_serialization=True)
    rng = np.random.default_rng(1)
    rewrite_tensors(tmp_path, lambda t: t.update({"lm_head.weight": rng.normal(
        size=t["model.embed_tokens.weight"].shape).astype(np.float32)}))
    hf_model = hf_load(tmp_path)
    assert hf_model.lm_head.weight.data_ptr() != hf_model.model.embed_tokens.weight.data_ptr()
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        model = jaxinfer.load_pretrained(tmp_path)
    assert model.config.tie_word_embeddings is False
    assert "model.embed_tokens.weight" in caplog.text and "lm_head.weight" in caplog.text
    np.testing.assert_allclose(jx_logits(model), hf_logits(hf_model), rtol=0, atol=LOGITS_ATOL)


def test_tied_config_with_an_equal_lm_head_copy_stays_tied(tmp_path, caplog):
    """What a torch .bin export or another writer may store: both names, one matrix."""
    hf_model = build_hf("LlamaConfig", tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    rewrite_tensors(tmp_path, lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        model = jaxinfer.load_pretrained(tmp_path)
    assert model.config.tie_word_embeddings is True and model.lm_head is None
    assert "lm_head" not in caplog.text  # neither "untied" nor "ignoring"
    np.testing.assert_allclose(jx_logits(model), hf_logits(hf_load(tmp_path)), rtol=0,
                               atol=LOGITS_ATOL)


def test_tied_checkpoint_holding_only_lm_head_loads_as_in_transformers(tmp_path):
    """transformers ties symmetrically: without embed_tokens, the shared matrix comes from
    lm_head.weight."""
    hf_model = build_hf("LlamaConfig", tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    rewrite_tensors(tmp_path, lambda t: t.update(
        {"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    model = jaxinfer.load_pretrained(tmp_path)
    assert model.config.tie_word_embeddings is True
    want = hf_logits(hf_load(tmp_path))
    np.testing.assert_allclose(want, hf_logits(hf_model), rtol=0, atol=LOGITS_ATOL)  # premise
    np.testing.assert_allclose(jx_logits(model), want, rtol=0, atol=LOGITS_ATOL)


# ----------------------------------------------------------------- malformed index
@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    config = jaxinfer.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("sharded")
    jaxinfer.save_pretrained(jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0)), directory,
                             max_shard_bytes=20_000)
    return directory


MALFORMED_INDEX = {  # id: (change of the index's JSON, what the error must say)
    "index_is_a_list": (lambda index: [1, 2], r"expected a JSON object.*got list"),
    "weight_map_is_a_list": (
        lambda index: {**index, "weight_map": list(index["weight_map"].items())},
        r"weight_map must be an object.*got list"),
    "weight_map_value_not_a_string": (
        lambda index: {**index, "weight_map": {k: 3 for k in index["weight_map"]}},
        r"weight_map must map each tensor name to a shard file name \(a string\).*: 3"),
    "no_weight_map": (lambda index: {"metadata": {}}, r"no 'weight_map'"),
}


@pytest.mark.parametrize("change,message", list(MALFORMED_INDEX.values()),
                         ids=list(MALFORMED_INDEX))
def test_malformed_index_raises_value_error_naming_the_file(sharded_dir, tmp_path, change,
                                                            message):
    directory = shutil.copytree(sharded_dir, tmp_path / "ckpt")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps(change(json.loads(index.read_text()))))
    with pytest.raises(ValueError, match=re.escape(str(index)) + ".*" + message):
        jaxinfer.load_pretrained(directory)
