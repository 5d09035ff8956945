"""Token ids have one set of rules (`jaxinfer.models.inputs`): the engine's 1-D prompts
(`Engine.submit`) and the models' [batch, seq] input_ids take the same inputs, torch tensors
included, and refuse them with the same messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import jaxinfer
from jaxinfer.generate.checks import check_prompt
from jaxinfer.models.inputs import check_input_ids
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
