"""Tuning what an EXL2 model keeps in fp16 (docs/exl2.md, "tuned"): after GPTQ has fixed every code and scale
nibble, each group's q_scale_max and every RMSNorm weight are still free. They are fitted to the unquantized
model by minimising the KL divergence of its next-token distributions on the calibration rows, with Adam on
log-multipliers (initially 0: the GPTQ result), so that the later layers compensate the earlier layers' errors,
which GPTQ, one linear at a time, cannot do.

A group's q_scale_max multiplies every scale of its group (2.6), so a multiplier on it scales the input features
that the group quantized; a norm weight scales one input feature of the linears after it. The rule reads and
writes the quantization pass's layout (exlbuild.quant.exl2.convert: layers/, head, globals), changing only
those tensors. The pass holds both models on the device (no layer streaming): it is for models that fit.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from exlbuild import progress
from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import (
    Device,
    head_weight,
    layer_prefix,
    layer_weights,
    norm_weight,
    open_model,
)
from exlbuild.model.llama import decoder_layer, embed, final_logits, rope_tables
from exlbuild.quant.exl2.convert import (
    EMBEDDING_KEY,
    FINAL_NORM_KEY,
    GLOBALS_FILE,
    HEAD_FILE,
    HEAD_KEY,
    LAYERS_DIR,
    calibration_perplexity,
    layer_file,
    linear_shapes,
)
from exlbuild.quant.exl2.pack import REQUIRED_KEYS, dequantize, input_feature_groups
from exlbuild.quant.stream import BLOCK_LINEARS, BLOCK_NORMS, check_calibration_ids, tf32_matmuls

LINEARS = [name for names in BLOCK_LINEARS.values() for name in names]
NORMS = list(BLOCK_NORMS.values())


class ScaledLinear:
    """A decoded EXL2 linear whose groups' q_scale_max are tuned: one multiplier per group, applied to the input
    features the group quantized (the same as scaling its weights, and far cheaper to differentiate)."""

    def __init__(self, tensors: dict[str, Tensor], key: str, out_features: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.tensors = tensors
        self.key = key
        on_device = {k: t.to(device) for k, t in tensors.items()}  # decoded where the kernels are
        self.weight = dequantize(on_device, out_features, key).to(dtype)
        self.bias = on_device["bias"][:out_features].to(dtype) if "bias" in on_device else None  # stored padded
        self.feature_multiplier = input_feature_groups(on_device, key)
        self.multipliers = tensors["q_scale_max"].shape[0]

    def tuned(self, log_multiplier: Tensor) -> dict[str, Tensor]:
        """The EXL2 tensors with the tuned q_scale_max (fp16, as stored)."""
        scale_max = (self.tensors["q_scale_max"].float() * log_multiplier.cpu().exp()).half()
        if not torch.isfinite(scale_max).all():
            raise ExlbuildError(f"{self.key}: tuning drove q_scale_max beyond the range of float16; "
                                "lower tune.lr or tune.steps")
        return {**self.tensors, "q_scale_max": scale_max}


class ScaledNorm:
    """An RMSNorm weight with one tuned multiplier per feature."""

    def __init__(self, weight: Tensor, device: torch.device) -> None:
        self.stored = weight
        self.weight = weight.to(device, torch.float32)
        self.feature_multiplier = torch.arange(weight.numel(), device=device)
        self.multipliers = weight.numel()

    def tuned(self, log_multiplier: Tensor) -> Tensor:
        return (self.stored.float() * log_multiplier.cpu().exp()).half()


class Multipliers:
    """The log-multipliers of every tuned tensor in one vector (one tensor for the optimizer), initially 0 (the
    GPTQ result), and their expansion to one factor per scaled feature. The expansion's backward sums over each
    group's features, deterministically under `deterministic_algorithms`."""

    def __init__(self, owners: list[ScaledLinear | ScaledNorm], device: torch.device) -> None:
        counts = [owner.multipliers for owner in owners]
        self.starts = [sum(counts[:k]) for k in range(len(counts) + 1)]
        self.index = torch.cat([owner.feature_multiplier.to(device) + start
                                for owner, start in zip(owners, self.starts)])
        self.features = [owner.feature_multiplier.numel() for owner in owners]
        self.log = torch.zeros(self.starts[-1], device=device, requires_grad=True)

    def expand(self) -> tuple[Tensor, ...]:
        """One factor per feature for each owner, in the owners' order."""
        return torch.index_select(self.log.exp(), 0, self.index).split(self.features)

    def of(self, k: int) -> Tensor:
        """Owner k's log-multipliers (detached)."""
        return self.log.detach()[self.starts[k]:self.starts[k + 1]]


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """PyTorch's deterministic kernels for the tuning loop, so that a rebuild on CUDA is byte-identical too (the
    fused attention's and the feature expansion's backward otherwise add atomically, in varying order). PyTorch
    allows cuBLAS in this mode only with a fixed workspace configuration; set it unless the user has."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _split(tensors: dict[str, Tensor], key: str) -> dict[str, Tensor]:
    """The tensors of one linear (q_weight, …) from a file's dict of full names."""
    return {s: tensors[f"{key}.{s}"] for s in (*REQUIRED_KEYS, "bias") if f"{key}.{s}" in tensors}


