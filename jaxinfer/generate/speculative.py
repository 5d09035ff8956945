"""Speculative decoding with a draft model or with prompt lookup, over the dense decoding cache.

Each round a drafter proposes `gamma` tokens; the target scores all of them in ONE forward pass of
gamma + 1 tokens and the acceptance rule keeps a prefix of the drafts plus one token of its own, so
every round yields 1 .. gamma + 1 tokens for one target pass.

* Draft model: a smaller model of the same vocabulary, run autoregressively for gamma steps.
* Prompt lookup (Aggressive Decoding's input-guided drafts): find the latest earlier occurrence of
  the last `lookup_ngram` tokens in prompt + generated text and propose the tokens that followed.
  The draft distribution q is then one-hot at the proposed tokens
  (`prompt_lookup.lookup_draft_traced`).

Acceptance (Leviathan et al.; Chen et al.): accept draft x with probability min(1, p(x)/q(x)); at
the first rejection sample from normalize(max(p - q, 0)); if all gamma are accepted, sample a bonus
token from p. The output then has exactly the target's distribution (lossless). Greedy decoding
accepts while the draft equals the target's argmax, so it reproduces target greedy decoding.

Cache bookkeeping: each cache holds valid K/V for positions 0 .. L-2 of a sequence of length L and
the last token is fed by the next pass. Rejected drafts leave stale K/V beyond L-1; the next pass
writes gamma + 1 slots starting at L-1, which covers every stale slot before it can be read (the
causal mask hides slots beyond a query's position), so rolling back is just keeping L. Hyena's
cache (``hyena_cache.py``) records its short- and long-convolution inputs by position in the same
way and reads only positions before the fed chunk, so the same bookkeeping rolls it back.

The whole generation is one jitted `lax.while_loop` with fixed shapes (gamma is static). Batches
are handled by `vmap` over sequences, each with its own length and acceptance count.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.generate.checks import MAX_SEED, check_int, check_model
from jaxinfer.generate.prompt_lookup import lookup_draft_traced
from jaxinfer.generate.sampling import SamplingArrays, filter_logits, make_sampling_params
from jaxinfer.models.inputs import check_input_ids


@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
    """Tokens and per-sequence statistics of `speculative_generate`."""

    tokens: jax.Array  # int32 [batch, prompt_len + max_new_tokens], prompt included
    target_passes: np.ndarray  # int [batch]: verification passes of the target (prefill excluded)
    accepted: np.ndarray  # int [batch]: draft tokens accepted over all rounds
    gamma: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens, over the whole batch."""
        return float(self.accepted.sum() / max(1, self.target_passes.sum() * self.gamma))

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens produced per target verification pass (1 .. gamma + 1), counting the
        last round's tokens beyond max_new_tokens that are cut off."""
        return float((self.accepted.sum() + self.target_passes.sum())
                     / max(1, self.target_passes.sum()))


# ----------------------------------------------------------------- acceptance rules


def accept_greedy(target_logits: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy verification: accept drafts while each equals the target's argmax.

    target_logits [gamma + 1, vocab] (row i predicts the token after draft i, row 0 after the last
    accepted token); drafts int32 [gamma]. Returns (n accepted in 0..gamma, the target's token at
    row n: the correction, or the bonus token when n == gamma)."""
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [gamma + 1]
    n = jnp.sum(jnp.cumprod(drafts == best[:-1])).astype(jnp.int32)
    return n, best[n]


def accept_sampled(p: jax.Array, q: jax.Array, drafts: jax.Array,
                   key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The lossless rule: accept draft i with probability min(1, p_i(x_i) / q_i(x_i)).

    p float32 [gamma + 1, vocab]: target probabilities (row gamma gives the bonus token);
    q float32 [gamma, vocab]: the draft probabilities the drafts were sampled from; drafts int32
    [gamma]. Returns (n accepted, next token) where the next token is drawn from
    normalize(max(p_n - q_n, 0)) on a rejection at n, or from p_gamma when all were accepted."""
    gamma = drafts.shape[0]
    key_accept, key_next = jax.random.split(key)
    rows = jnp.arange(gamma)
    p_x, q_x = p[rows, drafts], q[rows, drafts]  # [gamma]
    u = jax.random.uniform(key_accept, (gamma,))
    n = jnp.sum(jnp.cumprod(u * q_x < p_x)).astype(jnp.int32)  # u < p/q without dividing by q
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:1])], axis=0)  # row gamma: residual = p
    residual = jnp.maximum(p[n] - q_pad[n], 0.0)  # [vocab]
    # p_n == q_n makes a rejection impossible in exact arithmetic; rounding may still leave
    # an all-zero residual, then p_n itself is the right law
    residual = jnp.where(residual.sum() > 0, residual, p[n])
    token = jax.random.categorical(key_next, jnp.log(residual)).astype(jnp.int32)
    return n, token


