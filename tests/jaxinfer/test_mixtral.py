"""jaxinfer's Mixtral (sparse MoE decoder) against transformers' MixtralForCausalLM (PyTorch, CPU,
float32, tiny random config) as the oracle: logits, router logits, the load-balancing loss,
greedy generation, checkpoint conversion both ways (per-expert and fused layouts), and the refusal
of quantized or non-float checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jaxinfer  # noqa: E402
from jaxinfer.checkpoint.hf_mixtral import load_mixtral  # noqa: E402
from jaxinfer.models.mixtral import MixtralForCausalLM, apply_expert_placement  # noqa: E402
from jaxinfer.models.mixtral_config import MixtralConfig  # noqa: E402
from jaxinfer.models.moe import (dropless_moe, load_balancing_loss,  # noqa: E402
                                 router_z_loss, swiglu_experts)
from jaxinfer.train.step import training_loss  # noqa: E402

# float32 both sides, "highest" matmul precision (conftest): only summation order differs
# (torch's per-expert index_add vs a grouped matmul + weighted sum), ~1e-6 on O(1) logits.
LOGITS_ATOL = 1e-4
ROUTER_ATOL = 1e-5  # router logits are one layer deeper than the input: less accumulated drift
AUX_LOSS_RTOL = 1e-5  # a ratio of float32 sums over a few dozen tokens
# HF's default initializer_range (0.02) makes the router near-uniform and logits tiny, which would
# hide routing mistakes; 0.2 gives O(1) router logits with clear top-k margins.
INITIALIZER_RANGE = 0.2
VOCAB, BATCH, SEQ, NEW_TOKENS = 96, 2, 12, 4
NUM_EXPERTS, TOP_K = 4, 2


def hf_config(**changes):
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if int(transformers.__version__.split(".")[0]) < 5:
        rope = {"rope_theta": 10000.0}
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, rms_norm_eps=1e-5,
        initializer_range=INITIALIZER_RANGE, bos_token_id=1, eos_token_id=2, **rope)
    return transformers.MixtralConfig(**{**kwargs, **changes})


def build_hf_model(seed: int = 0, **changes):
    """A tiny random HF Mixtral whose norm weights are perturbed (they start at 1, which would
    hide norm mistakes)."""
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        hf_config(**changes), attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return hf_model


@nnx.jit
def _forward(model: MixtralForCausalLM, ids: jax.Array):
    """Jitted forward_with_routing: one compile instead of op-by-op dispatch (faster on CPU)."""
    logits, _, routing = model.forward_with_routing(ids)
    return logits, routing


def forward(model: MixtralForCausalLM, ids: np.ndarray):
    logits, routing = _forward(model, jnp.asarray(ids))
    return np.asarray(logits), routing


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@dataclasses.dataclass
class Built:
    hf_model: object
    hf_dir: object
    model: MixtralForCausalLM
    ids: np.ndarray
    hf_out: object


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    hf_model = build_hf_model()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    hf_dir = tmp_path_factory.mktemp("hf_mixtral")
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    with torch.no_grad():
        hf_out = hf_model(torch.from_numpy(ids).long(), output_router_logits=True)
    return Built(hf_model, hf_dir, load_mixtral(hf_dir), ids, hf_out)


def test_checkpoint_on_disk_uses_per_expert_names(built):
    """The conversion reads the layout transformers actually writes (w1/w2/w3 per expert)."""
    index = set(safetensors_torch.load_file(built.hf_dir / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in index
    assert "model.layers.1.block_sparse_moe.gate.weight" in index


def test_logits_match_transformers(built):
    got, _ = forward(built.model, built.ids)
    assert got.shape == (BATCH, SEQ, VOCAB) and got.dtype == np.float32
    np.testing.assert_allclose(got, built.hf_out.logits.numpy(), rtol=0, atol=LOGITS_ATOL)


# Window 4 against 12 positions: most queries see only part of their causal prefix.
@pytest.mark.parametrize("changes", [
    dict(sliding_window=4),
    dict(sliding_window=4, tie_word_embeddings=True, num_experts_per_tok=1),
], ids=["sliding_window", "sliding_window_tied_top1"])
def test_logits_match_transformers_with_sliding_window(tmp_path, changes):
    hf_model = build_hf_model(seed=2, **changes)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = load_mixtral(tmp_path)
    assert model.config.sliding_window == 4
    ids = np.random.default_rng(2).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    with torch.no_grad():
        want = hf_model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(forward(model, ids)[0], want, rtol=0, atol=LOGITS_ATOL)


# float32 both sides: the loss and each gradient differ in summation order alone (measured: 2e-6
# of a tensor's largest entry); a wrong expert, routing weight or router term is O(1) of it.
GRAD_ATOL_OF_MAX = 1e-4
AUX_COEF = 0.1  # router_aux_loss_coef; with output_router_logits HF's loss adds coef * aux


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_logits_loss_and_gradients_match_torch_autograd(tmp_path, top_k):
    """num_experts_per_tok 1 and 3 of 4 (elsewhere 2): logits, HF's training loss
    (cross-entropy + coef * load balancing) and the gradient of every parameter against torch
    autograd. With one expert the renormalised routing weight is exactly 1, so the routers'
    gradient comes from the load-balancing term alone."""
    hf_model = build_hf_model(seed=5, num_experts_per_tok=top_k, output_router_logits=True,
                              router_aux_loss_coef=AUX_COEF)
    hf_model.save_pretrained(tmp_path / "model", safe_serialization=True)
    model = load_mixtral(tmp_path / "model")
    assert model.config.num_experts_per_tok == top_k
    batch = np.random.default_rng(5).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    inputs, targets = torch.from_numpy(batch).long()[:, :-1], torch.from_numpy(batch).long()[:, 1:]

    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    hf_model.train()  # no dropout and no router jitter in this config: the eval function
    out = hf_model(inputs, output_router_logits=True)
    want_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB),
                                                  targets.reshape(-1)) \
        + AUX_COEF * load_balancing_loss_func(out.router_logits, NUM_EXPERTS, top_k)
    want_loss.backward()
    np.testing.assert_allclose(forward(model, batch[:, :-1])[0], out.logits.detach().numpy(),
                               rtol=0, atol=LOGITS_ATOL)

    graphdef, params = nnx.split(model)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: training_loss(graphdef, p, jnp.asarray(batch))[0]))(params)
    np.testing.assert_allclose(float(loss), want_loss.item(), rtol=AUX_LOSS_RTOL)
    # torch's gradients, named as its parameters, read by the loader into jaxinfer's layout
    # (a transpose or a split per tensor, which carries gradients as it carries weights)
    grad_dir = tmp_path / "grads"
    grad_dir.mkdir()
    safetensors_torch.save_file({name: p.grad.contiguous()
                                 for name, p in hf_model.named_parameters()},
                                grad_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tmp_path / "model" / "config.json", grad_dir)
    want, want_tree = jax.tree_util.tree_flatten(nnx.state(load_mixtral(grad_dir)))
    got, tree = jax.tree_util.tree_flatten_with_path(grads)
    assert tree == want_tree
    for (path, g), w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=GRAD_ATOL_OF_MAX * np.abs(w).max(),
                                   err_msg=jax.tree_util.keystr(path))
    router = jax.tree.leaves(grads.layers[0].block_sparse_moe.gate)
    assert np.abs(np.asarray(router[0])).max() > 1e-3  # a router gradient to test, not 0 == 0


def copy_checkpoint(src, dst):
    """A copy of checkpoint directory src, to be altered."""
    shutil.copytree(src, dst)
    return dst


def edit_config_json(directory, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


# id: (config.json quantization_config or None, quantize_config.json or None, method named)
QUANTIZED = {
    "compressed_tensors_int8": ({"quant_method": "compressed-tensors", "format": "int-quantized"},
                                None, "compressed-tensors"),
    "fp8": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, None, "fp8"),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 32}, None, "gptq"),
    "autogptq_quantize_config_json": (None, {"bits": 4, "group_size": 32}, "gptq"),
}


@pytest.mark.parametrize("quantization_config,quantize_config,method", list(QUANTIZED.values()),
                         ids=list(QUANTIZED))
def test_quantized_checkpoint_is_refused_naming_the_method(built, tmp_path, quantization_config,
                                                           quantize_config, method):
    """Mixtral loads float weights only: a quantized checkpoint is refused before any tensor is
    read, rather than loading int8 codes as weights or failing on float8 or missing names."""
    directory = copy_checkpoint(built.hf_dir, tmp_path / "ckpt")
    if quantization_config is not None:
        edit_config_json(directory, quantization_config=quantization_config)
    if quantize_config is not None:
        (directory / "quantize_config.json").write_text(json.dumps(quantize_config))
    message = (f"quant_method '{method}' is not supported for mixtral checkpoints "
               f"(only float weights)")
    with pytest.raises(ValueError, match=re.escape(message)):
        jaxinfer.load_pretrained(directory)


def test_null_quantization_config_is_a_float_checkpoint(built, tmp_path):
    """transformers reads `"quantization_config": null` as not quantized; so does the loader."""
    directory = copy_checkpoint(built.hf_dir, tmp_path / "ckpt")
    edit_config_json(directory, quantization_config=None)
    assert isinstance(jaxinfer.load_pretrained(directory), type(built.model))


@pytest.mark.parametrize("name,dtype,on_disk", [
    ("model.layers.1.block_sparse_moe.experts.2.w3.weight", torch.int8, "I8"),
    ("model.layers.0.self_attn.q_proj.weight", torch.int8, "I8"),
    ("model.layers.0.block_sparse_moe.experts.0.w1.weight", torch.float8_e4m3fn, "F8_E4M3"),
], ids=["int8_expert", "int8_attention", "float8_expert"])
def test_non_float_weight_is_refused_naming_the_tensor(built, tmp_path, name, dtype, on_disk):
    """Without a quantization_config (stripped, or a format that writes none), a weight stored
    as integer codes or float8 is refused by name, not cast to float (or an AttributeError)."""
    directory = copy_checkpoint(built.hf_dir, tmp_path / "ckpt")
    tensors = safetensors_torch.load_file(directory / "model.safetensors")
    tensors[name] = tensors[name].to(dtype)
    safetensors_torch.save_file(tensors, directory / "model.safetensors",
                                metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"{name!r} in model.safetensors has dtype "
                                                   f"{on_disk}")):
        load_mixtral(directory)


def test_unread_expert_tensors_are_reported(built, tmp_path, caplog):
    """Tensors beside the experts' weights (a quantized checkpoint's scales) are not silently
    dropped: the warning about unread tensors lists them."""
    directory = copy_checkpoint(built.hf_dir, tmp_path / "ckpt")
    tensors = safetensors_torch.load_file(directory / "model.safetensors")
    scale = "model.layers.0.block_sparse_moe.experts.1.w2.weight_scale"
    tensors[scale] = torch.ones(32)
    safetensors_torch.save_file(tensors, directory / "model.safetensors",
                                metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="jaxinfer.checkpoint"):
        load_mixtral(directory)
    assert "ignoring 1 tensor(s)" in caplog.text and scale in caplog.text


def test_router_logits_and_aux_loss_match_transformers(built):
    _, routing = forward(built.model, built.ids)
    assert routing.router_logits.shape == (2, BATCH * SEQ, NUM_EXPERTS)
    for layer, want in enumerate(built.hf_out.router_logits):
        np.testing.assert_allclose(np.asarray(routing.router_logits[layer]), want.numpy(),
                                   rtol=0, atol=ROUTER_ATOL)
    np.testing.assert_array_equal(np.asarray(routing.dropped), 0)
    aux = load_balancing_loss(list(routing.router_logits), NUM_EXPERTS, TOP_K)
    np.testing.assert_allclose(float(aux), float(built.hf_out.aux_loss), rtol=AUX_LOSS_RTOL)


def test_router_z_loss_matches_its_definition(built):
    """ST-MoE eq. 5, computed independently in float64 numpy from HF's router logits."""
    from scipy.special import logsumexp
    logits = [r.numpy().astype(np.float64) for r in built.hf_out.router_logits]
    want = np.mean([np.mean(logsumexp(x, axis=-1) ** 2) for x in logits])
    got = router_z_loss([jnp.asarray(x, jnp.float32) for x in logits])
    np.testing.assert_allclose(float(got), want, rtol=AUX_LOSS_RTOL)


