"""Meshes, logical-axis rules and collective algorithms for data, fsdp, tensor, sequence and expert
parallelism (DESIGN.md). Imports jax (flax.nnx only to read parameter metadata).

    import sharding
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)       # sizes multiply to the devices used
    rules = sharding.rules_for("fsdp_tp")                    # or your own {logical: mesh axes}
    model = sharding.shard(model, mesh, rules)               # every parameter placed by its axes
    with sharding.use_rules(mesh, rules):                    # activation constraints inside models
        out = jaxinfer.generate(model, prompts)
"""

from sharding.constraints import active_rules, constrain, use_rules
from sharding.mesh import MESH_AXES, axis_size, make_mesh
from sharding.params import batch_sharding, head_counts_of, place, shard, state_shardings
from sharding.rules import (ACTIVATION_NAMES, PARAM_NAMES, PRESETS, Rules, logical_to_spec,
                            rules_for)

__all__ = [
    "ACTIVATION_NAMES", "MESH_AXES", "PARAM_NAMES", "PRESETS", "Rules", "active_rules", "axis_size",
    "batch_sharding", "constrain", "head_counts_of", "logical_to_spec", "make_mesh", "place",
    "rules_for", "shard", "state_shardings", "use_rules",
]
