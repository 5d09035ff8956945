"""Models and oracles the serving Engine's tests share."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer


def peaky_model(config, cls=jaxinfer.LlamaForCausalLM):
    """O(1) logits and attention scores (the default init is near-uniform, where a wrong page or
    position would barely move the argmax). Built abstractly, then filled: running the default
    initializers eagerly would compile each of them (seconds on a busy CPU) for nothing."""
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def draw(path, x):
        offset = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(offset + 0.5 * rng.normal(size=x.shape), x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model, nnx.Param)))
    return model


def greedy_oracle(model, new_tokens: int):
    """Greedy continuation (new_tokens tokens) of one prompt by `jaxinfer.generate` alone."""
    @functools.lru_cache(maxsize=None)
    def run(prompt: tuple[int, ...]) -> list[int]:
        out = jaxinfer.generate(model, np.array([prompt], np.int32), max_new_tokens=new_tokens)
        return np.asarray(out)[0, len(prompt):].tolist()
    return lambda prompt: run(tuple(prompt))
