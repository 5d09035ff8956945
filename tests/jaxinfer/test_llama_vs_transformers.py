"""jaxinfer's Llama-family decoder against Hugging Face transformers (PyTorch, CPU) as the oracle.

Each case builds a tiny random HF model, perturbs the parameters HF initializes to constants (biases
to zero, norm weights to one) so that a bug in bias or norm handling shows, saves it as safetensors,
and checks that jaxinfer loads it into a model with the same logits and the same greedy
continuation, and that jaxinfer's export loads back into transformers with the same logits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxinfer  # noqa: E402
from kernels_pallas.attention import DEFAULT_BLOCK_SIZES, BlockSizes  # noqa: E402
from jaxinfer.models.rope import inverse_frequencies  # noqa: E402

# float32 on both sides with "highest" matmul precision (conftest); only the summation order
# differs between torch and XLA, which moves O(1) logits by ~1e-6.
LOGITS_ATOL = 1e-4
# bfloat16 keeps 8 mantissa bits (relative step 2**-8 ~ 0.4%); rounding weights and every activation
# over 2 layers moved logits spanning +-7 by at most 0.21 and by 0.03 on average (measured); a wrong
# cast, tensor or norm moves them by O(1), far beyond both bounds.
BF16_LOGITS_ATOL = 0.5
BF16_LOGITS_MEAN_ATOL = 0.08
# A change that matters (rope scaling, sliding window) must move the logits far beyond the
# float32 noise, or the corresponding case would not test anything.
MIN_MEANINGFUL_LOGIT_CHANGE = 100 * LOGITS_ATOL

BATCH = 2
PROMPT_LEN = 24
NEW_TOKENS = 8
# HF's default initializer_range (0.02) gives near-uniform attention, which would hide mistakes in
# rope, masking and head grouping; 0.2 makes attention scores and logits O(1).
INITIALIZER_RANGE = 0.2


@dataclasses.dataclass(frozen=True)
class Case:
    model_type: str
    vocab_size: int = 160
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    rope_scaling: dict | None = None
    rope_theta: float = 10000.0
    head_dim: int = 16  # 4 heads x 16 = hidden 64; other values set head_dim explicitly
    max_position_embeddings: int = 128


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 and theta 1e4 the wavelengths run from 2*pi to ~2e4, so against an
    # original context of 32 some frequencies are kept (wavelength < 8), one is blended and the
    # rest are divided by `factor`: all three branches of the llama3 rule are exercised.
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama_tied_mha": Case("llama", vocab_size=128, num_key_value_heads=4, tie_word_embeddings=True),
    "llama_untied_gqa2": Case("llama", vocab_size=200),
    "llama3_rope_scaling": Case("llama", vocab_size=144, rope_scaling=LLAMA3_SCALING),
    "llama_linear_rope_scaling": Case("llama", vocab_size=112,
                                      rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # 8 query heads over a single KV head (multi-query attention)
    "llama_attention_bias_mlp_bias_gqa8": Case("llama", vocab_size=300, num_attention_heads=8,
                                               num_key_value_heads=1, attention_bias=True,
                                               mlp_bias=True),
    # Window 5 against 24 + 8 positions: most queries see only part of their causal prefix.
    "mistral_sliding_window": Case("mistral", vocab_size=176, sliding_window=5),
    "qwen2_qkv_bias_gqa4": Case("qwen2", vocab_size=192, num_attention_heads=4,
                                num_key_value_heads=1),
    # use_sliding_window with max_window_layers 0: every layer has the window
    "qwen2_sliding_window_every_layer": Case("qwen2", vocab_size=136, sliding_window=5),
    # head_dim set apart from hidden_size / num_attention_heads: heads narrower than the hidden
    # size as in Mistral Nemo (32 x 128 = 4096 < 5120; here 4 x 8 = 32 < 64), and wider ones
    "mistral_nemo_narrow_head_dim": Case("mistral", vocab_size=152, head_dim=8,
                                         sliding_window=5),
    "qwen2_wide_head_dim": Case("qwen2", vocab_size=208, head_dim=32),
}

HF_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
}


def _rope_kwargs(case: Case) -> dict:
    """RoPE settings in the spelling of the installed transformers (5.x: rope_parameters)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": case.rope_theta,
                                    **(case.rope_scaling or {})}}
    return {"rope_theta": case.rope_theta, "rope_scaling": case.rope_scaling}


