"""A tiny Llama sharded by every preset equals the single-device run: logits, loss, gradients,
a jitted train step and greedy generation; parameters really end up split; bad layouts fail
clearly."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxinfer
import sharding
from jaxinfer.models import layers
from jaxinfer.train.optimizer import make_optimizer
from jaxinfer.train.step import train_step

# Sharded matmuls split contractions (row-parallel TP, vocab-parallel logits) into partial sums
# that are then all-reduced: the same float32 terms added in another order, ~1e-7 relative.
FWD_ATOL = FWD_RTOL = 1e-5
GRAD_RTOL = 1e-4  # backward chains more reordered sums; atol scales with the largest gradient
GRAD_ATOL_SCALE = 1e-5
# Three AdamW steps on reordered gradients: updates are g / sqrt(v), so tiny gradients' rounding
# can move a weight by up to lr; at lr 1e-2 over 3 steps the loss moves far less than this.
LOSS_RTOL = 1e-4

CONFIG = jaxinfer.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
                              max_position_embeddings=64)
BATCH = 8  # divisible by data * fsdp = 8 in every layout

LAYOUTS = {  # id -> (preset, mesh sizes)
    "dp-8": ("dp", dict(data=8)),
    "fsdp-8": ("fsdp", dict(fsdp=8)),
    "fsdp-2x4": ("fsdp", dict(data=2, fsdp=4)),
    "tp-2x4": ("tp", dict(data=2, tensor=4)),
    "tp_sp-2x4": ("tp_sp", dict(data=2, tensor=4)),
    "fsdp_tp-2x2x2": ("fsdp_tp", dict(data=2, fsdp=2, tensor=2)),
    # sequence parallelism: attention runs as ring / Ulysses attention over "sequence"
    "sp_ring-2x4": ("sp_ring", dict(data=2, sequence=4)),
    "sp_ulysses-2x4": ("sp_ulysses", dict(data=2, sequence=4)),
}

# Per-device shard shapes written out by hand from the layouts (not derived with sharding's own
# functions): q [32, 8*4], k [32, 4*4], o [32, 32], down [64, 32], embedding [64, 32],
# lm_head [32, 64], a norm [32].
FULL = dict(q=(32, 32), k=(32, 16), o=(32, 32), down=(64, 32), emb=(64, 32), lm=(32, 64),
            norm=(32,))
TP4 = dict(q=(32, 8), k=(32, 4), o=(8, 32), down=(16, 32), emb=(16, 32), lm=(32, 16), norm=(32,))
SHARD_SHAPES = {
    "dp-8": FULL,
    "fsdp-8": dict(q=(4, 32), k=(4, 16), o=(32, 4), down=(64, 4), emb=(64, 4), lm=(4, 64),
                   norm=(4,)),
    "fsdp-2x4": dict(q=(8, 32), k=(8, 16), o=(32, 8), down=(64, 8), emb=(64, 8), lm=(8, 64),
                     norm=(8,)),
    "tp-2x4": TP4,
    "tp_sp-2x4": TP4,
    "fsdp_tp-2x2x2": dict(q=(16, 16), k=(16, 8), o=(16, 16), down=(32, 16), emb=(32, 16),
                          lm=(16, 32), norm=(16,)),
    "sp_ring-2x4": FULL,  # parameters as under fsdp, whose axis has size 1 here
    "sp_ulysses-2x4": FULL,
}


def layout(name):
    preset, sizes = LAYOUTS[name]
    return sharding.make_mesh(**sizes), sharding.rules_for(preset)


@pytest.fixture(scope="module")
def model():
    return jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    return jax.random.randint(jax.random.key(1), (BATCH, 9), 0, CONFIG.vocab_size, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def loss_logits_grads(graphdef, params, batch):
    def loss_fn(p):
        logits, _ = nnx.merge(graphdef, p).forward(batch[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads


@pytest.fixture(scope="module")
def single_device(model, batch):
    graphdef, params = nnx.split(model)
    return jax.tree.map(np.asarray, loss_logits_grads(graphdef, params, batch))


def shard_shapes(model):
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    arrays = dict(q=attn.q_proj.kernel, k=attn.k_proj.kernel, o=attn.o_proj.kernel,
                  down=mlp.down_proj.kernel, emb=model.embed_tokens.embedding,
                  lm=model.lm_head.kernel, norm=model.norm.weight)
    out = {}
    for key, var in arrays.items():
        shapes = {s.data.shape for s in var[...].addressable_shards}
        assert len(shapes) == 1, (key, shapes)
        out[key] = shapes.pop()
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parameters_are_split_as_the_layout_says(model, name):
    mesh, rules = layout(name)
    sharded = sharding.shard(model, mesh, rules)
    assert shard_shapes(sharded) == SHARD_SHAPES[name]
    assert all(len(v[...].sharding.device_set) == 8 for v in jax.tree.leaves(
        nnx.state(sharded), is_leaf=lambda x: isinstance(x, nnx.Variable)))
    # the input model is left where it was
    assert isinstance(model.lm_head.kernel[...].sharding, jax.sharding.SingleDeviceSharding)


# Every preset on meshes (8,), (2, 4) and (2, 2, 2) by default; the remaining layouts when slow.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in ("fsdp-8", "tp_sp-2x4") else n
    for n in LAYOUTS])
def test_logits_loss_and_grads_match_single_device(model, batch, single_device, name):
    mesh, rules = layout(name)
    impl = sharding.SEQUENCE_PARALLEL_IMPL.get(LAYOUTS[name][0])
    if impl is not None:  # the config picks the algorithm; the same seed gives the same weights
        model = jaxinfer.LlamaForCausalLM(dataclasses.replace(CONFIG, sequence_parallel=impl),
                                          rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(sharding.shard(model, mesh, rules))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules, ("batch", None)))
    with sharding.use_rules(mesh, rules):
        loss, logits, grads = loss_logits_grads(graphdef, params, batch)
        if impl is not None:  # attention really exchanged K/V blocks, or heads, between devices
            hlo = loss_logits_grads.lower(graphdef, params, batch).as_text()
            assert ("collective_permute" if impl == "ring" else "all_to_all") in hlo
    ref_loss, ref_logits, ref_grads = single_device
    np.testing.assert_allclose(loss, ref_loss, rtol=FWD_RTOL, atol=FWD_ATOL)
    np.testing.assert_allclose(logits, ref_logits, rtol=FWD_RTOL, atol=FWD_ATOL)
    # the batch ran split over data x fsdp, under Megatron presets the logits over vocab, and
    # under sequence parallelism the sequence over "sequence"
    sizes = LAYOUTS[name][1]
    vocab_split = sizes.get("tensor", 1) if "tp" in LAYOUTS[name][0] else 1
    assert logits.addressable_shards[0].data.shape == (
        BATCH // (sizes.get("data", 1) * sizes.get("fsdp", 1)), 8 // sizes.get("sequence", 1),
        CONFIG.vocab_size // vocab_split)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        atol = GRAD_ATOL_SCALE * max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g), r, rtol=GRAD_RTOL, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def _compile_loss_and_grads(name: str, vocab: int, length: int):
    """The loss, logits and gradients of a model with `vocab` tokens compiled under layout
    `name` for rows of `length` ids. `vocab`: one no other compile used, so that nothing comes
    from a cache and the table's shape is its own."""
    model = jaxinfer.LlamaForCausalLM(dataclasses.replace(CONFIG, vocab_size=vocab),
                                      rngs=nnx.Rngs(0))
    mesh, rules = layout(name)
    graphdef, params = nnx.split(sharding.shard(model, mesh, rules))
    ids = jax.device_put(jnp.zeros((BATCH, length), jnp.int32),
                         sharding.batch_sharding(mesh, rules, ("batch", None)))
    with sharding.use_rules(mesh, rules):
        return loss_logits_grads.lower(graphdef, params, ids).compile()


