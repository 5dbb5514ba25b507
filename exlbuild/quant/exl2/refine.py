"""Refining GPTQ's codes layer by layer (docs/exl2.md, "refined"). GPTQ rounds one weight at a time, greedily, and
each linear for its own output; here every decoder layer in turn gets its codes, group scale maxima and norm
weights fitted together to the unquantized layer's output. The codes are continuous "latent" values during the
fit (initially GPTQ's codes) and are rounded in the forward pass, with the rounding's gradient taken as 1 (the
straight-through estimator); the ones that cross a rounding boundary are the codes that change.

Inputs and targets: the layer runs on the quantized model's states (the layers before it refined and written) and
is fitted to the unquantized model's own states after the same layer, so it also corrects what the earlier layers
got wrong. Loss: each token's squared error relative to the target's squared norm (the next RMSNorm sees the
relative error; the attention sink's huge residual would otherwise outweigh every other token).

A layer's fit is kept only if it lowered the layer's loss over all calibration rows.

Streams one layer at a time: the states of both models (float16) and one layer's parameters are on the device.
Reads and writes the quantization pass's layout (exlbuild.quant.exl2.convert) and changes, per linear, q_weight
(same bit widths, so the bits per weight stay) and q_scale_max, and the norm weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from exlbuild import progress
from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import Device, layer_prefix, layer_weights, open_model
from exlbuild.model.llama import Rope, decoder_layer, embed, rope_tables
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
from exlbuild.quant.exl2.pack import (
    bits_per_row,
    pack_q_weight,
    parse_q_groups,
    scale_from_nibbles,
    unpack_q_weight,
    unpack_scale_nibbles,
)
from exlbuild.quant.exl2.tune import (
    LINEARS,
    NORMS,
    Adam,
    Multipliers,
    ScaledLinear,
    ScaledNorm,
    decode_linear,
    deterministic_algorithms,
    linear_tensors,
    run_steps,
)
from exlbuild.quant.stream import STATE_DTYPE, check_calibration_ids, chunk_rows

METRIC_ROWS = 16  # calibration rows of the reported perplexity, as the tuning reports it


class LatentCodes:
    """One EXL2 linear's codes as latent values in the decoded (out, in) orientation, minus each input feature's
    zero point, and each weight's fp16 scale: weight = scale · round(clamp(latent))."""

    def __init__(self, tensors: dict[str, Tensor], out_features: int, device: torch.device) -> None:
        t = {k: v.to(device) for k, v in tensors.items()}
        self.groups = parse_q_groups(t["q_groups"], t["q_weight"].shape[0], "refine")
        self.invperm = t["q_invperm"].long()  # input feature i is stored row invperm[i]
        bits = bits_per_row(self.groups, device)[self.invperm]
        self.zero = (2 ** (bits - 1)).float()  # per input feature
        self.low, self.high = -self.zero, (2**bits - 1).float() - self.zero
        self.out_features = out_features
        codes = unpack_q_weight(t["q_weight"], self.groups)[self.invperm].T  # (padded out, in)
        # Columns past out_features (the padding to 32) keep their codes: only the real outputs are fitted.
        self.padding = codes[out_features:]
        self.initial = codes[:out_features].contiguous()
        self.latent = self.initial.float() - self.zero
        scale = scale_from_nibbles(unpack_scale_nibbles(t["q_scale"]), t["q_scale_max"])  # (groups, padded out)
        group_of_row = torch.repeat_interleave(torch.arange(len(self.groups), device=device),
                                               torch.tensor([g.rows for g in self.groups], device=device))
        self.scale = scale[group_of_row][self.invperm].T[:out_features].contiguous()  # fp16

    def weight(self, latent: Tensor, dtype: torch.dtype = torch.float16) -> Tensor:
        """The decoded weight of `latent` (a view of this linear's values) rounded, in fp16 as the loader computes
        it, then cast to `dtype`, with the rounding passed straight through in the backward."""
        return _StraightThroughWeight.apply(latent, self.scale, self.low, self.high, dtype)

    def _codes(self) -> Tensor:
        """The codes (out, in) of the current latent values."""
        return (torch.round(_clamp(self.latent, self.low, self.high)) + self.zero).to(torch.uint8)

    def q_weight(self) -> Tensor:
        """q_weight of the current latent values (on the CPU)."""
        decoded = torch.cat([self._codes(), self.padding])
        stored = torch.empty_like(decoded.T)
        stored[self.invperm] = decoded.T
        return pack_q_weight(stored, self.groups).cpu()

    def changed(self) -> int:
        """How many codes differ from GPTQ's."""
        return int((self._codes() != self.initial).sum())