def hf_config_for(case: Case):
    kwargs = dict(
        vocab_size=case.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=case.num_attention_heads, num_key_value_heads=case.num_key_value_heads,
        head_dim=case.head_dim, max_position_embeddings=case.max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=INITIALIZER_RANGE, tie_word_embeddings=case.tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, **_rope_kwargs(case),
    )
    if case.model_type == "llama":
        kwargs.update(attention_bias=case.attention_bias, mlp_bias=case.mlp_bias)
    if case.model_type == "mistral":
        kwargs.update(sliding_window=case.sliding_window)
    if case.model_type == "qwen2":
        kwargs.update(use_sliding_window=case.sliding_window is not None,
                      sliding_window=case.sliding_window, max_window_layers=0)
    return getattr(transformers, HF_CONFIG_CLASSES[case.model_type])(**kwargs)


def perturb_constant_initialized(hf_model, seed: int) -> None:
    """Random biases and norm weights: HF initializes them to 0 and 1, which hides their bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))


def build_hf_model(case: Case, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config_for(case), attn_implementation="eager").eval()
    perturb_constant_initialized(model, seed + 1)
    # generate exactly NEW_TOKENS tokens: no EOS stop, and no EOS suppression by min_new_tokens
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids).long()).logits.float().numpy()


def jx_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def prompt_ids(vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@dataclasses.dataclass
class Built:
    case: Case
    hf_model: object
    hf_dir: Path
    model: object
    ids: np.ndarray
    expected_logits: np.ndarray


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def built(request, tmp_path_factory) -> Built:
    case = CASES[request.param]
    hf_model = build_hf_model(case)
    hf_dir = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    ids = prompt_ids(case.vocab_size)
    return Built(case, hf_model, hf_dir, jaxinfer.load_pretrained(hf_dir), ids,
                 hf_logits(hf_model, ids))


def test_perturbed_parameters_are_not_constant(built):
    """Guards the premise of the suite: no bias is all-zero and no norm weight all-one."""
    for name, p in built.hf_model.named_parameters():
        if name.endswith(".bias"):
            assert p.abs().max() > 0.1, name
        elif "norm" in name:
            assert (p - 1).abs().max() > 0.1, name


def test_loaded_config_matches_hf_architecture(built):
    c, case = built.model.config, built.case
    assert c.model_type == case.model_type
    assert c.vocab_size == case.vocab_size
    assert c.num_attention_heads == case.num_attention_heads
    assert c.num_key_value_heads == case.num_key_value_heads
    assert c.head_dim == case.head_dim
    assert c.tie_word_embeddings == case.tie_word_embeddings
    assert c.sliding_window == case.sliding_window
    assert c.qkv_bias == (case.attention_bias or case.model_type == "qwen2")
    assert c.o_bias == case.attention_bias
    assert c.mlp_bias == case.mlp_bias
    assert (built.model.lm_head is None) == case.tie_word_embeddings


def test_logits_match_transformers(built):
    got = jx_logits(built.model, built.ids)
    assert got.shape == (BATCH, PROMPT_LEN, built.case.vocab_size)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, built.expected_logits, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_logits_match_transformers_with_every_attention_backend(built, backend):
    """The uncached forward runs kernels_pallas.flash_attention; pallas runs in interpret mode here."""
    model = jaxinfer.load_pretrained(built.hf_dir, attention_backend=backend)
    np.testing.assert_allclose(jx_logits(model, built.ids), built.expected_logits,
                               rtol=0, atol=LOGITS_ATOL)


def test_greedy_generation_matches_transformers(built):
    got = np.asarray(jaxinfer.generate(built.model, jnp.asarray(built.ids), max_new_tokens=NEW_TOKENS,
                                       temperature=0.0))
    with torch.no_grad():
        ids = torch.from_numpy(built.ids).long()
        want = built.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS).numpy()
    assert want.shape == (BATCH, PROMPT_LEN + NEW_TOKENS)
    np.testing.assert_array_equal(got, want)


def test_exported_checkpoint_loads_in_transformers_with_same_logits(built, tmp_path):
    jaxinfer.save_pretrained(built.model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(reloaded) is type(built.hf_model)
    np.testing.assert_allclose(hf_logits(reloaded, built.ids), built.expected_logits,
                               rtol=0, atol=LOGITS_ATOL)


# ----------------------------------------------------------------- the cases are not vacuous
def _load_with_config_change(hf_dir: Path, tmp_path: Path, change) -> object:
    """jaxinfer model from hf_dir's weights with config.json edited by `change(dict)`."""
    for file in hf_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return jaxinfer.load_pretrained(tmp_path)