def tune_model(
    model_dir: Path,
    quantized_dir: Path,
    out_dir: Path,
    ids: Tensor,
    steps: int,
    lr: float,
    rows_per_step: int,
    rope_scale: float | None = None,
    rope_alpha: float | None = None,
    device: Device = None,
    metric_rows: int = 16,
) -> dict[str, Any]:
    """Tune the quantization pass in `quantized_dir` towards the model in `model_dir` (module docstring) for
    `steps` Adam steps of `rows_per_step` calibration rows each (rows taken in order, cycling); write the result
    to `out_dir` in the same layout. Returns metrics: the mean KL per token (nats) of the first and the last pass
    over the rows, calibration_perplexity on the first `metric_rows` rows, seconds."""
    started = time.perf_counter()
    cfg, ckpt = open_model(model_dir, rope_scale=rope_scale, rope_alpha=rope_alpha)
    ids = check_calibration_ids(ids, cfg)
    device = torch.device(device or "cpu")
    quantized_dir, out_dir = Path(quantized_dir), Path(out_dir)
    layers = [load_file(str(quantized_dir / layer_file(i))) for i in range(cfg.num_hidden_layers)]
    head_tensors = load_file(str(quantized_dir / HEAD_FILE))
    global_tensors = load_file(str(quantized_dir / GLOBALS_FILE))

    # On CUDA both models run in bfloat16 (the multipliers and their updates stay float32).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_features = {name: shape.out_features for name, shape in linear_shapes(cfg).items()}
    owners: list[ScaledLinear | ScaledNorm] = []
    fixed: list[dict[str, Tensor]] = []  # each student layer's decoded weights and biases
    scaled: list[list[tuple[str, int]]] = []  # each student layer's tuned entries: (weights key, owner index)
    for i, layer in enumerate(layers):
        fixed.append({})
        scaled.append([])
        for name in LINEARS:
            linear = ScaledLinear(_split(layer, layer_prefix(i) + name), layer_prefix(i) + name, out_features[name],
                                  device, dtype)
            fixed[i][f"{name}.weight"] = linear.weight
            if linear.bias is not None:
                fixed[i][f"{name}.bias"] = linear.bias
            scaled[i].append((f"{name}.input_scale", len(owners)))
            owners.append(linear)
        for name in NORMS:
            scaled[i].append((name, len(owners)))
            owners.append(ScaledNorm(layer[layer_prefix(i) + name], device))
    head = ScaledLinear(_split(head_tensors, HEAD_KEY), HEAD_KEY, cfg.vocab_size, device, dtype)
    final_norm = ScaledNorm(global_tensors[FINAL_NORM_KEY], device)
    owners += [head, final_norm]
    multipliers = Multipliers(owners, device)
    embedding = global_tensors[EMBEDDING_KEY].to(device, torch.float32)
    teacher = [{k: v.to(dtype) if v.dim() == 2 else v.float()
                for k, v in layer_weights(ckpt, cfg, i, torch.float16, device).items()}
               for i in range(cfg.num_hidden_layers)]
    teacher_norm = norm_weight(ckpt, torch.float16, device).float()
    teacher_head = head_weight(ckpt, cfg, torch.float16, device).to(dtype)
    rope = rope_tables(cfg, ids.shape[1], device)

    def hidden(x: Tensor, weights) -> Tensor:
        for i in range(cfg.num_hidden_layers):
            x = decoder_layer(x, weights(i), cfg, rope)
        return x

    def student_logits(x: Tensor) -> Tensor:
        factors = multipliers.expand()

        def layer(i: int) -> dict[str, Tensor]:
            w = dict(fixed[i])
            for key, k in scaled[i]:
                owner = owners[k]
                w[key] = owner.weight * factors[k] if isinstance(owner, ScaledNorm) else factors[k]
            return w

        # The head's multipliers scale its input features, as the final norm's do.
        norm = final_norm.weight * factors[-1] * factors[-2]
        return final_logits(hidden(x, layer), norm, head.weight, cfg.rms_norm_eps)

    optimizer = torch.optim.Adam([multipliers.log], lr=lr, fused=device.type == "cuda")
    rows = ids.shape[0]
    step_rows = min(rows_per_step, rows)
    kl_per_step = []
    # A step is a forward of each model and a backward of one, on rows_per_step whole rows.
    low_precision = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with tf32_matmuls(device), low_precision, deterministic_algorithms():
        for step in progress.track(range(steps), "tuning"):
            batch = ids[(torch.arange(step_rows) + step * step_rows) % rows].to(device)
            x = embed(batch, embedding)
            with torch.no_grad():
                target = F.log_softmax(final_logits(hidden(x, lambda i: teacher[i]), teacher_norm, teacher_head,
                                                   cfg.rms_norm_eps).float(), dim=-1)
            logits = student_logits(x).float()
            kl = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="sum") / batch.numel()
            optimizer.zero_grad()
            kl.backward()
            optimizer.step()
            kl_per_step.append(kl.item())
            del x, target, logits, kl
    if not all(math.isfinite(k) for k in kl_per_step):
        raise ExlbuildError("tuning diverged (the KL divergence became NaN or infinite); lower tune.lr")

    out_layers = []
    for i, layer in enumerate(layers):
        tuned = dict(layer)
        for key, k in scaled[i]:
            owner = owners[k]
            if isinstance(owner, ScaledNorm):
                tuned[layer_prefix(i) + key] = owner.tuned(multipliers.of(k))
            else:
                tuned.update({f"{owner.key}.{s}": t for s, t in owner.tuned(multipliers.of(k)).items()})
        out_layers.append(tuned)
    head_out = {f"{HEAD_KEY}.{s}": t for s, t in head.tuned(multipliers.of(len(owners) - 2)).items()}
    globals_out = {**global_tensors, FINAL_NORM_KEY: final_norm.tuned(multipliers.of(len(owners) - 1))}

    # The calibration perplexity of what is written (its fp16 scales decoded as the loader does).
    with torch.no_grad():
        metric_ids = ids[: min(metric_rows, rows)].to(device)
        x = embed(metric_ids, embedding)
        for i, layer in enumerate(out_layers):
            w = {n: layer[layer_prefix(i) + n].to(device, torch.float32) for n in NORMS}
            for n in LINEARS:
                tensors = {k: t.to(device) for k, t in _split(layer, layer_prefix(i) + n).items()}
                w[f"{n}.weight"] = dequantize(tensors, out_features[n]).float()
                if "bias" in tensors:
                    w[f"{n}.bias"] = tensors["bias"][: out_features[n]].float()
            x = decoder_layer(x, w, cfg, rope)
        head_decoded = dequantize({k: t.to(device) for k, t in _split(head_out, HEAD_KEY).items()}, cfg.vocab_size)
        ppl = calibration_perplexity(x, metric_ids, globals_out[FINAL_NORM_KEY].to(device).float(),
                                     head_decoded.float(), cfg.rms_norm_eps)

    (out_dir / LAYERS_DIR).mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(out_layers):
        save_file({k: v.contiguous() for k, v in layer.items()}, str(out_dir / layer_file(i)))
    save_file(head_out, str(out_dir / HEAD_FILE))
    save_file(globals_out, str(out_dir / GLOBALS_FILE))
    per_pass = max(1, -(-rows // step_rows))
    return {
        "kl_first_pass": sum(kl_per_step[:per_pass]) / len(kl_per_step[:per_pass]) if kl_per_step else None,
        "kl_last_pass": sum(kl_per_step[-per_pass:]) / len(kl_per_step[-per_pass:]) if kl_per_step else None,
        "calibration_perplexity": ppl,
        "seconds": time.perf_counter() - started,
    }

