"""Mixtral training under sharding equals the single-device run: under the "ep" preset (experts
split over "expert", tokens exchanged by all_to_all) and under "dp", the training loss, each of
its parts (next-token loss, Switch load-balancing loss, router z-loss) and every gradient; a
jitted train step tracks the single-device losses. The router losses are computed from global
statistics: the load-balancing loss is not a mean of per-token terms, so a mean of per-shard
losses would differ (the control shows by how much)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from jaxinfer.models.moe import load_balancing_loss
from jaxinfer.train.optimizer import make_optimizer
from jaxinfer.train.step import train_step_with_losses, training_loss
from tests.jaxinfer.test_train_moe_loss import (  # noqa: F401  (tiny: a fixture)
    EXPERTS, SEQ, TOP_K, VOCAB, abstract_model, loss_and_grads, tiny)

# The oracle is dropless routing (sort + ragged_dot) on one device; the sharded runs add the
# mean losses' per-shard partial sums and route by capacity einsums (EP), whose one-hot products
# add exact zeros: the same float32 terms in another order. Measured ~2e-7 relative on the
# losses and ~1e-8 on the gradients; the bounds leave at least 10x headroom.
LOSS_RTOL = 2e-6
GRAD_RTOL = 1e-5  # atol scales with the largest gradient of the parameter
GRAD_ATOL_SCALE = 1e-6
# Three AdamW steps on reordered gradients: an update is g / sqrt(v), so the rounding of a tiny
# gradient can move a weight by up to lr; at lr 1e-2 over 3 steps the loss moves far less.
STEP_LOSS_RTOL = 1e-4
STEPS = 3

BATCH = 8  # [8, SEQ + 1]: divisible by the 8 token shards of every layout

# id -> (preset, mesh sizes, the model's moe_impl). The model takes its expert-parallel path
# only with moe_impl="expert_parallel" under rules that split "expert"; with the default dropless
# routing the "ep" preset still splits the expert weights, and XLA partitions the ragged_dot.
LAYOUTS = {
    "ep-2x4": ("ep", dict(data=2, expert=4), "expert_parallel"),
    "dp-8": ("dp", dict(data=8), "dropless"),
}


def layout(name: str):
    preset, sizes, _ = LAYOUTS[name]
    return sharding.make_mesh(**sizes), sharding.rules_for(preset)


def graphdef_for(graphdef: nnx.GraphDef, params: nnx.State, moe_impl: str) -> nnx.GraphDef:
    """The oracle's model structure (dropless) with `moe_impl`; "expert_parallel" gets a
    capacity of one slot per local token in every expert (cf = E / K), so nothing drops and it
    computes what dropless routing computes."""
    config = nnx.merge(graphdef, params).config
    if moe_impl == config.moe_impl:
        return graphdef
    return nnx.graphdef(abstract_model(config.replace(moe_impl=moe_impl,
                                                      capacity_factor=EXPERTS / TOP_K)))


@pytest.fixture(scope="module")
def batch():
    """int32 [BATCH, SEQ + 1]; row b draws from its own ids [6b, 6b + 6), so each device's rows
    route differently (which the per-shard control needs to tell global from local statistics)."""
    ids_per_row = VOCAB // BATCH
    rng = np.random.default_rng(7)
    rows = np.arange(BATCH)[:, None] * ids_per_row + rng.integers(0, ids_per_row,
                                                                   (BATCH, SEQ + 1))
    return jnp.asarray(rows, jnp.int32)


@pytest.fixture(scope="module")
def single_device(tiny, batch):
    graphdef, params, _ = tiny
    return jax.tree.map(np.asarray, loss_and_grads(params, batch, None, graphdef=graphdef))


def place(graphdef, params, batches, mesh, rules, batch_axes):
    """params and batches (logical axes `batch_axes`) on `mesh` as `rules` say."""
    params = sharding.place(params, mesh, rules,
                            head_counts=sharding.head_counts_of(nnx.merge(graphdef, params)))
    return params, jax.device_put(batches, sharding.batch_sharding(mesh, rules, batch_axes))


@pytest.mark.parametrize("name", ["ep-2x4"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("dp-8",)])
def test_loss_parts_and_grads_match_single_device(tiny, batch, single_device, name):
    graphdef, params, _ = tiny
    mesh, rules = layout(name)
    _, sizes, moe_impl = LAYOUTS[name]
    run = graphdef_for(graphdef, params, moe_impl)
    sharded, ids = place(graphdef, params, batch, mesh, rules, ("batch", None))
    with sharding.use_rules(mesh, rules):
        (loss, parts), grads = loss_and_grads(sharded, ids, None, graphdef=run)
        # under expert parallelism the experts run where they live, the tokens sent by all_to_all
        hlo = loss_and_grads.lower(sharded, ids, None, graphdef=run).as_text()
        assert ("all_to_all" in hlo) == (moe_impl == "expert_parallel")
    assert ids.addressable_shards[0].data.shape == (1, SEQ + 1)  # tokens over all 8 devices
    gate = sharded.layers[0].block_sparse_moe.experts.gate_proj[...]  # [E, embed, mlp]
    assert gate.addressable_shards[0].data.shape[0] == EXPERTS // sizes.get("expert", 1)
    (ref_loss, ref_parts), ref_grads = single_device
    np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
    assert set(parts) == set(ref_parts) == {"next_token_loss", "load_balancing_loss",
                                            "router_z_loss"}
    for key in ref_parts:
        np.testing.assert_allclose(parts[key], ref_parts[key], rtol=LOSS_RTOL, err_msg=key)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
        atol = GRAD_ATOL_SCALE * max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g), r, rtol=GRAD_RTOL, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@functools.partial(jax.jit, static_argnames="graphdef")
def packed_loss_parts(params: nnx.State, batch: jax.Array, segment_ids: jax.Array,
                      graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    return training_loss(graphdef, params, batch, None, None, segment_ids)[1]


def test_router_losses_with_padding_match_single_device_under_ep(tiny, batch):
    """Packed rows whose padding (segment id 0) differs per row, so each device holds another
    number of real tokens: the router losses are sums over real tokens divided by their global
    count, and expert parallelism gives the single-device values."""
    graphdef, params, _ = tiny
    lengths = np.arange(BATCH) % 4 + 3  # real inputs per row: 3..6 of SEQ
    segment_ids = jnp.asarray(np.where(np.arange(SEQ + 1)[None] < lengths[:, None], 1, 0),
                              jnp.int32)  # [BATCH, SEQ + 1]
    want = packed_loss_parts(params, batch, segment_ids, graphdef=graphdef)
    mesh, rules = layout("ep-2x4")
    sharded, (ids, segs) = place(graphdef, params, (batch, segment_ids), mesh, rules,
                                 ("batch", None))
    with sharding.use_rules(mesh, rules):
        got = packed_loss_parts(sharded, ids, segs,
                                graphdef=graphdef_for(graphdef, params, "expert_parallel"))
    for key in ("load_balancing_loss", "router_z_loss", "next_token_loss"):
        np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)


@functools.partial(jax.jit, static_argnames=("graphdef", "shards"))
def global_and_per_shard_load_balancing(params: nnx.State, batch: jax.Array,
                                        graphdef: nnx.GraphDef, shards: int):
    """(the load-balancing loss of every layer's router logits over the whole batch, the mean of
    the losses of `shards` equal slices of the batch rows), from one single-device forward."""
    routing = nnx.merge(graphdef, params).forward_with_routing(batch[:, :-1])[2]
    logits = routing.router_logits  # [layers, BATCH * SEQ, E], rows in (batch, seq) order
    per_shard = [load_balancing_loss(list(s), EXPERTS, TOP_K)
                 for s in jnp.split(logits, shards, axis=1)]
    return load_balancing_loss(list(logits), EXPERTS, TOP_K), jnp.mean(jnp.stack(per_shard))


def test_per_shard_load_balancing_loss_would_differ_from_the_global_one(tiny, batch,
                                                                        single_device):
    """The control for the test above: the mean of the 8 data shards' own load-balancing losses
    (each a sum of products of that shard's means) misses the global value by far more than
    LOSS_RTOL, so the sharded runs' agreement shows that they pool the statistics globally."""
    graphdef, params, _ = tiny
    (_, ref_parts), _ = single_device
    pooled, per_shard = global_and_per_shard_load_balancing(params, batch, graphdef=graphdef,
                                                            shards=8)
    np.testing.assert_allclose(pooled, ref_parts["load_balancing_loss"], rtol=LOSS_RTOL)
    gap = abs(float(per_shard) - float(pooled)) / float(pooled)
    assert gap > 100 * LOSS_RTOL, gap


def run_steps(graphdef, params, batch, mesh=None, rules=None):
    """STEPS jitted updates on `batch` -> [(loss, parts)] per step, and the final params."""
    tx = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1,
                        clip_norm=1.0)
    opt_state = tx.init(params)
    batches = batch[None]  # [accum=1, B, SEQ + 1]
    if mesh is not None:
        params, batches = place(graphdef, params, batches, mesh, rules, (None, "batch", None))
        opt_state = sharding.place(opt_state, mesh, rules)
    history = []
    for _ in range(STEPS):
        with contextlib.nullcontext() if mesh is None else sharding.use_rules(mesh, rules):
            out = train_step_with_losses(graphdef, tx, params, opt_state, batches)
        params, opt_state = out.params, out.opt_state
        history.append((float(out.loss), {k: float(v) for k, v in out.losses.items()}))
    return history, params


@pytest.mark.slow  # ~30 s on a loaded 2-core machine: two train steps compiled
def test_jitted_ep_train_step_tracks_single_device_losses(tiny, batch):
    graphdef, params, _ = tiny
    want, _ = run_steps(graphdef, params, batch)
    mesh, rules = layout("ep-2x4")
    got, stepped = run_steps(graphdef_for(graphdef, params, "expert_parallel"), params, batch,
                             mesh, rules)
    for step, ((loss, parts), (ref_loss, ref_parts)) in enumerate(zip(got, want)):
        np.testing.assert_allclose(loss, ref_loss, rtol=STEP_LOSS_RTOL, err_msg=f"step {step}")
        for key in ref_parts:
            np.testing.assert_allclose(parts[key], ref_parts[key], rtol=STEP_LOSS_RTOL,
                                       err_msg=f"step {step} {key}")
    assert got[-1][0] < got[0][0]
    # the updated experts stay split over "expert": no per-step resharding
    spec = stepped.layers[0].block_sparse_moe.experts.gate_proj[...].sharding.spec
    assert spec[0] == "expert"
