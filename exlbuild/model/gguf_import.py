"""Convert a llama-architecture GGUF file into a Hugging Face directory (FP16 safetensors, config, tokenizer).

The demo model ships only as a quantized GGUF; dequantizing it once gives an ordinary FP16 model that the rest of
exlbuild treats like any Hugging Face checkpoint. Every dimension is read from the GGUF metadata. The output is
byte-identical from run to run: fixed tensor order, sorted JSON keys.

The file's metadata and tensor table are parsed here (`read_gguf`); the gguf package supplies the format's constants
and the dequantization of each quantization type. (Its own reader makes a numpy view of the mapped file for every
value: 4 s for the 49,152 tokens and 48,900 merges of the demo model's vocabulary, against 0.1 s here.)
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from exlbuild.errors import ExlbuildError
from exlbuild.progress import track

_LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_PARTS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp pre-tokenizer names whose rule is "each digit alone, then the GPT-2 regex" (Hugging Face:
# Digits(individual_digits) followed by ByteLevel); "gpt-2"/"default" are ByteLevel alone.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_PLAIN_PRE = {"gpt-2", "default"}

# Special token ids: config/tokenizer_config key prefix -> GGUF metadata key.
_SPECIAL_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}

_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)


# Scalar value types of GGUF metadata: their struct formats (little-endian).
_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # as the file lists them: innermost first
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # its bytes in the mapped file, (rows..., bytes per row) as gguf.quants.dequantize takes them


def _unpack_all(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, raw)


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return _unpack_all(f, fmt)[0]


def _string(f: BinaryIO) -> str:
    length = _unpack(f, "<Q")
    raw = f.read(length)
    if len(raw) != length:
        raise ValueError("the file ends inside its header")
    return raw.decode("utf-8")


def _value(f: BinaryIO, kind: int) -> Any:
    """One metadata value of GGUF type `kind`: a Python scalar, a str, or a list of either."""
    kind = gguf.GGUFValueType(kind)
    if kind == gguf.GGUFValueType.STRING:
        return _string(f)
    if kind == gguf.GGUFValueType.ARRAY:
        item_kind, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if item_kind in _SCALAR_FORMATS:  # one read and one unpack for the whole array
            fmt = _SCALAR_FORMATS[gguf.GGUFValueType(item_kind)]
            return list(_unpack_all(f, f"<{count}{fmt[1]}"))
        return [_value(f, item_kind) for _ in range(count)]
    return _unpack(f, _SCALAR_FORMATS[kind])


def read_gguf(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """The metadata (key → value) and tensors of a GGUF file (version 2 or 3), the tensors' data mapped, not read.
    Raises ValueError or OSError where the file is not one."""
    with open(path, "rb") as f:
        if _unpack(f, "<I") != gguf.GGUF_MAGIC:
            raise ValueError("it does not start with the GGUF magic number")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_values = _unpack(f, "<Q"), _unpack(f, "<Q")
        metadata = {}
        for _ in range(n_values):
            key = _string(f)
            metadata[key] = _value(f, _unpack(f, "<I"))
        table = []
        for _ in range(n_tensors):
            name = _string(f)
            dims = tuple(_unpack(f, "<Q") for _ in range(_unpack(f, "<I")))
            table.append((name, dims, gguf.GGMLQuantizationType(_unpack(f, "<I")), _unpack(f, "<Q")))
        alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        data_start = -(-f.tell() // alignment) * alignment
    mapped = np.memmap(path, mode="r")
    tensors = []
    for name, dims, tensor_type, offset in table:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(reversed(dims)), tensor_type)
        start = data_start + offset
        data = mapped[start : start + int(np.prod(byte_shape))]
        if data.size != int(np.prod(byte_shape)):
            raise ValueError(f"tensor {name} lies past the end of the file")
        tensors.append(GGUFTensor(name, dims, tensor_type, data.reshape(byte_shape)))
    return metadata, tensors


def import_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write model.safetensors, config.json, tokenizer.json, tokenizer_config.json and generation_config.json."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ExlbuildError(f"GGUF file {gguf_path} does not exist")
    try:
        metadata, gguf_tensors = read_gguf(gguf_path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ExlbuildError(f"{gguf_path} is not a readable GGUF file: {e}") from None
    meta = _Metadata(metadata, gguf_path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ExlbuildError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; supported: llama")

    tensors = _convert_tensors(gguf_tensors, meta, gguf_path)
    config = _config(meta, tensors)
    tokenizer_json, tokenizer_config = _tokenizer(meta, config)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    _write_json(out_dir / "generation_config.json", generation)


class _Metadata:
    def __init__(self, values: dict[str, Any], path: Path) -> None:
        self.values, self.path = values, path

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.values:
            if default is ...:
                raise ExlbuildError(f"{self.path}: GGUF metadata lacks '{key}'")
            return default
        return self.values[key]

    def integer(self, key: str) -> int:
        value = self.get(key)
        if not isinstance(value, int):
            raise ExlbuildError(f"{self.path}: GGUF metadata '{key}' must be one integer, got {value!r}")
        return value

    def float32(self, key: str, default: float | None = None) -> float | None:
        value = self.get(key, default)
        # GGUF stores float32; its shortest decimal form gives config.json the value it was made from (1e-05,
        # not 9.999999747378752e-06).
        return None if value is None else float(str(np.float32(value)))


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo GGUF's q/k row order: rows (n, head_dim/2, 2) back to Hugging Face's rotate-half (n, 2, head_dim/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_PARTS:
        return f"{_GLOBAL_PARTS[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_PARTS:
        return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{suffix}"
    return None


def _layer_sort_key(hf_name: str) -> tuple[int, int, str]:
    """Embedding, then layers in numeric order, then the final norm and head."""
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    if m:
        return (1, int(m.group(1)), hf_name)
    return (0 if hf_name.startswith("model.embed_tokens") else 2, 0, hf_name)


def _convert_tensors(gguf_tensors: list[GGUFTensor], meta: _Metadata, path: Path) -> dict[str, torch.Tensor]:
    names = {t.name: _hf_name(t.name) for t in gguf_tensors}
    if len(names) != len(gguf_tensors):
        raise ExlbuildError(f"{path}: tensor names repeat")
    unknown = sorted(n for n, hf in names.items() if hf is None)
    if unknown:
        raise ExlbuildError(f"{path}: tensors with no Hugging Face Llama equivalent: {', '.join(unknown)}")
    heads = {
        "attn_q": meta.integer("llama.attention.head_count"),
        "attn_k": meta.integer("llama.attention.head_count_kv"),
    }

    converted: dict[str, torch.Tensor] = {}
    for t in track(sorted(gguf_tensors, key=lambda t: _layer_sort_key(names[t.name])), "import GGUF"):
        shape = tuple(reversed(t.dims))
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ExlbuildError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        # np.array copies: F32 tensors come back as read-only views of the mapped file.
        w = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))
        part = t.name.split(".")[-2]
        if part in heads:
            w = _unpermute(w, heads[part])
        w = w.to(torch.float16)
        if not torch.isfinite(w).all():
            raise ExlbuildError(f"{path}: tensor {t.name} holds NaN or Inf values once converted to FP16")
        converted[names[t.name]] = w.contiguous()
    return converted


def _config(meta: _Metadata, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    heads = meta.integer("llama.attention.head_count")
    hidden = meta.integer("llama.embedding_length")
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta.integer("llama.feed_forward_length"),
        "num_hidden_layers": meta.integer("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": meta.float32("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.float32("llama.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": meta.integer("llama.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": any(".self_attn." in n and n.endswith(".bias") for n in tensors),
        "mlp_bias": any(".mlp." in n and n.endswith(".bias") for n in tensors),
        "torch_dtype": "float16",
        "use_cache": True,
    }
    for key in ("bos", "eos", "pad"):
        value = meta.get(_SPECIAL_IDS[key], None)
        if value is not None:
            config[f"{key}_token_id"] = value
    return config


def _rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ExlbuildError(f"{meta.path}: rope scaling type {kind!r} is not supported by the import (only linear)")
    return {"rope_type": "linear", "factor": meta.float32("llama.rope.scaling.factor")}


def _tokenizer(meta: _Metadata, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """tokenizer.json (as text) and tokenizer_config.json for the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ExlbuildError(f"{meta.path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    supported = sorted(_DIGIT_SPLIT_PRE | _PLAIN_PRE)
    if pre not in supported:
        raise ExlbuildError(f"{meta.path}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(supported)}")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens) or len(tokens) != config["vocab_size"]:
        raise ExlbuildError(
            f"{meta.path}: {len(tokens)} tokens ({len(vocab)} distinct, {len(types)} types) for an embedding of "
            f"{config['vocab_size']} rows"
        )

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (e.g. <|im_start|>) are special; user-defined ones are added but ordinary text.
    control = [t for t, k in zip(tokens, types) if k == _CONTROL]
    user_defined = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    tokenizer_config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
    }
    for key, gguf_key in _SPECIAL_IDS.items():
        value = meta.get(gguf_key, None)
        if value is not None:
            tokenizer_config[f"{key}_token"] = tokens[value]
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        tokenizer_config["chat_template"] = template
    return tok.to_str(pretty=True), tokenizer_config


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
