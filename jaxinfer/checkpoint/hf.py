"""Hugging Face checkpoint import and export: config.json plus safetensors (single file or sharded).

Parameter names follow HF's module names, so the mapping is mechanical: prefix `model.`, rename
`kernel`/`embedding` to `weight`, and transpose linear kernels (HF stores [out, in]).

GPTQ checkpoints (a GPTQ `quantization_config`, see `gptq_config.py`) hold, per quantized decoder
linear layer, `<module>.{qweight,qzeros,scales,g_idx}` in AutoGPTQ's packing (`gptq_format.py`)
instead of `<module>.weight`; they load into `QuantizedLinear` layers (repacked once into the
kernel layout), and `save_pretrained` writes a model holding such layers in that format.

Writing goes through `hf_write.write_checkpoint`, which replaces the directory's checkpoint as a
whole (never a new config.json over old or half-written weights, never a stale index or single
file left behind).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from jaxinfer.checkpoint.gptq_config import (QUANTIZE_CONFIG_FILE, GPTQConfig, GPTQLayerSpec,
                                             gptq_config_for, read_gptq_config)
from jaxinfer.checkpoint.gptq_format import FORMATS, from_gptq_tensors, to_gptq_tensors
from jaxinfer.checkpoint.hf_write import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE,
                                          write_checkpoint)
from jaxinfer.config import HYENA_MODEL_TYPE, LlamaConfig, read_config_json
from jaxinfer.models.hyena import HyenaForCausalLM
from jaxinfer.models.layers import Linear, QuantizedLinear
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.llama import LlamaForCausalLM
from jaxinfer.quant.model import QUANT_BACKENDS, quantized_linear
from kernels_pallas.quant_matmul import QuantizedWeight

log = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
# Buffers some exporters write that carry no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
REQUIRED_GPTQ_TENSORS = ("qweight", "qzeros", "scales")  # and g_idx, needed under desc_act
GPTQ_TENSORS = (*REQUIRED_GPTQ_TENSORS, "g_idx")
# safetensors dtypes: those of float parameters, and all that safe_open(framework="flax") can
# read (it fails with an AttributeError on the others, float8 among them).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
READABLE_DTYPES = FLOAT_DTYPES + ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")


def hf_name(path: tuple) -> tuple[str, bool]:
    """HF tensor name for an NNX parameter path, and whether the tensor is stored transposed."""
    *parts, leaf = (str(p) for p in path)
    name = ".".join(parts + ["weight" if leaf in ("kernel", "embedding") else leaf])
    return (name if parts[0] == "lm_head" else "model." + name), leaf == "kernel"


def hf_tensors(model: nnx.Module,
               expand: Callable[[tuple, np.ndarray], dict[str, np.ndarray] | None] | None = None,
               ) -> dict[str, np.ndarray]:
    """{HF tensor name: array in the on-disk layout} for the model's `nnx.Param`s: named by
    `hf_name`, linear kernels transposed to [out, in]. `expand(path, value)` may return the
    tensors of a parameter stored under other names (Mixtral's stacked experts, one tensor per
    expert on disk), or None for the `hf_name` default."""
    tensors: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.value)
        expanded = expand(path, value) if expand is not None else None
        if expanded is None:
            name, transposed = hf_name(path)
            expanded = {name: np.ascontiguousarray(value.T if transposed else value)}
        tensors.update(expanded)
    return tensors


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it.

    Where the directory has both model.safetensors and an index, model.safetensors wins, as in
    transformers (`modeling_utils._get_resolved_checkpoint_files`), so that both load the same
    weights; transformers' own single-file save over a sharded one deletes the shards but leaves
    the index behind."""
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.exists():
        if index.exists():
            log.warning("%s has both %s and %s; loading %s and ignoring the index, as "
                        "transformers does", model_dir, SINGLE_FILE, INDEX_FILE, SINGLE_FILE)
        try:
            with safe_open(single, framework="flax") as f:
                return {name: single for name in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{single} is not a readable safetensors file: {e}") from None
    if not index.exists():
        raise FileNotFoundError(
            f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; expected safetensors weights")
    weight_map = _read_weight_map(index)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (model_dir / s).exists()]
    if missing:
        raise FileNotFoundError(
            f"{index} names shard file(s) that are missing from {model_dir}: {missing}")
    return {name: model_dir / shard for name, shard in weight_map.items()}


def _read_weight_map(index: Path) -> dict[str, str]:
    """The {tensor name: shard file name} of a safetensors index, with errors that name the file
    and what in it is malformed."""
    try:
        content = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not a valid safetensors index ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{index} is not a valid safetensors index: expected a JSON object with "
                         f"a 'weight_map'; got {type(content).__name__}")
    if "weight_map" not in content:
        raise ValueError(f"{index} is not a valid safetensors index: it has no 'weight_map'")
    weight_map = content["weight_map"]
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must be an object {{tensor name: shard file}}; "
                         f"got {type(weight_map).__name__}")
    bad = [(name, shard) for name, shard in weight_map.items() if not isinstance(shard, str)]
    if bad:
        raise ValueError(f"{index}: weight_map must map each tensor name to a shard file name "
                         f"(a string); got {len(bad)} that do not, e.g. {bad[0][0]!r}: "
                         f"{bad[0][1]!r}")
    return weight_map


