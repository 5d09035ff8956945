"""Model configuration: frozen dataclasses for the Llama family (and Hyena), read from and written
to HF config.json.

Llama 2/3, Mistral and Qwen2 differ only in a handful of switches (rope scaling, projection biases,
sliding window), so one config and one decoder cover all three. The config is hashable so that
jitted functions can take it as a static argument.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Mapping

from jaxinfer.config_checks import (check_bools, check_finite, check_token_ids, is_int,
                                    normalize_fields, token_ids_to_tuple)
# RopeScaling and the rope constants live in config_rope; they are part of this module's API
from jaxinfer.config_rope import (ROPE_TYPE_FIELDS, SUPPORTED_ROPE_TYPES,  # noqa: F401
                                  RopeScaling, hf_rope_fields)
# the values the kernels and sharding take, imported so that the config accepts exactly those
from kernels_pallas.attention import BACKENDS as ATTENTION_BACKENDS
from kernels_pallas.fftconv import BACKENDS as FFTCONV_BACKENDS
from sharding.sequence_parallel import IMPLS as SEQUENCE_PARALLEL_IMPLS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# What transformers' config classes (Llama/Mistral/Mixtral/Qwen2Config) assume for a key that
# config.json omits, so that an absent key means here what it means to transformers.
# num_key_value_heads None: as many KV heads as query heads (multi-head attention).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=None, max_position_embeddings=2048, rope_theta=1e4,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2),
    "mistral": dict(num_key_value_heads=8, max_position_embeddings=131072, rope_theta=1e4,
                    rms_norm_eps=1e-6, sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(num_key_value_heads=8, max_position_embeddings=131072, rope_theta=1e6,
                    rms_norm_eps=1e-5, sliding_window=None, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(num_key_value_heads=32, max_position_embeddings=32768, rope_theta=1e4,
                  rms_norm_eps=1e-6, sliding_window=4096, max_window_layers=28,
                  bos_token_id=None, eos_token_id=None),
}
# hidden_act values that mean SiLU; to_hf_config writes "silu"
SILU_NAMES = ("silu", "swish")
SUPPORTED_DTYPES = ("float32", "bfloat16")
REMAT_MODES = ("none", "full", "dots")  # see LlamaConfig.remat


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file (a config.json; a run's train_config.json or run.json) as a dict,
    with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:  # a binary file given where a JSON file belongs
        raise ValueError(f"{path} is not a UTF-8 text (JSON) file: {e.reason} at byte "
                         f"{e.start}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(hf).__name__}")
    return hf


@contextlib.contextmanager
def config_json_errors():
    """Prefix "config.json: " to the ValueError / TypeError of a config built from its values."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"config.json: {e}") from None


def hf_decoder_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """`LlamaConfig`'s architecture fields from a Hugging Face config dict (transformers 4.x or
    5.x spelling) of `model_type`: one of SUPPORTED_MODEL_TYPES, or "mixtral", whose attention
    blocks are Mistral's. Keys config.json omits take transformers' defaults for that model type
    (HF_DEFAULTS); errors name config.json and the model type."""
    defaults = HF_DEFAULTS[model_type]
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ValueError(f"config.json: missing required field(s) {missing}")
    act = hf.get("hidden_act", "silu")
    if act not in SILU_NAMES:  # transformers' ACT2FN maps both names to nn.SiLU
        raise ValueError(f"config.json: hidden_act must be 'silu' for {model_type}; got {act!r} "
                         f"(its alias 'swish' is accepted too)")
    max_positions = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
    kv_heads = hf.get("num_key_value_heads", defaults["num_key_value_heads"])
    if model_type == "qwen2":
        sliding_window = _qwen2_sliding_window(hf, hf["num_hidden_layers"])
    elif model_type == "llama":  # HF's Llama reads no window, even if config.json names one
        sliding_window = None
    else:  # Mistral's and Mixtral's apply to every layer
        sliding_window = hf.get("sliding_window", defaults["sliding_window"])

    rope_theta, rope_scaling = hf_rope_fields(hf, max_positions=max_positions,
                                              default_theta=defaults["rope_theta"])

    # HF's Mistral, Mixtral and Qwen2 classes ignore attention_bias / mlp_bias; Llama reads them.
    # Not bool(): a string such as "false" would be truthy; LlamaConfig refuses a non-bool.
    attention_bias = hf.get("attention_bias", False) if model_type == "llama" else False
    # an absent id takes the class default (Llama's 1 and 2); an explicit null stays None
    eos = hf.get("eos_token_id", defaults["eos_token_id"])
    return dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_attention_heads"] if kv_heads is None else kv_heads,
        head_dim=hf.get("head_dim"),
        max_position_embeddings=max_positions,
        rms_norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias,
        mlp_bias=hf.get("mlp_bias", False) if model_type == "llama" else False,
        sliding_window=sliding_window,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id", defaults["bos_token_id"]),
        eos_token_id=() if eos is None else eos,
    )


