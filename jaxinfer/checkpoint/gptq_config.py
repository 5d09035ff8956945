"""The ``quantization_config`` of an HF GPTQ checkpoint: read, validate, write, resolve per module.

Where it lives: ``config.json["quantization_config"]`` (transformers) with ``quant_method: "gptq"``,
or a ``quantize_config.json`` beside it (AutoGPTQ). The fields that change how tensors decode are
``bits``, ``group_size`` (-1 = per channel) and the checkpoint format (``format``, or the legacy
``checkpoint_format``: "gptq" = v1 "zeros minus one", "gptq_v2"); ``desc_act`` and ``sym`` describe
how the weights were made (act-order shows in ``g_idx``, asymmetry in ``qzeros``).

Per-module overrides follow GPTQModel's ``dynamic`` (also read by vLLM): an ordered map of regular
expressions over module names (``model.layers.0.mlp.down_proj``), ``re.match``-ed in order, the
first match wins; a ``"-:"`` prefix leaves matching modules unquantized (float ``weight``), a
``"+:"`` prefix or none overrides the decoding fields (``bits``, ``group_size``, ``desc_act``,
``sym``). GPTQModel also records quantize-time settings there (``damp_percent``, ``mse``,
``v2``..., ``QUANTIZE_TIME_OVERRIDES``): they do not change how tensors decode and are ignored; a
per-module LoRA ``adapter``, another format or packing dtype would, and is refused; any other key
(a typo, a setting newer than this list) is ignored with a logged warning. transformers'
``modules_in_block_to_quantize`` (module names inside a decoder block, e.g. ``self_attn.q_proj``)
leaves the block's other linear modules float. ``save_pretrained`` writes one exact-name override
per layer that differs from the most common setting, a ``"-:"`` rule per float decoder linear
layer and, when every block keeps the same modules float, ``modules_in_block_to_quantize`` too
(transformers and optimum read it; AutoGPTQ reads neither it nor ``dynamic``, and vLLM matches
``dynamic`` rules against its fused modules, ``qkv_proj`` and ``gate_up_proj``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxinfer.checkpoint.gptq_format import FORMATS
from jaxinfer.config_checks import check_group_size, is_int
from jaxinfer.quant.mixed_linear import MIXED_PART_NAMES
from kernels_pallas.quant_matmul import SUPPORTED_BITS, QuantizedWeight

log = logging.getLogger(__name__)

QUANTIZE_CONFIG_FILE = "quantize_config.json"
OVERRIDABLE = ("bits", "group_size", "desc_act", "sym")
# Per-module keys that would change how a module decodes (a LoRA adapter added to its output,
# another format or packing): refused. ``pack_dtype`` "int32" is the packing read here.
REFUSED_OVERRIDES = ("adapter", "format", "checkpoint_format", "quant_method", "is_marlin_format",
                     "pack_dtype")
# GPTQModel's quantize-time settings (its QuantizeConfig fields across versions: the Hessian
# damping, MSE grid search, static groups, GPTQ v2 / GPTAQ, fallback, offloading): they change how
# the weights were made, not how they decode. Ignored quietly; any other key is ignored with a
# warning (it may be a typo of a decoding key, or a setting that changes decoding).
QUANTIZE_TIME_OVERRIDES = (
    "damp_percent", "damp_auto_increment", "mse", "static_groups", "true_sequential",
    "act_group_aware", "hyb_act", "v2", "v2_alpha", "v2_memory_device", "gptaq", "gptaq_alpha",
    "gptaq_memory_device", "hessian", "hessian_chunk_size", "fallback", "fail_safe",
    "mock_quantization", "pack_impl", "offload_to_disk", "offload_to_disk_path", "buffered_fwd")


@dataclasses.dataclass(frozen=True)
class GPTQLayerSpec:
    """How one module's tensors decode."""

    bits: int
    group_size: int  # -1: per channel
    desc_act: bool
    sym: bool


