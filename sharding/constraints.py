"""Activation sharding by logical name: `use_rules` sets (mesh, rules); `constrain` applies them.

Models call `constrain(x, ("batch", "seq", "act_embed"))` at the points where a layout matters;
outside a `use_rules` block it returns x untouched, so single-device code pays nothing.

The active (mesh, rules) pair lives in a `jax.make_user_context`, which is part of jit's tracing
and compilation cache key: a function traced outside `use_rules` (no constraints) is retraced
inside it, and switching rule tables retraces too. A plain contextvar would silently reuse the
first trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import axis_size, check_auto_mesh
from sharding.rules import (Rules, check_rules_match_mesh, logical_to_mesh_axes, resolve,
                            spec_entry)
from sharding.sp_common import shard_map


@dataclasses.dataclass(frozen=True)
class ActiveRules:
    mesh: Mesh
    rules: tuple  # sorted (logical name, value) pairs: hashable, part of the jit cache key

    @property
    def table(self) -> dict:
        return dict(self.rules)


def _freeze(rules: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


_ACTIVE = jax.make_user_context(None)


def _current() -> ActiveRules | None:
    return _ACTIVE.value


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules | str):
    """Within the block, `constrain` places activations on `mesh` by `rules` (a table or preset)."""
    check_auto_mesh(mesh)
    table = resolve(rules)
    check_rules_match_mesh(table, mesh.axis_names)
    with _ACTIVE(ActiveRules(mesh, _freeze(table))):
        yield


def active_rules() -> ActiveRules | None:
    """The (mesh, rules) set by the innermost `use_rules`, or None."""
    return _current()


def activation_spec(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
    """Spec for an activation of `shape`; a dimension its mesh axes do not divide stays whole
    (a decode step's batch of 1 under data parallelism, say): activation shapes vary per call,
    so this is not an error as it is for parameters, and an uneven constraint would only add
    padding."""
    entries = []
    for size, mesh_axes in zip(shape, logical_to_mesh_axes(axes, rules)):
        entries.append(None if size % axis_size(mesh, mesh_axes) else spec_entry(mesh_axes))
    return PartitionSpec(*entries)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """x with a sharding constraint from its logical axes (one name or None per dimension) under
    the active `use_rules`; x itself when none is active."""
    active = _current()
    if active is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: logical axes {tuple(axes)} do not match the array's shape "
                         f"{tuple(x.shape)}")
    spec = activation_spec(x.shape, axes, active.mesh, active.table)
    return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))


def local_map(fn: Callable, in_axes: Sequence[Sequence[str | None]],
              out_axes: Sequence[str | None]) -> Callable:
    """fn run on each device's own block of its arguments (split by their logical axes under the
    active `use_rules`, as `constrain` would split them), or fn itself when none is active.

    For operations that need no communication but that the SPMD partitioner would not split: it
    shards no FFT, for one, and all-gathers the operand to transform it whole on every device.
    fn must be elementwise over the split dimensions (no collectives inside; `check_vma` is off,
    as Pallas kernels' outputs carry no varying-axes type). A None argument passes through."""
    def mapped(*args):
        active = _current()
        if active is None:
            return fn(*args)

        def spec(x, axes):
            return None if x is None else activation_spec(x.shape, axes, active.mesh,
                                                          active.table)

        in_specs = tuple(spec(x, axes) for x, axes in zip(args, in_axes, strict=True))
        out_specs = spec(jax.eval_shape(fn, *args), out_axes)
        return shard_map(fn, mesh=active.mesh, in_specs=in_specs, out_specs=out_specs)(*args)

    return mapped
