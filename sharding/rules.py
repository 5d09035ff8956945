"""Rule tables: logical axis names (carried by parameters and activations) -> mesh axes.

A table is a plain dict `{logical name: mesh axis | tuple of mesh axes | None}`; a name that is
absent, or maps to None, is replicated (flax's convention for logical rules). Changing a parallel
layout is choosing another table, never editing the model.

Known names are the models' (LOGICAL_NAMES, below) and a table's own keys: a module of your own
with its own axis name (a LoRA adapter's "lora_rank") gets a rule for it, `{"lora_rank": None}`
to replicate it. What would otherwise match nothing and replicate silently is refused:
  * an array axis named neither in LOGICAL_NAMES nor in the table;
  * a table key that is a mesh axis name ({"tensor": ...}: keys are logical names, values mesh
    axes) or a close misspelling of a known name that the table leaves out ("embd" without
    "embed": did you mean "embed"?).
A key of one's own that is no close misspelling ("heads_kv", "embedding") and that no parameter
carries gets a warning from `sharding.shard`, not an error: it may name an activation of one's
own, which only a `constrain` call inside the model shows.

Parameter names (jaxinfer/models/layers.py): "vocab", "embed", "heads", "kv_heads", "mlp".
Activation names (constrained inside the model through `sharding.constrain`):
  "batch"        the batch dimension of every activation
  "res_seq"      the sequence dimension of the residual stream (norm inputs/outputs); Megatron
                 sequence parallelism shards it over "tensor"
  "seq"          the sequence dimension inside attention and the MLP
  "act_embed"    the model-width dimension of the residual stream
  "act_heads", "act_kv_heads", "head_dim"   q / k, v and attention outputs [batch, seq, H, D]
  "act_mlp"      the MLP hidden activation
  "act_vocab"    logits
  "cache_seq"    the slot dimension of the KV cache [batch, cache_seq, act_kv_heads, head_dim]
"""

from __future__ import annotations

import difflib
import functools
from typing import Mapping, Sequence

from jax.sharding import PartitionSpec

from sharding.mesh import MESH_AXES

Rules = Mapping[str, "str | tuple[str, ...] | None"]

PARAM_NAMES = ("vocab", "embed", "heads", "kv_heads", "mlp", "expert")
ACTIVATION_NAMES = ("batch", "res_seq", "seq", "act_embed", "act_heads", "act_kv_heads", "head_dim",
                    "act_mlp", "act_vocab", "cache_seq")
# Every logical name the models use; a table may add names of its own (see the module docstring).
LOGICAL_NAMES = PARAM_NAMES + ACTIVATION_NAMES
_KNOWN = frozenset(LOGICAL_NAMES)
# difflib ratio at or above which a table key of one's own counts as a misspelt known name: one
# letter dropped, added or swapped ("embd", "kv_head", "vocb", "experts") scores >= 0.8, while
# distinct names of one's own ("act_lora" 0.71 against "act_vocab", "act_hidden" 0.63) fall below.
MISSPELLING_CUTOFF = 0.8

# Data parallelism runs over both "data" and "fsdp": under FSDP the fsdp axis is a data axis whose
# parameters are sharded rather than replicated, so a batch always splits over the two.
_BATCH = ("data", "fsdp")
_REPLICATED_ACTIVATIONS = {name: None for name in ACTIVATION_NAMES} | {"batch": _BATCH}
# Megatron: column-parallel q/k/v/gate/up (output features over "tensor"), row-parallel o/down
# (input features over "tensor"), vocab-parallel embedding and lm_head; activations follow.
_MEGATRON_PARAMS = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}
_MEGATRON_ACTIVATIONS = {"act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor",
                         "act_vocab": "tensor"}

_SEQUENCE_PARALLEL = ({name: None for name in PARAM_NAMES} | {"embed": "fsdp"}
                      | _REPLICATED_ACTIVATIONS | {"seq": "sequence", "res_seq": "sequence"})