def _partitioner_replicates(name: str, vocab: int, capfd) -> bool:
    """Whether XLA's partitioner warns, compiling the loss and gradients under layout `name`,
    that it can only reach a sharding by replicating a tensor."""
    capfd.readouterr()
    _compile_loss_and_grads(name, vocab, 9)
    return "Involuntary full rematerialization" in capfd.readouterr().err


@pytest.mark.parametrize("name", ["tp-2x4", "fsdp_tp-2x2x2"])
def test_vocab_parallel_embedding_partitions_without_replicating(name, capfd, monkeypatch):
    """Megatron's embedding: each device looks ids up in its vocab shard and the results are
    all-reduced. Under fsdp_tp, without the embedding's constraint on its table, the partitioner
    replicated the table split over vocab and model width (and said so: the control)."""
    assert not _partitioner_replicates(name, 96, capfd)
    if name.startswith("fsdp_tp"):
        monkeypatch.setattr(layers, "constrain", lambda x, axes: x)
        assert _partitioner_replicates(name, 98, capfd)


def _gathers_full_table(name: str, vocab: int) -> bool:
    """Whether the compiled loss and gradients under layout `name` all-gather a whole
    embedding table [vocab, hidden]. 32 positions: at 8 the partitioner happened to gather the
    ids instead, hiding the bug."""
    hlo = _compile_loss_and_grads(name, vocab, 33).as_text()
    table = f"f32[{vocab},{CONFIG.hidden_size}]"
    return any("all-gather" in line and table in line for line in hlo.splitlines())


