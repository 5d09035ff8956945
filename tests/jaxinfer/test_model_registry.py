"""The model_type dispatch that load_pretrained and `jaxinfer train --config` share."""

import json

import pytest

import jaxinfer
from jaxinfer.config import HYENA_MODEL_TYPE, SUPPORTED_MODEL_TYPES
from jaxinfer.models.mixtral_config import MIXTRAL_MODEL_TYPE
from jaxinfer.models.registry import MODEL_CLASSES, model_classes


def test_every_supported_model_type_names_its_config_and_model_class():
    assert model_classes(MIXTRAL_MODEL_TYPE) == (jaxinfer.MixtralConfig,
                                                 jaxinfer.MixtralForCausalLM)
    assert model_classes(HYENA_MODEL_TYPE) == (jaxinfer.HyenaConfig, jaxinfer.HyenaForCausalLM)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_classes(model_type) == (jaxinfer.LlamaConfig, jaxinfer.LlamaForCausalLM)
    assert tuple(MODEL_CLASSES) == (*SUPPORTED_MODEL_TYPES, MIXTRAL_MODEL_TYPE, HYENA_MODEL_TYPE)


@pytest.mark.parametrize("model_type", ["gpt2", None, ["llama"]])
def test_unknown_model_type_error_names_the_file_and_every_supported_type(model_type):
    with pytest.raises(ValueError, match=r"^my.json: model_type must be one of \('llama', "
                                         r"'mistral', 'qwen2', 'mixtral', 'hyena'\); got "):
        model_classes(model_type, "my.json")


def test_load_pretrained_refuses_an_unknown_model_type_listing_every_supported_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type must be one of .*'mixtral', 'hyena'\); "
                                         r"got 'gpt2'"):
        jaxinfer.load_pretrained(tmp_path)