PRESETS: dict[str, dict] = {
    # parameters replicated; the batch split over data x fsdp
    "dp": {name: None for name in PARAM_NAMES} | _REPLICATED_ACTIVATIONS,
    # ZeRO-3 style: every weight sharded along its model-width ("embed") dimension over fsdp,
    # all-gathered by XLA where a matmul needs it; optimizer state follows the parameters
    "fsdp": {name: None for name in PARAM_NAMES} | {"embed": "fsdp"} | _REPLICATED_ACTIVATIONS,
    # Megatron tensor parallelism, data parallel across data x fsdp
    "tp": {"embed": None} | _MEGATRON_PARAMS | _REPLICATED_ACTIVATIONS | _MEGATRON_ACTIVATIONS,
    # Megatron TP with sequence-parallel norms: the residual stream is split over "tensor" along
    # the sequence; the models' projections then all-gather it before the column-parallel
    # matmuls and reduce-scatter onto it after the row-parallel ones (sharding.tensor_parallel)
    "tp_sp": {"embed": None} | _MEGATRON_PARAMS | _REPLICATED_ACTIVATIONS | _MEGATRON_ACTIVATIONS
             | {"res_seq": "tensor"},
    # 2-D: Megatron TP inside, FSDP on the remaining (embed) weight dimension
    "fsdp_tp": {"embed": "fsdp"} | _MEGATRON_PARAMS | _REPLICATED_ACTIVATIONS
               | _MEGATRON_ACTIVATIONS,
    # sequence (context) parallelism: every activation's sequence dimension split over
    # "sequence", parameters as under "fsdp"; attention must then run through
    # sharding.sequence_parallel_attention with the impl SEQUENCE_PARALLEL_IMPL names
    "sp_ring": _SEQUENCE_PARALLEL,
    "sp_ulysses": _SEQUENCE_PARALLEL,
    # expert parallelism: MoE experts split over "expert", which also carries data parallelism
    # for everything else. Tokens travel to their experts' devices by all_to_all when the model
    # runs MixtralConfig(moe_impl="expert_parallel"); the default dropless MoE stays correct
    # under this table but gathers every token's routing to every device (no expert parallelism)
    "ep": {name: None for name in PARAM_NAMES} | _REPLICATED_ACTIVATIONS
          | {"expert": "expert", "batch": (*_BATCH, "expert")},
}

# The attention algorithm each sequence-parallel preset stands for (the tables are the same: the
# layout of the arrays does not depend on how attention exchanges them).
SEQUENCE_PARALLEL_IMPL = {"sp_ring": "ring", "sp_ulysses": "ulysses"}


