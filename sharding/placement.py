"""Expert placement (MoETuner-style, ILP-free): which device holds which expert, per layer.

Inputs are routing statistics (`routing_statistics`): per layer the tokens routed to each expert
(load) and, between consecutive layers, how many tokens went to expert i at layer l and to expert
j at layer l+1 (co-activation). Under MoETuner's cost model a token's hidden state moves from the
device of its layer-l expert to the device of its layer-(l+1) expert, so a transition i -> j costs
a transfer exactly when the two experts sit on different devices.

Objective (lexicographic, as MoETuner's two ILPs): every device holds exactly E / G experts per
layer (stacked weights sharded contiguously require it); first balance load, so that no device
carries more than cap_l = max(LPT's max device load, (1 + load_slack) * mean load) at layer l;
then, within that cap, minimise the cross-device transitions summed over consecutive layers.

Heuristic: per layer, LPT (largest expert first onto the least-loaded device with a free slot)
gives the balance cap and a start; then best-improvement pairwise swaps that keep every device
within the cap and raise the transitions kept local to the neighbouring layers' current
placements; a few forward sweeps over the layers. Each swap's gain is exact because it only
depends on the neighbours, so the search terminates. Cost O(sweeps * L * swaps * E^2).

A placement is realised without model changes by permuting, per layer, the router columns and
the stacked expert weights (`placement_permutation`, `permute_experts`); contiguous sharding over
the "expert" mesh axis then gives each device its assigned experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


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
    layers, tokens, top_k = ids.shape
    onehot = np.zeros((layers, tokens, num_experts), np.int64)  # [L, T, E]
    layer_idx, token_idx = np.arange(layers)[:, None], np.arange(tokens)[None, :]
    for k in range(top_k):
        np.add.at(onehot, (layer_idx, token_idx, ids[:, :, k]), 1)
    loads = onehot.sum(axis=1)
    transitions = np.einsum("lti,ltj->lij", onehot[:-1], onehot[1:])
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
                 cap: float, num_devices: int, max_swaps: int) -> np.ndarray:
    """Best-improvement pairwise swaps raising kept-local affinity, keeping loads within cap
    (or not above the pair's current maximum where the start already exceeds it)."""
    d = device_of.copy()
    experts = np.arange(len(d))
    for _ in range(max_swaps):
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


def greedy_placement(stats: RoutingStats, num_devices: int, *, load_slack: float = 0.05,
                     sweeps: int = 3, max_swaps: int | None = None) -> np.ndarray:
    """device_of int [L, E] by the objective and heuristic of the module docstring."""
    loads = np.asarray(stats.loads, np.float64)
    layers, experts = loads.shape
    if experts % num_devices:
        raise ValueError(f"num_experts={experts} must be divisible by num_devices={num_devices}")
    if np.asarray(stats.transitions).shape != (max(layers - 1, 0), experts, experts):
        raise ValueError(f"transitions must be [L-1, E, E] = [{layers - 1}, {experts}, "
                         f"{experts}]; got {np.asarray(stats.transitions).shape}")
    if load_slack < 0:
        raise ValueError(f"load_slack must be >= 0; got {load_slack}")
    max_swaps = experts * experts if max_swaps is None else max_swaps
    device_of = np.stack([_lpt(row, num_devices) for row in loads])
    caps = [max(device_loads(device_of[i:i + 1], loads[i:i + 1], num_devices).max(),
                (1 + load_slack) * loads[i].sum() / num_devices) for i in range(layers)]
    for _ in range(sweeps):
        before = device_of.copy()
        for layer in range(layers):
            affinity = _affinity(layer, device_of, stats.transitions, num_devices)
            device_of[layer] = _swap_search(device_of[layer], loads[layer], affinity, caps[layer],
                                            num_devices, max_swaps)
        if (device_of == before).all():
            break
    _check(device_of, num_devices)
    return device_of


def placement_permutation(device_of: np.ndarray) -> np.ndarray:
    """int [L, E]: per layer, the expert order (old ids) that contiguous sharding over the devices
    realises: new slot s holds old expert perm[l, s]; device g gets slots g*E/G .. (g+1)*E/G."""
    return np.argsort(device_of, axis=1, kind="stable")


def permute_experts(router_kernel: jax.Array, expert_params: Any, perm: np.ndarray
                    ) -> tuple[jax.Array, Any]:
    """One layer's router [D, E] columns and stacked expert weights ([E, ...] leaves) reordered so
    that new expert s is old expert perm[s]. The layer computes the same function: routing picks
    the same experts under new ids."""
    perm = np.asarray(perm)
    if sorted(perm.tolist()) != list(range(router_kernel.shape[1])):
        raise ValueError(f"perm must be a permutation of range({router_kernel.shape[1]}); "
                         f"got {perm.tolist()}")
    return router_kernel[:, perm], jax.tree.map(lambda w: w[perm], expert_params)
