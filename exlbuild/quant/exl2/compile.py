"""The output directory exllamav2 loads (docs/exl2-format.md section 5), from the tensors of the quantization
pass (`exlbuild.quant.exl2.convert`) and the source model's non-tensor files.

Every quantized linear is validated before anything is written. The bytes depend only on the inputs: tensors
go to the shards in a fixed order and safetensors is called without metadata.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import INDEX_NAME, layer_prefix
from exlbuild.model.config import LlamaConfig
from exlbuild.quant.exl2.convert import (
    BLOCK_NORMS,
    EMBEDDING_KEY,
    FINAL_NORM_KEY,
    GLOBALS_FILE,
    HEAD_FILE,
    HEAD_KEY,
    LAYERS_DIR,
    decoder_linears,
)
from exlbuild.quant.exl2.measurement_json import LinearShape
from exlbuild.quant.exl2.options import pad_to_32
from exlbuild.quant.exl2.pack import REQUIRED_KEYS, validate_layer
from exlbuild.quant.stream import BLOCK_LINEARS

MIB = 1024**2
# Source files not copied (5.3, plus the pickle formats and the index, which would describe absent shards);
# config.json is rewritten instead.
NOT_COPIED = ("*.safetensors", "*.bin", "*.pt", "*.pth", INDEX_NAME, "config.json")
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I16": 2, "I32": 4}


class _QuantizedTensors:
    """The tensors of a quantization pass's output directory, read one at a time."""

    def __init__(self, directory: Path) -> None:
        layers = sorted((directory / LAYERS_DIR).glob("*.safetensors"))
        paths = [directory / GLOBALS_FILE, *layers, directory / HEAD_FILE]
        self._handle_of: dict[str, Any] = {}
        for path in paths:
            if not path.is_file():
                raise ExlbuildError(f"{directory} is not a complete EXL2 quantization: {path.name} is missing")
            handle = safe_open(path, framework="pt")
            self._handle_of.update(dict.fromkeys(handle.keys(), handle))

    def __contains__(self, name: str) -> bool:
        return name in self._handle_of

    def names_under(self, key: str) -> list[str]:
        return sorted(n for n in self._handle_of if n.startswith(key + "."))

    def nbytes(self, name: str) -> int:
        view = self._handle_of[name].get_slice(name)
        return math.prod(view.get_shape()) * _DTYPE_BYTES[view.get_dtype()]

    def get(self, name: str) -> Tensor:
        return self._handle_of[name].get_tensor(name)


def quantized_linears(cfg: LlamaConfig) -> dict[str, LinearShape]:
    """Full key → shape of every quantized linear: the decoder's in model order, then the head."""
    linears = decoder_linears(cfg)
    linears[HEAD_KEY] = LinearShape(cfg.hidden_size, cfg.vocab_size)
    return linears


def module_tensors(cfg: LlamaConfig) -> list[list[str]]:
    """The tensor names of each module in the reference's compile order (5.1): the embedding; per layer the
    attention module (input norm, q/k/v/o) and the MLP module (post-attention norm, gate/up/down); the final
    norm; the head. A linear's tensors are in name order, as the reference's safetensors reader lists them."""
    linears = quantized_linears(cfg)

    def tensors_of(key: str) -> list[str]:
        suffixes = (*REQUIRED_KEYS, "bias") if linears[key].bias else REQUIRED_KEYS
        return [f"{key}.{s}" for s in sorted(suffixes)]

    modules = [[EMBEDDING_KEY]]
    for i in range(cfg.num_hidden_layers):
        prefix = layer_prefix(i)
        for block, norm in BLOCK_NORMS.items():
            modules.append([prefix + norm, *(n for name in BLOCK_LINEARS[block] for n in tensors_of(prefix + name))])
    modules += [[FINAL_NORM_KEY], tensors_of(HEAD_KEY)]
    return modules


