"""Lazy reader of a Hugging Face directory's safetensors, one tensor at a time.

Only safetensors are read (never pickles). The directory may hold one file or many shards, with or without
model.safetensors.index.json; the tensor → file map is built from the index or from the files' headers.

EXL2 directories (docs/exl2-format.md section 5) read like any other: a quantized linear `<key>` is stored as
`<key>.q_weight`, `<key>.q_scale`, … and `get("<key>.weight")` decodes it (section 7). Its stored output width
(and bias) is padded to 32, so decoding needs the real width from the config: open such a directory with it.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from exlbuild.errors import ExlbuildError
from exlbuild.model.config import LlamaConfig
from exlbuild.quant.exl2.options import pad_to_32
from exlbuild.quant.exl2.pack import REQUIRED_KEYS, dequantize
from exlbuild.transfer import to_device

INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

Device = torch.device | str | None


class Checkpoint:
    """The tensors of a model directory; nothing is read until `get`.

    `names`, `in`, `shape` and `dtype_of` are about the stored tensors, except that `shape` of an EXL2 linear's
    `<key>.weight` is the stored (padded out, in). `cfg` gives EXL2 linears their real output width.
    """

    def __init__(self, directory: Path, cfg: LlamaConfig | None = None) -> None:
        self.directory = Path(directory)
        self.cfg = cfg
        if not self.directory.is_dir():
            raise ExlbuildError(f"model directory {self.directory} does not exist")
        self._file_of = self._index()
        self._handles: dict[str, Any] = {}

    def _index(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ExlbuildError(f"{index} is not a valid safetensors index ({e!r})") from None
            if not isinstance(weight_map, dict):
                raise ExlbuildError(f"{index}: 'weight_map' must map tensor names to shard files")
            for file in sorted(set(weight_map.values())):
                if not (self.directory / file).is_file():
                    raise ExlbuildError(f"{index} names shard {file}, which is not in {self.directory}")
            return dict(weight_map)

        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (found {', '.join(pickles)}: convert them to safetensors; pickles are never loaded)"
            raise ExlbuildError(f"{self.directory} holds no .safetensors files{hint if pickles else ''}")
        file_of: dict[str, str] = {}
        for file in files:
            with safe_open(self.directory / file, framework="pt") as f:
                for name in f.keys():
                    if name in file_of:
                        raise ExlbuildError(f"tensor {name} is in both {file_of[name]} and {file} in {self.directory}")
                    file_of[name] = file
        return file_of

    def _handle(self, name: str) -> Any:
        if name not in self._file_of:
            close = difflib.get_close_matches(name, self._file_of, n=3, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ExlbuildError(f"tensor {name} is not in the checkpoint {self.directory}{hint}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.directory / file, framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _exl2_weight(self, name: str) -> str | None:
        """`<key>` if `name` is `<key>.weight` of an EXL2 linear."""
        key = name.removesuffix(".weight")
        return key if key != name and f"{key}.q_weight" in self._file_of else None

    def _exl2_padded(self, name: str) -> bool:
        """Whether `name` is the weight or bias of an EXL2 linear, whose output is stored padded to 32."""
        key, _, suffix = name.rpartition(".")
        return suffix in ("weight", "bias") and f"{key}.q_weight" in self._file_of

    def _stored_names(self, name: str) -> list[str]:
        key = self._exl2_weight(name)
        return [f"{key}.{suffix}" for suffix in REQUIRED_KEYS] if key else [name]

    def _out_features(self, name: str) -> int:
        """The real output width of an EXL2 linear's weight or bias, from the config."""
        if self.cfg is None:
            raise ExlbuildError(f"{name} in {self.directory} is EXL2-quantized: open the directory with its config")
        if name.startswith("lm_head."):
            return self.cfg.vocab_size
        _, _, relative = name.removeprefix("model.layers.").partition(".")
        shape = layer_tensor_shapes(self.cfg).get(relative)
        if shape is None:
            raise ExlbuildError(f"{name} in {self.directory} is EXL2-quantized but is no linear layer of the config")
        return shape[0]

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._exl2_weight(name)
        if key:
            return (self.shape(f"{key}.q_weight")[1], self.shape(f"{key}.q_invperm")[0])
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype_of(self, name: str) -> torch.dtype:
        code = self._handle(name).get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise ExlbuildError(f"tensor {name} in {self.directory} has dtype {code}; supported: F16, BF16, F32")
        return _DTYPES[code]

    def _read(self, name: str) -> torch.Tensor:
        """The stored tensor, in host memory."""
        return self._handle(name).get_tensor(name)

    def get(self, name: str, dtype: torch.dtype = torch.float32, device: Device = None) -> torch.Tensor:
        """Read one tensor, converted to `dtype`; raises if it holds NaN or Inf (also after the conversion).

        The weight of an EXL2 linear comes decoded (fp16 values, as exllamav2 computes them); its weight and
        bias come without the output padding.
        """
        device = torch.device(device or "cpu")
        key = self._exl2_weight(name)
        if key:
            tensors = {suffix: self._read(f"{key}.{suffix}") for suffix in REQUIRED_KEYS}
            tensor = dequantize(tensors, self._out_features(name), f"{self.directory}: {key}", device).to(dtype)
            # A sum is finite only if every element is (a cheap test); confirm element-wise before blaming the
            # tensor, since a float32 sum of huge finite values can overflow.
            finite = torch.isfinite(tensor.sum(dtype=torch.float32)) or torch.isfinite(tensor).all()
        else:
            self.dtype_of(name)
            tensor = self._read(name)
            if self._exl2_padded(name):
                tensor = tensor[: self._out_features(name)]
            # Checked in host memory, before the copy (a check on the device waits for the GPU). Rounding is
            # monotonic, so the values stay finite in `dtype` exactly when the smallest and the largest do (NaN
            # propagates to both).
            finite = not tensor.numel() or all(torch.isfinite(t.to(dtype)) for t in torch.aminmax(tensor))
            tensor = to_device(tensor, device).to(dtype)
        if not finite:
            raise ExlbuildError(f"tensor {name} in {self.directory} holds NaN or Inf values (as {dtype})")
        return tensor

    def check(self, cfg: LlamaConfig) -> None:
        """Raise unless every tensor `cfg` needs is present with the expected shape."""
        expected = expected_tensors(cfg)
        expected.setdefault(head_key(self, cfg), (cfg.vocab_size, cfg.hidden_size))
        stored = [n for name in expected for n in self._stored_names(name)]
        missing = [name for name in stored if name not in self._file_of]
        if missing:
            unexpected = sorted(set(self._file_of) - set(stored))
            hint = ""
            if unexpected:
                close = [c for m in missing for c in difflib.get_close_matches(m, unexpected, n=1, cutoff=0.8)]
                hint = f"; unexpected tensors that look close: {', '.join(close)}" if close else ""
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ExlbuildError(f"{self.directory} lacks {len(missing)} tensor(s) the config needs: {shown}{hint}")
        for name, shape in expected.items():
            if self._exl2_padded(name):
                shape = (pad_to_32(shape[0]), *shape[1:])
            actual = self.shape(name)
            if actual != shape:
                raise ExlbuildError(
                    f"tensor {name} in {self.directory} has shape {list(actual)}, config.json implies {list(shape)}"
                )


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def layer_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder layer's tensors, keyed by name relative to `layer_prefix`."""
    h, ff = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ff, h),
        "mlp.up_proj.weight": (ff, h),
        "mlp.down_proj.weight": (h, ff),
    }
    if cfg.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if cfg.attention_out_bias:
        shapes["self_attn.o_proj.bias"] = (h,)
    if cfg.mlp_bias:
        shapes.update({"mlp.gate_proj.bias": (ff,), "mlp.up_proj.bias": (ff,), "mlp.down_proj.bias": (h,)})
    return shapes