def test_llama3_rope_scaling_changes_frequencies_and_logits(tmp_path):
    case = CASES["llama3_rope_scaling"]
    hf_model = build_hf_model(case)
    hf_model.save_pretrained(tmp_path / "scaled", safe_serialization=True)
    scaled = jaxinfer.load_pretrained(tmp_path / "scaled")
    assert scaled.config.rope_scaling is not None
    assert scaled.config.rope_scaling.rope_type == "llama3"

    unscaled_freq = inverse_frequencies(scaled.config.replace(rope_scaling=None))
    scaled_freq = inverse_frequencies(scaled.config)
    ratio = unscaled_freq / scaled_freq
    # all three regimes of the llama3 rule: kept, blended, divided by factor
    assert np.isclose(ratio, 1.0).any()
    assert np.isclose(ratio, LLAMA3_SCALING["factor"]).any()
    assert ((ratio > 1.01) & (ratio < LLAMA3_SCALING["factor"] - 0.01)).any()

    # and they agree with transformers' own llama3 frequencies
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_model.config, "cpu")
    np.testing.assert_allclose(scaled_freq, hf_freq.numpy(), rtol=1e-6)

    (tmp_path / "unscaled").mkdir()
    unscaled = _load_with_config_change(
        tmp_path / "scaled", tmp_path / "unscaled",
        lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": case.rope_theta},
                           rope_scaling=None))
    assert unscaled.config.rope_scaling is None
    ids = prompt_ids(case.vocab_size)
    change = np.abs(jx_logits(scaled, ids) - jx_logits(unscaled, ids)).max()
    assert change > MIN_MEANINGFUL_LOGIT_CHANGE


def test_sliding_window_changes_logits(tmp_path):
    case = CASES["mistral_sliding_window"]
    assert case.sliding_window < PROMPT_LEN
    hf_model = build_hf_model(case)
    hf_model.save_pretrained(tmp_path / "windowed", safe_serialization=True)
    windowed = jaxinfer.load_pretrained(tmp_path / "windowed")
    (tmp_path / "full").mkdir()
    full = _load_with_config_change(tmp_path / "windowed", tmp_path / "full",
                                    lambda c: c.update(sliding_window=None))
    assert full.config.sliding_window is None
    ids = prompt_ids(case.vocab_size)
    windowed_logits, full_logits = jx_logits(windowed, ids), jx_logits(full, ids)
    # positions inside the first window see the same keys either way
    np.testing.assert_allclose(windowed_logits[:, :case.sliding_window],
                               full_logits[:, :case.sliding_window], rtol=0, atol=LOGITS_ATOL)
    assert np.abs(windowed_logits - full_logits).max() > MIN_MEANINGFUL_LOGIT_CHANGE