class _TensorReader:
    """Reads named tensors (jax arrays), opening each safetensors file once; `used` collects the
    names read, so that the loaders can report the tensors they left unread."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def __enter__(self) -> _TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="flax").__enter__()
        return self.handles[file]

    def dtype(self, name: str) -> str:
        """Tensor `name`'s safetensors dtype ("F32", "I8", "F8_E4M3", ...), read from the header."""
        try:
            return self._handle(name).get_slice(name).get_dtype()
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.files[name]}: {e}") from None

    def get(self, name: str) -> jax.Array:
        """Tensor `name`; a ValueError naming it for a dtype jaxinfer cannot read (float8)."""
        dtype = self.dtype(name)
        if dtype not in READABLE_DTYPES:
            raise ValueError(f"tensor {name!r} in {self.files[name].name} has dtype {dtype}, "
                             f"which jaxinfer cannot read (a quantized checkpoint?); readable "
                             f"dtypes: {READABLE_DTYPES}")
        try:
            tensor = self._handle(name).get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.files[name]}: {e}") from None
        self.used.add(name)
        return tensor

    def get_float(self, name: str) -> jax.Array:
        """Tensor `name`, which must be stored as a float: an int8 tensor where a float parameter
        belongs means quantized codes (beside scales the model does not read), not weights."""
        dtype = self.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} in {self.files[name].name} has dtype {dtype}, "
                             f"but config.json implies a float parameter (one of "
                             f"{FLOAT_DTYPES}); of quantized checkpoints, jaxinfer loads only "
                             f"GPTQ ones of Llama-family models")
        return self.get(name)


EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def resolve_tied_embeddings(config, files: dict[str, Path]) -> tuple[object, str]:
    """(config, name of the tensor the embedding is read from) for a checkpoint's files, with
    transformers' (5.x `PreTrainedModel.tie_weights`) reading of tie_word_embeddings: a tied
    config whose checkpoint also holds an lm_head.weight that differs from the embedding loads
    untied (a warning names both; a copy that equals the embedding stays tied), and one that
    holds lm_head.weight but no embedding reads the shared matrix from lm_head.weight."""
    if not config.tie_word_embeddings or LM_HEAD not in files:
        return config, EMBEDDING
    if EMBEDDING not in files:
        return config, LM_HEAD
    with _TensorReader(files) as reader:
        embedding, lm_head = reader.get_float(EMBEDDING), reader.get_float(LM_HEAD)
        if embedding.shape == lm_head.shape and bool(np.array_equal(np.asarray(embedding),
                                                                    np.asarray(lm_head))):
            return config, EMBEDDING
    log.warning("config.json sets tie_word_embeddings, but the checkpoint holds both %s and %s "
                "with different values: loading them untied, as transformers does (set "
                "tie_word_embeddings to false in config.json to silence this)", EMBEDDING, LM_HEAD)
    return dataclasses.replace(config, tie_word_embeddings=False), EMBEDDING


def warn_unused(reader: _TensorReader, tie_word_embeddings: bool) -> None:
    """Log the checkpoint tensors a load left unread (other than buffers and a tied lm_head,
    which `resolve_tied_embeddings` found equal to the embedding)."""
    unused = sorted(n for n in set(reader.files) - reader.used
                    if not n.endswith(IGNORED_SUFFIXES)
                    and not (n == LM_HEAD and tie_word_embeddings))
    if unused:
        log.warning("ignoring %d tensor(s) the model does not use, e.g. %s",
                    len(unused), unused[:5])