def test_masked_aux_loss_matches_transformers(built):
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[1, :5] = 0  # left padding on the second row
    logits = tuple(torch.from_numpy(np.asarray(r)) for r in built.hf_out.router_logits)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    want = load_balancing_loss_func(logits, NUM_EXPERTS, TOP_K, torch.from_numpy(mask))
    got = load_balancing_loss([jnp.asarray(r.numpy()) for r in logits], NUM_EXPERTS, TOP_K,
                              jnp.asarray(mask))
    np.testing.assert_allclose(float(got), float(want), rtol=AUX_LOSS_RTOL)
    unmasked = load_balancing_loss([jnp.asarray(r.numpy()) for r in logits], NUM_EXPERTS, TOP_K)
    assert abs(float(unmasked) - float(got)) > 1e-4  # the mask is not a no-op here


def test_capacity_routing_with_ample_capacity_equals_dropless(built):
    """capacity_factor = E / K gives every expert room for all tokens: nothing can drop."""
    model = load_mixtral(built.hf_dir, moe_impl="capacity", capacity_factor=NUM_EXPERTS / TOP_K)
    logits, routing = forward(model, built.ids)
    np.testing.assert_array_equal(np.asarray(routing.dropped), 0)
    np.testing.assert_allclose(np.asarray(logits), built.hf_out.logits.numpy(), rtol=0,
                               atol=LOGITS_ATOL)