# ----------------------------------------------------------------- windows over many tiles
# flash_attention tiles queries and keys; a sliding window leaves some key tiles wholly out of a
# query tile's reach (skipped), some in part (masked) and some whole. The 24-token cases above fit
# in one tile. Here 300 tokens under window 37 over 64 x 32 tiles (set in place of the 512 x 512
# xla and 128 x 64 pallas defaults, so that a sequence a CPU scores quickly spans 5 query and 10
# key tiles); neither 300 nor 37 is a multiple of a tile, so the last tiles are ragged too.
# LOGITS_ATOL holds: the online softmax over tiles moved logits by at most 1.4e-5 (measured).
LONG_LEN = 300
LONG_WINDOW = 37
LONG_TILES = BlockSizes(block_q=64, block_k=32, block_q_bwd=64, block_k_bwd=32)
LONG_CASES = {
    "mistral": Case("mistral", vocab_size=120, sliding_window=LONG_WINDOW,
                    max_position_embeddings=512),
    "qwen2": Case("qwen2", vocab_size=104, sliding_window=LONG_WINDOW,
                  max_position_embeddings=512),
}


@pytest.fixture(scope="module", params=list(LONG_CASES), ids=list(LONG_CASES))
def long_window(request, tmp_path_factory):
    """(checkpoint dir, ids [1, LONG_LEN], transformers' logits) of a windowed model."""
    case = LONG_CASES[request.param]
    hf_model = build_hf_model(case, seed=5)
    hf_dir = tmp_path_factory.mktemp(f"long_{request.param}")
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    ids = np.random.default_rng(5).integers(0, case.vocab_size, (1, LONG_LEN)).astype(np.int32)
    return hf_dir, ids, hf_logits(hf_model, ids)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_sliding_window_over_many_attention_tiles_matches_transformers(long_window, backend,
                                                                       monkeypatch):
    hf_dir, ids, expected = long_window
    for table_entry in ("xla", "pallas_gpu"):  # "pallas" on a CPU interprets the GPU kernel
        assert table_entry in DEFAULT_BLOCK_SIZES
        monkeypatch.setitem(DEFAULT_BLOCK_SIZES, table_entry, LONG_TILES)
    assert LONG_LEN > 4 * LONG_TILES.block_q and LONG_WINDOW > LONG_TILES.block_k
    model = jaxinfer.load_pretrained(hf_dir, attention_backend=backend)
    assert model.config.sliding_window == LONG_WINDOW
    np.testing.assert_allclose(jx_logits(model, ids), expected, rtol=0, atol=LOGITS_ATOL)


# ----------------------------------------------------------------- sharding and dtypes
SHARD_CASE = "llama_untied_gqa2"


@pytest.fixture(scope="module")
def shard_source(tmp_path_factory):
    case = CASES[SHARD_CASE]
    hf_model = build_hf_model(case, seed=3)
    hf_dir = tmp_path_factory.mktemp("shard_source")
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    ids = prompt_ids(case.vocab_size, seed=3)
    return hf_model, hf_dir, ids, hf_logits(hf_model, ids)


@pytest.mark.parametrize("generation", [{"eos_token_id": [2, 7]}, {"eos_token_id": 7},
                                        {"eos_token_id": None}, {"do_sample": False}])
def test_stop_tokens_are_those_transformers_generate_stops_on(shard_source, tmp_path,
                                                             generation):
    """generation_config.json's eos_token_id, where it names one, replaces config.json's (2)."""
    _, hf_dir, _, _ = shard_source
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    named = transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id
    want = json.loads((hf_dir / "config.json").read_text())["eos_token_id"] if named is None \
        else named
    assert jaxinfer.load_pretrained(tmp_path).config.eos_token_id == tuple(np.atleast_1d(want))


def test_malformed_generation_config_stop_tokens_are_refused(shard_source, tmp_path):
    _, hf_dir, _, _ = shard_source
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    for eos in ("</s>", [2, 10**6]):  # not an id; an id past the vocabulary
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a "
                                             "token id"):
            jaxinfer.load_pretrained(tmp_path)