def _gptq_modules(flat, gptq: GPTQConfig, files) -> dict[tuple, tuple[str, GPTQLayerSpec]]:
    """{kernel path: (HF module name, spec)} for each decoder linear the checkpoint quantizes:
    those the config quantizes, except any stored as a float ``weight`` alone, with none of its
    GPTQ tensors (a partly quantized checkpoint whose config does not say so; logged). A module
    with some GPTQ tensors but not all, or one the config names as quantized
    (``GPTQConfig.names_as_quantized``) but stored as float, raises."""
    out, stored_float = {}, []
    for path, var in flat:
        if not (isinstance(var, nnx.Param) and path[0] == "layers" and path[-1] == "kernel"):
            continue
        module = hf_name(path)[0].removesuffix(".weight")
        spec = gptq.layer_spec(module)
        if spec is None:  # left float by modules_in_block_to_quantize or a "-:" dynamic rule
            continue
        present = [t for t in GPTQ_TENSORS if f"{module}.{t}" in files]
        if not present and f"{module}.weight" in files:
            named = gptq.names_as_quantized(module)
            if named:
                raise ValueError(f"quantization_config names {module} as quantized ({named}) but "
                                 f"the checkpoint stores it as a float weight, with none of its "
                                 f"GPTQ tensors {list(GPTQ_TENSORS)}")
            stored_float.append(module)
            continue
        missing = [f"{module}.{t}" for t in REQUIRED_GPTQ_TENSORS if f"{module}.{t}" not in files]
        if spec.desc_act and f"{module}.g_idx" not in files:
            missing.append(f"{module}.g_idx")
        if missing:
            raise ValueError(f"GPTQ checkpoint is missing tensor(s) {missing} (quantization_config "
                             f"quantizes {module} with bits={spec.bits}; the checkpoint holds "
                             f"{[f'{module}.{t}' for t in present] or 'none of its GPTQ tensors'})")
        out[path] = (module, spec)
    if stored_float:
        log.warning("quantization_config quantizes %d module(s) that the checkpoint stores as "
                    "float weights (no GPTQ tensors), e.g. %s: loading them as float",
                    len(stored_float), stored_float[0])
    return out


def _read_gptq_weight(reader: _TensorReader, module: str, spec: GPTQLayerSpec,
                      shape: tuple[int, int], checkpoint_format: str) -> QuantizedWeight:
    """One layer's GPTQ tensors, checked against the [in, out] = [K, N] shape the config implies."""
    k, n = shape
    b, g = spec.bits, spec.group_size
    if g != -1 and k % g:
        raise ValueError(f"{module}: group_size={g} does not divide in_features={k}")
    if (k * b) % 32 or (n * b) % 32:
        raise ValueError(f"{module}: {b}-bit packing needs in_features*bits and out_features*bits "
                         f"to be multiples of 32; got [in={k}, out={n}]")
    groups = 1 if g == -1 else k // g
    expected = {"qweight": (k * b // 32, n), "qzeros": (groups, n * b // 32),
                "scales": (groups, n), "g_idx": (k,)}
    tensors = {}
    for t, want in expected.items():
        name = f"{module}.{t}"
        if name not in reader.files:  # only g_idx may be absent (checked by _gptq_modules)
            continue
        x = np.asarray(reader.get(name))
        if tuple(x.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {list(x.shape)}; bits={b}, "
                             f"group_size={g} and the layer's [in={k}, out={n}] imply "
                             f"{list(want)}")
        integer = t != "scales"
        if integer != np.issubdtype(x.dtype, np.integer) or (t in ("qweight", "qzeros")
                                                            and x.dtype != np.int32):
            raise ValueError(f"tensor {name!r} must be "
                             f"{'a float type' if t == 'scales' else 'int32'}; got {x.dtype}")
        tensors[t] = x
    try:
        return from_gptq_tensors(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                 tensors.get("g_idx"), bits=b, group_size=g,
                                 checkpoint_format=checkpoint_format)
    except ValueError as e:
        raise ValueError(f"{module}: {e}") from None


def _module_at(model, path: tuple):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def read_model_dir(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    """A local Hugging Face model directory and its config.json as a dict, with errors that say
    which of the two is missing or malformed."""
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory; expected a Hugging Face "
                                f"model directory (config.json and safetensors weights)")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config_file = model_dir / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(
            f"{model_dir} has no config.json; expected a Hugging Face model directory")
    return model_dir, read_config_json(config_file)


def check_present(model_dir: Path, names: list[str], files: dict) -> None:
    """A clear error naming the tensors config.json implies that no file in model_dir holds."""
    missing = [name for name in names if name not in files]
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} is missing {len(missing)} tensor(s) that config.json "
            f"implies, e.g. {missing[:5]}")