def test_small_capacity_drops_tokens_and_changes_logits(built):
    model = load_mixtral(built.hf_dir, moe_impl="capacity", capacity_factor=0.25)
    logits, routing = forward(model, built.ids)
    capacity = int(np.ceil(0.25 * BATCH * SEQ * TOP_K / NUM_EXPERTS))
    # per layer, at most E * C of the T * K choices are served
    assert (np.asarray(routing.dropped) >= BATCH * SEQ * TOP_K - NUM_EXPERTS * capacity).all()
    assert np.abs(np.asarray(logits) - built.hf_out.logits.numpy()).max() > 100 * LOGITS_ATOL


@nnx.jit
def _forward_with_router_key(model: MixtralForCausalLM, ids: jax.Array, key: jax.Array | None):
    logits, _, routing = model.forward_with_routing(ids, router_key=key)
    return logits, routing.router_logits


def with_router_jitter(model: MixtralForCausalLM, eps: float, *, train: bool
                       ) -> MixtralForCausalLM:
    """`model`'s weights under a config with router_jitter_noise = eps, in training or eval mode."""
    config = model.config.replace(router_jitter_noise=eps)
    abstract = nnx.eval_shape(lambda: MixtralForCausalLM(config, rngs=nnx.Rngs(0)))
    jittered = nnx.merge(nnx.graphdef(abstract), nnx.state(model))
    if train:
        jittered.train()
    return jittered


def test_router_jitter_changes_routing_only_in_training_with_a_key(built):
    """Switch-style router jitter: eps = 0 or eval mode leave routing exactly as it is (so HF
    parity holds); eps > 0 in training mode perturbs the router logits, reproducibly for a fixed
    key."""
    ids = jnp.asarray(built.ids)
    key = jax.random.key(0)
    want_logits, routing = forward(built.model, built.ids)  # eval mode, no key
    want_router = np.asarray(routing.router_logits)
    for eps, train in [(0.0, True), (0.1, False)]:
        logits, router = _forward_with_router_key(with_router_jitter(built.model, eps, train=train),
                                                  ids, key)
        np.testing.assert_array_equal(np.asarray(router), want_router)
        np.testing.assert_array_equal(np.asarray(logits), want_logits)
    training = with_router_jitter(built.model, 0.1, train=True)
    _, jittered = _forward_with_router_key(training, ids, key)
    _, again = _forward_with_router_key(training, ids, key)
    _, other = _forward_with_router_key(training, ids, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(jittered))
    change = np.abs(np.asarray(jittered) - want_router)
    assert change.max() > 1e-3  # the noise reaches the router logits ...
    assert change.max() < 0.5 * np.abs(want_router).max()  # ... as a perturbation
    assert np.abs(np.asarray(other) - np.asarray(jittered)).max() > 1e-3  # and follows the key
    with pytest.raises(ValueError, match="router_jitter_noise must lie in"):
        built.model.config.replace(router_jitter_noise=1.5)