def _check_spec(spec: dict, where: str) -> None:
    bits, group_size = spec.get("bits"), spec.get("group_size")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits must be one of {SUPPORTED_BITS}; got {bits!r}")
    check_group_size(group_size, where=where)
    for key in ("desc_act", "sym"):
        if not isinstance(spec.get(key), bool):
            raise ValueError(f"{where}: {key} must be true or false; got {spec.get(key)!r}")


def _decoding_fields(spec: dict) -> dict:
    """The OVERRIDABLE fields of ``spec``, a ``desc_act`` of null (as some writers leave it)
    read as false, and NumPy integers as Python ones (so that the config saves as JSON)."""
    out = {k: spec[k] for k in OVERRIDABLE if k in spec}
    if "desc_act" in out and out["desc_act"] is None:
        out["desc_act"] = False
    for key in ("bits", "group_size"):
        if is_int(out.get(key)):
            out[key] = int(out[key])
    return out


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """A validated GPTQ ``quantization_config``; ``dynamic`` keeps its (significant) order."""

    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    # pattern -> overrides of OVERRIDABLE fields only
    dynamic: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # module names inside a block (``self_attn.q_proj``); None: every decoder linear module
    modules_in_block_to_quantize: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str = "quantization_config") -> GPTQConfig:
        """Validate a config dict; unsupported variants raise ``ValueError`` naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} must be a JSON object; got {type(d).__name__}")
        method = d.get("quant_method", "gptq")
        if method != "gptq":
            raise ValueError(f"{source}: quant_method {method!r} is not supported; jaxinfer reads "
                             f"GPTQ checkpoints (quant_method 'gptq')")
        formats = {d[k] for k in ("format", "checkpoint_format") if d.get(k) is not None}
        if len(formats) > 1:
            raise ValueError(f"{source}: format and checkpoint_format disagree; got {formats}")
        fmt = formats.pop() if formats else "gptq"
        if d.get("is_marlin_format") or fmt not in FORMATS:
            raise ValueError(f"{source}: checkpoint format must be one of {FORMATS}; got "
                             f"{'marlin' if d.get('is_marlin_format') else fmt!r} (Marlin-packed "
                             f"checkpoints are not supported)")
        if d.get("lm_head"):
            raise ValueError(f"{source}: a quantized lm_head (lm_head: true) is not supported")
        base = {"bits": d.get("bits"), "group_size": d.get("group_size", -1),
                "desc_act": d.get("desc_act"), "sym": d.get("sym", True)}
        base = _decoding_fields(base)
        _check_spec(base, source)
        dynamic = d.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ValueError(f"{source}: dynamic must map module regexes to overrides; got "
                             f"{type(dynamic).__name__}")
        decoding, unknown_keys = {}, {}
        for pattern, override in dynamic.items():
            where = f"{source}.dynamic[{pattern!r}]"
            try:
                re.compile(pattern.removeprefix("-:").removeprefix("+:"))
            except re.error as e:
                raise ValueError(f"{where}: not a valid regular expression ({e})") from None
            if not isinstance(override, dict):
                raise ValueError(f"{where}: overrides must be a dict; got {override!r}")
            refused = sorted(k for k in set(override) & set(REFUSED_OVERRIDES)
                             if not (k == "pack_dtype" and override[k] == "int32"))
            if refused:
                raise ValueError(f"{where}: per-module {refused} would change how the module "
                                 f"decodes, which jaxinfer does not support; overrides may set "
                                 f"{OVERRIDABLE} (quantize-time settings are ignored)")
            for key in (set(override) - set(OVERRIDABLE) - set(REFUSED_OVERRIDES)
                        - set(QUANTIZE_TIME_OVERRIDES)):
                unknown_keys.setdefault(key, []).append(pattern)
            decoding[pattern] = _decoding_fields(override)
            if not pattern.startswith("-:"):
                _check_spec({**base, **decoding[pattern]}, where)
        if unknown_keys:  # once per load, not once per rule (a rule per module is common)
            log.warning("%s.dynamic: ignoring unknown per-module key(s) %s (in %d rule(s), e.g. "
                        "%r): jaxinfer decodes with %s and ignores GPTQModel's quantize-time "
                        "settings; a key that changes how the module decodes would make its "
                        "weights wrong", source, sorted(unknown_keys),
                        len({p for ps in unknown_keys.values() for p in ps}),
                        next(iter(unknown_keys.values()))[0], OVERRIDABLE)
        return cls(checkpoint_format=fmt, dynamic=decoding,
                   modules_in_block_to_quantize=_block_modules(
                       d.get("modules_in_block_to_quantize"), source), **base)

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` written to config.json (and quantize_config.json)."""
        d = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
             "desc_act": self.desc_act, "sym": self.sym, "lm_head": False,
             # transformers >= 5 reads ``format``; AutoGPTQ and older readers ``checkpoint_format``
             "format": self.checkpoint_format, "checkpoint_format": self.checkpoint_format}
        if self.dynamic:
            d["dynamic"] = self.dynamic
        if self.modules_in_block_to_quantize is not None:
            d["modules_in_block_to_quantize"] = [list(self.modules_in_block_to_quantize)]
        return d

    def layer_spec(self, module: str) -> GPTQLayerSpec | None:
        """The spec of module ``module`` (HF name, ``model.layers.<i>.<name>``), or None where
        ``modules_in_block_to_quantize`` or ``dynamic`` leaves it float."""
        in_block = module.split(".", 3)[-1]  # e.g. self_attn.q_proj
        if (self.modules_in_block_to_quantize is not None
                and in_block not in self.modules_in_block_to_quantize):
            return None
        base = {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
                "sym": self.sym}
        for pattern, override in self.dynamic.items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], module):
                    return None
            elif re.match(pattern.removeprefix("+:"), module):
                return GPTQLayerSpec(**{**base, **override})
        return GPTQLayerSpec(**base)

    def names_as_quantized(self, module: str) -> str | None:
        """Where the config names module ``module`` (HF name) as quantized, explicitly: its
        ``modules_in_block_to_quantize`` entry or the ``"+:"`` (or unprefixed) ``dynamic`` rule that
        decides it and sets how it decodes (bits, group size, ...); None when it is quantized
        only by default or by a rule of quantize-time settings alone (``{".*": {"damp_percent":
        0.1}}`` names nothing), so such a module stored in float loads as float."""
        if self.layer_spec(module) is None:
            return None
        for pattern, override in self.dynamic.items():
            if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), module):
                return f"dynamic rule {pattern!r}" if override else None
        if self.modules_in_block_to_quantize is not None:
            return f"modules_in_block_to_quantize entry {module.split('.', 3)[-1]!r}"
        return None


