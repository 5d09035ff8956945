"""Packed sequences: documents packed into one row with segment ids compute exactly what each
document computes alone (attention within its run of equal ids, even where a later run reuses an
id, and RoPE positions restarting at 0), for
Llama with GQA, Mistral with a sliding window and Mixtral, on the XLA and Pallas (interpreted)
attention backends; the oracle is each document alone through the reference attention."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig

# float32 throughout; packed and alone differ only in attention's summation order (blocked
# online softmax over a longer, masked row vs the materialised reference), ~1e-6 on O(1) logits.
LOGITS_ATOL = 2e-5

VOCAB, ROW = 64, 32
# Two rows, three documents of odd lengths each, cut differently; the rest of a row is padding
# (segment id 0, its logits unchecked). The second row labels its third document with its first
# document's id again: a document is a contiguous run, whatever its id.
DOC_LENGTHS = ((7, 11, 13), (13, 5, 9))
DOC_IDS = ((1, 2, 3), (1, 2, 1))
LLAMA = jaxinfer.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
MODELS = {
    "llama-gqa": LLAMA,
    # a window shorter than the documents, so it cuts inside each of them
    "mistral-window": dataclasses.replace(LLAMA, model_type="mistral", sliding_window=4),
    "mixtral-dropless": MixtralConfig(**{f.name: getattr(LLAMA, f.name)
                                         for f in dataclasses.fields(jaxinfer.LlamaConfig)
                                         if f.name != "model_type"},
                                      num_local_experts=4, num_experts_per_tok=2),
}


def model_class(config):
    return MixtralForCausalLM if isinstance(config, MixtralConfig) else jaxinfer.LlamaForCausalLM


@pytest.fixture(scope="module")
def weights():
    """name -> the parameters of a seeded model (initialised once: eager init dominates)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = nnx.state(model_class(MODELS[name])(MODELS[name], rngs=nnx.Rngs(0)))
        return cache[name]
    return get


def make_model(name, backend, weights):
    """The model `name` with the attention backend `backend` and the shared weights."""
    config = dataclasses.replace(MODELS[name], attention_backend=backend)
    abstract = nnx.eval_shape(lambda: model_class(config)(config, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), weights(name))


def packed_rows():
    """ids, segment ids int32 [2, ROW] and the documents as (row, start, tokens)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (len(DOC_LENGTHS), ROW)).astype(np.int32)
    segs = np.zeros_like(ids)
    docs = []
    for r, (lengths, labels) in enumerate(zip(DOC_LENGTHS, DOC_IDS)):
        start = 0
        for s, n in zip(labels, lengths):
            segs[r, start:start + n] = s
            docs.append((r, start, ids[r, start:start + n]))
            start += n
    return ids, segs, docs


def documents_alone(name, docs, weights):
    """Each document's logits as if alone: the documents right-padded to one length in a batch of
    their own through the reference attention (causal, so the padding after a document does not
    reach it), one compile for all."""
    longest = max(len(tokens) for _, _, tokens in docs)
    batch = np.stack([np.pad(tokens, (0, longest - len(tokens))) for _, _, tokens in docs])
    alone = make_model(name, "reference", weights)
    logits = np.asarray(nnx.jit(lambda m, i: m(i))(alone, batch))
    return [logits[i, :len(tokens)] for i, (_, _, tokens) in enumerate(docs)]


@pytest.fixture(scope="module")
def alone_logits(weights):
    cache = {}

    def get(name, docs):
        if name not in cache:
            cache[name] = documents_alone(name, docs, weights)
        return cache[name]
    return get


# Mixtral's attention is the Llama module's: the Pallas kernel is exercised by the other two.
@pytest.mark.parametrize("name, backend", [(name, backend) for name in MODELS
                                           for backend in ("xla", "pallas")
                                           if (name, backend) != ("mixtral-dropless", "pallas")])
def test_packed_documents_give_the_logits_of_each_document_alone(name, backend, weights,
                                                                 alone_logits):
    ids, segs, docs = packed_rows()
    packed = make_model(name, backend, weights)
    logits = np.asarray(nnx.jit(lambda m, i, s: m(i, segment_ids=s))(packed, ids, segs))
    for (row, start, tokens), want in zip(docs, alone_logits(name, docs)):
        np.testing.assert_allclose(logits[row, start:start + len(tokens)], want,
                                   atol=LOGITS_ATOL, err_msg=f"row {row}, document at {start}")


def test_segment_ids_with_a_cache_or_a_start_are_an_error(weights):
    model = make_model("llama-gqa", "xla", weights)
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids .* cannot be used with a KV cache"):
        model.forward(ids, model.init_cache(1, 8), start=0, segment_ids=jnp.ones_like(ids))
    with pytest.raises(ValueError, match=r"segment_ids .* need start=0.*; got start=3"):
        model.forward(ids, start=3, segment_ids=jnp.ones_like(ids))


def test_segment_ids_of_the_wrong_shape_are_an_error(weights):
    model = make_model("llama-gqa", "xla", weights)
    with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\] = \[1, 4\]"):
        model(np.zeros((1, 4), np.int32), segment_ids=np.ones((1, 5), np.int32))