# ----------------------------------------------------------------- drafting


def _probs(logits: jax.Array, params: SamplingArrays) -> jax.Array:
    """Sampling distribution after temperature, top-k and top-p. logits [n, vocab] -> [n, vocab]."""
    return jax.nn.softmax(filter_logits(logits, params), axis=-1)


def _draft_model(draft, tokens, length, cache, params, key, gamma: int, greedy: jax.Array):
    """gamma tokens from the draft model, and the distributions they were drawn from.

    The first pass feeds the 2-token chunk (x[L-2], x[L-1]) at L-2: it rewrites the already valid
    slot L-2 and fills it when the previous round accepted every draft (the last draft is never
    fed). At L == 1 the chunk's second token is garbage at slot 1, hidden from the query at slot 0
    and overwritten later."""
    start = jnp.maximum(length - 2, 0)
    chunk = jax.lax.dynamic_slice(tokens, (start,), (2,))[None]  # [1, 2]
    logits, cache = draft.forward(chunk, cache, start)
    logits = logits[0, length - 1 - start]  # [vocab]

    def pick(logits, k):  # [vocab] -> (token, q [vocab]); q is unused when greedy
        def sample():
            q = _probs(logits[None], params)[0]
            token = jax.random.categorical(jax.random.fold_in(key, k), jnp.log(q))
            return token.astype(jnp.int32), q

        return jax.lax.cond(greedy, lambda: (jnp.argmax(logits).astype(jnp.int32),
                                             jnp.zeros_like(logits)), sample)

    def step(carry, k):
        token, cache = carry
        logits, cache = draft.forward(token[None, None], cache, length - 1 + k)
        nxt, q = pick(logits[0, 0], k)
        return (nxt, cache), (nxt, q)

    first, q_first = pick(logits, 0)
    (_, cache), (rest, q_rest) = jax.lax.scan(step, (first, cache), jnp.arange(1, gamma))
    drafts = jnp.concatenate([first[None], rest])  # [gamma]
    q = jnp.concatenate([q_first[None], q_rest])  # [gamma, vocab]
    return drafts, q, cache


# ----------------------------------------------------------------- the generation loop


def _generate_one(target, draft, prompt, key, params, *, max_new_tokens: int, gamma: int,
                  ngram: int | None):
    """Speculative generation of one sequence: prompt int32 [P] -> (tokens [P + new], passes,
    accepted)."""
    prompt_len = prompt.shape[0]
    total = prompt_len + max_new_tokens
    buffer = total + gamma + 1  # the last round may write gamma + 1 slots past total - 1
    tokens = jnp.zeros((buffer,), jnp.int32).at[:prompt_len].set(prompt)

    def prefill(model):
        cache = model.init_cache(1, buffer)
        if prompt_len > 1:
            _, cache = model.forward(prompt[None, :-1], cache, 0)
        return cache

    greedy = params.temperature == 0  # traced: one executable serves greedy and sampling
    target_cache = prefill(target)
    draft_cache = None if draft is None else prefill(draft)

    def body(state):
        tokens, length, target_cache, draft_cache, passes, accepted = state
        key_round = jax.random.fold_in(key, passes)
        key_draft, key_accept = jax.random.split(key_round)
        if draft is None:
            drafts = lookup_draft_traced(tokens, length, ngram, gamma)
            q = jax.nn.one_hot(drafts, target.config.vocab_size, dtype=jnp.float32)
        else:
            drafts, q, draft_cache = _draft_model(draft, tokens, length, draft_cache, params,
                                                  key_draft, gamma, greedy)
        fed = jnp.concatenate([tokens[length - 1][None], drafts])[None]  # [1, gamma + 1]
        logits, target_cache = target.forward(fed, target_cache, length - 1)
        logits = logits[0]  # [gamma + 1, vocab]
        n, nxt = jax.lax.cond(greedy, lambda: accept_greedy(logits, drafts),
                              lambda: accept_sampled(_probs(logits, params), q, drafts, key_accept))
        new = jnp.concatenate([drafts, jnp.zeros((1,), jnp.int32)]).at[n].set(nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, new, (length,))  # slots past n are stale
        return tokens, length + n + 1, target_cache, draft_cache, passes + 1, accepted + n

    state = (tokens, jnp.int32(prompt_len), target_cache, draft_cache, jnp.int32(0), jnp.int32(0))
    tokens, _, _, _, passes, accepted = jax.lax.while_loop(lambda s: s[1] < total, body, state)
    return tokens[:total], passes, accepted


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "max_new_tokens", "gamma",
                                             "ngram"))
