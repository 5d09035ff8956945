"""Meshes, rule tables and activation constraints, without a model (fast)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sharding


def test_make_mesh_names_sizes_and_auto_axes():
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2, sequence=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 1, "sequence": 2, "tensor": 2}
    assert set(mesh.axis_names) == {"data", "fsdp", "tensor", "sequence", "expert"}
    assert mesh.devices.size == 8 and len(set(mesh.devices.flat)) == 8
    # Auto, so GSPMD propagates shardings (jax.make_mesh alone defaults to Explicit)
    if hasattr(jax.sharding, "AxisType"):
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_over_a_subset_of_devices():
    mesh = sharding.make_mesh(tensor=4, devices=jax.devices()[:4])
    assert mesh.shape["tensor"] == 4 and mesh.devices.size == 4


@pytest.mark.parametrize("sizes", [dict(data=3), dict(data=2, tensor=2), dict(tensor=16)])
def test_make_mesh_rejects_sizes_that_do_not_multiply_to_the_devices(sizes):
    with pytest.raises(ValueError, match="multiply to the number of devices"):
        sharding.make_mesh(**sizes)


def test_make_mesh_larger_than_the_devices_says_it_needs_more_devices():
    with pytest.raises(ValueError, match=r"data=16 .* = 16, but there are 8 devices; the mesh "
                                         r"needs more than the 8 devices that exist") as info:
        sharding.make_mesh(data=16)
    assert "jax.devices()[:" not in str(info.value)  # slicing 8 devices cannot give 16
    with pytest.raises(ValueError, match=r"needs more than the 2 devices given"):
        sharding.make_mesh(data=4, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=r"pass devices=devices\[:2\]"):  # the caller's list
        sharding.make_mesh(data=2, devices=jax.devices()[:4])


def test_make_mesh_rejects_a_repeated_device():
    with pytest.raises(ValueError, match="devices must not repeat a device; got 2 entries for 1"):
        sharding.make_mesh(data=2, devices=[jax.devices()[0]] * 2)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_make_mesh_rejects_non_positive_integer_sizes(bad):
    with pytest.raises(ValueError, match="data must be an integer >= 1"):
        sharding.make_mesh(data=bad)


def test_unknown_preset_lists_the_presets():
    listing = r"unknown sharding preset 'zero9'.*'dp'.*'fsdp'.*'fsdp_tp'.*'tp'"
    with pytest.raises(ValueError, match=listing):
        sharding.rules_for("zero9")


def test_rules_for_returns_an_editable_copy():
    rules = sharding.rules_for("tp")
    rules["kv_heads"] = None
    assert sharding.rules_for("tp")["kv_heads"] == "tensor"


# Megatron's layout for a Llama block (../shared/research/parallelism.md section 4), written out by
# hand as the independent expectation; kernels are [in, out].
MEGATRON = {
    ("vocab", "embed"): P("tensor", None),        # vocab-parallel embedding
    ("embed", "heads"): P(None, "tensor"),        # q: column-parallel
    ("embed", "kv_heads"): P(None, "tensor"),     # k, v: column-parallel
    ("heads", "embed"): P("tensor", None),        # o: row-parallel
    ("embed", "mlp"): P(None, "tensor"),          # gate, up: column-parallel
    ("mlp", "embed"): P("tensor", None),          # down: row-parallel
    ("embed", "vocab"): P(None, "tensor"),        # lm_head: vocab-parallel
    ("embed",): P(None),                          # norms replicated
}


@pytest.mark.parametrize("axes", list(MEGATRON))
def test_tp_preset_is_megatron(axes):
    assert sharding.logical_to_spec(axes, sharding.rules_for("tp")) == MEGATRON[axes]


@pytest.mark.parametrize("axes", list(MEGATRON))
def test_fsdp_tp_adds_fsdp_on_the_embed_dimension(axes):
    want = P(*("fsdp" if name == "embed" else entry for name, entry in zip(axes, MEGATRON[axes])))
    assert sharding.logical_to_spec(axes, "fsdp_tp") == want


def test_fsdp_and_dp_presets():
    assert sharding.logical_to_spec(("embed", "mlp"), "fsdp") == P("fsdp", None)
    assert sharding.logical_to_spec(("vocab", "embed"), "dp") == P(None, None)
    for preset in ("dp", "fsdp", "tp", "fsdp_tp"):
        assert sharding.logical_to_spec(("batch", "seq", "act_embed"), preset) == \
            P(("data", "fsdp"), None, None)


def test_ep_preset_splits_experts_and_routes_the_batch_over_the_expert_axis():
    logical_to_spec = sharding.logical_to_spec
    assert logical_to_spec(("expert", "embed", "mlp"), "ep") == P("expert", None, None)
    assert logical_to_spec(("batch", "seq", "act_embed"), "ep") == P(("data", "fsdp", "expert"),
                                                                    None, None)
    assert all(logical_to_spec((name,), "dp") == P(None) for name in ("expert", "mlp"))


def test_custom_rules_tuples_none_and_names_without_a_rule():
    rules = {"batch": ("data", "fsdp"), "mlp": "tensor", "embed": None}
    assert sharding.logical_to_spec(("batch", None, "mlp", "embed", "act_vocab"), rules) == \
        P(("data", "fsdp"), None, "tensor", None, None)


class _LoRA(nnx.Module):
    """A module of one's own whose rank dimension has its own logical name."""

    def __init__(self):
        self.a = nnx.Param(jnp.ones((64, 8)), logical_axes=("embed", "lora_rank"))
        self.b = nnx.Param(jnp.ones((8, 64)), logical_axes=("lora_rank", "mlp"))


