"""`generate`: batched generation for a fixed batch of equal-length prompts.

Prefill runs once over the prompts; a compiled `lax.scan` then decodes one token per step against a
KV cache sized for prompt + new tokens. The compiled function is cached per (model structure,
batch, prompt length, new tokens), so repeated calls and every decode step reuse one executable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.generate.checks import MAX_SEED, check_int, check_model
from jaxinfer.generate.sampling import SamplingArrays, make_sampling_params, sample_next_token
from jaxinfer.models.inputs import check_input_ids


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
              params: SamplingArrays, key: jax.Array, max_new_tokens: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.forward(input_ids, cache, start=0)
    first = sample_next_token(logits[:, -1], params, jax.random.fold_in(key, 0))  # [batch]

    def step(carry, i):
        token, cache = carry
        logits, cache = model.forward(token[:, None], cache, start=prompt_len + i)
        nxt = sample_next_token(logits[:, -1], params, jax.random.fold_in(key, i + 1))
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens - 1))
    new_tokens = jnp.concatenate([tokens.T, last[:, None]], axis=1)  # [batch, max_new_tokens]
    return jnp.concatenate([input_ids, new_tokens], axis=1)


def generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> jax.Array:
    """Continue each prompt of input_ids int32 [batch, seq] by exactly max_new_tokens tokens.

    Returns int32 [batch, seq + max_new_tokens] (prompt included). temperature=0 is greedy;
    otherwise tokens are sampled after top-k and top-p filtering, reproducibly for a given seed."""
    check_model("model", model)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=0)
    seed = check_int("seed", seed, low=0, high=MAX_SEED)
    params = make_sampling_params(temperature, top_k, top_p)
    input_ids = check_input_ids(input_ids, model.config, new_tokens=max_new_tokens)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if max_new_tokens == 0:
        return input_ids
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, input_ids, params, jax.random.key(seed), max_new_tokens)