def _qwen2_sliding_window(hf: Mapping[str, Any], num_layers: int) -> int | None:
    """The sliding window of a Qwen2 config's layers, worked out as transformers' Qwen2Config
    does: `sliding_window` counts only with `use_sliding_window`, and a layer slides where an
    explicit `layer_types` says "sliding_attention", else where its index is >=
    `max_window_layers`. jaxinfer gives every layer the same attention, so a config whose layers
    differ is refused; one where no layer slides (the usual max_window_layers >= layers) is
    not."""
    defaults = HF_DEFAULTS["qwen2"]
    window = (hf.get("sliding_window", defaults["sliding_window"])
              if hf.get("use_sliding_window", False) else None)
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = hf.get("max_window_layers", defaults["max_window_layers"])
        layer_types = ["sliding_attention" if window is not None and i >= first
                       else "full_attention" for i in range(num_layers)]
    known = {"full_attention", "sliding_attention"}
    if len(layer_types) != num_layers or not set(layer_types) <= known:
        raise ValueError(f"config.json: layer_types must list {num_layers} (num_hidden_layers) "
                         f"entries among {sorted(known)} for qwen2; got {layer_types!r}")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if not sliding:
        return None
    if window is None:
        raise ValueError(f"config.json: layer_types marks qwen2 layers {sliding} as "
                         f"sliding_attention, but use_sliding_window is false or sliding_window "
                         f"is null, so they have no window")
    if len(sliding) < num_layers:
        raise ValueError(f"config.json: qwen2 with a sliding window in only some layers (layers "
                         f"{sliding} of {num_layers}, from use_sliding_window, max_window_layers "
                         f"and layer_types) is not supported; jaxinfer gives every layer the same "
                         f"attention")
    return window


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder and the dtypes it runs in.

    `param_dtype` is how weights are stored, `dtype` the compute dtype of matmuls; normalization,
    softmax and logits are always float32. `attention_backend` picks the implementation of
    `kernels_pallas.flash_attention` for uncached forward passes (training, scoring), and
    `sequence_parallel` the algorithm ("ring" or "ulysses") attention uses when the active sharding
    rules split the sequence over a mesh axis. `remat` trades compute for memory in training:
    "full" keeps only each decoder layer's input for the backward pass and recomputes the rest,
    "dots" also keeps the projections' outputs (recomputing attention's score products and the
    elementwise work).
    All three are run settings, not part of the HF config.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int | None = None
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral, Mixtral, Qwen2: a query sees this many keys
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "auto"
    sequence_parallel: str = "ring"  # "ring" | "ulysses": used where the rules split "seq"
    remat: str = "none"  # "none" | "full" | "dots": recompute layer activations in the backward

    # fields whose numpy scalars are stored as Python ones (MixtralConfig adds its own)
    _INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                   "head_dim", "sliding_window", "bos_token_id")
    _FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")
    _BOOL_FIELDS = ("qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings")

    def __post_init__(self) -> None:
        normalize_fields(self, self._INT_FIELDS, self._FLOAT_FIELDS, self._BOOL_FIELDS)
        hidden, heads = self.hidden_size, self.num_attention_heads
        derived_from = ""
        if self.head_dim is None and is_int(hidden) and is_int(heads) and heads > 0:
            # transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 (its
            # validate_architecture), while its Mistral and Qwen2 classes floor the division and
            # build q/o projections of heads * head_dim != hidden_size without a word. Such a
            # shape without an explicit head_dim is almost surely a typo, so it is refused here
            # for every model type; config.json files written by transformers carry head_dim,
            # so real checkpoints with narrower heads still load.
            if hidden % heads:
                raise ValueError(
                    f"hidden_size must be a multiple of num_attention_heads when head_dim is not "
                    f"given; got hidden_size {hidden} and num_attention_heads {heads} (set "
                    f"head_dim for heads whose total width differs from hidden_size)")
            object.__setattr__(self, "head_dim", hidden // heads)
            derived_from = f" (hidden_size {hidden} // num_attention_heads {heads})"
        # here rather than in _validate, to say where a derived head_dim came from
        if is_int(self.head_dim) and self.head_dim > 0 and self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings rotate pairs); "
                             f"got head_dim={self.head_dim}{derived_from}")
        object.__setattr__(self, "eos_token_id", token_ids_to_tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):  # an HF-style dict, as config.json holds it
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        self._validate()

    def _validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {SUPPORTED_MODEL_TYPES}; got {self.model_type!r}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "head_dim"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "num_attention_heads must be a multiple of num_key_value_heads; got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            check_finite(name, getattr(self, name))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"rope_scaling must be a RopeScaling, a dict of its fields or None; "
                            f"got {self.rope_scaling!r}")
        window = self.sliding_window
        if window is not None and (not is_int(window) or window <= 0):
            raise (ValueError if is_int(window) else TypeError)(
                f"sliding_window must be a positive int or None; got {window!r}")
        check_bools(self, self._BOOL_FIELDS)
        check_token_ids(self)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}; "
                             f"got {self.attention_backend!r}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat must be one of {REMAT_MODES}; got {self.remat!r}")
        if self.sequence_parallel not in SEQUENCE_PARALLEL_IMPLS:
            raise ValueError(f"sequence_parallel must be one of {SEQUENCE_PARALLEL_IMPLS}; "
                             f"got {self.sequence_parallel!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"{name} must be one of {SUPPORTED_DTYPES}; got {getattr(self, name)!r}"
                )

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, dtype: str = "float32",
                       attention_backend: str = "auto") -> LlamaConfig:
        """Build from a Hugging Face config dict (transformers 4.x or 5.x spelling)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type must be one of {SUPPORTED_MODEL_TYPES}; "
                             f"got {model_type!r}")
        fields = hf_decoder_fields(hf, model_type)
        with config_json_errors():  # config.json's values alone, so that errors name the file
            cls(**fields)
        return cls(**fields, dtype=dtype, param_dtype=dtype, attention_backend=attention_backend)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that transformers loads back into the same architecture.

        Raises ValueError for switch combinations HF's classes cannot express, rather than writing
        a checkpoint that transformers would run as a different model."""
        problems = []
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            problems.append("llama's attention_bias covers q/k/v and o together; got "
                            f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        if self.model_type == "mistral" and (self.qkv_bias or self.o_bias or self.mlp_bias):
            problems.append("mistral has no qkv_bias, o_bias or mlp_bias")
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
            problems.append("qwen2 needs qkv_bias=True and has no o_bias or mlp_bias")
        if self.sliding_window is not None and self.model_type == "llama":
            problems.append("sliding_window is only expressible for mistral and qwen2; got llama")
        if problems:
            raise ValueError("config cannot be written as a Hugging Face config.json: "
                             + "; ".join(problems))
        architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:  # only the fields its type reads: HF warns on others
            rope_type = self.rope_scaling.rope_type
            rope_parameters.update(rope_type=rope_type, **{
                name: getattr(self.rope_scaling, name) for name in ROPE_TYPE_FIELDS[rope_type]})
        hf: dict[str, Any] = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "rope_parameters": rope_parameters,
            # transformers 4.x reads these two instead of rope_parameters
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {
                k: v for k, v in rope_parameters.items() if k != "rope_theta"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (self.eos_token_id[0] if len(self.eos_token_id) == 1
                             else list(self.eos_token_id) or None),
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":  # max_window_layers 0: every layer slides
            hf["use_sliding_window"] = self.sliding_window is not None
            if self.sliding_window is not None:
                hf.update(sliding_window=self.sliding_window, max_window_layers=0)
        return hf

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, dtype: str = "float32",
                       attention_backend: str = "auto") -> LlamaConfig:
        return cls.from_hf_config(read_config_json(path), dtype=dtype,
                                  attention_backend=attention_backend)


HYENA_MODEL_TYPE = "hyena"


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
    """Architecture of a Hyena decoder (Poli et al. 2023): attention replaced by gated long
    convolutions whose filters are implicit (a small sine network over positions, times a decay).

    `order` N: the input is projected to N + 1 streams (x_0 .. x_{N-1}, v) and v goes through
    N - 1 gated long convolutions. The filter fields follow the safari reference implementation:
    `filter_emb_dim` positional features (t plus (emb_dim - 1) / 2 sin/cos bands, so it is odd),
    an FFN of width `filter_hidden_size` with `filter_inner_layers` hidden layers and sine
    activations of initial frequency `filter_sine_freq`, and an exponential decay window whose
    per-channel rates reach `filter_decay_target` at fractions `filter_decay_fast` ..
    `filter_decay_slow` of the context. `filter_squash` is the soft threshold lambda of "Simple
    Hardware-Efficient Long Convolutions" (k -> sign(k) max(|k| - lambda, 0)); 0 disables it.
    `max_position_embeddings` is the longest sequence (the filters' length).
    `fftconv_backend` picks `kernels_pallas.fftconv`'s implementation and `remat` what the
    backward pass keeps of each block, as LlamaConfig's ("full": the block's input only; "dots":
    also the matmul outputs); both are run settings, not written to config.json.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    order: int = 2
    short_filter_size: int = 3
    filter_emb_dim: int = 33
    filter_hidden_size: int = 64
    filter_inner_layers: int = 1
    filter_sine_freq: float = 1.0
    filter_decay_fast: float = 0.3
    filter_decay_slow: float = 1.5
    filter_decay_target: float = 1e-2
    filter_squash: float = 0.0
    model_type: str = HYENA_MODEL_TYPE
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    fftconv_backend: str = "auto"
    remat: str = "none"  # "none" | "full" | "dots": recompute block activations in the backward

    _INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "max_position_embeddings", "order", "short_filter_size", "filter_emb_dim",
                   "filter_hidden_size", "filter_inner_layers", "bos_token_id")
    _FLOAT_FIELDS = ("filter_sine_freq", "filter_decay_fast", "filter_decay_slow",
                     "filter_decay_target", "filter_squash", "rms_norm_eps")
    _RUN_SETTINGS = ("fftconv_backend", "remat")  # fields kept out of config.json

    def __post_init__(self) -> None:
        normalize_fields(self, self._INT_FIELDS, self._FLOAT_FIELDS, ("tie_word_embeddings",))
        object.__setattr__(self, "eos_token_id", token_ids_to_tuple(self.eos_token_id))
        self._validate()

    def _validate(self) -> None:
        if self.model_type != HYENA_MODEL_TYPE:
            raise ValueError(f"model_type must be {HYENA_MODEL_TYPE!r}; got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "max_position_embeddings", "short_filter_size", "filter_hidden_size"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not is_int(self.order) or self.order < 2:
            raise ValueError(f"order must be an integer >= 2 (one long convolution at least); "
                             f"got {self.order!r}")
        if not is_int(self.filter_inner_layers) or self.filter_inner_layers < 0:
            raise ValueError(f"filter_inner_layers must be a non-negative integer; "
                             f"got {self.filter_inner_layers!r}")
        emb = self.filter_emb_dim
        if not is_int(emb) or emb < 3 or emb % 2 == 0:
            raise ValueError(f"filter_emb_dim must be an odd integer >= 3 (t plus sin/cos pairs); "
                             f"got {emb!r}")
        for name in ("filter_sine_freq", "filter_decay_fast", "filter_decay_slow",
                     "filter_decay_target", "rms_norm_eps"):
            check_finite(name, getattr(self, name))
        if not self.filter_decay_fast <= self.filter_decay_slow:
            raise ValueError("filter_decay_fast and filter_decay_slow must satisfy 0 < fast <= "
                             f"slow; got {self.filter_decay_fast} and {self.filter_decay_slow}")
        if not self.filter_decay_target < 1:
            raise ValueError(f"filter_decay_target must lie in (0, 1); "
                             f"got {self.filter_decay_target}")
        check_finite("filter_squash", self.filter_squash, low_inclusive=True)  # 0: no squash
        check_bools(self, ("tie_word_embeddings",))
        check_token_ids(self)
        if self.fftconv_backend not in FFTCONV_BACKENDS:
            raise ValueError(f"fftconv_backend must be one of {FFTCONV_BACKENDS}; "
                             f"got {self.fftconv_backend!r}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat must be one of {REMAT_MODES}; got {self.remat!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"{name} must be one of {SUPPORTED_DTYPES}; got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> HyenaConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict (no transformers class exists for Hyena; the keys are this
        dataclass's fields, so `from_hf_config` reads it back exactly)."""
        hf = dataclasses.asdict(self)
        hf["eos_token_id"] = list(self.eos_token_id)
        hf["architectures"] = ["HyenaForCausalLM"]
        for name in self._RUN_SETTINGS:  # like LlamaConfig's attention_backend and remat
            del hf[name]
        return hf

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, fftconv_backend: str = "auto"
                       ) -> HyenaConfig:
        if hf.get("model_type") != HYENA_MODEL_TYPE:
            raise ValueError(f"config.json: model_type must be {HYENA_MODEL_TYPE!r}; "
                             f"got {hf.get('model_type')!r}")
        names = {f.name for f in dataclasses.fields(cls)} - set(cls._RUN_SETTINGS)
        fields = {k: v for k, v in hf.items() if k in names}
        with config_json_errors():  # config.json's values alone, so that errors name the file
            cls(**fields)
        return cls(**fields, fftconv_backend=fftconv_backend)