def read_param(reader: "_TensorReader", files: dict, name: str, transposed: bool,
               current: jax.Array) -> jax.Array:
    """Tensor `name` as the value of a parameter now holding `current` (its shape and dtype),
    transposed from the on-disk [out, in] layout where `transposed`; a clear error on a shape
    that config.json does not imply, or a non-float tensor."""
    tensor = reader.get_float(name)
    expected = current.shape[::-1] if transposed else current.shape
    if tensor.shape != expected:
        raise ValueError(f"tensor {name!r} in {files[name].name} has shape "
                         f"{list(tensor.shape)}; config.json implies {list(expected)}")
    return jnp.asarray(tensor.T if transposed else tensor, dtype=current.dtype)


def with_generation_stop_tokens(model_dir: Path, config):
    """``config`` with the stop tokens of ``model_dir``'s generation_config.json where it names
    them (``eos_token_id``, an int or a list), else ``config`` itself.

    transformers' ``generate`` stops on the generation config's ids, which can differ from
    config.json's: Llama 3.1 Instruct's config.json names end-of-text (128001) but its
    generation_config.json also end-of-turn (128008, 128009), where a chat reply ends. Reading
    them makes generation here stop where transformers does."""
    path = model_dir / GENERATION_CONFIG_FILE
    if not path.exists():
        return config
    eos = read_config_json(path).get("eos_token_id")
    if eos is None:
        return config
    try:  # the config checks the ids: ints in [0, vocab_size)
        return dataclasses.replace(config, eos_token_id=eos)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_pretrained(model_dir: str | os.PathLike, dtype: str = "float32",
                    attention_backend: str = "auto",
                    quant_backend: str = "auto"
                    ) -> LlamaForCausalLM | MixtralForCausalLM | HyenaForCausalLM:
    """Load a local Hugging Face model directory (config.json + safetensors) as an NNX model:
    a `MixtralForCausalLM` or `HyenaForCausalLM` where config.json's model_type says so, else a
    `LlamaForCausalLM`.

    `dtype` ("float32" or "bfloat16") is both the parameter and the compute dtype;
    `attention_backend` is that of `kernels_pallas.flash_attention`. A GPTQ checkpoint loads
    with `QuantizedLinear` layers whose `quant_matmul` backend is `quant_backend`."""
    if quant_backend not in QUANT_BACKENDS:
        raise ValueError(f"quant_backend must be one of {QUANT_BACKENDS}; got {quant_backend!r}")
    model_dir, hf_config = read_model_dir(model_dir)
    model_type = hf_config.get("model_type")
    if model_type == "mixtral":
        from jaxinfer.checkpoint.hf_mixtral import load_mixtral  # it imports this module

        return load_mixtral(model_dir, dtype=dtype, attention_backend=attention_backend)
    if model_type == HYENA_MODEL_TYPE:
        from jaxinfer.checkpoint.hf_hyena import load_hyena  # it imports this module

        return load_hyena(model_dir, dtype=dtype)
    config = with_generation_stop_tokens(model_dir, LlamaConfig.from_hf_config(
        hf_config, dtype=dtype, attention_backend=attention_backend))
    gptq = read_gptq_config(model_dir, hf_config)
    files = _tensor_files(model_dir)
    config, embedding = resolve_tied_embeddings(config, files)

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    wanted = {path: hf_name(path) for path, var in flat if isinstance(var, nnx.Param)}
    wanted = {path: (embedding, t) if name == EMBEDDING else (name, t)
              for path, (name, t) in wanted.items()}
    quantized = _gptq_modules(flat, gptq, files) if gptq else {}
    for path in quantized:
        del wanted[path]
    check_present(model_dir, [name for name, _ in wanted.values()], files)

    with _TensorReader(files) as reader:
        for path, var in tqdm(flat, desc=f"loading {model_dir.name}", unit="tensor", leave=False,
                              disable=None):  # None: a bar on terminals only
            if path not in wanted:
                continue
            var.value = read_param(reader, files, *wanted[path], var.value)
        model = nnx.merge(graphdef, nnx.from_flat_state(flat))
        for path, (module, spec) in quantized.items():
            parent, name = _module_at(model, path[:-2]), path[-2]
            layer = getattr(parent, name)
            weight = _read_gptq_weight(reader, module, spec, tuple(layer.kernel.shape),
                                       gptq.checkpoint_format)
            setattr(parent, name, quantized_linear(layer, weight, quant_backend))
        warn_unused(reader, config.tie_word_embeddings)
    if quantized:
        log.info("loaded %d GPTQ layers (%s, %d-bit base)", len(quantized),
                 gptq.checkpoint_format, gptq.bits)
    return model


