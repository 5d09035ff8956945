"""Expert parallelism (shard_map + all_to_all over the "expert" mesh axis) against single-device
MoE: dropless routing when capacity is ample, per-shard capacity routing when it is not. The
ragged exchange (ragged_all_to_all, not implemented on XLA:CPU) is checked by its offsets against
the padded exchange, through the op's documented semantics emulated in numpy, and by lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.models.moe import dropless_moe, swiglu_experts
from sharding.expert_exchange import ragged_exchange_layout, resolve_exchange
from sharding.expert_parallel import (capacity_dispatch, capacity_moe, expert_capacity,
                                      expert_parallel_moe, route_top_k)

# float32 with "highest" precision: the one-hot einsums add exact zeros, so EP and single-device
# differ only in the order of the expert matmul and the k-way weighted sum.
F32_ATOL = 2e-5
T, D, F, E, K = 64, 16, 24, 8, 2


def moe_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles threefry, slow on CPU

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    x, router = normal(T, D), normal(D, E)
    params = {"gate": normal(E, D, F, scale=0.3), "up": normal(E, D, F, scale=0.3),
              "down": normal(E, F, D, scale=0.3)}
    return x, router, params


@jax.jit
def dropless_reference(x, router, params, router_input=None):
    """Single-device dropless MoE (sort + ragged_dot), jitted: one compile, not op-by-op. The
    router sees router_input when given, the experts x."""
    _, weights, ids = route_top_k(x if router_input is None else router_input, router, K)
    return dropless_moe(x, weights, ids, params)


def expert_mesh(p: int, data: int = 1):
    return sharding.make_mesh(data=data, expert=p, devices=jax.devices()[:p * data])


@pytest.mark.parametrize("p", [2, 4, 8])
def test_ep_equals_dropless_single_device_with_ample_capacity(p):
    x, router, params = moe_inputs()
    want = dropless_reference(x, router, params)
    # cf = E / K: every expert has a slot for every local token, so nothing can drop
    got = jax.jit(lambda x, r, w: expert_parallel_moe(
        x, r, w, swiglu_experts, mesh=expert_mesh(p), top_k=K, capacity_factor=E / K))(
            x, router, params)
    assert int(got.dropped) == 0
    np.testing.assert_allclose(np.asarray(got.y), np.asarray(want), rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(got.router_logits), np.asarray(x @ router),
                               rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_ep_with_forced_drops_equals_per_shard_capacity_routing(p):
    """Each device's tokens are one capacity group: the oracle routes each slice on one device."""
    x, router, params = moe_inputs(seed=1)
    cf = 0.5
    got = jax.jit(lambda x, r, w: expert_parallel_moe(
        x, r, w, swiglu_experts, mesh=expert_mesh(p), top_k=K, capacity_factor=cf))(
            x, router, params)
    capacity = expert_capacity(T // p, E, K, cf)
    slices = jax.jit(lambda x: [capacity_moe(xs, router, params, swiglu_experts, top_k=K,
                                             capacity=capacity) for xs in jnp.split(x, p)])(x)
    want_y = jnp.concatenate([s.y for s in slices])
    want_dropped = sum(int(s.dropped) for s in slices)
    assert want_dropped > 0
    assert int(got.dropped) == want_dropped
    np.testing.assert_allclose(np.asarray(got.y), np.asarray(want_y), rtol=0, atol=F32_ATOL)


def test_ep_over_data_and_expert_axes_with_router_input_equals_dropless():
    """Tokens split over data x expert; experts replicated over data, all_to_all within each. The
    router routes a separate input (as router jitter does); the experts still process x."""
    x, router, params = moe_inputs(seed=2)
    routed = x * jnp.asarray(np.random.default_rng(5).uniform(0.5, 1.5, x.shape), jnp.float32)
    got = jax.jit(lambda x, r, w, routed: expert_parallel_moe(
        x, r, w, swiglu_experts, mesh=expert_mesh(4, data=2), top_k=K, capacity_factor=E / K,
        token_axes=("data", "expert"), router_input=routed))(x, router, params, routed)
    assert int(got.dropped) == 0
    np.testing.assert_allclose(np.asarray(got.router_logits), np.asarray(routed @ router),
                               rtol=0, atol=F32_ATOL)
    want = dropless_reference(x, router, params, routed)
    np.testing.assert_allclose(np.asarray(got.y), np.asarray(want), rtol=0, atol=F32_ATOL)
    assert np.abs(np.asarray(want - dropless_reference(x, router, params))).max() > 1e-2


def test_ep_gradients_match_single_device_capacity_routing():
    x, router, params = moe_inputs(seed=3)
    mesh = expert_mesh(4)

    def loss_ep(x, params):
        out = expert_parallel_moe(x, router, params, swiglu_experts, mesh=mesh, top_k=K,
                                  capacity_factor=E / K)
        return jnp.sum(out.y ** 2)

    def loss_ref(x, params):
        capacity = expert_capacity(T // 4, E, K, E / K)
        ys = [capacity_moe(xs, router, params, swiglu_experts, top_k=K, capacity=capacity).y
              for xs in jnp.split(x, 4)]
        return jnp.sum(jnp.concatenate(ys) ** 2)

    got = jax.jit(jax.grad(loss_ep, argnums=(0, 1)))(x, params)
    want = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(x, params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_capacity_dispatch_serves_first_choices_before_second_choices():
    """Choice-major priority: with capacity 1, expert 0 goes to token 1's first choice even
    though token 0 (earlier) wanted it as a second choice."""
    ids = jnp.array([[1, 0], [0, 1], [2, 3]], jnp.int32)  # [T=3, K=2]
    weights = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]], jnp.float32)
    dispatch, combine, dropped = capacity_dispatch(ids, weights, num_experts=4, capacity=1)
    assert dispatch.shape == (3, 4, 1)
    served = np.asarray(dispatch[..., 0]).astype(int)  # [T, E]
    np.testing.assert_array_equal(served, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]])
    assert int(dropped) == 2  # token 0 -> expert 0 and token 1 -> expert 1 (second choices)
    np.testing.assert_allclose(np.asarray(combine[1, 0, 0]), 0.7)


def test_capacity_dispatch_never_materialises_the_k_times_larger_product():
    """Dispatch and combine are contractions over the K choices: the compiled function's scratch
    stays below one [T, E, C] float32 output, where the [K, T, E, C] product of the two one-hots
    took K of them. Combine is each kept choice's routing weight, exactly."""
    tokens, experts, capacity = 512, 16, 64
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.argsort(rng.random((tokens, experts)), axis=1)[:, :K], jnp.int32)
    weights = jnp.asarray(rng.random((tokens, K)), jnp.float32)
    fn = jax.jit(lambda i, w: capacity_dispatch(i, w, experts, capacity))
    temp = fn.lower(ids, weights).compile().memory_analysis().temp_size_in_bytes
    assert temp < tokens * experts * capacity * 4, temp
    dispatch, combine, _ = fn(ids, weights)
    chosen = np.einsum("tke,tk->te", np.eye(experts)[np.asarray(ids)], np.asarray(weights))
    np.testing.assert_array_equal(np.asarray(combine), np.asarray(dispatch) * chosen[..., None])


def test_bad_layouts_raise_clear_errors():
    x, router, params = moe_inputs()
    with pytest.raises(ValueError, match="num_experts=8 must be divisible by the size 3"):
        mesh = sharding.make_mesh(expert=3, devices=jax.devices()[:3])
        expert_parallel_moe(x[:63], router, params, swiglu_experts, mesh=mesh, top_k=K,
                            capacity_factor=1.0)
    with pytest.raises(ValueError, match="token count 60 must be divisible by the 8"):
        expert_parallel_moe(x[:60], router, params, swiglu_experts, mesh=expert_mesh(8),
                            top_k=K, capacity_factor=1.0)
    with pytest.raises(ValueError, match="every expert parameter must lead with num_experts"):
        bad = dict(params, down=params["down"][:4])
        expert_parallel_moe(x, router, bad, swiglu_experts, mesh=expert_mesh(2), top_k=K,
                            capacity_factor=1.0)


@pytest.mark.parametrize("top_k, capacity_factor, message", [
    (0, 1.0, r"top_k must be an int in \[1, num_experts=8\]; got 0"),
    (-1, 1.0, r"top_k must be an int in \[1, num_experts=8\]; got -1"),
    (E + 1, 1.0, r"top_k must be an int in \[1, num_experts=8\]; got 9"),
    (K, float("inf"), r"capacity_factor must be a finite positive number; got inf"),
    (K, float("nan"), r"capacity_factor must be a finite positive number; got nan"),
    (K, 0.0, r"capacity_factor must be a finite positive number; got 0.0"),
])
def test_bad_top_k_or_capacity_factor_is_a_clear_error(top_k, capacity_factor, message):
    """Checked at every public entry before routing: top_k=0 would otherwise route nothing
    (all-zero output) or fail inside the shard_map, and an infinite capacity factor overflow."""
    x, router, params = moe_inputs()
    with pytest.raises(ValueError, match=message):
        expert_parallel_moe(x, router, params, swiglu_experts, mesh=expert_mesh(8), top_k=top_k,
                            capacity_factor=capacity_factor)
    with pytest.raises(ValueError, match=message):
        expert_capacity(T, E, top_k, capacity_factor)
    if capacity_factor == 1.0:
        with pytest.raises(ValueError, match=message):
            capacity_moe(x, router, params, swiglu_experts, top_k=top_k, capacity=4)
        with pytest.raises(ValueError, match=message):
            route_top_k(x, router, top_k)
    with pytest.raises(ValueError, match=r"capacity must be a positive int .*; got 0"):
        capacity_moe(x, router, params, swiglu_experts, top_k=K, capacity=0)


def test_mixtral_model_expert_parallel_under_rules_equals_dropless():
    """The model names no mesh axis: the rules' "expert" entry turns on the shard_map path."""
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=32, num_local_experts=E, num_experts_per_tok=K)
    # initialise once, in one jitted program (eager init compiles the RNG per parameter shape)
    state = jax.jit(lambda: nnx.state(MixtralForCausalLM(config, rngs=nnx.Rngs(0))))()

    def build(c):
        return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: MixtralForCausalLM(
            c, rngs=nnx.Rngs(0)))), state)

    dropless = build(config)
    ep_model = build(config.replace(moe_impl="expert_parallel", capacity_factor=E / K))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    mesh = expert_mesh(4, data=2)
    rules = sharding.rules_for("dp") | {"expert": "expert"}
    sharded = sharding.shard(ep_model, mesh, rules)
    spec = sharded.layers[0].block_sparse_moe.experts.gate_proj[...].sharding.spec
    assert spec[0] == "expert"
    with sharding.use_rules(mesh, rules):
        logits, _, routing = nnx.jit(lambda m, i: m.forward_with_routing(i))(sharded, ids)
    want, _, _ = nnx.jit(lambda m, i: m.forward_with_routing(i))(dropless, ids)
    np.testing.assert_array_equal(np.asarray(routing.dropped), 0)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=0, atol=1e-4)


def emulate_ragged_all_to_all(operands: list[np.ndarray], outputs: list[np.ndarray],
                              layouts: list) -> list[np.ndarray]:
    """jax.lax.ragged_all_to_all over P devices, from its docstring's semantics: device src sends
    operand[input_offsets[i]:+send_sizes[i]] to device i // (N / P), which writes it at
    output_offsets[i] (the sender's offsets); recv_sizes must mirror send_sizes."""
    p, n = len(operands), len(layouts[0].send_sizes)
    per_peer = n // p
    results = [out.copy() for out in outputs]
    for src, layout in enumerate(layouts):
        for i in range(n):
            dst, size = i // per_peer, int(layout.send_sizes[i])
            # the receiver's slice (src, i % per_peer) must expect exactly this many rows
            assert int(layouts[dst].recv_sizes[src * per_peer + i % per_peer]) == size
            start, at = int(layout.input_offsets[i]), int(layout.output_offsets[i])
            results[dst][at:at + size] = operands[src][start:start + size]
    return results


def test_ragged_exchange_layout_reproduces_the_padded_all_to_all():
    """Offsets and sizes from the padded path's own dispatch counts (forced drops, so experts
    are partly filled and some full): the emulated ragged dispatch yields exactly the padded
    all_to_all's [E/P, P*C, D] buffers, and the ragged combine returns every filled slot to its
    token's device (empty slots come back as 0)."""
    p, local = 4, E // 4
    x, router, _ = moe_inputs(seed=4)
    capacity = expert_capacity(T // p, E, K, 0.75)

    @jax.jit
    def buffers(x):  # per shard: capacity buffer [E, C, D] and filled slots per expert [E]
        def one(xs):
            _, weights, ids = route_top_k(xs, router, K)
            dispatch, _, _ = capacity_dispatch(ids, weights, E, capacity)
            return (jnp.einsum("tec,td->ecd", dispatch, xs),
                    jnp.sum(dispatch, axis=(0, 2)).astype(jnp.int32))
        return jax.vmap(one)(x.reshape(p, T // p, D))

    xs, counts = (np.asarray(a) for a in buffers(x))  # [P, E, C, D], [P, E]
    assert (counts == capacity).any() and (counts < capacity).any()
    filled = np.arange(capacity)[None, None, :] < counts[..., None]  # [P, E, C]
    assert not np.abs(xs[~filled]).any()  # the padded path fills slots from 0
    # padded all_to_all(split 0, concat 1, tiled): device d gets [E/P, P*C, D] with block
    # [j, s*C:(s+1)*C] = device s's buffer of expert d * E/P + j
    padded = [xs[:, d * local:(d + 1) * local].transpose(1, 0, 2, 3).reshape(local, p * capacity, D)
              for d in range(p)]
    recv = [counts[:, d * local:(d + 1) * local].reshape(E) for d in range(p)]  # all_to_all
    layouts = [ragged_exchange_layout(jnp.asarray(counts[s]), jnp.asarray(recv[s]), s, p,
                                      capacity) for s in range(p)]
    dispatch = [jax.tree.map(np.asarray, lay[0]) for lay in layouts]
    combine = [jax.tree.map(np.asarray, lay[1]) for lay in layouts]
    received = emulate_ragged_all_to_all([b.reshape(E * capacity, D) for b in xs],
                                         [np.zeros((E * capacity, D), np.float32)] * p, dispatch)
    for d in range(p):
        np.testing.assert_array_equal(received[d].reshape(local, p * capacity, D), padded[d])
    # an "expert" that is nonzero on empty slots shows which rows travel back
    outputs = [2.0 * r + 1.0 for r in received]
    returned = emulate_ragged_all_to_all(outputs, [np.zeros((E * capacity, D), np.float32)] * p,
                                         combine)
    for s in range(p):
        want = np.where(filled[s][..., None], 2.0 * xs[s] + 1.0, 0.0)
        np.testing.assert_array_equal(returned[s].reshape(E, capacity, D), want)


def test_ragged_exchange_lowers_to_ragged_all_to_all_forward_and_backward():
    """XLA:CPU cannot compile ragged-all-to-all, so "auto" picks the padded exchange on CPU; the
    ragged path, forced, lowers to StableHLO (forward: dispatch + combine; the gradient adds
    their transposes)."""
    x, router, params = moe_inputs()
    mesh = expert_mesh(4)
    assert resolve_exchange("auto", mesh) == "padded"

    def loss(x, params, exchange):
        y = expert_parallel_moe(x, router, params, swiglu_experts, mesh=mesh, top_k=K,
                                capacity_factor=1.0, exchange=exchange).y
        return jnp.sum(y ** 2)

    ragged = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, "ragged"), argnums=(0, 1)))
    assert ragged.lower(x, params).as_text().count("@ragged_all_to_all") == 4
    padded = jax.jit(lambda x, w: loss(x, w, "auto")).lower(x, params).as_text()
    assert "ragged_all_to_all" not in padded and "all_to_all" in padded
    with pytest.raises(ValueError, match="exchange must be one of"):
        loss(x, params, "sparse")