@pytest.mark.parametrize("rank_rule, a_spec, b_spec", [
    (None, P("fsdp", None), P(None, "tensor")),  # replicated rank: the table says so
    ("data", P("fsdp", "data"), P("data", "tensor")),
])
def test_a_name_of_ones_own_with_a_rule_places_and_constrains(rank_rule, a_spec, b_spec):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.rules_for("fsdp_tp") | {"lora_rank": rank_rule}
    state = nnx.state(sharding.shard(_LoRA(), mesh, rules))
    assert (state["a"].value.sharding.spec, state["b"].value.sharding.spec) == (a_spec, b_spec)
    with sharding.use_rules(mesh, rules | {"my_feat": "tensor"}):
        y = jax.jit(lambda x: sharding.constrain(x, ("batch", "my_feat")))(jnp.ones((8, 4)))
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")


def test_shard_warns_of_a_rule_of_ones_own_that_names_no_parameter_axis(caplog):
    """A key no known name is close to ("heads_kv" for "kv_heads", "embedding") used to shard
    nothing in silence; a name the model's parameters carry, or a rule of None, is quiet."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.rules_for("fsdp_tp") | {"lora_rank": "data", "heads_kv": "tensor",
                                             "embedding": "fsdp", "act_lora": None}
    with caplog.at_level("WARNING", logger="sharding.params"):
        sharding.shard(_LoRA(), mesh, rules)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert "rule 'heads_kv' -> 'tensor' names no logical axis of the model's" in warned[0]
    assert "'embedding' -> 'fsdp'" in warned[1] and "did you mean 'embed'?" in warned[1]


@pytest.mark.parametrize("rules, message", [
    # a misspelt key used to match nothing, so its dimension was silently replicated
    ({"embd": "fsdp"}, r"rules name logical axis 'embd' but not 'embed': did you mean 'embed'\?"),
    ({"kv_head": "tensor", "heads": "tensor"}, r"'kv_head' but not 'kv_heads': did you mean"),
    ({"mlp": "tensor", "tensor": "tensor"},
     r"rules map logical axis names to mesh axes; 'tensor' is a mesh axis"),
    ({3: "tensor"}, r"rules map logical axis names \(str\) to mesh axes; got key 3"),
])
def test_rules_keys_misspelt_or_naming_mesh_axes_are_errors(rules, message):
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    with pytest.raises((ValueError, TypeError), match=message):
        sharding.state_shardings({"x": jnp.ones(8)}, mesh, rules)
    with pytest.raises((ValueError, TypeError), match=message):
        with sharding.use_rules(mesh, rules):
            pass
    with pytest.raises((ValueError, TypeError), match=message):
        sharding.logical_to_mesh_axes(("seq",), rules)


def test_a_name_of_ones_own_close_to_a_known_one_is_taken_where_the_table_has_both():
    # "q_heads" is one letter-run from "heads": with "heads" in the table it is taken as meant
    rules = {**sharding.rules_for("tp"), "q_heads": "tensor"}
    assert sharding.logical_to_spec(("batch", "q_heads"), rules) == P(("data", "fsdp"), "tensor")
    with pytest.raises(ValueError, match=r"'q_heads' but not 'heads'.*give 'heads' a rule too"):
        sharding.logical_to_spec(("batch", "q_heads"), {"q_heads": "tensor"})


def test_logical_axes_naming_unknown_names_are_errors():
    with pytest.raises(ValueError, match=r"logical axes \('embedd', 'heads'\) name 'embedd', "
                                         r"which is neither a known logical axis nor in the "
                                         r"rules \(did you mean 'embed'\?\)"):
        sharding.logical_to_spec(("embedd", "heads"), "fsdp_tp")
    # a name of one's own needs a rule (None to replicate): the table is what declares it
    with pytest.raises(ValueError, match=r"name 'lora_rank'.*needs a rule \(None to replicate"):
        sharding.logical_to_spec(("embed", "lora_rank"), "fsdp_tp")
    with pytest.raises(ValueError, match=r"did you mean 'lora_rank'\?"):
        sharding.logical_to_spec(("embed", "lora_rnk"), {"lora_rank": None})


def test_every_preset_and_model_axis_name_is_known():
    for preset in sharding.PRESETS:
        assert set(sharding.rules_for(preset)) <= set(sharding.LOGICAL_NAMES), preset
    from jaxinfer.models import hyena, layers, llama
    model_axes = (llama.Q_AXES, llama.KV_AXES, llama.CACHE_AXES, llama.LOGITS, layers.RESIDUAL,
                  hyena.SHORT_CACHE_AXES, hyena.LONG_CACHE_AXES, hyena.FILTER_CACHE_AXES,
                  hyena.LONG_CONV_AXES)
    for axes in model_axes:
        sharding.logical_to_spec(axes, "fsdp_tp")  # raises on an unknown name


def test_axis_size_names_a_missing_axis_and_the_mesh_axes():
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    assert sharding.axis_size(mesh, ("fsdp", "tensor")) == 8 and sharding.axis_size(mesh, None) == 1
    with pytest.raises(ValueError, match=r"axes='model' is not an axis of the mesh; its axes are "
                                         r"\('data', 'fsdp', 'expert', 'sequence', 'tensor'\)"):
        sharding.axis_size(mesh, "model")


def test_one_mesh_axis_on_two_dimensions_is_an_error():
    with pytest.raises(ValueError, match="mesh axis 'tensor' is assigned to two dimensions"):
        sharding.logical_to_spec(("embed", "mlp"), {"embed": "tensor", "mlp": "tensor"})


def test_malformed_rule_value_is_an_error():
    with pytest.raises(ValueError, match="rule for logical axis 'mlp'"):
        sharding.logical_to_spec(("mlp",), {"mlp": 3})


def test_rule_naming_a_missing_mesh_axis_is_an_error():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="names mesh axis 'tensor'"):
        with sharding.use_rules(mesh, "tp"):
            pass


@pytest.mark.skipif(not hasattr(jax.sharding, "AxisType"), reason="no axis types in this jax")
def test_explicit_mesh_is_rejected_with_the_fix():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match=r"\('data',\) are Explicit.*sharding\.make_mesh"):
        with sharding.use_rules(mesh, {"batch": "data"}):
            pass
    with pytest.raises(ValueError, match="are Explicit"):
        sharding.state_shardings({"x": jnp.ones(8)}, mesh, {})


@pytest.mark.skipif(not hasattr(jax.sharding, "AxisType"), reason="no axis types in this jax")
@pytest.mark.parametrize("impl", ["ring", "ulysses", "expert_parallel_moe"])
def test_collectives_reject_an_explicit_mesh_with_the_fix(impl):
    """The shard_map collectives check the mesh as use_rules does, before shard_map would blame
    its in_specs."""
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    with pytest.raises(ValueError, match=r"are Explicit.*sharding\.make_mesh"):
        if impl == "expert_parallel_moe":
            mesh = jax.make_mesh((8, 1), ("expert", "data"), axis_types=explicit)
            params = {"w": jnp.ones((8, 4, 4))}
            sharding.expert_parallel_moe(jnp.ones((16, 4)), jnp.ones((4, 8)), params,
                                         lambda p, xs: xs, mesh=mesh, top_k=2,
                                         capacity_factor=1.0)
        else:
            mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=explicit)
            q = jnp.ones((2, 16, 4, 8))
            sharding.sequence_parallel_attention(q, q, q, mesh=mesh, impl=impl, causal=True)


def test_constrain_is_identity_without_rules():
    x = jnp.ones((8, 4))
    assert sharding.constrain(x, ("batch", "act_embed")) is x
    assert sharding.active_rules() is None


def test_constrain_applies_rules_and_jit_retraces_inside_use_rules():
    mesh = sharding.make_mesh(data=2, tensor=4)
    f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "act_mlp")))
    x = jnp.arange(64.0).reshape(8, 8)
    plain = f(x)  # traced with no rules: no constraint
    assert plain.sharding.is_fully_replicated
    with sharding.use_rules(mesh, "tp"):
        y = f(x)  # must not reuse the unconstrained trace
        assert y.sharding.spec == P("data", "tensor")
        assert y.addressable_shards[0].data.shape == (4, 2)
    with sharding.use_rules(mesh, "dp"):
        assert f(x).addressable_shards[0].data.shape == (4, 8)  # another table, another trace
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))


def test_constrain_leaves_an_indivisible_activation_dimension_whole():
    mesh = sharding.make_mesh(data=8)
    with sharding.use_rules(mesh, "dp"):
        y = jax.jit(lambda x: sharding.constrain(x, ("batch", "act_embed")))(jnp.ones((1, 8)))
    assert y.addressable_shards[0].data.shape == (1, 8)  # a decode batch of 1 is not an error


def test_constrain_rank_mismatch_is_an_error():
    with sharding.use_rules(sharding.make_mesh(data=8), "dp"):
        with pytest.raises(ValueError, match="do not match the array's shape"):
            sharding.constrain(jnp.ones((8, 4)), ("batch",))


def test_local_map_transforms_each_devices_block_without_gathering():
    """The partitioner shards no FFT: given channel-split input it all-gathers and transforms
    the whole array on every device (the control). Under local_map each device transforms its
    own rows (3: indivisible, kept whole) and channels, and the result equals the unsharded one.
    None arguments pass through."""
    def spectrum(x, scale, unused):  # x [rows, channels, T]; scale [channels]
        assert unused is None
        return jnp.abs(jnp.fft.rfft(x * scale[:, None], axis=-1))

    axes = ("batch", "act_heads", None)
    mapped = sharding.local_map(spectrum, (axes, ("act_heads",), axes), axes)
    mesh = sharding.make_mesh(data=2, tensor=4)
    x = jax.random.normal(jax.random.key(0), (3, 8, 16))
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, "tensor", None)))
    scale = jnp.arange(1.0, 9.0)
    want = spectrum(x, scale, None)
    np.testing.assert_array_equal(np.asarray(mapped(x, scale, None)), np.asarray(want))  # no rules
    plain = jax.jit(lambda x, s: spectrum(x, s, None)).lower(x, scale).compile()
    assert "all-gather" in plain.as_text()
    with sharding.use_rules(mesh, "tp"):
        compiled = jax.jit(lambda x, s: mapped(x, s, None)).lower(x, scale).compile()
    got = compiled(x, scale)
    assert "all-gather" not in compiled.as_text()
    assert got.addressable_shards[0].data.shape == (3, 2, 9)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)