def _gptq_tensors(model, checkpoint_format: str | None) -> tuple[dict, GPTQConfig | None]:
    """({tensor name: array}, config) for the model's QuantizedLinear layers; ({}, None) if none.
    The config keeps the model's float decoder linear layers float (a "-:" rule each)."""
    weights, float_modules = {}, []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedLinear):
            weights[hf_name(path + ("kernel",))[0].removesuffix(".weight")] = node.weight
        elif isinstance(node, Linear) and path[:1] == ("layers",):
            float_modules.append(hf_name(path + ("kernel",))[0].removesuffix(".weight"))
    if not weights:
        return {}, None
    if checkpoint_format is None:  # v1 (widest reader support) unless a zero point is 0
        v1_ok = all(bool((w.zeros >= 1).all()) for w in weights.values())
        checkpoint_format = "gptq" if v1_ok else "gptq_v2"
    elif checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS} or None; "
                         f"got {checkpoint_format!r}")
    config = gptq_config_for(weights, checkpoint_format, float_modules)  # refuses mixed bits
    tensors = {}
    for module, w in weights.items():
        for t, x in to_gptq_tensors(w, checkpoint_format).items():
            tensors[f"{module}.{t}"] = jnp.asarray(x)
    return tensors, config


def save_pretrained(model: LlamaForCausalLM | MixtralForCausalLM | HyenaForCausalLM,
                    out_dir: str | os.PathLike, *, tokenizer=None,
                    max_shard_bytes: int | None = None,
                    checkpoint_format: str | None = None,
                    extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write config.json and safetensors that `transformers.AutoModelForCausalLM` loads back
    (Llama family, Mixtral; Hyena, which transformers lacks, loads back through `load_pretrained`).

    With `max_shard_bytes` the weights are split into shards plus `model.safetensors.index.json`;
    a `tokenizers.Tokenizer` given as `tokenizer` is saved beside them as tokenizer.json, and
    `extra_files` ({name: source file}, e.g. the source directory's tokenizer files) are copied in
    with the checkpoint, replacing out_dir's files of those names in the same step.
    A Llama-family model with `QuantizedLinear` layers is written as an HF GPTQ checkpoint (a
    `quantization_config` in config.json, also written as quantize_config.json):
    `checkpoint_format` "gptq" (v1), "gptq_v2", or None for v1 unless some zero point is 0
    (which v1 cannot store). Mixtral and Hyena models are written in float.

    out_dir's previous checkpoint (weights, index, config.json, quantize_config.json) is replaced
    as a whole, so it is never left half-written or with stale files; its other files (tokenizer
    files, generation_config.json, ...) are kept. See `hf_write.write_checkpoint`."""
    if not isinstance(model, (LlamaForCausalLM, MixtralForCausalLM, HyenaForCausalLM)):
        raise TypeError(f"model must be a jaxinfer LlamaForCausalLM, MixtralForCausalLM or "
                        f"HyenaForCausalLM (jaxinfer.load_pretrained gives one); "
                        f"got {type(model).__name__}")
    gptq = None
    if isinstance(model, (MixtralForCausalLM, HyenaForCausalLM)):
        if checkpoint_format is not None:
            raise ValueError(f"checkpoint_format applies to GPTQ checkpoints of Llama-family "
                             f"models; a {type(model).__name__} is saved in float, got "
                             f"checkpoint_format={checkpoint_format!r}")
        if isinstance(model, MixtralForCausalLM):
            from jaxinfer.checkpoint.hf_mixtral import mixtral_tensors  # it imports this module

            tensors = mixtral_tensors(model)
        else:
            tensors = hf_tensors(model)
    else:
        gptq_tensors, gptq = _gptq_tensors(model, checkpoint_format)
        tensors = hf_tensors(model) | gptq_tensors
    hf_config = model.config.to_hf_config()  # after _gptq_tensors: its errors say more
    json_files: dict[str, dict] = {}  # written after the weights, config.json last
    if gptq is not None:
        hf_config["quantization_config"] = gptq.to_dict()
        json_files[QUANTIZE_CONFIG_FILE] = gptq.to_dict()
    json_files[CONFIG_FILE] = hf_config
    return write_checkpoint(out_dir, tensors, json_files, max_shard_bytes=max_shard_bytes,
                            tokenizer=tokenizer, extra_files=extra_files)
