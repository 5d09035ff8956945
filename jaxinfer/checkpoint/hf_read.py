"""Reading Hugging Face checkpoints: one pipeline for every model type.

`load_model` is the whole load of a local model directory into an NNX model: the
generation_config.json stop tokens, the safetensors files (single or sharded), transformers'
reading of tied embeddings, the abstract model, a clear error for every tensor config.json
implies that no file holds, the read itself (with a progress bar on terminals), and a warning
naming the tensors left unread. The per-model loaders (`hf.load_pretrained` for the Llama family
and GPTQ, `hf_mixtral.load_mixtral`, `hf_hyena.load_hyena`) build the config and pass hooks for
what their layout adds: names of their own, parameters read another way, layers replaced after.

Parameter names follow HF's module names, so the mapping is mechanical (`hf_name`): prefix
`model.`, rename `kernel`/`embedding` to `weight`, and transpose linear kernels (HF stores
[out, in]).
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

from jaxinfer.checkpoint.gptq_config import QUANTIZE_CONFIG_FILE, read_quantization_config
from jaxinfer.checkpoint.hf_write import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from jaxinfer.config import read_config_json
from jaxinfer.config_checks import is_int

log = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
# Buffers some exporters write that carry no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtypes: those of float parameters, and all that safe_open(framework="flax") can
# read (it fails with an AttributeError on the others, float8 among them).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
READABLE_DTYPES = FLOAT_DTYPES + ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def hf_name(path: tuple) -> tuple[str, bool]:
    """HF tensor name for an NNX parameter path, and whether the tensor is stored transposed."""
    *parts, leaf = (str(p) for p in path)
    name = ".".join(parts + ["weight" if leaf in ("kernel", "embedding") else leaf])
    return (name if parts[0] == "lm_head" else "model." + name), leaf == "kernel"


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


def _autogptq_base_name(model_dir: Path) -> tuple[object, str] | None:
    """The <base> of an AutoGPTQ checkpoint's ``<base>.safetensors``, unchecked, and where it was
    read (for error messages); None for a checkpoint without a GPTQ config or without a name.

    It is the quantization config's ``model_file_base_name``, else quantize_config.json's:
    transformers and optimum write config.json's ``quantization_config`` without the field, and
    AutoGPTQ reads quantize_config.json, which keeps it. Without either, AutoGPTQ's default
    ``gptq_model-<bits>bit-<group_size>g``."""
    found = read_quantization_config(model_dir, read_config_json(model_dir / CONFIG_FILE))
    if found is None or not isinstance(found[0], dict):  # a malformed one fails later, named
        return None
    qconfig, source = found
    if qconfig.get("model_file_base_name") is not None:
        return qconfig["model_file_base_name"], source
    file = model_dir / QUANTIZE_CONFIG_FILE
    if file.exists() and source != str(file):
        try:
            autogptq = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # config.json's config is the one read; only the name
            # (unreadable, not UTF-8, not JSON: each a ValueError or an OSError)
            log.warning("%s cannot be read as JSON (%s); ignoring its model_file_base_name",
                        file, e)
            autogptq = None
        if isinstance(autogptq, dict) and autogptq.get("model_file_base_name") is not None:
            return autogptq["model_file_base_name"], str(file)
    if is_int(qconfig.get("bits")) and is_int(qconfig.get("group_size")):
        return f"gptq_model-{qconfig['bits']}bit-{qconfig['group_size']}g", source
    return None


def _checked_base_name(base: object, source: str) -> str:
    """``base`` without a ``.safetensors`` extension, refusing what is not a file name in the
    model directory (a path would read outside it)."""
    name = base.removesuffix(".safetensors") if isinstance(base, str) else None
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"{source}: model_file_base_name must be a file name without its "
                         f".safetensors extension, e.g. 'gptq_model-4bit-128g'; got {base!r}")
    return name


def _weights_in(model_dir: Path, single_name: str, index_name: str) -> dict[str, Path] | None:
    """{tensor name: file} of the single file ``single_name``, else of the shards the index
    ``index_name`` names; None where neither exists. Where both do, the single file wins, as in
    transformers (`modeling_utils._get_resolved_checkpoint_files`), so that both load the same
    weights; transformers' own single-file save over a sharded one deletes the shards but leaves
    the index behind."""
    single, index = model_dir / single_name, model_dir / index_name
    if single.exists():
        if index.exists():
            log.warning("%s has both %s and %s; loading %s and ignoring the index, as "
                        "transformers does", model_dir, single_name, index_name, single_name)
        try:
            with safe_open(single, framework="flax") as f:
                return {name: single for name in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{single} is not a readable safetensors file: {e}") from None
    if index.exists():
        weight_map = _read_weight_map(index)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard file(s) that are missing from "
                                    f"{model_dir}: {missing}")
        return {name: model_dir / shard for name, shard in weight_map.items()}
    return None


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it.

    The weights are transformers' model.safetensors or its index, else, for an AutoGPTQ
    checkpoint (a GPTQ quantization config), ``<base>.safetensors`` or
    ``<base>.safetensors.index.json`` (see `_autogptq_base_name`). The base name is checked only
    when it is read, so that a bad one does not refuse a directory with model.safetensors."""
    found = _weights_in(model_dir, SINGLE_FILE, INDEX_FILE)
    base = _autogptq_base_name(model_dir)
    if found is not None:
        if base is not None:
            _warn_if_autogptq_weights_too(model_dir, *base)
        return found
    names = [(SINGLE_FILE, INDEX_FILE)]
    if base is not None:
        name = _checked_base_name(*base)
        if name + ".safetensors" != SINGLE_FILE:
            names.append((name + ".safetensors", name + ".safetensors.index.json"))
            found = _weights_in(model_dir, *names[-1])
            if found is not None:
                return found
    looked_for = ", ".join(name for pair in names for name in pair)
    raise FileNotFoundError(f"{model_dir} has none of the weight files {looked_for}; expected "
                            f"safetensors weights")


