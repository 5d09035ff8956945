"""Training on packed documents: PackedDocuments lays whole documents into rows with segment ids
(a pure function of seed and position), and the packed loss is the token-weighted mean of each
document's own loss computed alone; train() runs on packed data end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.train.data import PackedDocuments, split_documents, split_held_out
from jaxinfer.train.loop import TrainConfig, train
from jaxinfer.train.step import held_out_loss, train_step_with_losses, training_loss

# float32; packed and alone differ in attention's summation order and in how the mean's terms
# are grouped (one masked sum vs per-document sums), ~1e-6 on a loss near log(vocab) ~ 4.
LOSS_RTOL = 1e-5
# float32 gradients summed over two micro-batches vs one batch: reordered sums, ~1e-6 relative
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7

VOCAB = 64
CONFIG = jaxinfer.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, attention_backend="xla")


@pytest.fixture(scope="module")
def split_model():
    """(graphdef, params) of the seeded CONFIG model, initialised once (eager init is slow)."""
    return nnx.split(jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)))


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(1, VOCAB, n).astype(np.int32) for n in lengths)


def test_packed_rows_are_the_shuffled_documents_cut_into_segments():
    docs = documents((5, 9, 3, 12, 7, 4))  # 40 tokens: 4 rows of 10 per epoch
    packed = PackedDocuments(docs, seq_len=9, batch_size=2, seed=3)
    tokens, segs = packed.batch(0)  # [2, 10] each
    np.testing.assert_array_equal(tokens, packed.batch(0)[0])  # a function of the position
    assert not np.array_equal(tokens, packed.batch(1)[0])
    epoch = np.concatenate([t for b in (packed.batch(0), packed.batch(1)) for t in b[0]])
    np.testing.assert_array_equal(np.sort(epoch), np.sort(np.concatenate(docs)))  # every token once
    for row_tokens, row_segs in zip(tokens, segs):
        assert row_segs[0] == 1 and np.all(np.diff(row_segs) >= 0)
        for s in np.unique(row_segs):  # each segment is a contiguous piece of one document
            piece = row_tokens[row_segs == s]
            assert any(piece.tobytes() in d.tobytes() for d in docs)


def reference_rows(docs, seq_len, seed, epochs):
    """Every row of `epochs` epochs, straight from PackedDocuments' definition: each epoch's
    documents in the order permutation(seed, epoch), concatenated, cut into rows of seq_len + 1
    (the remainder dropped); segment ids number a row's pieces of documents 1, 2, ..."""
    width, rows = seq_len + 1, []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(docs))
        stream = np.concatenate([docs[i] for i in order])
        owner = np.concatenate([np.full(len(docs[i]), k) for k, i in enumerate(order)])
        for r in range(len(stream) // width):
            piece = owner[r * width:(r + 1) * width]
            segs = np.concatenate([[1], 1 + np.cumsum(piece[1:] != piece[:-1])])
            rows.append((stream[r * width:(r + 1) * width], segs))
    return rows


def test_packed_batches_are_the_epochs_streams_cut_into_rows():
    """Batches of 3 rows over 4-row epochs (so some span two epochs), read out of order: equal
    to the rows of the definition, bit for bit, whatever the epochs cached before."""
    docs = documents((5, 9, 3, 12, 7, 4, 1, 2))  # 43 tokens: 4 rows of 10, 3 dropped
    packed = PackedDocuments(docs, seq_len=9, batch_size=3, seed=5)
    want = reference_rows(docs, 9, seed=5, epochs=4)
    for position in (4, 0, 3, 1, 2, 0, 4):
        tokens, segs = packed.batch(position)  # [3, 10] each
        for i, (want_tokens, want_segs) in enumerate(want[3 * position:3 * position + 3]):
            np.testing.assert_array_equal(tokens[i], want_tokens)
            np.testing.assert_array_equal(segs[i], want_segs)


def test_an_epochs_order_and_offsets_are_computed_once_not_every_batch(monkeypatch):
    """A batch must cost O(its rows), not O(documents): the shuffled order and cumulative
    lengths of an epoch (O(documents) each) are computed once per epoch, not once per batch
    (they were, and 300k documents cost 168 ms a step)."""
    layouts = []
    original = PackedDocuments._layout
    monkeypatch.setattr(PackedDocuments, "_layout",
                        lambda self, order: layouts.append(len(order)) or original(self, order))
    rng = np.random.default_rng(0)
    docs = tuple(rng.integers(1, VOCAB, rng.integers(4, 30)).astype(np.int32) for _ in range(500))
    packed = PackedDocuments(docs, seq_len=32, batch_size=4, seed=0)
    batches = 2 * packed.rows_per_epoch // 4  # two epochs' rows (~130 batches)
    for position in range(batches):
        packed.batch(position)
    assert layouts == [500, 500]  # epochs 0 and 1, once each


@pytest.mark.parametrize("documents,got", [
    ((), "got 0 documents"),
    (([1, 2], [], [3]), r"got documents\[1\] of shape \(0,\)"),
    (([1, 2], [3], [[4, 5]]), r"got documents\[2\] of shape \(1, 2\)"),
    ((7,), r"got documents\[0\] of shape \(\)"),
])
def test_bad_documents_are_named_by_their_index_and_shape(documents, got):
    with pytest.raises(ValueError, match=r"documents must be a non-empty sequence of non-empty "
                                         r"1-D token arrays; " + got):
        PackedDocuments(documents, seq_len=2, batch_size=1)


def test_split_documents_keeps_each_separator_with_its_document():
    docs = split_documents(np.array([5, 6, 0, 7, 0, 8, 9]), separator=0)
    assert [d.tolist() for d in docs] == [[5, 6, 0], [7, 0], [8, 9]]


def test_held_out_cut_moves_back_to_a_document_end_when_packing():
    stream = np.array([5, 6, 0, 7, 8, 9, 0, 4, 3, 0])
    train_part, held_out = split_held_out(stream, 0.5, separator=0)  # the plain cut is at 5
    assert train_part.tolist() == [5, 6, 0] and held_out.tolist() == [7, 8, 9, 0, 4, 3, 0]
    assert len(split_held_out(stream, 0.5)[0]) == 5  # without a separator: where it falls
    with pytest.raises(ValueError, match="separator 0 does not occur in the first 2 tokens"):
        split_held_out(np.array([5, 6, 7, 0]), 0.5, separator=0)


def test_a_separator_that_leaves_one_training_document_is_an_error(split_model, tmp_path):
    """tokenize_corpus adds no EOS: a separator missing from the stream must not silently
    pack it as a single document."""
    stream = documents([200])[0]
    config = TrainConfig(steps=1, batch_size=2, seq_len=16, document_separator=0)
    with pytest.raises(ValueError, match=r"document_separator=0 must end the documents .* "
                                         r"occurs 0 time\(s\)"):
        train(nnx.merge(*split_model), stream, stream[:100], config, tmp_path, progress=False)


def alone_loss_sums(graphdef, params, docs):
    """Per document run alone: the sum of its next-token cross-entropies and its target count.
    The documents go right-padded in one batch (causal: padding after a document cannot reach
    it), one compile for all."""
    longest = max(len(d) for d in docs)
    batch = jnp.asarray(np.stack([np.pad(d, (0, longest - len(d))) for d in docs]))
    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p).forward(x)[0])(params, batch[:, :-1])
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))
    return [(float(ce[i, :len(d) - 1].sum()), len(d) - 1) for i, d in enumerate(docs)]


def test_packed_loss_is_the_token_weighted_mean_of_each_documents_loss_alone(split_model):
    graphdef, params = split_model
    # two rows of 24: three documents each, the second row ends in padding (id 0)
    rng = np.random.default_rng(1)
    batch = rng.integers(0, VOCAB, (2, 24)).astype(np.int32)
    segs = np.array([[1] * 7 + [2] * 9 + [3] * 8, [1] * 5 + [2] * 11 + [3] * 4 + [0] * 4],
                    np.int32)
    docs = [row[ids == s] for row, ids in zip(batch, segs) for s in (1, 2, 3)]
    sums, counts = zip(*alone_loss_sums(graphdef, params, docs))
    want = sum(sums) / sum(counts)
    loss, _ = jax.jit(lambda p, b, s: training_loss(graphdef, p, b, segment_ids=s))(
        params, jnp.asarray(batch), jnp.asarray(segs))
    np.testing.assert_allclose(float(loss), want, rtol=LOSS_RTOL)
    held_out = held_out_loss(graphdef, params, [(jnp.asarray(batch), jnp.asarray(segs))])
    np.testing.assert_allclose(held_out, want, rtol=LOSS_RTOL)


def test_held_out_loss_over_packed_batches_is_per_target_not_a_mean_of_batch_means(split_model):
    """Two held-out batches of very different target counts (the first mostly padding): the
    loss is the token-weighted mean of all their documents' losses computed alone."""
    graphdef, params = split_model
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, VOCAB, (1, 24)).astype(np.int32) for _ in range(2)]
    segs = [np.array([[1] * 5 + [0] * 19], np.int32), np.array([[1] * 14 + [2] * 10], np.int32)]
    docs = [row[ids == s] for b, g in zip(batches, segs) for row, ids in zip(b, g)
            for s in np.unique(ids[ids > 0])]
    sums, counts = zip(*alone_loss_sums(graphdef, params, docs))
    loss = held_out_loss(graphdef, params, [(jnp.asarray(b), jnp.asarray(g))
                                            for b, g in zip(batches, segs)])
    np.testing.assert_allclose(loss, sum(sums) / sum(counts), rtol=LOSS_RTOL)
    mean_of_means = (sums[0] / counts[0] + sum(sums[1:]) / sum(counts[1:])) / 2  # 1 + 2 docs
    assert abs(loss - mean_of_means) > 100 * LOSS_RTOL * loss  # the test can tell them apart