def _speculative(target_def, target_state, draft_def, draft_state, prompts, keys, params, *,
                 max_new_tokens: int, gamma: int, ngram: int | None):
    target = nnx.merge(target_def, target_state)
    draft = None if draft_def is None else nnx.merge(draft_def, draft_state)
    one = functools.partial(_generate_one, target, draft, params=params,
                            max_new_tokens=max_new_tokens, gamma=gamma, ngram=ngram)
    if prompts.shape[0] == 1:  # no vmap: dynamic_update_slice stays a slice write, not a scatter
        return jax.tree.map(lambda x: x[None], one(prompts[0], keys[0]))
    return jax.vmap(one)(prompts, keys)


def speculative_generate(target, prompt_ids, max_new_tokens: int, *, draft=None, gamma: int = 4,
                         lookup_ngram: int | None = None, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None,
                         seed: int = 0) -> SpeculativeOutput:
    """Continue each prompt of prompt_ids int32 [batch, seq] by exactly max_new_tokens tokens.

    Exactly one drafter: `draft` (a model with the target's vocabulary) or `lookup_ngram` (n-gram
    size for prompt lookup). temperature=0 is greedy and reproduces `jaxinfer.generate`'s greedy
    output; otherwise tokens follow the target's sampling distribution (temperature, top-k, top-p
    applied to both p and q), reproducibly for a given seed. Each row of a batch is an independent
    sequence with its own key (fold_in(seed, row)) and its own acceptance count."""
    check_model("target", target)
    if draft is not None:
        check_model("draft", draft)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=0)
    gamma = check_int("gamma", gamma, low=1)
    if (draft is None) == (lookup_ngram is None):
        raise ValueError("give exactly one drafter: draft (a model) or lookup_ngram (an int); "
                         f"got draft={'a model' if draft is not None else None}, "
                         f"lookup_ngram={lookup_ngram!r}")
    if lookup_ngram is not None:
        lookup_ngram = check_int("lookup_ngram", lookup_ngram, low=1)
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft must share the target's vocabulary; got draft vocab_size "
                         f"{draft.config.vocab_size}, target vocab_size {target.config.vocab_size}")
    seed = check_int("seed", seed, low=0, high=MAX_SEED)
    params = make_sampling_params(temperature, top_k, top_p)
    prompt_ids = check_input_ids(prompt_ids, target.config, new_tokens=max_new_tokens)
    if draft is not None:
        check_input_ids(prompt_ids, draft.config, new_tokens=max_new_tokens)
    prompts = jnp.asarray(prompt_ids, jnp.int32)  # [batch, seq]
    if max_new_tokens == 0:  # as generate: the prompts, and no target pass
        nothing = np.zeros(prompts.shape[0], np.int32)
        return SpeculativeOutput(prompts, nothing, nothing, gamma)
    keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.key(seed), b))(
        jnp.arange(prompts.shape[0]))
    target_def, target_state = nnx.split(target)
    draft_def, draft_state = (None, None) if draft is None else nnx.split(draft)
    tokens, passes, accepted = _speculative(
        target_def, target_state, draft_def, draft_state, prompts, keys, params,
        max_new_tokens=max_new_tokens, gamma=gamma, ngram=lookup_ngram)
    return SpeculativeOutput(tokens, np.asarray(passes), np.asarray(accepted), gamma)
