"""One process of the multi-host test: `python -m tests.sharding.multihost_worker PORT ID COUNT`.

Joins a job of COUNT processes with 8 / COUNT emulated CPU devices each, trains the tiny Llama of
test_sharded_llama for three steps under the fsdp preset on one 8-device mesh, and prints the
losses as JSON (process 0 only). The test runs the same `fsdp_losses` in its own process of 8
devices for the one-process reference."""

from __future__ import annotations

import json
import sys


def fsdp_losses() -> list[float]:
    """Three fsdp train steps of the tiny Llama on all the job's 8 devices -> their losses."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxinfer
    import sharding
    from jaxinfer.train.optimizer import make_optimizer
    from jaxinfer.train.step import train_step
    from tests.sharding.test_sharded_llama import BATCH, CONFIG

    mesh, rules = sharding.make_mesh(fsdp=8), sharding.rules_for("fsdp")
    model = jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, BATCH, 9), 0, CONFIG.vocab_size, jnp.int32)
    tx = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1,
                        clip_norm=1.0)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    params = sharding.place(params, mesh, rules, head_counts=sharding.head_counts_of(model))
    opt_state = sharding.place(opt_state, mesh, rules)
    # every process holds the same host batch; each device takes its slice of it
    batch_sharding = sharding.batch_sharding(mesh, rules, (None, "batch", None))
    tokens = jax.make_array_from_callback(tokens.shape, batch_sharding,
                                          lambda index: tokens[index])
    losses = []
    with sharding.use_rules(mesh, rules):
        for _ in range(3):
            params, opt_state, loss, _ = train_step(graphdef, tx, params, opt_state, tokens)
            losses.append(float(loss))
    return losses


def main() -> None:
    port, process_id, count = (int(a) for a in sys.argv[1:4])
    import sharding

    sharding.initialize(f"localhost:{port}", count, process_id, local_device_count=8 // count)
    import jax

    losses = fsdp_losses()
    if jax.process_index() == 0:
        print(json.dumps({"losses": losses, "processes": jax.process_count(),
                          "devices": jax.device_count()}))


if __name__ == "__main__":
    main()
