"""Hugging Face checkpoint import and export: config.json plus safetensors (single file or sharded).

Parameter names follow HF's module names, so the mapping is mechanical: prefix `model.`, rename
`kernel`/`embedding` to `weight`, and transpose linear kernels (HF stores [out, in]).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file
from tqdm.auto import tqdm

from jaxinfer.config import LlamaConfig
from jaxinfer.models.layers import QuantParam
from jaxinfer.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple) -> tuple[str, bool]:
    """HF tensor name for an NNX parameter path, and whether the tensor is stored transposed."""
    *parts, leaf = (str(p) for p in path)
    name = ".".join(parts + ["weight" if leaf in ("kernel", "embedding") else leaf])
    return (name if parts[0] == "lm_head" else "model." + name), leaf == "kernel"


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise FileNotFoundError(
                f"{index} names shard file(s) that are missing from {model_dir}: {missing}")
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(
            f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; expected safetensors weights")
    try:
        with safe_open(single, framework="flax") as f:
            return {name: single for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{single} is not a readable safetensors file: {e}") from None


def load_pretrained(model_dir: str | os.PathLike, dtype: str = "float32",
                    attention_backend: str = "auto") -> LlamaForCausalLM:
    """Load a local Hugging Face model directory (config.json + safetensors) as an NNX model.

    `dtype` ("float32" or "bfloat16") is both the parameter and the compute dtype;
    `attention_backend` is that of `kernels_pallas.flash_attention`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{model_dir} has no config.json; expected a Hugging Face model directory")
    config = LlamaConfig.from_json_file(config_file, dtype=dtype,
                                        attention_backend=attention_backend)
    files = _tensor_files(model_dir)

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    wanted = {path: hf_name(path) for path, var in flat if isinstance(var, nnx.Param)}
    missing = [name for name, _ in wanted.values() if name not in files]
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} is missing {len(missing)} tensor(s) that config.json "
            f"implies, e.g. {missing[:5]}")
    unexpected = set(files) - {name for name, _ in wanted.values()}
    unexpected = sorted(n for n in unexpected if not n.endswith(IGNORED_SUFFIXES)
                        and not (n == "lm_head.weight" and config.tie_word_embeddings))
    if unexpected:
        log.warning("ignoring %d tensor(s) the model does not use, e.g. %s",
                    len(unexpected), unexpected[:5])

    handles: dict[Path, object] = {}
    try:
        for path, var in tqdm(flat, desc=f"loading {model_dir.name}", unit="tensor", leave=False,
                              disable=None):  # None: a bar on terminals only
            if path not in wanted:
                continue
            name, transposed = wanted[path]
            file = files[name]
            try:
                if file not in handles:
                    handles[file] = safe_open(file, framework="flax").__enter__()
                tensor = handles[file].get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from None
            expected = var.value.shape[::-1] if transposed else var.value.shape
            if tensor.shape != expected:
                raise ValueError(f"tensor {name!r} in {file.name} has shape {list(tensor.shape)}; "
                                 f"config.json implies {list(expected)}")
            tensor = tensor.T if transposed else tensor
            var.value = jnp.asarray(tensor, dtype=var.value.dtype)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_pretrained(model: LlamaForCausalLM, out_dir: str | os.PathLike, *, tokenizer=None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write config.json and safetensors that `transformers.AutoModelForCausalLM` loads back.

    With `max_shard_bytes` the weights are split into shards plus `model.safetensors.index.json`;
    a `tokenizers.Tokenizer` given as `tokenizer` is saved beside them as tokenizer.json."""
    if nnx.to_flat_state(nnx.state(model, QuantParam)):
        raise ValueError("save_pretrained cannot write quantized (packed) weights yet; save the "
                         "float model and quantize after loading")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, jax.Array] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(path)
        value = np.asarray(var.value)
        tensors[name] = jnp.asarray(np.ascontiguousarray(value.T if transposed else value))

    (out_dir / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2) + "\n")
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a format tag
    if max_shard_bytes is None:
        save_file(tensors, out_dir / SINGLE_FILE, metadata=metadata)
    else:
        shards: list[dict[str, jax.Array]] = [{}]
        size = 0
        for name, tensor in tensors.items():
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += tensor.nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / file, metadata=metadata)
            weight_map.update({name: file for name in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir
