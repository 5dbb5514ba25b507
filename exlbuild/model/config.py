"""The model's shape, read from a Hugging Face directory's config.json.

Only the Llama family is supported: Llama, Mistral and Qwen2 share one layout (RMSNorm, rotary attention with
grouped KV heads, SwiGLU MLP) and differ only in biases, sliding windows and rope settings, all captured here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exlbuild.errors import ExlbuildError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# config.json files written by `PretrainedConfig.save_pretrained` alone have a model_type but no architectures.
_ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_MISSING = object()


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # normalised: always has "rope_type"; None for plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v
    attention_out_bias: bool  # bias on o_proj (Llama's attention_bias covers it, Qwen2's q/k/v bias does not)
    mlp_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    # Recipe overrides, as exllamav2's converter defines them: positions are divided by rope_scale (linear
    # scaling; taken from config.json's "linear" rope_scaling unless the recipe sets it) and the rope base is
    # multiplied by rope_alpha ** (head_dim / (head_dim - 2)) (NTK-aware scaling).
    rope_scale: float = 1.0
    rope_alpha: float = 1.0

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_base(self) -> float:
        """The rope base after NTK alpha scaling."""
        return self.rope_theta * self.rope_alpha ** (self.head_dim / (self.head_dim - 2))

    @classmethod
    def from_dir(cls, path: Path, rope_scale: float | None = None, rope_alpha: float | None = None) -> LlamaConfig:
        """Read `path`/config.json; `rope_scale` and `rope_alpha` come from the recipe (None: the model's own)."""
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise ExlbuildError(f"{path} is not a Hugging Face model directory: it has no config.json")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExlbuildError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ExlbuildError(f"{file} must hold a JSON object, not {type(raw).__name__}")
        return _parse(raw, file, rope_scale, rope_alpha)


def _parse(raw: dict[str, Any], file: Path, rope_scale: float | None, rope_alpha: float | None) -> LlamaConfig:
    def get(key: str, default: Any = _MISSING) -> Any:
        value = raw.get(key, default)
        if value is _MISSING:
            raise ExlbuildError(f"{file}: missing key '{key}'")
        return value

    def positive_int(key: str, default: Any = _MISSING) -> int:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ExlbuildError(f"{file}: '{key}' must be a positive integer, got {value!r}")
        return value

    def positive_float(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ExlbuildError(f"{file}: '{key}' must be a positive number, got {value!r}")
        return float(value)

    def flag(key: str, default: bool) -> bool:
        value = get(key, default)
        if not isinstance(value, bool):
            raise ExlbuildError(f"{file}: '{key}' must be true or false, got {value!r}")
        return value

    def token_id(key: str) -> int | list[int] | None:
        value = raw.get(key)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
        if not ok:
            raise ExlbuildError(f"{file}: '{key}' must be a token id or a list of them, got {value!r}")
        return value

    architecture = _architecture(raw, file)

    act = get("hidden_act", "silu")
    if act != "silu":
        raise ExlbuildError(f"{file}: hidden_act {act!r} is not supported (the Llama family uses 'silu')")

    hidden = positive_int("hidden_size")
    heads = positive_int("num_attention_heads")
    kv_heads = positive_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ExlbuildError(
            f"{file}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = raw.get("head_dim") or hidden // heads  # Mistral-style configs may set head_dim explicitly
    if not isinstance(head_dim, int) or head_dim % 2:
        raise ExlbuildError(f"{file}: 'head_dim' must be an even positive integer, got {head_dim!r}")

    # transformers 5 writes rope settings as one "rope_parameters" dict; older files use rope_theta/rope_scaling.
    rope_params = raw.get("rope_parameters") or {}
    theta = positive_float("rope_theta", raw.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
    scaling = _rope_scaling(raw.get("rope_scaling") or rope_params, file)
    config_scale = scaling["factor"] if scaling and scaling["rope_type"] == "linear" else 1.0

    is_qwen2 = architecture == "Qwen2ForCausalLM"
    sliding_window = None
    if architecture == "MistralForCausalLM":
        sliding_window = raw.get("sliding_window")
    elif is_qwen2 and raw.get("use_sliding_window"):
        # Qwen2 applies its window to only some layers; no released Qwen2 model turns it on.
        raise ExlbuildError(f"{file}: use_sliding_window true is not supported for Qwen2")
    if sliding_window is not None:
        sliding_window = positive_int("sliding_window")

    attention_bias = flag("attention_bias", False)
    return LlamaConfig(
        architecture=architecture,
        hidden_size=hidden,
        intermediate_size=positive_int("intermediate_size"),
        num_hidden_layers=positive_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=positive_int("vocab_size"),
        rms_norm_eps=positive_float("rms_norm_eps", get("rms_norm_eps")),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=positive_int("max_position_embeddings"),
        tie_word_embeddings=flag("tie_word_embeddings", False),
        attention_bias=attention_bias or is_qwen2,
        attention_out_bias=attention_bias,
        mlp_bias=flag("mlp_bias", False),
        sliding_window=sliding_window,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        rope_scale=positive_float("rope_scale", config_scale if rope_scale is None else rope_scale),
        rope_alpha=positive_float("rope_alpha", 1.0 if rope_alpha is None else rope_alpha),
    )


def _architecture(raw: dict[str, Any], file: Path) -> str:
    archs = raw.get("architectures")
    if archs is None:
        model_type = raw.get("model_type")
        if model_type not in _ARCHITECTURE_OF_MODEL_TYPE:
            raise ExlbuildError(
                f"{file}: no 'architectures' key and model_type {model_type!r} is not one of "
                f"{', '.join(sorted(_ARCHITECTURE_OF_MODEL_TYPE))}"
            )
        return _ARCHITECTURE_OF_MODEL_TYPE[model_type]
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise ExlbuildError(f"{file}: 'architectures' must be a list of one name, got {archs!r}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ExlbuildError(
            f"{file}: architecture {archs[0]} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return archs[0]


def _rope_scaling(raw: dict[str, Any], file: Path) -> dict[str, Any] | None:
    """Normalise rope scaling to a dict with "rope_type" (None for plain rope), checking the keys we use."""
    if not isinstance(raw, dict):
        raise ExlbuildError(f"{file}: 'rope_scaling' must be an object, got {raw!r}")
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ExlbuildError(
            f"{file}: rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    needed = ["factor"]
    if rope_type == "llama3":
        needed += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    scaling: dict[str, Any] = {"rope_type": rope_type}
    for key in needed:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ExlbuildError(f"{file}: rope scaling '{key}' must be a positive number, got {value!r}")
        scaling[key] = float(value)
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ExlbuildError(f"{file}: rope scaling 'high_freq_factor' must exceed 'low_freq_factor'")
    return scaling