def layer_bytes(cfg: LlamaConfig, dtype: torch.dtype) -> int:
    """The bytes of one decoder layer's weights in `dtype`."""
    return sum(math.prod(shape) for shape in layer_tensor_shapes(cfg).values()) * dtype.itemsize


def model_bytes(cfg: LlamaConfig, dtype: torch.dtype) -> int:
    """The bytes of the model's weights in `dtype`, the head counted apart from the embedding (a forward that holds
    the whole model keeps both tables, also when they are tied)."""
    tables = (2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * dtype.itemsize
    return cfg.num_hidden_layers * layer_bytes(cfg, dtype) + tables


def free_device_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on the CUDA device `device`: what the driver has free and what
    PyTorch's allocator holds cached but unused (earlier steps of a build leave their blocks there)."""
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


def require_device_memory(need: int, device: torch.device, what: str, instead: str) -> None:
    """Stop, saying what needs `need` bytes and what to do `instead`, unless the CUDA device `device` has that much
    free: before loading, rather than run out of memory half-way. Other devices are not checked."""
    if device.type != "cuda":
        return
    free = free_device_memory(device)
    if need > free:
        raise ExlbuildError(f"{what} needs {need / 2**30:.1f} GiB of GPU memory, but {free / 2**30:.1f} GiB are free; "
                            f"{instead}")


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model needs, with its shape, in a fixed order."""
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        expected.update({layer_prefix(i) + k: s for k, s in layer_tensor_shapes(cfg).items()})
    expected["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return expected


def open_model(
    directory: Path, rope_scale: float | None = None, rope_alpha: float | None = None
) -> tuple[LlamaConfig, Checkpoint]:
    """Read the config, open the checkpoint and check it holds every tensor the config needs."""
    cfg = LlamaConfig.from_dir(directory, rope_scale=rope_scale, rope_alpha=rope_alpha)
    ckpt = Checkpoint(directory, cfg)
    ckpt.check(cfg)
    return cfg, ckpt


def layer_weights(
    ckpt: Checkpoint, cfg: LlamaConfig, i: int, dtype: torch.dtype = torch.float32, device: Device = None
) -> dict[str, torch.Tensor]:
    """Decoder layer `i`'s tensors, keyed by name relative to `layer_prefix(i)` (e.g. "self_attn.q_proj.weight")."""
    prefix = layer_prefix(i)
    return {k: ckpt.get(prefix + k, dtype, device) for k in layer_tensor_shapes(cfg)}


def layers_ahead(
    ckpt: Checkpoint, cfg: LlamaConfig, layers: Sequence[int], dtype: torch.dtype = torch.float32, device: Device = None
) -> Iterator[dict[str, torch.Tensor]]:
    """layer_weights of each of `layers` in turn, on `device`. On CUDA each next layer is read (from the files,
    checked, into page-locked memory) by a background thread while the caller works on the current one
    (`read_ahead`): ~30 ms of host time a SmolLM2 layer that the quantization pass otherwise spends between its GPU
    work, and a large model's layer read from disk. Elsewhere the caller's thread reads them: the CPU path's work
    is PyTorch's own threads on every core, and after a second thread has run PyTorch operations every later one
    of the caller's thread is slower (most likely libgomp: a second OpenMP team, more threads than cores, and no
    more spinning between parallel regions); the 2-core machine's measurement ran 1.7× slower (bench/NOTES.md §26).
    (A quantized checkpoint's layers are decoded on the device, in the caller's thread.)"""
    device = torch.device(device or "cpu")
    quantized = any(ckpt._exl2_weight(layer_prefix(i) + name) for i in layers[:1] for name in layer_tensor_shapes(cfg))
    if quantized or device.type != "cuda":
        yield from (layer_weights(ckpt, cfg, i, dtype, device) for i in layers)
    else:
        yield from read_ahead(ckpt, cfg, layers, dtype, device)


def read_ahead(
    ckpt: Checkpoint, cfg: LlamaConfig, layers: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """layer_weights of each of `layers` in turn, on `device`, each next one read by a background thread (on CUDA
    into page-locked memory) while the caller works on the current one; an error of a layer's read is raised when
    the caller reaches that layer."""

    def read(i: int) -> dict[str, torch.Tensor]:
        weights = layer_weights(ckpt, cfg, i, dtype)
        return {k: t.pin_memory() for k, t in weights.items()} if device.type == "cuda" else weights

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="exlbuild-read-ahead") as pool:
        pending = [pool.submit(read, i) for i in layers[:1]]
        for n in range(len(layers)):
            current = pending.pop().result()
            if n + 1 < len(layers):
                pending.append(pool.submit(read, layers[n + 1]))
            yield {k: to_device(t, device) for k, t in current.items()}


def embedding_weight(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: Device = None) -> torch.Tensor:
    return ckpt.get("model.embed_tokens.weight", dtype, device)


def norm_weight(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: Device = None) -> torch.Tensor:
    return ckpt.get("model.norm.weight", dtype, device)


def head_key(ckpt: Checkpoint, cfg: LlamaConfig) -> str:
    """The tensor the output head reads: the embedding when the config ties them, except that a quantized lm_head
    wins (the EXL2 writer quantizes a tied head from the embedding and stores it as lm_head; the loader prefers it)."""
    if cfg.tie_word_embeddings and "lm_head.q_weight" not in ckpt:
        return "model.embed_tokens.weight"
    return "lm_head.weight"


def head_weight(
    ckpt: Checkpoint, cfg: LlamaConfig, dtype: torch.dtype = torch.float32, device: Device = None
) -> torch.Tensor:
    """The output head; the embedding when the config ties them (see `head_key`)."""
    return ckpt.get(head_key(ckpt, cfg), dtype, device)
