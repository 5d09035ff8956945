"""Files shipped inside the package: the embedded default model and a public-domain text sample."""

from pathlib import Path

ASSETS = Path(__file__).parent


def default_model_dir() -> Path:
    """The embedded Llama-family model (HF layout: config.json, model.safetensors, tokenizer.json)."""
    return ASSETS / "default_model"


def corpus_sample_path() -> Path:
    """A public-domain English text sample (King James Bible excerpt) for tests and calibration."""
    return ASSETS / "corpus" / "kjv_sample.txt"
