"""Meshes, logical-axis rules and collective algorithms for data, fsdp, tensor, sequence and expert
parallelism (the design: ../shared/DESIGN.md from the project root). Imports jax, flax.nnx
(parameter metadata), scipy (MILP placement), kernels_pallas.

    import sharding
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)       # sizes multiply to the devices used
    rules = sharding.rules_for("fsdp_tp")                    # or your own {logical: mesh axes}
    model = sharding.shard(model, mesh, rules)               # every parameter placed by its axes
    with sharding.use_rules(mesh, rules):                    # activation constraints inside models
        out = jaxinfer.generate(model, prompts)

Sequence parallelism: `sequence_parallel_attention(q, k, v, mesh=mesh, impl="ring" | "ulysses")`
over the "sequence" axis (ring attention, or DeepSpeed-Ulysses), tokens in natural order unless
layout="zigzag" (tokens permuted by `zigzag_permute`, which balances the causal ring's work).
Megatron-SP (preset "tp_sp"): `column_parallel_matmul` all-gathers the sequence-split residual
before the column-parallel projections, `row_parallel_matmul` reduce-scatters the row-parallel
ones back onto it and `vocab_parallel_lookup` the embedding; under other layouts the first two
are plain matmuls and the last returns None (the caller's own lookup). `local_map` runs an
operation the partitioner would gather (an FFT) on each device's own block instead.
Multi-host: `sharding.initialize(...)` in every process first; meshes then span all processes.
Expert parallelism: `expert_parallel_moe` (all_to_all dispatch over the "expert" axis, preset "ep";
ragged_all_to_all of the filled slots only on GPU/TPU) and expert placement from routing
statistics (`routing_statistics`, then `greedy_placement` or the MILP `ilp_placement`).
"""

from sharding.constraints import active_rules, constrain, local_map, use_rules
from sharding.distributed import initialize
from sharding.expert_exchange import EXCHANGES, ragged_exchange_layout, resolve_exchange
from sharding.expert_parallel import (MoEResult, capacity_dispatch, capacity_moe, expert_capacity,
                                      expert_parallel_moe, jitter_router_input, route_top_k)
from sharding.mesh import MESH_AXES, axis_size, make_mesh
from sharding.params import batch_sharding, head_counts_of, place, shard, state_shardings
from sharding.placement import (RoutingStats, contiguous_placement, cross_device_transitions,
                                device_loads, greedy_placement, ilp_placement, load_imbalance,
                                placement_permutation, permute_experts, round_robin_placement,
                                routing_statistics)
from sharding.ring_attention import ring_attention, ring_attention_shard
from sharding.rules import (ACTIVATION_NAMES, LOGICAL_NAMES, PARAM_NAMES, PRESETS,
                            SEQUENCE_PARALLEL_IMPL, Rules, logical_to_mesh_axes, logical_to_spec,
                            rules_for)
from sharding.sequence_parallel import communication_elements, sequence_parallel_attention
from sharding.tensor_parallel import (column_parallel_matmul, row_parallel_matmul,
                                      vocab_parallel_lookup)
from sharding.ulysses import ulysses_attention, ulysses_attention_shard
from sharding.zigzag import zigzag_permute, zigzag_positions, zigzag_unpermute

__all__ = [
    "ACTIVATION_NAMES", "EXCHANGES", "LOGICAL_NAMES", "MESH_AXES", "MoEResult", "PARAM_NAMES",
    "PRESETS", "Rules",
    "RoutingStats", "SEQUENCE_PARALLEL_IMPL", "capacity_dispatch", "capacity_moe",
    "contiguous_placement", "cross_device_transitions", "device_loads", "expert_capacity",
    "expert_parallel_moe", "greedy_placement", "ilp_placement", "jitter_router_input",
    "load_imbalance",
    "permute_experts", "ragged_exchange_layout", "resolve_exchange",
    "placement_permutation", "round_robin_placement", "route_top_k", "routing_statistics",
    "active_rules", "axis_size", "batch_sharding", "column_parallel_matmul",
    "communication_elements", "constrain", "row_parallel_matmul",
    "head_counts_of", "initialize", "local_map", "logical_to_mesh_axes", "logical_to_spec",
    "make_mesh", "place",
    "ring_attention", "ring_attention_shard", "rules_for", "sequence_parallel_attention", "shard",
    "state_shardings", "ulysses_attention", "ulysses_attention_shard", "use_rules",
    "vocab_parallel_lookup",
    "zigzag_permute", "zigzag_positions", "zigzag_unpermute",
]