def _warn_if_autogptq_weights_too(model_dir: Path, base: object, source: str) -> None:
    """Warn where AutoGPTQ's <base> weights sit beside the model.safetensors (or index) read:
    AutoGPTQ would load the other file."""
    try:
        name = _checked_base_name(base, source)
    except ValueError:  # not a file AutoGPTQ could load either
        return
    loaded = SINGLE_FILE if (model_dir / SINGLE_FILE).exists() else INDEX_FILE
    for other in (name + ".safetensors", name + ".safetensors.index.json"):
        if other not in (SINGLE_FILE, INDEX_FILE) and (model_dir / other).exists():
            log.warning("%s has both %s and AutoGPTQ's %s (the model_file_base_name of %s); "
                        "loading %s, as transformers does, where AutoGPTQ would load %s",
                        model_dir, loaded, other, source, loaded, other)
            return


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


class TensorReader:
    """Reads named tensors (jax arrays), opening each safetensors file once; `used` collects the
    names read, so that a load can report the tensors it left unread."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def __enter__(self) -> TensorReader:
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

    def get_param(self, name: str, transposed: bool, current: jax.Array) -> jax.Array:
        """Tensor `name` as the value of a parameter now holding `current` (its shape and dtype),
        transposed from the on-disk [out, in] layout where `transposed`; a clear error on a shape
        that config.json does not imply, or a non-float tensor."""
        tensor = self.get_float(name)
        expected = current.shape[::-1] if transposed else current.shape
        if tensor.shape != expected:
            raise ValueError(f"tensor {name!r} in {self.files[name].name} has shape "
                             f"{list(tensor.shape)}; config.json implies {list(expected)}")
        return jnp.asarray(tensor.T if transposed else tensor, dtype=current.dtype)


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
    with TensorReader(files) as reader:
        embedding, lm_head = reader.get_float(EMBEDDING), reader.get_float(LM_HEAD)
        if embedding.shape == lm_head.shape and bool(np.array_equal(np.asarray(embedding),
                                                                    np.asarray(lm_head))):
            return config, EMBEDDING
    log.warning("config.json sets tie_word_embeddings, but the checkpoint holds both %s and %s "
                "with different values: loading them untied, as transformers does (set "
                "tie_word_embeddings to false in config.json to silence this)", EMBEDDING, LM_HEAD)
    return dataclasses.replace(config, tie_word_embeddings=False), EMBEDDING


def _check_present(model_dir: Path, names: list[str], files: dict) -> None:
    """A clear error naming the tensors config.json implies that no file in model_dir holds."""
    missing = [name for name in names if name not in files]
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} is missing {len(missing)} tensor(s) that config.json "
            f"implies, e.g. {missing[:5]}")


def _warn_unused(reader: TensorReader, tie_word_embeddings: bool) -> None:
    """Log the checkpoint tensors a load left unread (other than buffers and a tied lm_head,
    which `resolve_tied_embeddings` found equal to the embedding)."""
    unused = sorted(n for n in set(reader.files) - reader.used
                    if not n.endswith(IGNORED_SUFFIXES)
                    and not (n == LM_HEAD and tie_word_embeddings))
    if unused:
        log.warning("ignoring %d tensor(s) the model does not use, e.g. %s",
                    len(unused), unused[:5])


# Hooks of `load_model`; `flat` is the abstract model's `nnx.to_flat_state`, a list of
# (path, variable) pairs, and `files` the {tensor name: file} of the checkpoint.
Names = Callable[[list, Mapping[str, Path]], dict[tuple, tuple[str, bool]]]
ReadOther = Callable[[TensorReader, tuple, jax.Array], jax.Array]
Finish = Callable[[nnx.Module, TensorReader], nnx.Module]


def param_names(flat: list, files: Mapping[str, Path]) -> dict[tuple, tuple[str, bool]]:
    """{path: (HF tensor name, transposed)} of every `nnx.Param`, by `hf_name`."""
    return {path: hf_name(path) for path, var in flat if isinstance(var, nnx.Param)}


def load_model(model_dir: Path, config, model_class: type[nnx.Module], *,
               names: Names = param_names, read_other: ReadOther | None = None,
               finish: Finish | None = None) -> nnx.Module:
    """`model_class(config)` with its parameters read from `model_dir`'s safetensors.

    `config` takes the stop tokens of generation_config.json and transformers' reading of tied
    embeddings (`resolve_tied_embeddings`) first. `names(flat, files)` gives the parameters read
    here, each from one tensor (the embedding's name is replaced by the tensor it is read from);
    every one of those tensors must be present. Each other `nnx.Param` takes
    `read_other(reader, path, abstract value)` (Mixtral's stacked experts, several tensors each),
    or, without `read_other`, stays abstract for `finish(model, reader)`, which runs after the
    merge with the files still open and returns the model (GPTQ layers replacing float ones).
    A warning then names the tensors that nothing read."""
    config = with_generation_stop_tokens(model_dir, config)
    files = tensor_files(model_dir)
    config, embedding = resolve_tied_embeddings(config, files)
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    wanted = {path: (embedding if name == EMBEDDING else name, transposed)
              for path, (name, transposed) in names(flat, files).items()}
    _check_present(model_dir, [name for name, _ in wanted.values()], files)
    with TensorReader(files) as reader:
        for path, var in tqdm(flat, desc=f"loading {model_dir.name}", unit="tensor", leave=False,
                              disable=None):  # None: a bar on terminals only
            if path in wanted:
                var.value = reader.get_param(*wanted[path], var.value)
            elif read_other is not None and isinstance(var, nnx.Param):
                var.value = read_other(reader, path, var.value)
        model = nnx.merge(graphdef, nnx.from_flat_state(flat))
        if finish is not None:
            model = finish(model, reader)
        _warn_unused(reader, config.tie_word_embeddings)
    return model