def _clamp(latent: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Each latent value clamped to its code range (low and high per input feature, broadcast along outputs)."""
    return torch.maximum(torch.minimum(latent, high), low)


class _StraightThroughWeight(torch.autograd.Function):
    """fp16(scale · round(clamp(latent, low, high))) cast to a dtype, whose backward takes the rounding's gradient
    as 1: the gradient of the same expression written with torch.minimum, torch.maximum and a detached rounding
    (the clamp's gradient halved where the latent value sits on a bound, as theirs is), without keeping their
    float32 intermediates for the backward (a dozen bytes per weight)."""

    @staticmethod
    def forward(ctx, latent: Tensor, scale: Tensor, low: Tensor, high: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(latent, scale, low, high)
        return (scale * torch.round(_clamp(latent, low, high))).half().to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        latent, scale, low, high = ctx.saved_tensors
        inside = ((latent > low) & (latent < high)).float() + 0.5 * ((latent == low) | (latent == high)).float()
        return grad.half().float() * scale * inside, None, None, None, None


def _relative_error(y: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of |y − target|² / |target|², in float32."""
    y, target = y.float(), target.float()
    return ((y - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)).mean()


def refine_model(
    model_dir: Path,
    quantized_dir: Path,
    out_dir: Path,
    ids: Tensor,
    steps: int,
    lr: float,
    rows_per_step: int,
    scale_lr: float = 1e-3,
    rope_scale: float | None = None,
    rope_alpha: float | None = None,
    device: Device = None,
) -> dict[str, Any]:
    """Refine the quantization pass in `quantized_dir` towards the model in `model_dir` (module docstring): per
    layer `steps` Adam steps on `rows_per_step` calibration rows each (rows in order, cycling), learning rate `lr`
    for the codes (in units of one code) and `scale_lr` for the log-multipliers of q_scale_max and the norms, both
    decaying to 0 along a half cosine so that the codes settle; a layer's fit is kept only if it lowered the
    layer's loss over all calibration rows. Writes `out_dir` in the same layout. Returns metrics: per layer that
    loss before and after, whether the fit was kept and the codes it changed; the codes changed in all; the
    calibration perplexity of what is written (first METRIC_ROWS rows); seconds."""
    started = time.perf_counter()
    cfg, ckpt = open_model(model_dir, rope_scale=rope_scale, rope_alpha=rope_alpha)
    ids = check_calibration_ids(ids, cfg)
    device = torch.device(device or "cpu")
    quantized_dir, out_dir = Path(quantized_dir), Path(out_dir)
    # As in the tuning: on CUDA the fit runs in bfloat16 (the parameters and their updates stay float32).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_features = {name: shape.out_features for name, shape in linear_shapes(cfg).items()}
    global_tensors = load_file(str(quantized_dir / GLOBALS_FILE))
    rope = rope_tables(cfg, ids.shape[1], device)  # float32 for the passes over all rows
    compute_rope = Rope(rope.cos.to(dtype), rope.sin.to(dtype))
    rows = ids.shape[0]
    step_rows = min(rows_per_step, rows)
    static_batch, decay = torch.arange(step_rows, device=device), torch.ones((), device=device)  # run_steps' inputs
    with torch.no_grad():
        quantized_states = embed(ids.to(device), global_tensors[EMBEDDING_KEY].to(device, STATE_DTYPE))
    unquantized_states = quantized_states.clone()
    chunk = chunk_rows(quantized_states, cfg)

    def run(states: Tensor, weights: dict[str, Tensor]) -> None:
        """Every row of `states` through one layer, in place, a chunk of rows at a time in float32."""
        with torch.no_grad():
            for r in range(0, rows, chunk):
                states[r : r + chunk] = decoder_layer(states[r : r + chunk].float(), weights, cfg, rope).to(STATE_DTYPE)

    (out_dir / LAYERS_DIR).mkdir(parents=True, exist_ok=True)
    layer_metrics = []
    with deterministic_algorithms():
        for i in progress.track(range(cfg.num_hidden_layers), "refining"):
            layer = load_file(str(quantized_dir / layer_file(i)))
            keys = [layer_prefix(i) + name for name in LINEARS]
            linears = [ScaledLinear(linear_tensors(layer, key), key, out_features[name], device, dtype)
                       for key, name in zip(keys, LINEARS)]
            norms = [ScaledNorm(layer[layer_prefix(i) + name], device) for name in NORMS]
            latents = [LatentCodes(linear_tensors(layer, key), out_features[name], device)
                       for key, name in zip(keys, LINEARS)]
            multipliers = Multipliers(linears, norms, device)
            flat = torch.cat([latent.latent.flatten() for latent in latents]).requires_grad_()
            sizes = [latent.latent.numel() for latent in latents]
            for latent, part in zip(latents, flat.detach().split(sizes)):
                latent.latent = part.view_as(latent.latent)  # one copy: the values as the optimizer moves them
            code_optimizer, scale_optimizer = Adam(flat, lr), Adam(multipliers.log, scale_lr)

            # The target: the unquantized layer on the unquantized model's states (kept for the next layer).
            unquantized = layer_weights(ckpt, cfg, i, torch.float16, device)
            run(unquantized_states, {k: v.float() for k, v in unquantized.items()})

            def loss_on(batch: Tensor) -> Tensor:
                linear_factors, norm_factors = multipliers.expand()
                w: dict[str, Tensor] = {}
                for name, linear, latent, part, factor in zip(
                        LINEARS, linears, latents, flat.split(sizes), linear_factors):
                    w[f"{name}.weight"] = latent.weight(part.view_as(latent.latent), dtype)
                    w[f"{name}.input_scale"] = factor.to(dtype)
                    if linear.bias is not None:
                        w[f"{name}.bias"] = linear.bias
                for name, norm, factor in zip(NORMS, norms, norm_factors):
                    w[name] = (norm.weight * factor).to(dtype)
                y = decoder_layer(quantized_states[batch].to(dtype), w, cfg, compute_rope)
                return _relative_error(y, unquantized_states[batch])

            def train_step() -> Tensor:
                loss = loss_on(static_batch)
                code_grad, scale_grad = torch.autograd.grad(loss, [flat, multipliers.log])
                code_optimizer.step(code_grad, decay)
                scale_optimizer.step(scale_grad, decay)
                return loss.detach()

            def prepare(step: int) -> None:
                static_batch.copy_((torch.arange(step_rows, device=device) + step * step_rows) % rows)
                decay.fill_(0.5 * (1 + math.cos(math.pi * step / steps)))

            def loss_on_all_rows() -> float:
                with torch.no_grad():
                    parts = [torch.arange(r, min(r + chunk, rows), device=device) for r in range(0, rows, chunk)]
                    return sum(float(loss_on(part)) * len(part) for part in parts) / rows

            before = loss_on_all_rows()
            run_steps(train_step, prepare, steps, device)
            after = loss_on_all_rows()
            if not math.isfinite(after):
                raise ExlbuildError(f"refining layer {i} diverged (its loss became NaN or infinite); lower refine.lr")

            # A fit that did not lower the layer's loss over the calibration rows (a rate too high for them, say)
            # is dropped: the layer stays as the quantization pass wrote it.
            kept = after < before
            refined = dict(layer)
            changed = 0
            for k, (linear, latent) in enumerate(zip(linears, latents) if kept else ()):
                changed += latent.changed()
                refined.update({f"{linear.key}.{s}": t for s, t in linear.tuned(multipliers.of_linear(k)).items()})
                refined[f"{linear.key}.q_weight"] = latent.q_weight()
            for k, (name, norm) in enumerate(zip(NORMS, norms) if kept else ()):
                refined[layer_prefix(i) + name] = norm.tuned(multipliers.of_norm(k))
            save_file({k: v.contiguous() for k, v in refined.items()}, str(out_dir / layer_file(i)))

            # The next layer's inputs: this layer as written, decoded as the loader does.
            written = {name: refined[layer_prefix(i) + name].to(device, torch.float32) for name in NORMS}
            for key, name in zip(keys, LINEARS):
                weight, bias = decode_linear(linear_tensors(refined, key), key, out_features[name], device,
                                             torch.float32)
                written[f"{name}.weight"] = weight
                if bias is not None:
                    written[f"{name}.bias"] = bias
            run(quantized_states, written)
            layer_metrics.append({"loss_before": before, "loss_after": after, "kept": kept, "codes_changed": changed})

    head_tensors = load_file(str(quantized_dir / HEAD_FILE))
    save_file(head_tensors, str(out_dir / HEAD_FILE))
    save_file(global_tensors, str(out_dir / GLOBALS_FILE))
    with torch.no_grad():
        head, _ = decode_linear(linear_tensors(head_tensors, HEAD_KEY), HEAD_KEY, cfg.vocab_size, device,
                                torch.float32)
        metric_rows = min(METRIC_ROWS, rows)
        ppl = calibration_perplexity(quantized_states[:metric_rows], ids[:metric_rows],
                                     global_tensors[FINAL_NORM_KEY].to(device).float(), head, cfg.rms_norm_eps)
    return {
        "calibration_perplexity": ppl,
        "layers": layer_metrics,
        "codes_changed": sum(m["codes_changed"] for m in layer_metrics),
        "seconds": time.perf_counter() - started,
    }