def test_accumulated_micro_batches_weigh_packed_targets_like_one_batch(split_model):
    """grad_accum=2 of B=2 packed rows gives the loss and gradients of one batch of the 4 rows,
    though the micro-batches count very different numbers of targets (the first is mostly
    padding): the cross-entropy is token-weighted over the step, not a mean of means."""
    graphdef, params = split_model
    rng = np.random.default_rng(2)
    batch = rng.integers(0, VOCAB, (4, 24)).astype(np.int32)
    segs = np.array([[1] * 6 + [0] * 18, [1] * 3 + [2] * 5 + [0] * 16,
                     [1] * 24, [1] * 10 + [2] * 14], np.int32)
    # the optimizer's state is the gradient it was given, so the step hands the gradient back
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, state, p=None: (g, g))

    def step(accum):
        out = train_step_with_losses(graphdef, keep, params, keep.init(params),
                                     jnp.asarray(batch).reshape(accum, -1, 24),
                                     segment_ids=jnp.asarray(segs).reshape(accum, -1, 24))
        return float(out.loss), out.opt_state

    (loss, grads), (want_loss, want_grads) = step(2), step(1)
    np.testing.assert_allclose(loss, want_loss, rtol=LOSS_RTOL)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_segment_ids_of_another_shape_than_the_batch_are_an_error(split_model):
    graphdef, params = split_model
    with pytest.raises(ValueError, match=r"segment_ids must have the batch's shape \[1, 9\]"):
        training_loss(graphdef, params, jnp.zeros((1, 9), jnp.int32),
                      segment_ids=jnp.ones((1, 8), jnp.int32))


def test_train_packs_documents_when_given_a_separator(tmp_path):
    stream = np.concatenate([np.append(d, 0) for d in documents([6, 13, 9, 17, 5, 11] * 8)])
    config = TrainConfig(steps=3, batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=1,
                         eval_every=3, eval_batches=1, checkpoint_every=3, document_separator=0)
    model = jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    result = train(model, stream, stream[:200], config, tmp_path, progress=False)
    assert len(result.history) == 3 and np.isfinite(result.history[-1]["eval_loss"])
    assert TrainConfig.load(tmp_path / "train_config.json").document_separator == 0


def test_packing_for_a_model_without_segment_ids_is_refused_before_any_file(tmp_path):
    hyena = jaxinfer.HyenaForCausalLM(jaxinfer.HyenaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        max_position_embeddings=64, filter_emb_dim=5, filter_hidden_size=16), rngs=nnx.Rngs(0))
    stream = np.concatenate([np.append(d, 0) for d in documents([6, 13, 9, 17, 5, 11] * 8)])
    config = TrainConfig(steps=1, batch_size=2, seq_len=16, document_separator=0)
    with pytest.raises(ValueError, match=r"document_separator=0 packs documents, which needs a "
                                         r"model whose forward takes segment_ids .*"
                                         r"HyenaForCausalLM does not"):
        train(hyena, stream, stream[:200], config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
