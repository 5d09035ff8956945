"""Expert placement (MoETuner-style): which device holds which expert, per layer.

Inputs are routing statistics (`routing_statistics`): per layer the tokens routed to each expert
(load) and, between consecutive layers, how many tokens went to expert i at layer l and to expert
j at layer l+1 (co-activation). Under MoETuner's cost model a token's hidden state moves from the
device of its layer-l expert to the device of its layer-(l+1) expert, so a transition i -> j costs
a transfer exactly when the two experts sit on different devices.

Objective (lexicographic, as MoETuner's two ILPs): every device holds exactly E / G experts per
layer (stacked weights sharded contiguously require it); first balance load, so that no device
carries more than cap_l = max(balanced max device load, (1 + load_slack) * mean load) at layer l;
then, within that cap, minimise the cross-device transitions summed over consecutive layers.

Two solvers share that objective and differ in how exactly they meet it:

- `greedy_placement`: per layer, LPT (largest expert first onto the least-loaded device with a
  free slot) gives the balance cap and a start; then best-improvement pairwise swaps that keep
  every device within the cap and raise the transitions kept local to the neighbouring layers'
  current placements. Cost O(sweeps * L * swaps * E^2).
- `ilp_placement`: per layer, a MILP (HiGHS through `scipy.optimize.milp`) finds the minimum
  possible max device load, so the cap is the true optimum rather than LPT's; then each layer in
  turn is re-placed by a second MILP that maximises the transitions kept local to its neighbours'
  current placements within the cap. Given the neighbours that objective is linear in the
  assignment, which keeps each MILP at E * G binaries instead of MoETuner's joint model with a
  product term per expert pair and device (E^2 * G * (L - 1) variables). Where a solve stops at
  its time limit, the better of its incumbent and the greedy step is kept, with a warning.

Both run a few forward sweeps over the layers; each step never lowers the kept-local transitions,
so the search terminates.

A placement is realised without model changes by permuting, per layer, the router columns and
the stacked expert weights (`placement_permutation`, `permute_experts`); contiguous sharding over
the "expert" mesh axis then gives each device its assigned experts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoutingStats:
    """loads int64 [L, E]: token-choices routed to each expert; transitions int64 [L-1, E, E]:
    tokens routed to i at layer l and to j at layer l+1 (every top-k pair counts)."""

    loads: np.ndarray
    transitions: np.ndarray


def routing_statistics(expert_ids: np.ndarray, num_experts: int) -> RoutingStats:
    """expert_ids int [L, T, K] (each token's top-k experts per layer) -> RoutingStats."""
    ids = np.asarray(expert_ids)
    if ids.ndim != 3:
        raise ValueError(f"expert_ids must be [layers, tokens, top_k]; got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert_ids must lie in [0, {num_experts}); got range "
                         f"[{ids.min()}, {ids.max()}]")
    layers, _, top_k = ids.shape
    loads = np.zeros((layers, num_experts), np.int64)  # [L, E]
    np.add.at(loads, (np.arange(layers)[:, None, None], ids), 1)
    transitions = np.zeros((max(layers - 1, 0), num_experts, num_experts), np.int64)  # [L-1, E, E]
    step = np.arange(layers - 1)[:, None]  # [L-1, 1]: layer l's choices meet layer l+1's
    for i in range(top_k):  # the K^2 (choice at l, choice at l+1) pairs of every token
        for j in range(top_k):
            np.add.at(transitions, (step, ids[:-1, :, i], ids[1:, :, j]), 1)
    return RoutingStats(loads, transitions)


def _check(device_of: np.ndarray, num_devices: int) -> None:
    experts = device_of.shape[1]
    if experts % num_devices:
        raise ValueError(f"num_experts={experts} must be divisible by num_devices={num_devices}")
    counts = np.stack([np.bincount(row, minlength=num_devices) for row in device_of])
    if (counts != experts // num_devices).any():
        raise ValueError(f"every device must hold num_experts / num_devices = "
                         f"{experts // num_devices} experts per layer; got counts "
                         f"{counts.tolist()}")


def round_robin_placement(num_layers: int, num_experts: int, num_devices: int) -> np.ndarray:
    """device_of int [L, E]: expert e on device e % G (every layer)."""
    device_of = np.tile(np.arange(num_experts) % num_devices, (num_layers, 1))
    _check(device_of, num_devices)
    return device_of


def contiguous_placement(num_layers: int, num_experts: int, num_devices: int) -> np.ndarray:
    """device_of int [L, E]: expert e on device e // (E / G), Megatron's default."""
    device_of = np.tile(np.arange(num_experts) // (num_experts // num_devices), (num_layers, 1))
    _check(device_of, num_devices)
    return device_of


def device_loads(device_of: np.ndarray, loads: np.ndarray, num_devices: int) -> np.ndarray:
    """float [L, G]: token-choices each device serves per layer."""
    return np.stack([np.bincount(d, weights=w, minlength=num_devices)
                     for d, w in zip(device_of, np.asarray(loads, np.float64))])


def load_imbalance(device_of: np.ndarray, loads: np.ndarray, num_devices: int) -> np.ndarray:
    """float [L]: max device load over mean device load (1 = perfectly balanced)."""
    per_device = device_loads(device_of, loads, num_devices)
    return per_device.max(axis=1) / np.maximum(per_device.mean(axis=1), 1e-12)


def cross_device_transitions(device_of: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """int [L-1]: transitions i -> j between layers l and l+1 whose experts sit on different
    devices."""
    remote = device_of[:-1, :, None] != device_of[1:, None, :]  # [L-1, E, E]
    return (np.asarray(transitions) * remote).sum(axis=(1, 2))


def _lpt(loads: np.ndarray, num_devices: int) -> np.ndarray:
    """Largest load first onto the least-loaded device that has a free slot -> device_of [E]."""
    slots = len(loads) // num_devices
    device_of = np.empty(len(loads), np.int64)
    dev_load, dev_count = np.zeros(num_devices), np.zeros(num_devices, np.int64)
    for e in np.argsort(-loads, kind="stable"):
        g = int(np.argmin(np.where(dev_count < slots, dev_load, np.inf)))
        device_of[e] = g
        dev_load[g] += loads[e]
        dev_count[g] += 1
    return device_of


def _affinity(layer: int, device_of: np.ndarray, transitions: np.ndarray,
              num_devices: int) -> np.ndarray:
    """float [E, G]: transitions expert e of `layer` would keep local on device g, given the
    neighbouring layers' current placements."""
    experts = device_of.shape[1]
    out = np.zeros((experts, num_devices))
    if layer > 0:  # incoming: tokens from expert i at layer-1 (on device dev(i)) to e
        prev = np.eye(num_devices)[device_of[layer - 1]]  # [E, G]
        out += transitions[layer - 1].T.astype(np.float64) @ prev
    if layer < device_of.shape[0] - 1:  # outgoing: tokens from e to expert j at layer+1
        nxt = np.eye(num_devices)[device_of[layer + 1]]
        out += transitions[layer].astype(np.float64) @ nxt
    return out


def _swap_search(device_of: np.ndarray, loads: np.ndarray, affinity: np.ndarray,
                 cap: float, num_devices: int, max_swaps: int | None) -> np.ndarray:
    """Best-improvement pairwise swaps (at most max_swaps, default E^2) raising kept-local
    affinity, keeping loads within cap (or not above the pair's current maximum where the start
    already exceeds it)."""
    d = device_of.copy()
    experts = np.arange(len(d))
    for _ in range(len(d) ** 2 if max_swaps is None else max_swaps):
        dev_load = np.bincount(d, weights=loads, minlength=num_devices)
        own = affinity[experts, d]  # [E]
        gain = affinity[:, d] + affinity[:, d].T - own[:, None] - own[None, :]  # swap e1 <-> e2
        new_1 = dev_load[d][:, None] - loads[:, None] + loads[None, :]  # e1's device after swap
        new_2 = dev_load[d][None, :] - loads[None, :] + loads[:, None]  # e2's device after swap
        limit = np.maximum(cap, np.maximum(dev_load[d][:, None], dev_load[d][None, :]))
        feasible = (d[:, None] != d[None, :]) & (new_1 <= limit + 1e-9) & (new_2 <= limit + 1e-9)
        gain = np.where(feasible, gain, 0.0)
        e1, e2 = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[e1, e2] <= 1e-9:
            break
        d[e1], d[e2] = d[e2], d[e1]
    return d


def _validated_loads(stats: RoutingStats, num_devices: int, load_slack: float) -> np.ndarray:
    """float64 [L, E] loads, after checking the statistics and the arguments both solvers share."""
    loads = np.asarray(stats.loads, np.float64)
    transitions = np.asarray(stats.transitions, np.float64)
    if loads.ndim != 2:
        raise ValueError(f"loads must be [layers, experts]; got shape {loads.shape}")
    layers, experts = loads.shape
    if layers < 1 or experts < 1:
        raise ValueError(f"loads must hold at least one layer and one expert; got shape "
                         f"{loads.shape}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1; got {num_devices}")
    if experts % num_devices:
        raise ValueError(f"num_experts={experts} must be divisible by num_devices={num_devices}")
    if transitions.shape != (max(layers - 1, 0), experts, experts):
        raise ValueError(f"transitions must be [L-1, E, E] = [{layers - 1}, {experts}, "
                         f"{experts}]; got {transitions.shape}")
    # a NaN compares False everywhere, so it would pass the sign check and place silently
    for name, counts in (("loads", loads), ("transitions", transitions)):
        if not np.isfinite(counts).all():
            raise ValueError(f"{name} must be finite token counts; got "
                             f"{int((~np.isfinite(counts)).sum())} NaN or infinite entries")
    if (loads < 0).any() or (transitions < 0).any():
        raise ValueError(f"loads and transitions must be non-negative token counts; got minima "
                         f"{loads.min(initial=0)} and {transitions.min(initial=0)}")
    if not (np.isfinite(load_slack) and load_slack >= 0):
        raise ValueError(f"load_slack must be a finite number >= 0; got {load_slack}")
    return loads


def _load_caps(device_of: np.ndarray, loads: np.ndarray, load_slack: float,
               num_devices: int) -> np.ndarray:
    """float [L]: the larger of the balanced start's max device load and (1 + slack) x mean."""
    return np.maximum(device_loads(device_of, loads, num_devices).max(axis=1),
                      (1 + load_slack) * loads.sum(axis=1) / num_devices)


def _kept_local(device_of: np.ndarray, affinity: np.ndarray) -> float:
    """Transitions one layer's placement device_of [E] keeps local, given affinity [E, G]."""
    return float(affinity[np.arange(len(device_of)), device_of].sum())


def _colocate(device_of: np.ndarray, transitions: np.ndarray, num_devices: int, sweeps: int,
              replace: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Forward sweeps over the layers: layer l's placement becomes replace(l, current [E],
    affinity [E, G]) given its neighbours' current placements; stops when a sweep changes
    nothing."""
    device_of = device_of.copy()
    for _ in range(sweeps):
        before = device_of.copy()
        for layer in range(device_of.shape[0]):
            affinity = _affinity(layer, device_of, transitions, num_devices)
            device_of[layer] = replace(layer, device_of[layer], affinity)
        if (device_of == before).all():
            break
    return device_of


def greedy_placement(stats: RoutingStats, num_devices: int, *, load_slack: float = 0.05,
                     sweeps: int = 3, max_swaps: int | None = None) -> np.ndarray:
    """device_of int [L, E] by LPT and pairwise swaps (module docstring); sweeps=0 is LPT alone."""
    loads = _validated_loads(stats, num_devices, load_slack)
    device_of = np.stack([_lpt(row, num_devices) for row in loads])
    caps = _load_caps(device_of, loads, load_slack, num_devices)
    device_of = _colocate(
        device_of, np.asarray(stats.transitions), num_devices, sweeps,
        lambda layer, current, affinity: _swap_search(current, loads[layer], affinity,
                                                      caps[layer], num_devices, max_swaps))
    _check(device_of, num_devices)
    return device_of


def _assignment_model(loads: np.ndarray, num_devices: int, *, with_bound: bool
                      ) -> tuple[list[LinearConstraint], sparse.csr_array]:
    """Constraints on binaries x [E * G] (x[e * G + g] = expert e on device g): each expert on
    one device, each device E / G experts; and the [G, columns] matrix of device loads. With
    with_bound, a last column z enters each device-load row with coefficient -1."""
    experts, bound_columns = len(loads), int(with_bound)

    def with_z(block: sparse.sparray, coefficient: float) -> sparse.csr_array:
        return sparse.csr_array(sparse.hstack(
            [block, np.full((block.shape[0], bound_columns), coefficient)]))

    one_device = with_z(sparse.kron(sparse.eye_array(experts), np.ones((1, num_devices))), 0)
    slots = with_z(sparse.kron(np.ones((1, experts)), sparse.eye_array(num_devices)), 0)
    per_device = with_z(sparse.kron(loads[None, :], sparse.eye_array(num_devices)), -1)
    per_slot = experts // num_devices
    return ([LinearConstraint(one_device, 1, 1), LinearConstraint(slots, per_slot, per_slot)],
            per_device)


def _solve(c: np.ndarray, constraints: list[LinearConstraint], integrality: np.ndarray,
           bounds: Bounds, num_experts: int, num_devices: int, options: dict[str, float]
           ) -> tuple[np.ndarray | None, str | None]:
    """HiGHS on the model: (device_of [E] from x, or None when no feasible point was found;
    None when solved to within options["mip_rel_gap"], else the solver's message)."""
    res = milp(c, integrality=integrality, bounds=bounds, constraints=constraints,
               options=options)
    device_of = (None if res.x is None else
                 np.argmax(res.x[:num_experts * num_devices].reshape(num_experts, num_devices),
                           axis=1))
    return device_of, None if res.status == 0 else res.message


def _min_max_load(layer: int, loads: np.ndarray, num_devices: int, options: dict[str, float]
                  ) -> np.ndarray:
    """device_of [E] minimising the max device load: min z s.t. load(g) <= z, E / G experts per
    device. Symmetry breaking: the r-th heaviest expert (r = 0 .. G-1) goes to a device <= r; every
    placement does once devices are relabelled in the order of their heaviest expert."""
    experts = len(loads)
    constraints, per_device = _assignment_model(loads, num_devices, with_bound=True)
    constraints.append(LinearConstraint(per_device, -np.inf, 0))
    upper = np.ones((experts, num_devices))
    for rank, e in enumerate(np.argsort(-loads, kind="stable")[:num_devices]):
        upper[e, rank + 1:] = 0
    integral = bool(np.all(loads == np.round(loads)))  # lets HiGHS round its bound up
    c = np.zeros(experts * num_devices + 1)
    c[-1] = 1
    solved, message = _solve(c, constraints, np.r_[np.ones(experts * num_devices), integral],
                             Bounds(np.r_[np.zeros(experts * num_devices), 0],
                                    np.r_[upper.ravel(), np.inf]),
                             experts, num_devices, options)
    if message is None:
        return solved
    logger.warning("layer %d: load MILP not solved to optimality (%s); keeping the better of "
                   "its incumbent and LPT", layer, message)
    lpt = _lpt(loads, num_devices)
    candidates = [lpt] if solved is None else [solved, lpt]
    return min(candidates, key=lambda d: np.bincount(d, weights=loads).max())


def _max_kept_local(layer: int, current: np.ndarray, loads: np.ndarray, affinity: np.ndarray,
                    cap: float, num_devices: int, options: dict[str, float],
                    max_swaps: int | None) -> np.ndarray:
    """device_of [E] maximising the kept-local transitions affinity [E, G] with every device
    within cap and holding E / G experts; `current` (within cap) unless strictly better."""
    if not affinity.any():
        return current
    experts = len(loads)
    constraints, per_device = _assignment_model(loads, num_devices, with_bound=False)
    constraints.append(LinearConstraint(per_device, -np.inf, cap))
    solved, message = _solve(-affinity.ravel(), constraints, np.ones(experts * num_devices),
                             Bounds(0, 1), experts, num_devices, options)
    candidates = [current] if solved is None else [current, solved]
    if message is not None:
        logger.warning("layer %d: co-location MILP not solved to optimality (%s); keeping the "
                       "best of its incumbent and the greedy swaps", layer, message)
        candidates.append(_swap_search(current, loads, affinity, cap, num_devices, max_swaps))
    return max(candidates, key=lambda d: _kept_local(d, affinity))


def ilp_placement(stats: RoutingStats, num_devices: int, *, load_slack: float = 0.05,
                  sweeps: int = 3, time_limit: float = 10.0, mip_rel_gap: float = 1e-4,
                  max_swaps: int | None = None) -> np.ndarray:
    """device_of int [L, E] by per-layer MILPs (module docstring); sweeps=0 is balance alone.

    time_limit bounds each MILP solve in seconds (there are L + sweeps * L of them at most); a
    solve that hits it falls back to the greedy step (LPT, or max_swaps pairwise swaps) where
    that is better, with a logged warning. mip_rel_gap is HiGHS's stopping gap (its default
    1e-4; 0 proves optimality): near-uniform loads make the balance MILP a number-partitioning
    problem whose last fraction of a percent is expensive to prove.
    """
    loads = _validated_loads(stats, num_devices, load_slack)
    if time_limit <= 0 or mip_rel_gap < 0:
        raise ValueError(f"time_limit must be > 0 seconds and mip_rel_gap >= 0; got "
                         f"time_limit={time_limit}, mip_rel_gap={mip_rel_gap}")
    options = {"time_limit": time_limit, "mip_rel_gap": mip_rel_gap}
    device_of = np.stack([_min_max_load(layer, row, num_devices, options)
                          for layer, row in enumerate(loads)])
    caps = _load_caps(device_of, loads, load_slack, num_devices)
    device_of = _colocate(
        device_of, np.asarray(stats.transitions), num_devices, sweeps,
        lambda layer, current, affinity: _max_kept_local(layer, current, loads[layer], affinity,
                                                         caps[layer], num_devices, options,
                                                         max_swaps))
    _check(device_of, num_devices)
    return device_of


def placement_permutation(device_of: np.ndarray) -> np.ndarray:
    """int [L, E]: per layer, the expert order (old ids) that contiguous sharding over the devices
    realises: new slot s holds old expert perm[l, s]; device g gets slots g*E/G .. (g+1)*E/G."""
    return np.argsort(device_of, axis=1, kind="stable")


def permute_experts(router_kernel: jax.Array, expert_params: Any, perm: np.ndarray
                    ) -> tuple[jax.Array, Any]:
    """One layer's router [D, E] columns and stacked expert weights ([E, ...] leaves) reordered so
    that new expert s is old expert perm[s]. The layer computes the same function, routing
    picking the same experts under new ids, unless a token's router probabilities tie across
    its k-th choice: top-k breaks a tie by the lower expert index, and the permutation changes
    which of the tied experts that is, so such a token may be served by another expert (a
    zero-initialised router ties everywhere; trained or random float routers practically
    never tie exactly). Routing itself is left as it is."""
    perm = np.asarray(perm)
    if sorted(perm.tolist()) != list(range(router_kernel.shape[1])):
        raise ValueError(f"perm must be a permutation of range({router_kernel.shape[1]}); "
                         f"got {perm.tolist()}")
    return router_kernel[:, perm], jax.tree.map(lambda w: w[perm], expert_params)