@pytest.mark.parametrize("name", ["tp-2x4", "tp_sp-2x4", "fsdp_tp-2x2x2"])
def test_vocab_parallel_embedding_never_gathers_the_whole_table(name, monkeypatch):
    """The compiled HLO holds no all-gather of the [vocab, hidden] table (under tp_sp the lookup
    is `sharding.vocab_parallel_lookup`'s, reduce-scattered onto the residual). Under tp_sp the
    control, a lookup constrained straight to the sequence-split residual, gathered it."""
    assert not _gathers_full_table(name, 104)
    if name.startswith("tp_sp"):
        monkeypatch.setattr(jaxinfer.models.llama.DecoderLM, "embed", lambda self, ids: (
            sharding.constrain(self.embed_tokens(ids), jaxinfer.models.llama.RESIDUAL)))
        assert _gathers_full_table(name, 112)


def run_train_steps(model, batches, mesh=None, rules=None, steps=3):
    tx = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1,
                        clip_norm=1.0)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    if mesh is not None:
        params = sharding.place(params, mesh, rules, head_counts=sharding.head_counts_of(model))
        opt_state = sharding.place(opt_state, mesh, rules)
        batches = jax.device_put(batches,
                                 sharding.batch_sharding(mesh, rules, (None, "batch", None)))
    losses = []
    for _ in range(steps):
        if mesh is None:
            params, opt_state, loss, _ = train_step(graphdef, tx, params, opt_state, batches)
        else:
            with sharding.use_rules(mesh, rules):
                params, opt_state, loss, _ = train_step(graphdef, tx, params, opt_state, batches)
        losses.append(float(loss))
    return losses, params, opt_state


@pytest.fixture(scope="module")
def single_device_losses(model, batch):
    return run_train_steps(model, batch[None])[0]


@pytest.mark.parametrize("name", [
    "fsdp_tp-2x2x2",
    pytest.param("dp-8", marks=pytest.mark.slow),
    pytest.param("fsdp-2x4", marks=pytest.mark.slow),
    pytest.param("tp-2x4", marks=pytest.mark.slow),
    pytest.param("tp_sp-2x4", marks=pytest.mark.slow),
])
def test_jitted_train_step_tracks_single_device_losses(model, batch, single_device_losses, name):
    mesh, rules = layout(name)
    losses, params, opt_state = run_train_steps(model, batch[None], mesh, rules)
    np.testing.assert_allclose(losses, single_device_losses, rtol=LOSS_RTOL)
    assert losses[-1] < losses[0]
    # the updated parameters and Adam moments stay where they were placed: no per-step resharding
    for tree in (params, opt_state):
        want = jax.tree.leaves(sharding.state_shardings(tree, mesh, rules))
        got = [x.sharding for x in jax.tree.leaves(tree)]
        assert len(want) == len(got)
        assert all(w.is_equivalent_to(g, np.ndim(x))
                   for w, g, x in zip(want, got, jax.tree.leaves(tree)))
    moments = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) == 2]
    assert moments and all(m.sharding.is_fully_replicated == (LAYOUTS[name][0] == "dp")
                           for m in moments)  # dp replicates the state; the rest split it