def _block_modules(value, source: str) -> tuple[str, ...] | None:
    """transformers' ``modules_in_block_to_quantize`` (a list of lists of module names, the
    groups quantized in turn, or a flat list) as one tuple of names; None when absent."""
    if value is None:
        return None
    names = ([n for item in value for n in (item if isinstance(item, list) else [item])]
             if isinstance(value, list) else None)
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: modules_in_block_to_quantize must be a list of lists of "
                         f"module names such as [[\"self_attn.q_proj\"]]; got {value!r}")
    return tuple(names)


def read_quantization_config(model_dir: Path, hf_config: dict) -> tuple[dict, str] | None:
    """The checkpoint's quantization config and where it was found (for error messages):
    config.json's ``quantization_config`` (transformers), else a ``quantize_config.json``
    (AutoGPTQ); None for a float checkpoint."""
    if hf_config.get("quantization_config") is not None:  # null: not quantized, as transformers
        return hf_config["quantization_config"], f"{model_dir / 'config.json'}: quantization_config"
    file = model_dir / QUANTIZE_CONFIG_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text()), str(file)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def read_gptq_config(model_dir: Path, hf_config: dict) -> GPTQConfig | None:
    """The checkpoint's GPTQ config, or None for a float checkpoint.

    A ``quantization_config`` of another method (AWQ, bitsandbytes...) raises."""
    found = read_quantization_config(model_dir, hf_config)
    return None if found is None else GPTQConfig.from_dict(*found)