def plan_shards(modules: Sequence[Sequence[tuple[str, int]]], shard_bytes: float) -> list[list[str]]:
    """Tensor names per shard, for modules given as (name, bytes) lists, by the reference's rule (5.2).

    Modules are appended to a pending list. Whenever its size exceeds shard_bytes after a module, and after the
    last module, a new shard takes the pending tensors in order whenever they still fit (first fit) and the rest
    stay pending; what is still pending at the end forms one last shard, whatever its size.
    """
    shards: list[list[str]] = []
    pending: list[tuple[str, int]] = []
    for index, module in enumerate(modules):
        pending += module
        if sum(size for _, size in pending) <= shard_bytes and index < len(modules) - 1:
            continue
        shard, deferred, used = [], [], 0
        for name, size in pending:
            if used + size <= shard_bytes:
                shard.append(name)
                used += size
            else:
                deferred.append((name, size))
        if not shard:
            name, size = max(pending, key=lambda t: t[1])
            raise ExlbuildError(
                f"tensor {name} ({size} bytes) does not fit in a shard of {int(shard_bytes)} bytes; "
                "use a larger shard size"
            )
        shards.append(shard)
        pending = deferred
    if pending:
        shards.append([name for name, _ in pending])
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["output.safetensors"]
    return [f"output-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _validated_bits(tensors: _QuantizedTensors, key: str, shape: LinearShape, source: Path) -> tuple[int, int]:
    """validate_layer on every stored tensor of one linear (so strays are caught too); returns its stored bits
    (which equal total_bits of its option, 3.3) and its weight count with the output padded."""
    stored = {name[len(key) + 1 :]: tensors.get(name) for name in tensors.names_under(key)}
    validate_layer(stored, layer=f"{source}: {key}", in_features=shape.in_features,
                   out_features=shape.out_features, bias=shape.bias)
    bits = sum(t.numel() * t.element_size() * 8 for t in stored.values())
    return bits, shape.in_features * pad_to_32(shape.out_features)


def compile_model(
    quantized_dir: Path, model_dir: Path, out: Path, shard_size_mb: int, quantization_config: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the loadable EXL2 directory `out`: shards of shard_size_mb MiB (0: one file) holding the tensors in
    module order, config.json of `model_dir` with `quantization_config` set, and the model's other files.

    Returns {files: name → bytes, bits_per_weight (decoder linears), head_bits_per_weight}.
    """
    quantized_dir, model_dir, out = Path(quantized_dir), Path(model_dir), Path(out)
    if shard_size_mb < 0:
        raise ExlbuildError(f"shard size must be a positive number of MiB or 0 (one file), got {shard_size_mb}")
    cfg = LlamaConfig.from_dir(model_dir)
    tensors = _QuantizedTensors(quantized_dir)
    modules = module_tensors(cfg)
    missing = [name for module in modules for name in module if name not in tensors]
    if missing:
        raise ExlbuildError(
            f"{quantized_dir} lacks {len(missing)} tensor(s) that {model_dir}/config.json implies: "
            f"{', '.join(missing[:5])}"
        )
    sizes = {key: _validated_bits(tensors, key, shape, quantized_dir) for key, shape in quantized_linears(cfg).items()}
    head_bits, head_weights = sizes.pop(HEAD_KEY)

    shard_bytes = shard_size_mb * MIB if shard_size_mb else math.inf
    shards = plan_shards([[(name, tensors.nbytes(name)) for name in module] for module in modules], shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    for file, names in zip(shard_names(len(shards)), shards):
        save_file({name: tensors.get(name) for name in names}, str(out / file))

    # Rewritten as the reference does: existing keys in their order, indent 4.
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = dict(quantization_config)
    (out / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not any(path.match(pattern) for pattern in NOT_COPIED):
            shutil.copyfile(path, out / path.name)

    return {
        "files": {path.name: path.stat().st_size for path in sorted(out.iterdir())},
        "bits_per_weight": sum(bits for bits, _ in sizes.values()) / sum(n for _, n in sizes.values()),
        "head_bits_per_weight": head_bits / head_weights,
    }
