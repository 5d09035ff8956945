"""The pieces of experiments/mixtral_traces.py on a tiny Mixtral (the experiment itself trains for
minutes): recorded routing traces are consistent with the model's router and with each other, the
runs with different router-loss weights train through jaxinfer's own step and share its compile,
and the imbalance and placement scores mean what they say. (That step's loss is tested in
tests/jaxinfer/test_train_moe_loss.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.mixtral_traces import expert_ids, expert_imbalance, score, train
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.train.data import TokenWindows
from jaxinfer.train.step import train_step_with_losses
from sharding.placement import contiguous_placement, load_imbalance, routing_statistics

LAYERS, EXPERTS, TOP_K, VOCAB, BATCH, SEQ = 2, 4, 2, 48, 2, 8


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, batches): a tiny Mixtral with random weights drawn in numpy (no RNG
    compiles, no init program) and two batches int32 [B, SEQ+1]."""
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
                           max_position_embeddings=SEQ, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOP_K)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: MixtralForCausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype),
                          abstract)
    batches = [rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32) for _ in range(2)]
    return graphdef, params, batches


def test_recorded_counts_sum_to_tokens_times_top_k_and_transitions_match_counts(tiny):
    graphdef, params, batches = tiny
    ids = expert_ids(graphdef, params, batches, TOP_K)
    tokens = len(batches) * BATCH * SEQ
    assert ids.shape == (LAYERS, tokens, TOP_K)
    assert (np.sort(ids, axis=-1)[..., 1:] != np.sort(ids, axis=-1)[..., :-1]).all()  # distinct
    stats = routing_statistics(ids, EXPERTS)
    assert (stats.loads.max(axis=1) > stats.loads.min(axis=1)).any()  # a non-trivial trace
    np.testing.assert_array_equal(stats.loads.sum(axis=1), tokens * TOP_K)
    # every token has k experts at each layer: a row of transitions(l) sums to k * load(l), a
    # column to k * load(l + 1)
    np.testing.assert_array_equal(stats.transitions.sum(axis=2), TOP_K * stats.loads[:-1])
    np.testing.assert_array_equal(stats.transitions.sum(axis=1), TOP_K * stats.loads[1:])


def test_runs_with_different_router_loss_weights_share_one_compiled_train_step(tiny):
    """`train` runs no_lb and lb_<coef> through jaxinfer.train's step with traced loss weights:
    the same losses at the first step (same init and batch), different ones once an update has
    been made (the schedule's first step has learning rate 0), one compile."""
    graphdef, params, _ = tiny
    windows = TokenWindows(np.random.default_rng(1).integers(0, VOCAB, 500).astype(np.int32),
                           SEQ, BATCH)
    runs = {}
    for aux_coef, z_coef in [(0.0, 0.0), (0.5, 0.01)]:
        compiled = train_step_with_losses._cache_size()
        runs[aux_coef] = train(nnx.merge(graphdef, params), windows, 3, 1e-2, aux_coef=aux_coef,
                               z_coef=z_coef, seed=0)[2]  # per-step losses
    assert train_step_with_losses._cache_size() == compiled  # the second run compiled nothing
    no_lb, lb = runs[0.0], runs[0.5]
    assert set(no_lb[0]) == {"next_token_loss", "load_balancing_loss", "router_z_loss"}
    assert no_lb[0] == lb[0]  # the losses are measured before the first update
    assert no_lb[2]["load_balancing_loss"] != lb[2]["load_balancing_loss"]


def test_expert_imbalance_is_max_over_mean_expert_load():
    loads = np.array([[5, 5, 5, 5], [20, 0, 0, 0], [8, 4, 4, 0]])  # [L, E]
    np.testing.assert_allclose(expert_imbalance(loads), [1.0, 4.0, 2.0])
    device_of = contiguous_placement(3, 4, 2)  # experts {0, 1} and {2, 3}
    np.testing.assert_allclose(load_imbalance(device_of, loads, 2), [1.0, 2.0, 1.5])


def test_score_counts_transitions_between_devices():
    """Two layers, 4 experts on 2 devices: only transitions across the device split count."""
    ids = np.array([[[0, 1], [2, 3]], [[1, 0], [0, 2]]])  # [L=2, T=2, K=2]
    stats = routing_statistics(ids, 4)
    result = score(contiguous_placement(2, 4, 2), stats, 2)
    # token 0: {0,1} -> {1,0}, all on device 0; token 1: {2,3} -> {0,2}: 2 of its 4 pairs cross
    assert result["cross_transitions"] == 2
    assert result["cross_fraction"] == pytest.approx(2 / 8)
    # layer 0: devices serve 2 and 2 choices; layer 1: experts 0, 0, 1 on device 0, 2 on device 1
    assert result["imbalance_mean"] == pytest.approx((1.0 + 1.5) / 2)
    assert result["imbalance_max"] == pytest.approx(1.5)