def hf_greedy(built) -> np.ndarray:
    with torch.no_grad():
        ids = torch.from_numpy(built.ids).long()
        return built.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS).numpy()


def test_greedy_generation_matches_transformers(built):
    got = np.asarray(jaxinfer.generate(built.model, jnp.asarray(built.ids),
                                       max_new_tokens=NEW_TOKENS, temperature=0.0))
    np.testing.assert_array_equal(got, hf_greedy(built))


def test_generation_is_dropless_under_a_capacity_config(built):
    """generate's cached forward routes every token whatever moe_impl says (as the engine does):
    under capacity routing a prompt's tokens would depend on the other prompts in the batch."""
    model = load_mixtral(built.hf_dir, moe_impl="capacity", capacity_factor=0.25)
    got = np.asarray(jaxinfer.generate(model, jnp.asarray(built.ids),
                                       max_new_tokens=NEW_TOKENS, temperature=0.0))
    np.testing.assert_array_equal(got, hf_greedy(built))


def test_engine_serves_mixtral_with_the_greedy_tokens_of_generate(built):
    """The paged engine runs the MoE layers too (continuous batching, chunked prefill: a step
    of 16 tokens splits the prompts)."""
    want = np.asarray(jaxinfer.generate(built.model, jnp.asarray(built.ids),
                                        max_new_tokens=NEW_TOKENS, temperature=0.0))[:, SEQ:]
    prompts = [row.tolist() for row in built.ids]
    greedy = jaxinfer.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine = jaxinfer.Engine(built.model, max_batch=BATCH, page_size=8, num_pages=32,
                             max_tokens_per_step=16)
    assert engine.generate(prompts, greedy) == want.tolist()
    # a config that trains with capacity routing still serves dropless: padding and the other
    # requests in a step never take a token's expert capacity
    graphdef, state = nnx.split(built.model)
    capacity = nnx.merge(graphdef, state)
    for layer in capacity.layers:
        layer.block_sparse_moe.impl, layer.block_sparse_moe.capacity_factor = "capacity", 0.5
    engine = jaxinfer.Engine(capacity, max_batch=BATCH, page_size=8, num_pages=32,
                             max_tokens_per_step=16)
    assert engine.generate(prompts, greedy) == want.tolist()


