"""Rotary-embedding settings: `RopeScaling` and how config.json's RoPE keys are read.

transformers 5 keeps theta and scaling in one `rope_parameters` dict; 4.x files have a top-level
`rope_theta` and a `rope_scaling` dict (rope type under "type" or "rope_type"). `hf_rope_fields`
reads either spelling, or a hand-edited mix of both, as transformers 5.24 does
(`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` and `standardize_rope_params`), so that
a config.json means here what it means to transformers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from jaxinfer.config_checks import check_finite, is_int, normalize_fields

log = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The RopeScaling fields each rope type reads (what to_hf_config writes for it).
ROPE_TYPE_FIELDS = {"default": (), "linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings")}
# The keys transformers requires in config.json for each type (its _validate_*_rope_parameters
# raise KeyError without them); original_max_position_embeddings has a fallback (hf_rope_fields).
HF_REQUIRED_ROPE_KEYS = {"default": (), "linear": ("factor",),
                         "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency rescaling for context extension (HF `rope_parameters` / `rope_scaling`).

    Built in Python, the fields a type reads default as below; read from config.json
    (`hf_rope_fields`), the keys transformers requires must be there."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; expected one "
                             f"of {SUPPORTED_ROPE_TYPES}")
        floats = ("factor", "low_freq_factor", "high_freq_factor")
        normalize_fields(self, ("original_max_position_embeddings",), floats, ())
        for name in floats:
            check_finite(f"rope_scaling {name}", getattr(self, name))
        original = self.original_max_position_embeddings
        if not is_int(original) or original <= 0:
            raise (ValueError if is_int(original) else TypeError)(
                f"rope_scaling original_max_position_embeddings must be a positive integer; "
                f"got {original!r}")
        # llama3 blends over (high - low); equal factors divide by zero (transformers warns)
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"rope_scaling high_freq_factor must be > low_freq_factor for llama3; "
                             f"got high_freq_factor={self.high_freq_factor} and "
                             f"low_freq_factor={self.low_freq_factor}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RopeScaling:
        """From a Hugging Face style dict ({"rope_type": "linear", "factor": 2.0}; the 4.x key
        "type" is read as rope_type), as `LlamaConfig(rope_scaling=...)` takes it: omitted
        fields default as in the constructor. Keys that are not RopeScaling fields are refused,
        rope_theta included: it is the config's own field."""
        d = dict(d)
        rope_type = d.pop("rope_type", None)
        legacy_type = d.pop("type", None)
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "rope_type"]
        unknown = sorted(str(k) for k in d if k not in fields)
        if unknown:
            raise ValueError(f"rope_scaling has unknown key(s) {unknown}; expected rope_type and "
                             f"some of {fields}")
        rope_type = rope_type if rope_type is not None else legacy_type
        return cls(rope_type="default" if rope_type is None else rope_type, **d)


def hf_rope_fields(hf: Mapping[str, Any], *, max_positions: Any,
                   default_theta: float) -> tuple[Any, RopeScaling | None]:
    """(rope_theta, rope_scaling or None) from a config.json dict, by transformers 5.24's rules:

    - a non-empty legacy `rope_scaling` replaces `rope_parameters` as a whole;
    - rope_theta is that dict's own, else the top-level `rope_theta`, else the model type's
      default (`default_theta`); a top-level one the dict overrides must still be a number;
    - the type is its "rope_type", else the 4.x "type", else "default";
    - for llama3, a top-level `original_max_position_embeddings` wins over the dict's (the
      model transformers builds reads it so), and without either it is `max_positions`;
    - a key the type requires (HF_REQUIRED_ROPE_KEYS) must be present: transformers refuses the
      config otherwise, so no default stands in for it.

    Numbers pass through as config.json has them, for LlamaConfig's checks to name a wrong one;
    errors name config.json and the key read (`rope_scaling` or `rope_parameters`)."""
    legacy = hf.get("rope_scaling")
    source, rope = (("rope_scaling", legacy) if legacy
                    else ("rope_parameters", hf.get("rope_parameters")))
    if rope is None:
        rope = {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"config.json: {source} must be an object of RoPE settings; "
                         f"got {rope!r}")
    rope = dict(rope)
    if "rope_theta" in rope:
        rope_theta = rope["rope_theta"]
        _check_overridden_theta(hf.get("rope_theta"), rope_theta, source)
    else:
        rope_theta = hf.get("rope_theta", default_theta)
    rope_type = rope["rope_type"] if "rope_type" in rope else rope.get("type", "default")
    if rope_type == "default":
        return rope_theta, None
    missing = [key for key in HF_REQUIRED_ROPE_KEYS.get(rope_type, ()) if key not in rope]
    if missing:
        raise ValueError(f"config.json: {source} of rope_type {rope_type!r} is missing required "
                         f"key(s) {missing} (transformers refuses such a config too)")
    if rope_type == "llama3":
        if "original_max_position_embeddings" in hf:
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", max_positions)
    fields = ROPE_TYPE_FIELDS.get(rope_type, ())  # keys the type does not read are ignored
    try:
        scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in rope.items()
                                                      if k in fields})
    except (TypeError, ValueError) as e:
        # RopeScaling's messages say "rope_scaling"; name the key this file has
        message = str(e)
        if message.startswith("rope_scaling "):
            message = source + message[len("rope_scaling"):]
        raise type(e)(f"config.json: {message}") from None
    return rope_theta, scaling


def _check_overridden_theta(top_level: Any, rope_theta: Any, source: str) -> None:
    """A top-level rope_theta that `source`'s own rope_theta overrides: transformers ignores it
    without a word; here a malformed one is refused (config.json is likely broken elsewhere too)
    and one that disagrees is logged."""
    if top_level is None:
        return
    try:
        check_finite("rope_theta", top_level)
    except (TypeError, ValueError) as e:
        raise type(e)(f"config.json: {e} (the top-level key, which the rope_theta in {source} "
                      f"overrides)") from None
    if top_level != rope_theta:
        log.warning("config.json: ignoring the top-level rope_theta %r, which the rope_theta "
                    "in %s (%r) overrides, as in transformers", top_level, source, rope_theta)