def rules_for(name: str) -> dict:
    """A fresh copy of the preset rule table `name` (edit it freely)."""
    if name not in PRESETS:
        raise ValueError(f"unknown sharding preset {name!r}; expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def _mesh_axes_of(value, name: str) -> tuple[str, ...]:
    """A rule value normalised to a tuple of mesh axis names (empty = replicated)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise ValueError(f"rule for logical axis {name!r} must be a mesh axis name, a tuple of them or "
                     f"None; got {value!r}")


@functools.lru_cache(maxsize=None)
def _misspelt(name: str) -> str | None:
    """The known logical name `name` is a close misspelling of (and not itself), or None."""
    close = difflib.get_close_matches(name, LOGICAL_NAMES, n=1, cutoff=MISSPELLING_CUTOFF)
    return close[0] if close else None


def check_rule_names(rules: Rules, mesh_axis_names: Sequence[str] = MESH_AXES) -> None:
    """A table's keys are logical names: the models' (LOGICAL_NAMES) or one's own. Refused: a key
    that is a mesh axis name (of `mesh_axis_names`) rather than a logical one, and a key of one's
    own that is a close misspelling of a known name the table leaves without a rule ("embd" with
    no "embed"; a table that has both is taken as meant)."""
    for name in rules:
        if name is None or name in _KNOWN:
            continue
        if not isinstance(name, str):
            raise TypeError(f"rules map logical axis names (str) to mesh axes; got key {name!r}")
        if name in mesh_axis_names:
            raise ValueError(f"rules map logical axis names to mesh axes; {name!r} is a mesh "
                             f"axis (logical names: {LOGICAL_NAMES} or your own)")
        known = _misspelt(name)
        if known is not None and known not in rules:
            raise ValueError(f"rules name logical axis {name!r} but not {known!r}: did you mean "
                             f"{known!r}? (if {name!r} is a name of your own, give {known!r} a "
                             f"rule too, None to replicate it)")


def resolve(rules: Rules | str) -> dict:
    """A preset name or a table -> a table (a preset name goes through rules_for); a table's
    keys pass `check_rule_names`."""
    if isinstance(rules, str):
        return rules_for(rules)
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a preset name or a dict of logical name -> mesh axes; "
                        f"got {type(rules).__name__}")
    check_rule_names(rules)
    return dict(rules)


def _check_axes_known(axes: Sequence[str | None], rules: Rules) -> None:
    """Each of `axes` is None, one of LOGICAL_NAMES or a key of `rules`."""
    for name in axes:
        if name is None or (isinstance(name, str) and (name in _KNOWN or name in rules)):
            continue
        close = difflib.get_close_matches(str(name), [*LOGICAL_NAMES, *map(str, rules)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"logical axes {tuple(axes)} name {name!r}, which is neither a known "
                         f"logical axis nor in the rules{hint}; a name of your own needs a rule "
                         f"(None to replicate it); known: {LOGICAL_NAMES}")


def logical_to_mesh_axes(axes: Sequence[str | None], rules: Rules) -> tuple[tuple[str, ...], ...]:
    """Per dimension, the tuple of mesh axes it is split over (empty = replicated). Each of
    `axes` is None, one of LOGICAL_NAMES or a key of `rules` (a known name without a rule is
    replicated)."""
    check_rule_names(rules)
    _check_axes_known(axes, rules)
    out, used = [], {}
    for dim, name in enumerate(axes):
        mesh_axes = () if name is None else _mesh_axes_of(rules.get(name), name)
        for a in mesh_axes:
            if a in used:
                raise ValueError(
                    f"mesh axis {a!r} is assigned to two dimensions of logical axes {tuple(axes)} "
                    f"({axes[used[a]]!r} and {name!r}); a mesh axis can split only one dimension")
            used[a] = dim
        out.append(mesh_axes)
    return tuple(out)


def spec_entry(mesh_axes: tuple[str, ...]):
    """A PartitionSpec entry for a dimension split over `mesh_axes`."""
    if not mesh_axes:
        return None
    return mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def logical_to_spec(axes: Sequence[str | None], rules: Rules | str) -> PartitionSpec:
    """Logical axis names of an array's dimensions -> the PartitionSpec under `rules`.

    ("embed", "heads") under rules_for("fsdp_tp") -> PartitionSpec("fsdp", "tensor")."""
    rules = resolve(rules)
    return PartitionSpec(*(spec_entry(m) for m in logical_to_mesh_axes(axes, rules)))


def check_rules_match_mesh(rules: Rules, mesh_axis_names: Sequence[str]) -> None:
    """Every mesh axis a rule names must exist in the mesh; no key may be one of its axes."""
    mesh_axis_names = tuple(mesh_axis_names)
    check_rule_names(rules, mesh_axis_names)
    for name, value in rules.items():
        for a in _mesh_axes_of(value, name):
            if a not in mesh_axis_names:
                raise ValueError(f"rule {name!r} -> {value!r} names mesh axis {a!r}, which the "
                                 f"mesh does not have (its axes: {tuple(mesh_axis_names)})")
