"""Megatron-SP ("tp_sp") as explicit collectives: the row-parallel projections reduce-scatter onto
the sequence-split residual and the column-parallel ones all-gather it, numerically the plain
matmuls; the compiled Llama loss and gradients really hold reduce-scatters where the
partitioner alone wrote all-reduces (the control)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxinfer
import sharding
from sharding import tensor_parallel

# Split contractions are the same float32 terms summed in another order (~1e-7 relative).
F32_ATOL = F32_RTOL = 1e-5

RESIDUAL = ("batch", "res_seq", "act_embed")
BATCH, SEQ, HIDDEN, TP = 8, 16, 32, 4
CONFIG = jaxinfer.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
                              max_position_embeddings=64)


def tp_sp_mesh():
    return sharding.make_mesh(data=BATCH // TP, tensor=TP), sharding.rules_for("tp_sp")


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_row_and_column_parallel_matmuls_equal_plain_matmuls_with_grads():
    """Values and gradients of every input, including a column weight the rules replicate (KV
    heads that the tensor axis does not divide), which each device applies whole."""
    mesh = sharding.make_mesh(data=BATCH // TP, tensor=TP)
    rules = sharding.rules_for("tp_sp") | {"kv_heads": None, "act_kv_heads": None}
    x, h = _rand(0, (BATCH, SEQ, HIDDEN)), _rand(1, (BATCH, SEQ, 64))  # residual, mlp hidden
    w_up, w_kv = _rand(2, (HIDDEN, 64)) / HIDDEN ** 0.5, _rand(4, (HIDDEN, 8)) / HIDDEN ** 0.5
    w_down = _rand(3, (64, HIDDEN)) / 8  # O(1) outputs

    def f(x, h, w_up, w_kv, w_down, explicit: bool):
        if explicit:
            up, kv = sharding.column_parallel_matmul(x, [w_up, w_kv], x_axes=RESIDUAL,
                                                     w_axes=[("embed", "mlp"),
                                                             ("embed", "kv_heads")])
            down = sharding.row_parallel_matmul(h, w_down, x_axes=("batch", "seq", "act_mlp"),
                                                w_axes=("mlp", "embed"), out_axes=RESIDUAL)
        else:
            up, kv, down = x @ w_up, x @ w_kv, h @ w_down
        loss = jnp.sum(jnp.sin(up)) + jnp.sum(jnp.cos(down)) + jnp.sum(kv ** 2)
        return loss, (up, kv, down)

    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True),
                   static_argnums=5)
    args = (x, h, w_up, w_kv, w_down)
    (ref_loss, ref_out), ref_grads = grad(*args, False)
    with sharding.use_rules(mesh, rules):
        (loss, out), grads = grad(*args, True)
        hlo = grad.lower(*args, True).as_text()
    assert "reduce_scatter" in hlo and "all_gather" in hlo
    assert out[0].addressable_shards[0].data.shape == (BATCH // 2, SEQ, 64 // TP)
    assert out[1].addressable_shards[0].data.shape == (BATCH // 2, SEQ, 8)
    assert out[2].addressable_shards[0].data.shape == (BATCH // 2, SEQ // TP, HIDDEN)
    for got, want in zip((loss, *out, *grads), (ref_loss, *ref_out, *ref_grads)):
        np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=F32_ATOL)


def test_vocab_parallel_lookup_equals_the_table_lookup_with_grads():
    """Every id found in exactly one vocab shard: rows and the table's gradient (a scatter-add
    of the reduce-scatter's transposed all-gather) equal the plain lookup's; None outside
    tp_sp, where the caller looks up itself."""
    mesh, rules = tp_sp_mesh()
    table = _rand(0, (64, HIDDEN))  # [vocab, embed]
    ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, 64, jnp.int32)
    weights = _rand(2, (BATCH, SEQ, HIDDEN))

    def f(table, explicit: bool):
        rows = (sharding.vocab_parallel_lookup(table, ids, table_axes=("vocab", "embed"),
                                               ids_axes=("batch", "seq"), out_axes=RESIDUAL)
                if explicit else table[ids])
        return jnp.sum(rows * weights), rows

    grad = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)
    (ref_loss, ref_rows), ref_grad = grad(table, False)
    with sharding.use_rules(mesh, rules):
        (loss, rows), table_grad = grad(table, True)
    assert rows.addressable_shards[0].data.shape == (BATCH // 2, SEQ // TP, HIDDEN)
    np.testing.assert_array_equal(rows, ref_rows)  # one non-zero term per sum: exact
    for got, want in ((loss, ref_loss), (table_grad, ref_grad)):
        np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=F32_ATOL)
    assert sharding.vocab_parallel_lookup(table, ids, table_axes=("vocab", "embed"),
                                          ids_axes=("batch", "seq"), out_axes=RESIDUAL) is None


def test_vocab_parallel_lookup_of_an_id_outside_the_vocabulary_is_nan_as_unsharded():
    """Out-of-range ids give the NaN rows of the unsharded lookup (jnp.take's fill; a negative id
    counts from the end): a zero row would hide a tokenizer/vocabulary mismatch under tp_sp."""
    mesh, rules = tp_sp_mesh()
    table = _rand(0, (64, HIDDEN))
    ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, 64, jnp.int32)
    ids = ids.at[0, 3].set(70).at[1, 5].set(-1).at[2, 7].set(-65)
    with sharding.use_rules(mesh, rules):
        rows = jax.jit(lambda t: sharding.vocab_parallel_lookup(
            t, ids, table_axes=("vocab", "embed"), ids_axes=("batch", "seq"),
            out_axes=RESIDUAL))(table)
    want = jnp.take(table, ids, axis=0)
    assert np.isnan(want[0, 3]).all() and np.isnan(want[2, 7]).all()
    np.testing.assert_array_equal(rows, want)  # NaN where want is NaN, the table's rows elsewhere


@pytest.mark.parametrize("why", ["no rules", "plain tp", "indivisible seq"])
def test_other_layouts_take_the_plain_matmul(why):
    """Outside tp_sp (or where the tensor axis does not divide the sequence: a decode step) the
    functions are jnp.dot and leave the layout to the partitioner."""
    seq = 6 if why == "indivisible seq" else SEQ
    x, w = _rand(0, (BATCH, seq, 64)), _rand(1, (64, HIDDEN))
    mesh, rules = sharding.make_mesh(data=2, tensor=TP), sharding.rules_for(
        "tp" if why == "plain tp" else "tp_sp")

    def f(x, w):
        return sharding.row_parallel_matmul(x, w, x_axes=("batch", "seq", "act_mlp"),
                                            w_axes=("mlp", "embed"), out_axes=RESIDUAL)

    if why == "no rules":
        hlo = jax.jit(f).lower(x, w).as_text()
    else:
        with sharding.use_rules(mesh, rules):
            hlo = jax.jit(f).lower(x, w).as_text()
    assert "reduce_scatter" not in hlo and "shard_map" not in hlo


def test_bad_shapes_are_clear_errors():
    x = jnp.zeros((2, 8, 16))
    with pytest.raises(ValueError, match="weight's input dimension"):
        sharding.row_parallel_matmul(x, jnp.zeros((8, 4)), x_axes=("batch", "seq", "act_mlp"),
                                     w_axes=("mlp", "embed"), out_axes=RESIDUAL)
    with pytest.raises(ValueError, match=r"\[batch, seq, features\]"):
        sharding.column_parallel_matmul(x[0], [jnp.zeros((16, 4))], x_axes=RESIDUAL,
                                        w_axes=[("embed", "mlp")])
    with pytest.raises(ValueError, match="one axes tuple per weight"):
        sharding.column_parallel_matmul(x, [jnp.zeros((16, 4))], x_axes=RESIDUAL, w_axes=[])


_COLLECTIVE = re.compile(r"\s(all-reduce|reduce-scatter|all-gather)(?:-start)?\(")


def collectives(hlo: str) -> list[tuple[str, list[str]]]:
    """(op, result array shapes) of every all-reduce / reduce-scatter / all-gather in compiled
    HLO text; a combined op (tuple result) lists each of its arrays."""
    out = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match and "=" in line[:match.start()]:
            result = line[line.index("=") + 1:match.start()]
            out.append((match.group(1), re.findall(r"f32\[([\d,]*)\]", result)))
    return out


def residual_collectives(hlo: str) -> dict[str, int]:
    """Per op, how many move a model-width activation of the layer: an all-reduce of the whole
    local sequence [batch/dp, T, hidden], a reduce-scatter onto its tensor shard
    [batch/dp, T/tp, hidden] (local shapes; the test's sizes keep them unambiguous)."""
    full, split = f"{BATCH // 2},{SEQ},{HIDDEN}", f"{BATCH // 2},{SEQ // TP},{HIDDEN}"
    counts = {"all-reduce": 0, "reduce-scatter": 0}
    for op, shapes in collectives(hlo):
        if op == "all-reduce":
            counts[op] += shapes.count(full)
        elif op == "reduce-scatter":
            counts[op] += shapes.count(split)
    return counts


def compiled_loss_and_grads_hlo() -> str:
    model = jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    mesh, rules = tp_sp_mesh()
    graphdef, params = nnx.split(sharding.shard(model, mesh, rules))
    ids = jax.device_put(jnp.zeros((BATCH, SEQ + 1), jnp.int32),
                         sharding.batch_sharding(mesh, rules, ("batch", None)))

    def loss_fn(p):
        logits, _ = nnx.merge(graphdef, p).forward(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    with sharding.use_rules(mesh, rules):
        return jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile().as_text()


def test_tp_sp_reduce_scatters_onto_the_residual_instead_of_all_reducing(monkeypatch):
    """The forward reduce-scatters the embedding lookup and, per layer, the o and down
    projections; the backward the gradients of the q/k/v and gate/up inputs per layer and of the
    LM head's once: no model-width activation is all-reduced. The control, the same model with
    the explicit collectives switched off, is the partitioner's own plan: no reduce-scatter, an
    all-reduce (then a slice) for every one of them."""
    explicit = residual_collectives(compiled_loss_and_grads_hlo())
    monkeypatch.setattr(tensor_parallel, "_plan", lambda *args, **kwargs: None)
    control = residual_collectives(compiled_loss_and_grads_hlo())
    layers = CONFIG.num_hidden_layers
    assert control["reduce-scatter"] == 0 and control["all-reduce"] >= 4 * layers
    assert explicit["reduce-scatter"] >= 4 * layers and explicit["all-reduce"] == 0