def refuse_quantized(model_dir: Path, hf_config: dict, model_type: str) -> None:
    """Raise for a quantized checkpoint of a model type that loads float weights only (Mixtral,
    Hyena), naming the method: its tensors would otherwise be missing, unreadable, or (int8
    codes beside scales) read as if they were the weights."""
    found = read_quantization_config(model_dir, hf_config)
    if found is None:
        return
    config, source = found
    if not isinstance(config, dict):
        raise ValueError(f"{source} must be a JSON object; got {type(config).__name__}")
    method = config.get("quant_method", "gptq")  # AutoGPTQ's quantize_config.json names none
    raise ValueError(f"{source}: quant_method {method!r} is not supported for {model_type} "
                     f"checkpoints (only float weights)")


def _is_symmetric(w: QuantizedWeight) -> bool:
    """GPTQ's symmetric grid puts every zero at 2**(bits-1) (8 at 4 bits)."""
    return bool((w.zeros == 2 ** (w.bits - 1)).all())


def gptq_config_for(weights: dict[str, QuantizedWeight], checkpoint_format: str,
                    float_modules: Sequence[str] = ()) -> GPTQConfig:
    """The config describing ``weights`` ({HF module name: weight}): the (bits, group_size) that
    fits most layers as the base and an exact-name ``dynamic`` override for every other layer,
    and an exact-name ``"-:"`` rule for each of ``float_modules`` (decoder linear modules kept
    float).

    A layer whose one group spans all its rows fits both group_size -1 and its in_features.
    Mixed 2/4-bit layers (their parts appear as ``<layer>.high`` / ``<layer>.low``) are refused:
    the format has one bit width per layer."""
    mixed = sorted({name.rsplit(".", 1)[0] for name in weights
                    if name.rsplit(".", 1)[-1] in MIXED_PART_NAMES})
    if mixed:
        raise ValueError(f"{len(mixed)} layer(s) hold mixed 2/4-bit weights (e.g. {mixed[0]}); an "
                         f"HF GPTQ checkpoint has one bit width per layer, so a mixed model "
                         f"cannot be saved in GPTQ format; quantize with a single bits value to "
                         f"save it")
    def fits(w: QuantizedWeight, bits: int, group_size: int) -> bool:
        return w.bits == bits and w.group_size == (w.in_features if group_size == -1
                                                   else group_size)

    candidates = sorted({(w.bits, g) for w in weights.values() for g in (w.group_size, -1)},
                        key=lambda c: (-c[0], c[1] == -1, c[1]))
    bits, group_size = max(candidates, key=lambda c: sum(fits(w, *c) for w in weights.values()))
    dynamic = {}
    for name, w in weights.items():
        if not fits(w, bits, group_size):
            g = -1 if w.group_size == w.in_features else w.group_size
            dynamic["+:" + re.escape(name) + "$"] = {"bits": w.bits, "group_size": g}
    for name in float_modules:
        dynamic["-:" + re.escape(name) + "$"] = {}
    return GPTQConfig(bits=bits, group_size=group_size,
                      desc_act=any(w.perm is not None for w in weights.values()),
                      sym=all(_is_symmetric(w) for w in weights.values()),
                      checkpoint_format=checkpoint_format, dynamic=dynamic,
                      modules_in_block_to_quantize=_same_in_every_block(weights, float_modules))


_BLOCK_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _same_in_every_block(quantized: Sequence[str], float_modules: Sequence[str]
                         ) -> tuple[str, ...] | None:
    """The in-block names of the ``quantized`` modules (``self_attn.q_proj``) when some modules
    are float and every block quantizes the same ones; else None (the ``"-:"`` rules say it)."""
    if not float_modules:
        return None
    blocks: dict[str, tuple[list, list]] = {}
    for names, kind in ((quantized, 0), (float_modules, 1)):
        for name in names:
            match = _BLOCK_MODULE.fullmatch(name)
            if match is None:
                return None
            blocks.setdefault(match[1], ([], []))[kind].append(match[2])
    sets = {(frozenset(q), frozenset(f)) for q, f in blocks.values()}
    if len(sets) != 1:
        return None
    first = next(iter(blocks.values()))[0]
    return tuple(first) if first else None
