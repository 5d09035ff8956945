"""Placing parameters and optimizer state by the `logical_axes` metadata of their nnx Variables.

`state_shardings(tree, mesh, rules)` maps any pytree that holds nnx Variables (an `nnx.State` of
parameters, or an optax state whose moments mirror it) to a tree of `NamedSharding`s usable as
`jax.device_put` targets and as jit in/out shardings. Variables without `logical_axes` and bare
arrays (step counters) are replicated.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import axis_size, check_auto_mesh
from sharding.rules import (LOGICAL_NAMES, Rules, check_rules_match_mesh, logical_to_mesh_axes,
                            resolve, spec_entry)

logger = logging.getLogger(__name__)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def head_counts_of(model_or_config) -> dict[str, int]:
    """{"heads": H, "kv_heads": H_kv} from a model's `config` (or a config), if it has them.

    Parameters store heads flattened with head_dim ([embed, heads * head_dim]); a split that
    divides that dimension but not the head count would cut a head in two."""
    config = getattr(model_or_config, "config", model_or_config)
    counts = {}
    for logical, attr in (("heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads")):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            counts[logical] = value
    return counts


def spec_for(path: str, shape: tuple[int, ...], axes, mesh: Mesh, rules: Mapping,
             head_counts: Mapping[str, int]) -> PartitionSpec:
    """The PartitionSpec of one parameter, after checking that every split is even."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {path}: logical axes {tuple(axes)} do not match its shape "
                         f"{shape}")
    entries = []
    split = logical_to_mesh_axes(axes, rules)
    for dim, (name, size, mesh_axes) in enumerate(zip(axes, shape, split)):
        n = axis_size(mesh, mesh_axes)
        if size % n:
            raise ValueError(
                f"parameter {path} {list(shape)}: dimension {dim} ({name!r}, size {size}) is not "
                f"divisible by mesh axes {mesh_axes} of total size {n}; change the mesh or map "
                f"{name!r} to other axes (None replicates it)")
        count = head_counts.get(name)
        if count is not None and n > 1 and count % n:
            what = "num_key_value_heads" if name == "kv_heads" else "num_attention_heads"
            raise ValueError(
                f"parameter {path} {list(shape)}: {name!r} is split over mesh axes {mesh_axes} of "
                f"total size {n}, which does not divide {what}={count}, so a head would be cut "
                f"in two; use a mesh size that divides {count}, or map {name!r} to None to "
                f"replicate those heads")
        entries.append(spec_entry(mesh_axes))
    return PartitionSpec(*entries)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules | str, *,
                    head_counts: Mapping[str, int] | None = None) -> Any:
    """A tree of NamedShardings for `tree`, with one NamedSharding in place of each nnx Variable
    (a tree prefix, which device_put and jit's in/out_shardings accept) and of each bare leaf.

    `head_counts` ({"heads": H, "kv_heads": H_kv}, see `head_counts_of`) adds the check that no
    head is split; shapes are always checked for even splits. Raises ValueError naming the
    parameter path otherwise."""
    check_auto_mesh(mesh)
    rules = resolve(rules)
    check_rules_match_mesh(rules, mesh.axis_names)
    head_counts = dict(head_counts or {})
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        if _is_variable(leaf):
            axes = leaf.get_metadata().get("logical_axes")
            if axes is None:
                return replicated
            spec = spec_for(_path_str(path), tuple(leaf.shape), axes, mesh, rules, head_counts)
            return NamedSharding(mesh, spec)
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def place(tree: Any, mesh: Mesh, rules: Rules | str, *,
          head_counts: Mapping[str, int] | None = None) -> Any:
    """`tree` (params state, optimizer state, ...) device_put by `state_shardings`."""
    return jax.device_put(tree, state_shardings(tree, mesh, rules, head_counts=head_counts))


def shard(model: nnx.Module, mesh: Mesh, rules: Rules | str) -> nnx.Module:
    """A copy of `model` with every parameter (every nnx Variable) placed on `mesh` by its logical
    axes under `rules`; the input model is left as it was. Head counts come from model.config."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax nnx.Module; got {type(model).__name__}")
    graphdef, state = nnx.split(model)
    rules = resolve(rules)
    _warn_unused_rules(rules, state)
    state = place(state, mesh, rules, head_counts=head_counts_of(model))
    return nnx.merge(graphdef, state)


def _warn_unused_rules(rules: Rules, state: Any) -> None:
    """Log a warning for each rule of one's own (a key outside LOGICAL_NAMES) that splits over
    mesh axes but names no axis of `state`'s parameters ("heads_kv", "embedding"): unless an
    activation of one's own is constrained by that name, which the parameters cannot show, it
    matches nothing and what it was meant to split is replicated. Not an error for that reason;
    close misspellings of known names are (`rules.check_rule_names`)."""
    used = {name for leaf in jax.tree.leaves(state, is_leaf=_is_variable) if _is_variable(leaf)
            for name in leaf.get_metadata().get("logical_axes") or () if name is not None}
    for name, value in rules.items():
        if name is None or name in LOGICAL_NAMES or name in used or not value:
            continue
        close = difflib.get_close_matches(str(name), [*LOGICAL_NAMES, *sorted(used)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        logger.warning("sharding rule %r -> %r names no logical axis of the model's parameters "
                       "and no known one%s; unless an activation of your own is constrained by "
                       "that name it splits nothing (known: %s)", name, value, hint,
                       LOGICAL_NAMES)


def batch_sharding(mesh: Mesh, rules: Rules | str, axes) -> NamedSharding:
    """NamedSharding for an input array with logical `axes`, e.g. train_step's batches
    [accum, B, L+1] -> (None, "batch", None)."""
    check_auto_mesh(mesh)
    rules = resolve(rules)
    check_rules_match_mesh(rules, mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(*map(spec_entry, logical_to_mesh_axes(axes, rules))))