def test_greedy_generation_with_tensor_parallelism_matches_unsharded(model):
    prompts = jax.random.randint(jax.random.key(2), (2, 5), 0, CONFIG.vocab_size, jnp.int32)
    want = jaxinfer.generate(model, prompts, max_new_tokens=6)
    mesh, rules = layout("tp-2x4")
    sharded = sharding.shard(model, mesh, rules)
    with sharding.use_rules(mesh, rules):
        got = jaxinfer.generate(sharded, prompts, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_kv_cache_is_split_by_kv_heads_under_tp(model):
    mesh, rules = layout("tp-2x4")
    with sharding.use_rules(mesh, rules):
        cache = model.init_cache(batch=2, max_len=16)
    k = cache.layers[0].k  # [batch, max_len, kv_heads, head_dim]
    assert k.addressable_shards[0].data.shape == (
        1, 16, CONFIG.num_key_value_heads // 4, CONFIG.head_dim)
    assert model.init_cache(batch=2, max_len=16).layers[0].k.sharding.is_fully_replicated


def test_tensor_axis_that_cuts_kv_heads_is_an_error(model):
    with pytest.raises(ValueError, match=r"self_attn\.k_proj\.kernel.*'kv_heads'.*size 8.*"
                                         r"num_key_value_heads=4"):
        sharding.shard(model, sharding.make_mesh(tensor=8), "tp")


def test_indivisible_parameter_dimension_is_an_error():
    odd = jaxinfer.LlamaForCausalLM(dataclasses.replace(CONFIG, vocab_size=66), rngs=nnx.Rngs(0))
    message = (r"embed_tokens\.embedding \[66, 32\]: dimension 0 \('vocab', size 66\) is not "
               r"divisible by mesh axes \('tensor',\)")
    with pytest.raises(ValueError, match=message):
        sharding.shard(odd, sharding.make_mesh(data=2, tensor=4), "tp")


def test_replicating_kv_heads_is_the_documented_way_out(model):
    rules = sharding.rules_for("tp") | {"kv_heads": None, "act_kv_heads": None}
    sharded = sharding.shard(model, sharding.make_mesh(tensor=8), rules)
    k = sharded.layers[0].self_attn.k_proj.kernel[...]
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert k.sharding.is_fully_replicated and q.addressable_shards[0].data.shape == (32, 4)


def test_shard_rejects_a_non_module():
    with pytest.raises(TypeError, match="nnx.Module"):
        sharding.shard({"w": jnp.ones(3)}, sharding.make_mesh(data=8), "dp")


def test_optimizer_state_shardings_mirror_the_parameters(model):
    mesh, rules = layout("fsdp_tp-2x2x2")
    tx = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1,
                        clip_norm=1.0)
    _, params = nnx.split(model)
    opt_state = tx.init(params)
    param_specs = [s.spec for s in jax.tree.leaves(sharding.state_shardings(params, mesh, rules))]
    adam = opt_state[1][0]  # chain(clip, adamw) -> adamw = chain(scale_by_adam, ...)
    for moment in (adam.mu, adam.nu):
        specs = [s.spec for s in jax.tree.leaves(sharding.state_shardings(moment, mesh, rules))]
        assert specs == param_specs
    assert any(spec != jax.sharding.PartitionSpec() for spec in param_specs)
    count = sharding.state_shardings(adam.count, mesh, rules)
    assert count.is_fully_replicated


def test_state_shardings_serve_as_jit_in_and_out_shardings(model):
    mesh, rules = layout("tp-2x4")
    _, params = nnx.split(model)
    shardings = sharding.state_shardings(params, mesh, rules)
    scale = jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p), in_shardings=(shardings,),
                    out_shardings=shardings)
    out = scale(params)  # params are on one device: jit moves them to the in_shardings
    q = out["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert q.addressable_shards[0].data.shape == (32, 8)
    q0 = params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    np.testing.assert_array_equal(np.asarray(q), 2 * np.asarray(q0))