def test_jaxinfer_sharded_save_loads_in_jaxinfer_and_transformers(shard_source, tmp_path):
    hf_model, hf_dir, ids, expected = shard_source
    model = jaxinfer.load_pretrained(hf_dir)
    # the largest tensor (lm_head / embeddings, 200 x 64 float32) is 51 KB
    jaxinfer.save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shard_files
    assert set(index["weight_map"]) == set(hf_model.state_dict())

    np.testing.assert_allclose(jx_logits(jaxinfer.load_pretrained(tmp_path), ids), expected,
                               rtol=0, atol=LOGITS_ATOL)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), expected, rtol=0, atol=LOGITS_ATOL)


def test_transformers_sharded_save_loads_in_jaxinfer(shard_source, tmp_path):
    hf_model, _, ids, expected = shard_source
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    np.testing.assert_allclose(jx_logits(jaxinfer.load_pretrained(tmp_path), ids), expected,
                               rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("stale_index", [True, False], ids=["stale_index", "both_complete"])
def test_single_file_wins_over_index_as_in_transformers(shard_source, tmp_path, caplog,
                                                        stale_index):
    """A directory holding model.safetensors and an index loads model.safetensors, as in
    transformers: whether the index is stale (transformers' single-file save over a sharded one
    deletes the shards and keeps the index) or a complete second copy of other weights."""
    hf_a, _, ids, _ = shard_source
    hf_b = build_hf_model(CASES[SHARD_CASE], seed=4)
    hf_a.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    if stale_index:
        hf_b.save_pretrained(tmp_path, safe_serialization=True)
        assert not list(tmp_path.glob("model-*.safetensors"))
    else:
        hf_b.save_pretrained(tmp_path / "b", safe_serialization=True)
        shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    want = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval(), ids)
    np.testing.assert_allclose(want, hf_logits(hf_b, ids), rtol=0, atol=LOGITS_ATOL)
    with caplog.at_level(logging.WARNING, logger="jaxinfer.checkpoint"):
        model = jaxinfer.load_pretrained(tmp_path)
    np.testing.assert_allclose(jx_logits(model, ids), want, rtol=0, atol=LOGITS_ATOL)
    assert "has both model.safetensors and model.safetensors.index.json" in caplog.text


def test_bfloat16_load_gives_finite_logits_close_to_float32(shard_source):
    _, hf_dir, ids, expected = shard_source
    model = jaxinfer.load_pretrained(hf_dir, dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.config.param_dtype == "bfloat16"
    assert model.lm_head.kernel[...].dtype == jnp.bfloat16
    assert model.layers[0].input_layernorm.weight[...].dtype == jnp.bfloat16
    got = jx_logits(model, ids)
    assert got.dtype == np.float32  # logits are float32 whatever the compute dtype
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=BF16_LOGITS_ATOL)
    assert np.abs(got - expected).mean() < BF16_LOGITS_MEAN_ATOL
    # the bf16 model is still the same function: greedy next tokens mostly agree with float32
    agree = (got.argmax(-1) == expected.argmax(-1)).mean()
    assert agree > 0.9


def test_bfloat16_checkpoint_loads_as_float32(shard_source, tmp_path):
    """A bf16 checkpoint on disk upcasts exactly on load (bf16 values are exact in float32)."""
    _, _, ids, _ = shard_source
    hf_bf16 = build_hf_model(CASES[SHARD_CASE], seed=3).to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path, safe_serialization=True)
    model = jaxinfer.load_pretrained(tmp_path, dtype="float32")
    assert model.lm_head.kernel[...].dtype == jnp.float32
    want = hf_bf16.lm_head.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), want)
    # the oracle reloads in float32 rather than calling .float() on hf_bf16, whose rotary
    # inv_freq buffer was rounded to bfloat16 by .to() and would stay rounded
    hf_f32 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    np.testing.assert_allclose(jx_logits(model, ids), hf_logits(hf_f32, ids),
                               rtol=0, atol=LOGITS_ATOL)