def test_export_loads_in_transformers_with_same_logits(built, tmp_path):
    jaxinfer.save_pretrained(built.model, tmp_path)
    names = set(safetensors_torch.load_file(tmp_path / "model.safetensors"))
    assert names == set(safetensors_torch.load_file(built.hf_dir / "model.safetensors"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(reloaded) is type(built.hf_model)
    with torch.no_grad():
        got = reloaded(torch.from_numpy(built.ids).long()).logits.numpy()
    np.testing.assert_allclose(got, built.hf_out.logits.numpy(), rtol=0, atol=LOGITS_ATOL)


def test_fused_in_memory_layout_loads(built, tmp_path):
    """transformers 5's in-memory names (mlp.gate, experts.gate_up_proj / down_proj) also load."""
    state = {k: v.contiguous() for k, v in built.hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    safetensors_torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((built.hf_dir / "config.json").read_text())
    got, _ = forward(load_mixtral(tmp_path), built.ids)
    np.testing.assert_allclose(got, built.hf_out.logits.numpy(), rtol=0, atol=LOGITS_ATOL)


def test_config_round_trips_through_hf_config(built):
    hf = json.loads((built.hf_dir / "config.json").read_text())
    config = MixtralConfig.from_hf_config(hf)
    assert (config.num_local_experts, config.num_experts_per_tok) == (NUM_EXPERTS, TOP_K)
    assert config.router_aux_loss_coef == hf["router_aux_loss_coef"]
    assert MixtralConfig.from_hf_config(config.to_hf_config()) == config
    assert config.to_hf_config()["architectures"] == ["MixtralForCausalLM"]


def test_bad_config_raises_clear_errors():
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    with pytest.raises(ValueError, match="num_experts_per_tok must be <= num_local_experts"):
        MixtralConfig(**base, num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="moe_impl must be one of"):
        MixtralConfig(**base, moe_impl="magic")
    with pytest.raises(ValueError, match="num_attention_heads must be a multiple"):
        MixtralConfig(**{**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="model_type must be 'mixtral'"):
        MixtralConfig.from_hf_config({"model_type": "llama"})


def test_config_json_errors_name_mixtral():
    """Mixtral's attention fields are parsed as the Llama family's; errors still say mixtral."""
    hf = hf_config().to_dict()
    with pytest.raises(ValueError, match=r"config.json: hidden_act must be 'silu' for mixtral; "
                                         r"got 'gelu'"):
        MixtralConfig.from_hf_config({**hf, "hidden_act": "gelu"})


EXPERTS_0 = "model.layers.0.block_sparse_moe.experts"


def test_missing_expert_tensor_is_named(built, tmp_path):
    """One expert's tensor gone from a per-expert checkpoint: the error names it (not expert 0,
    which is there, nor the fused layout, which this checkpoint does not use)."""
    directory = copy_checkpoint(built.hf_dir, tmp_path / "ckpt")
    tensors = safetensors_torch.load_file(directory / "model.safetensors")
    del tensors[f"{EXPERTS_0}.3.w1.weight"]
    safetensors_torch.save_file(tensors, directory / "model.safetensors",
                                metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"only some of its 4 experts.*missing 1: \[" +
                       re.escape(f"'{EXPERTS_0}.3.w1.weight'") + r"\]"):
        load_mixtral(directory)


def test_misshapen_expert_tensor_is_named_with_its_shape(built, tmp_path):
    directory = copy_checkpoint(built.hf_dir, tmp_path / "ckpt")
    tensors = safetensors_torch.load_file(directory / "model.safetensors")
    name = f"{EXPERTS_0}.2.w2.weight"  # [hidden 32, intermediate 48]
    tensors[name] = tensors[name][:, :40].contiguous()
    safetensors_torch.save_file(tensors, directory / "model.safetensors",
                                metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} in model.safetensors has "
                                                   f"shape [32, 40]; config.json implies "
                                                   f"[32, 48]")):
        load_mixtral(directory)


# float32 sums of a few terms in another order (grouped matmuls against dense einsums)
DROPLESS_ATOL = 1e-5
DROPLESS_GRAD_RTOL = 1e-5  # the same, relative: some gradient entries reach O(10)


def dense_moe(x, weights, expert_ids, params):
    """The oracle: every expert on every token, combined by the routing weights (zero for the
    experts a token did not choose). x [T, D] -> [T, D]."""
    num_experts = params["gate"].shape[0]
    ys = swiglu_experts(params, jnp.broadcast_to(x, (num_experts,) + x.shape))  # [E, T, D]
    combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(expert_ids, num_experts), weights)
    return jnp.einsum("te,etd->td", combine, ys)


def moe_inputs(rows: int, tokens: int = 5, dim: int = 8, hidden: int = 12):
    """x [rows, T, D], weights [rows, T, K], distinct expert_ids [rows, T, K], params."""
    rng = np.random.default_rng(0)
    params = {name: jnp.asarray(0.5 * rng.normal(size=shape), jnp.float32) for name, shape in
              (("gate", (NUM_EXPERTS, dim, hidden)), ("up", (NUM_EXPERTS, dim, hidden)),
               ("down", (NUM_EXPERTS, hidden, dim)))}
    x = jnp.asarray(rng.normal(size=(rows, tokens, dim)), jnp.float32)
    weights = jnp.asarray(rng.random((rows, tokens, TOP_K)), jnp.float32)
    ids = jnp.asarray([[rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in range(tokens)]
                       for _ in range(rows)], jnp.int32)
    return x, weights, ids, params


def test_dropless_moe_under_vmap_matches_dense_experts():
    """vmap over rows of tokens (speculative decoding's per-sequence vmap), also nested and with
    per-row expert weights, where ragged_dot alone has no batching rule."""
    x, weights, ids, params = moe_inputs(rows=3)
    want = jax.vmap(dense_moe, in_axes=(0, 0, 0, None))(x, weights, ids, params)
    got = jax.jit(jax.vmap(dropless_moe, in_axes=(0, 0, 0, None)))(x, weights, ids, params)
    np.testing.assert_allclose(got, want, rtol=0, atol=DROPLESS_ATOL)
    nested = jax.vmap(jax.vmap(dropless_moe, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, None))
    got = nested(x[:, None], weights[:, None], ids[:, None], params)[:, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=DROPLESS_ATOL)
    per_row = jax.tree.map(lambda p: jnp.stack([p] * 3), params)
    np.testing.assert_allclose(jax.vmap(dropless_moe)(x, weights, ids, per_row), want,
                               rtol=0, atol=DROPLESS_ATOL)


def test_dropless_moe_gradient_matches_dense_experts():
    """The batching rule must not cost training its gradient."""
    x, weights, ids, params = moe_inputs(rows=1)

    def loss(moe):
        return lambda x, w, p: jnp.sum(jnp.sin(moe(x, w, ids[0], p)))

    got = jax.jit(jax.grad(loss(dropless_moe), argnums=(0, 1, 2)))(x[0], weights[0], params)
    want = jax.grad(loss(dense_moe), argnums=(0, 1, 2))(x[0], weights[0], params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=DROPLESS_GRAD_RTOL, atol=DROPLESS_ATOL)


def test_expert_weights_carry_the_expert_logical_axis(built):
    experts = built.model.layers[0].block_sparse_moe.experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        var = getattr(experts, name)
        assert var.get_metadata()["logical_axes"][0] == "expert"
        assert var.shape[0] == NUM_EXPERTS


def test_expert_placement_permutation_leaves_logits_unchanged(built):
    """A placement reorders each layer's experts (router columns with them): same function."""
    model = load_mixtral(built.hf_dir)
    perm = np.stack([np.random.default_rng(layer).permutation(NUM_EXPERTS) for layer in range(2)])
    apply_expert_placement(model, perm)
    logits, routing = forward(model, built.ids)
    np.testing.assert_allclose(logits, built.hf_out.logits.numpy(), rtol=0, atol=LOGITS_ATOL)
    for layer, want in enumerate(built.hf_out.router_logits):
        np.testing.assert_allclose(np.asarray(routing.router_logits[layer]),
                                   want.numpy()[:, perm[layer]], rtol=0, atol=ROUTER_ATOL)
    with pytest.raises(ValueError, match="perm must be"):
        apply_expert_placement(model, perm[:1])
