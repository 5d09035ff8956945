"""Token ids have one set of rules (`jaxinfer.models.inputs`): the engine's 1-D prompts
(`Engine.submit`) and the models' [batch, seq] input_ids take the same inputs, torch tensors
included, and refuse them with the same messages."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxinfer
from jaxinfer.generate.checks import check_prompt
from jaxinfer.models.inputs import check_input_ids, check_segment_ids, known_start
from tests.jaxinfer.test_engine import (  # noqa: F401  (model, oracle: fixtures)
    CONFIG, ENGINE, GREEDY, VOCAB, model, oracle)


def test_a_torch_tensor_prompt_is_served_as_its_list(model, oracle):
    engine = jaxinfer.Engine(model, **ENGINE)
    prompt = [5, 17, 2, 90, 41, 8, 33, 60]
    request = engine.submit(torch.tensor(prompt), GREEDY)
    assert engine.run_until_done()[request] == oracle(prompt)


@pytest.mark.parametrize("ids,message", [
    ([[1, 2], [3]], "must be {expected}; got ragged nested lists"),
    ([1.5, 2.0], "must hold integer token ids; got dtype float64"),
    ([True, False], "must hold integer token ids; got dtype bool"),
    (torch.tensor([1.0, 2.0], requires_grad=True), "must hold integer token ids; got dtype float32"),
    (torch.tensor([1, VOCAB]), f"must lie in [0, {VOCAB}) (vocab_size); found token id {VOCAB}"),
    ([3, -1, VOCAB], f"must lie in [0, {VOCAB}) (vocab_size); found token id -1"),
])
def test_prompts_and_input_ids_are_refused_with_the_same_message(ids, message):
    """The same ids as a prompt and as one row of input_ids (ragged: as rows of input_ids)."""
    rows = ids if isinstance(ids, list) and isinstance(ids[0], list) else [ids]
    if isinstance(ids, torch.Tensor):
        rows = ids[None]
    for name, check, expected in (
            ("prompt_ids", lambda: check_prompt(ids, VOCAB), "a flat sequence of token ids"),
            ("input_ids", lambda: check_input_ids(rows, CONFIG),
             "a rectangular [batch, seq] array")):
        with pytest.raises(ValueError, match=re.escape(f"{name} " + message.format(
                expected=expected))):
            check()


def test_integer_torch_tensors_pass_both_checks_unchanged():
    ids = torch.tensor([[4, 0, VOCAB - 1]], dtype=torch.int32)
    assert check_prompt(ids[0], VOCAB) == [4, 0, VOCAB - 1]
    out = check_input_ids(ids, CONFIG)
    assert isinstance(out, np.ndarray) and out.dtype == np.int32
    assert out.tolist() == [[4, 0, VOCAB - 1]]


def test_segment_ids_take_torch_tensors_and_refuse_ragged_or_float_ones():
    np.testing.assert_array_equal(check_segment_ids(torch.tensor([[0, 0, 1]]), (1, 3)), [[0, 0, 1]])
    with pytest.raises(ValueError, match="segment_ids must be a rectangular .* ragged"):
        check_segment_ids([[0, 1], [0]], (2, 2))
    with pytest.raises(ValueError, match="segment_ids must hold integer token ids; got dtype"):
        check_segment_ids(torch.zeros((1, 3)), (1, 3))


@pytest.mark.parametrize("start", [3, np.int64(3), np.uint32(3), np.array(3), jnp.int32(3)])
def test_a_known_start_is_a_python_int(start):
    assert known_start(start) == 3 and type(known_start(start)) is int


def test_a_traced_start_stays_traced():
    assert int(jax.jit(lambda s: jnp.asarray(known_start(s)) + 1)(jnp.int32(3))) == 4


@pytest.mark.parametrize("start", [True, np.True_, 2.0, jnp.float32(2), np.array([3]), "3"])
def test_a_start_that_is_not_an_integer_scalar_is_refused(start):
    with pytest.raises(ValueError, match="start must be an integer scalar"):
        known_start(start)
