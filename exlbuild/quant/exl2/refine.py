"""Refining GPTQ's codes layer by layer (docs/exl2.md, "refined"). GPTQ rounds one weight at a time, greedily, and
each linear for its own output; here every decoder layer in turn gets its codes, group scale maxima and norm
weights fitted together to the unquantized layer's output. The codes are continuous "latent" values during the
fit (initially GPTQ's codes) and are rounded in the forward pass, with the rounding's gradient taken as 1 (the
straight-through estimator); the ones that cross a rounding boundary are the codes that change.

Inputs and targets: the layer runs on the quantized model's states (the layers before it refined and written) and
is fitted to the unquantized model's own states after the same layer, so it also corrects what the earlier layers
got wrong. Loss: each token's squared error relative to the target's squared norm (the next RMSNorm sees the
relative error; the attention sink's huge residual would otherwise outweigh every other token).

One calibration row in ten is held out of the fit (`held_out_rows`), and a fit is kept only if it lowered the
layer's loss on those rows: a fit that only learnt its training rows is dropped. Layers that each got better can
still compound into a worse model, so the whole refinement is also judged at the end, on the same rows, by the
model's next-token KL divergence from the unquantized model, and dropped (the quantization pass's layers written
unchanged) unless it lowered it.

Streams one layer at a time: the states of both models (float16) and one layer's parameters are on the device. A
layer with more weights than `weights_per_fit` is fitted in parts of consecutive output rows, one after the other
(`fit_parts`), so that the optimizer's state stays bounded on large models. Each refined layer's file goes to the
state directory as it is finished and is the checkpoint: an interrupted refinement (hours at 70B) runs the rows
through the finished layers again, as the quantization pass does, and goes on at its next layer.
Reads and writes the quantization pass's layout (exlbuild.quant.exl2.convert) and changes, per linear, q_weight
(same bit widths, so the bits per weight stay) and q_scale_max, and the norm weights.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from exlbuild import progress
from exlbuild.errors import ExlbuildError
from exlbuild.hashing import hash_bytes, hash_json
from exlbuild.kernels.decoder_ops import squared_relative_error
from exlbuild.kernels.straight_through import straight_through_backward, straight_through_weight
from exlbuild.model.checkpoint import (
    Device,
    head_weight,
    layer_prefix,
    layer_weights,
    layers_ahead,
    norm_weight,
    open_model,
)
from exlbuild.model.llama import Rope, decoder_layer, embed, rope_tables
from exlbuild.quant.exl2.convert import (
    EMBEDDING_KEY,
    FINAL_NORM_KEY,
    GLOBALS_FILE,
    HEAD_FILE,
    HEAD_KEY,
    LAYERS_DIR,
    calibration_perplexity,
    decode_layer_weights,
    decode_linear,
    layer_file,
    linear_shapes,
    linear_tensors,
)
from exlbuild.quant.exl2.pack import (
    bits_per_row,
    input_feature_groups,
    pack_q_weight,
    parse_q_groups,
    scale_from_nibbles,
    unpack_q_weight,
    unpack_scale_nibbles,
)
from exlbuild.quant.exl2.tune import (
    EAGER_STEPS,
    Adam,
    Multipliers,
    ScaledLinear,
    ScaledNorm,
    at_step,
    cycled_rows,
    deterministic_algorithms,
    next_token_kl,
    run_steps,
)
from exlbuild.quant.stream import (
    LINEARS,
    NORMS,
    STATE_DTYPE,
    LayerCheckpoint,
    check_calibration_ids,
    chunk_rows,
    pass_precision,
    resume_point,
)
from exlbuild.transfer import to_device, to_host

METRIC_ROWS = 16  # calibration rows of the reported perplexity, as the tuning reports it
HELD_OUT_EVERY = 10  # one calibration row in this many is not trained on: it judges each fit
# The next layer is set up (read, decoded, its codes unpacked: host work, ~25 ms a SmolLM2 layer on the H100's host)
# once this layer's last steps are queued, so that on CUDA it runs while the GPU runs them, where that setup's ~5 bytes
# a weight on the device (the decoded float32 weights, the codes) stay under AHEAD_BYTES: not at 70B (0.86 billion
# weights a layer), whose fit's peak is near the 20 GB goal. (On the CPU it changes only the order of the work.)
AHEAD_BYTES_PER_WEIGHT = 5
AHEAD_BYTES = 2 << 30


class LinearCodes:
    """One EXL2 linear's codes in the decoded (out, in) orientation as the fit changes them, with what decodes
    them: per input feature the zero point and code range, per (group, output) the fp16 scale; weight = scale ·
    (code − zero). The fit moves latent values, codes minus zero points, rounded in the forward."""

    def __init__(self, tensors: dict[str, Tensor], key: str, out_features: int, device: torch.device) -> None:
        # The structure is read from the tensors as given (a file's: in host memory): a read on the device waits.
        self.groups = parse_q_groups(tensors["q_groups"], tensors["q_weight"].shape[0], key)
        t = {k: to_device(v, device) for k, v in tensors.items()}
        self.invperm = t["q_invperm"].long()  # input feature i is stored row invperm[i]
        bits = bits_per_row(self.groups, device)[self.invperm]
        self.zero = (2 ** (bits - 1)).float()  # per input feature
        self.low, self.high = -self.zero, (2**bits - 1).float() - self.zero
        self.out_features = out_features
        # Rows past out_features (the padding to 32) keep their codes: only the real outputs are fitted.
        self.codes = self._decoded_codes(t["q_weight"])  # (padded out, in) uint8
        self.group_scale = scale_from_nibbles(unpack_scale_nibbles(t["q_scale"]), t["q_scale_max"])  # (groups, out)
        self.feature_group = to_device(input_feature_groups(tensors, key), device)

    def _decoded_codes(self, q_weight: Tensor) -> Tensor:
        return unpack_q_weight(to_device(q_weight, self.invperm.device), self.groups)[self.invperm].T.contiguous()

    def scale(self, rows: slice) -> Tensor:
        """(rows, in) fp16: the scale of each weight of output rows `rows`."""
        return self.group_scale[:, rows][self.feature_group].T.contiguous()

    def latent(self, rows: slice) -> Tensor:
        """(rows, in) float32 latent values of the current codes of output rows `rows`."""
        return self.codes[rows].float() - self.zero

    def store(self, rows: slice, latent: Tensor) -> None:
        """Output rows `rows` take the codes of `latent` (rounded, clamped to each feature's range)."""
        self.codes[rows] = (torch.round(_clamp(latent, self.low, self.high)) + self.zero).to(torch.uint8)

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The (out, in) weight of the current codes in fp16, as the loader decodes it, cast to `dtype`."""
        rows = slice(0, self.out_features)
        unit = torch.ones(self.low.shape, dtype=dtype, device=self.low.device)
        return straight_through_weight(self.latent(rows), self.scale(rows), self.low, self.high, unit)

    def straight_through(self, latent: Tensor, scale: Tensor, factor: Tensor) -> Tensor:
        """The weight of `latent` (some output rows' values) with `scale` (theirs), rounded, in fp16 as the loader
        computes it, then cast to factor's dtype and each input feature multiplied by its `factor`; in the
        backward the rounding passes the gradient straight through."""
        return _StraightThroughWeight.apply(latent, scale, self.low, self.high, factor)

    def pack(self) -> tuple[Tensor, Tensor]:
        """q_weight of the current codes, and whether any code was out of range for its bit width (a 0-dim bool),
        both on the codes' device: the caller reads the flags of a layer once."""
        stored = torch.empty_like(self.codes.T)
        stored[self.invperm] = self.codes.T
        out_of_range = torch.zeros((), dtype=torch.bool, device=stored.device)
        return pack_q_weight(stored, self.groups, out_of_range), out_of_range

    def changed_from(self, q_weight: Tensor) -> Tensor:
        """How many codes differ from those of `q_weight` (this linear's as stored before), as a 0-dim tensor on the
        device: the caller reads the sum of a layer's once."""
        rows = slice(0, self.out_features)
        return (self.codes[rows] != self._decoded_codes(q_weight)[rows]).sum()


class _LayerSetup(NamedTuple):
    """A layer's quantization-pass tensors (its file's, in host memory), its decoded weights, and its fit's
    starting point: the scaled linears and norms, the codes, the multipliers."""

    layer: dict[str, Tensor]
    unrefined: dict[str, Tensor]
    linears: list[ScaledLinear]
    norms: list[ScaledNorm]
    codes: list[LinearCodes]
    multipliers: Multipliers


@dataclass(frozen=True)
class RowSlice:
    """Output rows start..stop of the layer's linear number `linear` (in LINEARS order)."""

    linear: int
    start: int
    stop: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def fit_parts(shapes: list[tuple[int, int]], weights_per_fit: int) -> list[list[RowSlice]]:
    """A layer's linears, of (out, in) `shapes`, cut into parts fitted one after the other, each of consecutive
    output rows in order and at most `weights_per_fit` weights (at least one row): the fit's memory grows with
    the weights it moves at once (about 20 bytes each: the latent value, its gradient, Adam's moments, the scale),
    and a 70B-class layer has 0.86 billion. Each linear has at most one slice in a part."""
    parts: list[list[RowSlice]] = []
    part: list[RowSlice] = []
    room = weights_per_fit
    for k, (out_features, in_features) in enumerate(shapes):
        start = 0
        while start < out_features:
            rows = min(out_features - start, max(room, 0) // in_features)
            if rows == 0 and part:
                parts.append(part)
                part, room = [], weights_per_fit
                continue
            rows = max(rows, 1)
            part.append(RowSlice(k, start, start + rows))
            start += rows
            room -= rows * in_features
    if part:
        parts.append(part)
    return parts


def held_out_rows(rows: int) -> list[int]:
    """The calibration rows that judge each fit and are not trained on: one in HELD_OUT_EVERY, spread evenly (at
    least one of two or more rows; none of a single row, whose fit is judged on the row it was fitted to)."""
    if rows < 2:
        return []
    count = max(1, rows // HELD_OUT_EVERY)
    return [(k + 1) * rows // count - 1 for k in range(count)]


def _clamp(latent: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Each latent value clamped to its code range (low and high per input feature, broadcast along outputs)."""
    return torch.maximum(torch.minimum(latent, high), low)


class _StraightThroughWeight(torch.autograd.Function):
    """The straight-through weight of exlbuild.kernels.straight_through (fp16(scale · round(clamp(latent, low,
    high))) in factor's dtype times factor, the rounding's gradient taken as 1) with its gradient: on CUDA one fused
    kernel each way, where the expression in PyTorch takes 7 elementwise passes of each linear's weights forward and
    ~16 backward; only the inputs are kept for the backward."""

    @staticmethod
    def forward(ctx, latent: Tensor, scale: Tensor, low: Tensor, high: Tensor, factor: Tensor) -> Tensor:
        ctx.save_for_backward(latent, scale, low, high, factor)
        return straight_through_weight(latent, scale, low, high, factor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, Tensor]:
        grad_latent, grad_factor = straight_through_backward(grad, *ctx.saved_tensors)
        return grad_latent, None, None, None, grad_factor


# A layer's linears for their input features' factors: each (weight, factor of its inputs or None where the weight
# has it already).
ScaledWeights = Callable[[list[Tensor]], list[tuple[Tensor, "Tensor | None"]]]


class _Part:
    """One part's fit: its row slices' latent values in one flat tensor (the optimizer's), their scales, and the
    layer's other weights decoded and fixed."""

    def __init__(self, slices: list[RowSlice], codes: list[LinearCodes], dtype: torch.dtype) -> None:
        self.codes = codes
        self.slice_of = {s.linear: s for s in slices}
        latents = [codes[s.linear].latent(s.rows) for s in slices]
        self.shapes = [latent.shape for latent in latents]
        self.flat = torch.cat([latent.flatten() for latent in latents]).requires_grad_()
        self.scales = {s.linear: codes[s.linear].scale(s.rows) for s in slices}
        self.fixed = {k: c.weight(dtype) for k, c in enumerate(codes) if not self._whole(k)}

    def _whole(self, k: int) -> bool:
        s = self.slice_of.get(k)
        return s is not None and s.start == 0 and s.stop == self.codes[k].out_features

    def _latents(self, flat: Tensor) -> list[Tensor]:
        return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in self.shapes]), self.shapes)]

    def weights(self, factors: list[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
        """Every linear's (weight, factor of its inputs or None) for `factors`, each linear's per input feature in the
        compute dtype: the fitted rows rounded from the latent values (straight through), the rest fixed. A linear
        fitted whole takes its factor in its weight (fewer values to scale than its inputs); the others scale
        their inputs, which needs no weight-sized copy of the fixed rows (parts exist to bound memory)."""
        latents = dict(zip(self.slice_of, self._latents(self.flat)))
        weights = []
        for k, factor in enumerate(factors):
            if k not in latents:
                weights.append((self.fixed[k], factor))
            elif self._whole(k):
                weights.append((self.codes[k].straight_through(latents[k], self.scales[k], factor), None))
            else:
                s, fixed = self.slice_of[k], self.fixed[k]
                fitted = self.codes[k].straight_through(latents[k], self.scales[k], torch.ones_like(factor))
                weights.append((torch.cat([fixed[: s.start], fitted, fixed[s.stop :]]), factor))
        return weights

    def store(self) -> None:
        """The fitted rows take the codes of their latent values."""
        for s, latent in zip(self.slice_of.values(), self._latents(self.flat.detach())):
            self.codes[s.linear].store(s.rows, latent)


def refine_model(
    model_dir: Path,
    quantized_dir: Path,
    out_dir: Path,
    ids: Tensor,
    steps: int,
    lr: float,
    rows_per_step: int,
    weights_per_fit: int = 1 << 27,
    scale_lr: float = 1e-3,
    rope_scale: float | None = None,
    rope_alpha: float | None = None,
    device: Device = None,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Refine the quantization pass in `quantized_dir` towards the model in `model_dir` (module docstring): per
    layer and part (`fit_parts`, at most `weights_per_fit` weights) `steps` Adam steps on `rows_per_step`
    calibration rows each (the training rows in order, cycling; `held_out_rows` are not trained on), learning rate
    `lr` for the codes (in units of one code) and `scale_lr` for the log-multipliers of q_scale_max and the norms,
    both decaying to 0 along a half cosine so that the codes settle; a part's fit is kept only if it lowered the
    layer's loss on the held-out rows, and the whole refinement only if it lowered the model's next-token KL from
    the unquantized model on those rows (else the quantization pass's layers are written). Writes `out_dir` in the
    same layout; `state_dir` holds the finished layers to resume from (a temporary directory when None). Returns
    metrics: per layer that loss before and after, the parts fitted and kept, and the codes changed; the model's
    held-out KL before and after and whether the refinement was kept; the codes changed in what is written; the
    calibration perplexity of what is written (first METRIC_ROWS rows); seconds (in all, and of the steps, their graph
    captures included)."""
    started = time.perf_counter()
    cfg, ckpt = open_model(model_dir, rope_scale=rope_scale, rope_alpha=rope_alpha)
    ids = check_calibration_ids(ids, cfg)
    device = torch.device(device or "cpu")
    quantized_dir, out_dir = Path(quantized_dir), Path(out_dir)
    # As in the tuning: on CUDA the fit runs in bfloat16 (the parameters and their updates stay float32).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {name: (shape.out_features, shape.in_features) for name, shape in linear_shapes(cfg).items()}
    out_features = {name: out for name, (out, _) in shapes.items()}
    parts = fit_parts([shapes[name] for name in LINEARS], weights_per_fit)
    global_tensors = load_file(str(quantized_dir / GLOBALS_FILE))
    rope = rope_tables(cfg, ids.shape[1], device)  # float32 for the passes over all rows
    compute_rope = Rope(rope.cos.to(dtype), rope.sin.to(dtype))
    rows = ids.shape[0]
    held_out = held_out_rows(rows)
    training = torch.tensor([r for r in range(rows) if r not in held_out], device=device)
    judging = torch.tensor(held_out or [0], device=device)
    step_rows = min(rows_per_step, len(training))
    batches = training[cycled_rows(len(training), step_rows, steps, device)]
    # Both rates decay to 0 along a half cosine over each fit's steps.
    decay = [0.5 * (1 + math.cos(math.pi * step / steps)) for step in range(steps)]
    with torch.no_grad():
        quantized_states = embed(ids.to(device), global_tensors[EMBEDDING_KEY].to(device, STATE_DTYPE))
    unquantized_states = quantized_states.clone()
    # The quantization pass's model on the rows that judge the whole refinement and on the metric's rows, in case
    # the refinement is dropped: (row, position in `unrefined_states`). In host memory: at 70B these 26 rows are
    # 0.9 GB, which the peak of a part's fit cannot spare under the 20 GB goal.
    metric_rows = min(METRIC_ROWS, rows)
    tracked = sorted(set(range(metric_rows)) | set(held_out))
    # (Page-locked on CUDA: a copy from or into pageable memory is staged through a bounce buffer and took ~2 ms a
    # row, ~60 ms of each SmolLM2 layer.)
    unrefined_states = torch.empty(quantized_states[tracked].shape, dtype=STATE_DTYPE, pin_memory=device.type == "cuda")
    unrefined_states.copy_(quantized_states[tracked])
    chunk = chunk_rows(quantized_states, cfg)
    judged_batches = judging.split(chunk)  # the held-out rows, a chunk at a time

    def run(states: Tensor, weights: dict[str, Tensor]) -> None:
        """Every row of `states` (on the device or in host memory) through one layer, in place, a chunk of rows at a
        time on the device in float32 (on CUDA at the quantization pass's precision: stream.pass_precision). Rows in
        host memory cross in their own dtype and are converted on the device: a copy that also converts does it on
        the host, through a pageable float32 buffer twice their size (~0.15 s of each SmolLM2 layer for 26 rows)."""
        with torch.no_grad(), pass_precision(device):
            for r in range(0, states.shape[0], chunk):
                x = states[r : r + chunk].to(device).float()
                states[r : r + chunk].copy_(decoder_layer(x, weights, cfg, rope).to(states.dtype))

    # What the finished layers in `state_dir` depend on, so that those of other inputs are never resumed from.
    fingerprint = hash_json({"ids": hash_bytes(ids.numpy().tobytes()), "shape": list(ids.shape),
                             "config": dataclasses.asdict(cfg),
                             "fit": [steps, lr, rows_per_step, weights_per_fit, scale_lr]})
    temporary = tempfile.TemporaryDirectory(prefix="exlbuild-refine-") if state_dir is None else None
    state_dir = Path(temporary.name if temporary is not None else state_dir)
    checkpoint = LayerCheckpoint(state_dir)
    start, notes = resume_point(checkpoint, fingerprint, "a refinement of other inputs (model config, calibration "
                                "rows or refine parameters)")
    layer_metrics: list[dict[str, Any]] = notes.get("layers", [])
    steps_seconds = 0.0  # of this run's fits (not of layers finished before a resume)
    for directory in (state_dir, out_dir):
        (directory / LAYERS_DIR).mkdir(parents=True, exist_ok=True)
    with deterministic_algorithms(), checkpoint:
        # Resuming: the three models' states after the finished layers, computed again as the loop below computed
        # them (the same weights through `run`), so the same bits.
        for i in progress.track(range(start), "resuming: the finished layers again"):
            run(unrefined_states, decode_layer_weights(load_file(str(quantized_dir / layer_file(i))), i, out_features,
                                                       device))
            unquantized = layer_weights(ckpt, cfg, i, torch.float16, device)
            run(unquantized_states, {k: v.float() for k, v in unquantized.items()})
            run(quantized_states, decode_layer_weights(load_file(str(state_dir / layer_file(i))), i, out_features,
                                                       device))

        def set_up(i: int) -> _LayerSetup:
            """Layer i of the quantization pass and what its fit starts from. Reads no device value, so that it can
            be queued while the GPU runs the previous layer's steps."""
            layer = load_file(str(quantized_dir / layer_file(i)))
            keys = [layer_prefix(i) + name for name in LINEARS]
            linears = [ScaledLinear(linear_tensors(layer, key), key, out_features[name], device, dtype)
                       for key, name in zip(keys, LINEARS)]
            norms = [ScaledNorm(layer[layer_prefix(i) + name], device) for name in NORMS]
            codes = [LinearCodes(linear_tensors(layer, key), key, out_features[name], device)
                     for key, name in zip(keys, LINEARS)]
            return _LayerSetup(layer, decode_layer_weights(layer, i, out_features, device), linears, norms, codes,
                               Multipliers(linears, norms, device))

        # The next layer is set up during this layer's last steps where it fits beside them (AHEAD_BYTES).
        set_up_ahead = AHEAD_BYTES_PER_WEIGHT * sum(o * k for o, k in shapes.values()) <= AHEAD_BYTES
        ahead: list[_LayerSetup] = []
        fitted_shapes: set[tuple[torch.Size, ...]] = set()  # of each part's latent values, fitted so far in this run
        layers = range(start, cfg.num_hidden_layers)
        for i, unquantized in zip(progress.track(layers, "refining"),
                                  layers_ahead(ckpt, cfg, layers, torch.float16, device)):
            layer, unrefined, linears, norms, codes, multipliers = ahead.pop() if ahead else set_up(i)
            run(unrefined_states, unrefined)
            del unrefined

            # The target: the unquantized layer on the unquantized model's states (kept for the next layer).
            run(unquantized_states, {k: v.float() for k, v in unquantized.items()})

            def loss_on(batch: Tensor, scaled_weights: ScaledWeights) -> Tensor:
                """The loss on rows `batch` of the layer whose linears `scaled_weights` gives for their input
                features' factors (the group multipliers)."""
                linear_factors, norm_weights = multipliers.expand(dtype)
                weights = scaled_weights(list(linear_factors))
                w: dict[str, Tensor] = {}
                for name, linear, (weight, input_scale) in zip(LINEARS, linears, weights):
                    w[f"{name}.weight"] = weight
                    if input_scale is not None:
                        w[f"{name}.input_scale"] = input_scale
                    if linear.bias is not None:
                        w[f"{name}.bias"] = linear.bias
                w.update(zip(NORMS, norm_weights))
                y = decoder_layer(quantized_states[batch].to(dtype), w, cfg, compute_rope)
                return squared_relative_error(y, unquantized_states[batch])

            def judged_loss() -> Tensor:
                """The layer's loss on each chunk of the held-out rows, with the current codes and multipliers, on
                the device: `mean_loss` reads it when the value is needed, and the host goes on meanwhile."""
                with torch.no_grad():
                    weights = [c.weight(dtype) for c in codes]

                    def scaled(factors: list[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
                        return list(zip(weights, factors))

                    return torch.stack([loss_on(b, scaled) for b in judged_batches])

            def mean_loss(chunk_losses: Tensor) -> float:
                return sum(value * len(b) for value, b in zip(chunk_losses.tolist(), judged_batches)) / len(judging)

            # Read once the first part's steps are done (run_steps waits for them): until then the host sets up
            # the fit while the GPU runs the passes above and this loss.
            judged_before = judged_loss()
            before = loss = None
            kept = 0
            for slices in parts:
                part = _Part(slices, codes, dtype)
                code_optimizer = Adam(part.flat, lr, decay)
                scale_optimizer = Adam(multipliers.log, scale_lr, decay)
                log_before = multipliers.log.detach().clone()

                def train_step(step: Tensor) -> Tensor:
                    step_loss = loss_on(at_step(batches, step), part.weights)
                    code_grad, scale_grad = torch.autograd.grad(step_loss, [part.flat, multipliers.log])
                    code_optimizer.step(code_grad, step)
                    scale_optimizer.step(scale_grad, step)
                    return step_loss.detach()

                next_layer_now = set_up_ahead and slices is parts[-1] and i + 1 < cfg.num_hidden_layers
                meanwhile = (lambda k=i + 1: ahead.append(set_up(k))) if next_layer_now else None
                # Ordinary steps before the capture only for a part of shapes not yet fitted in this run (layers
                # differ in their groups, which only torch's own indexing sees).
                shapes_seen = tuple(part.shapes) in fitted_shapes
                fitted_shapes.add(tuple(part.shapes))
                steps_started = time.perf_counter()
                run_steps(train_step, steps, device, meanwhile=meanwhile,
                          eager_steps=0 if shapes_seen else EAGER_STEPS)
                steps_seconds += time.perf_counter() - steps_started
                if before is None:
                    before = loss = mean_loss(judged_before)
                # A fit that did not lower the loss on rows it was not trained on (a rate too high for the
                # calibration rows, say) is dropped: those codes and the multipliers stay as they were.
                saved = [codes[s.linear].codes[s.rows].clone() for s in slices]
                part.store()
                fitted = mean_loss(judged_loss())
                if not math.isfinite(fitted):
                    raise ExlbuildError(f"refining layer {i} diverged (its loss became NaN or infinite); "
                                        "lower refine.lr")
                if fitted < loss:
                    loss, kept = fitted, kept + 1
                else:
                    for s, old in zip(slices, saved):
                        codes[s.linear].codes[s.rows] = old
                    with torch.no_grad():
                        multipliers.log.copy_(log_before)
                del part, code_optimizer, scale_optimizer

            # The layer as written: its codes packed on the device, copied to host memory with the multipliers, and
            # one read (of the counts, after the copies) before the next layer's inputs are queued; its file is
            # written while the GPU runs them.
            packed = [linear_codes.pack() for linear_codes in codes]
            host_q_weights = [to_host(q_weight) for q_weight, _ in packed]
            log = to_host(multipliers.log.detach())
            changed = torch.stack([c.changed_from(layer[f"{linear.key}.q_weight"]) for linear, c in zip(linears, codes)])
            out_of_range = torch.stack([flag for _, flag in packed]).any()
            codes_changed, out_of_range = torch.stack([changed.sum(), out_of_range.long()]).tolist()
            if out_of_range:
                raise ValueError(f"layer {i}: refined codes out of range for their bit widths")
            refined = dict(layer)
            for k, (linear, q_weight) in enumerate(zip(linears, host_q_weights)):
                refined.update({f"{linear.key}.{s}": t for s, t in linear.tuned(multipliers.of_linear(k, log)).items()})
                refined[f"{linear.key}.q_weight"] = q_weight
            for k, (name, norm) in enumerate(zip(NORMS, norms)):
                refined[layer_prefix(i) + name] = norm.tuned(multipliers.of_norm(k, log))

            # The next layer's inputs: this layer as written, decoded as the loader does (from the same codes, still
            # on the device). Nothing waits for this pass before the next layer's fit is set up.
            on_device = {**refined, **{f"{linear.key}.q_weight": q_weight
                                       for linear, (q_weight, _) in zip(linears, packed)}}
            run(quantized_states, decode_layer_weights(on_device, i, out_features, device,
                                                       groups=dict(zip(LINEARS, (c.groups for c in codes)))))
            save_file({k: v.contiguous() for k, v in refined.items()}, str(state_dir / layer_file(i)))
            layer_metrics.append({"loss_before": before, "loss_after": loss, "parts": len(parts), "kept": kept,
                                  "codes_changed": codes_changed})
            checkpoint.save(i + 1, {}, {"fingerprint": fingerprint, "layers": layer_metrics})

    # From here only the tracked rows matter: both models' other states (GBs at 70B) go before the heads come.
    refined_states, target_states = quantized_states[tracked], unquantized_states[held_out]
    quantized_states = unquantized_states = None
    head_tensors = load_file(str(quantized_dir / HEAD_FILE))
    save_file(head_tensors, str(out_dir / HEAD_FILE))
    save_file(global_tensors, str(out_dir / GLOBALS_FILE))
    with torch.no_grad():
        head, _ = decode_linear(linear_tensors(head_tensors, HEAD_KEY), HEAD_KEY, cfg.vocab_size, device,
                                torch.float32)
        final_norm = global_tensors[FINAL_NORM_KEY].to(device).float()
        model_check = {"kept": True}
        if held_out:
            # Each layer was judged on its own; judge their sum, on the same held-out rows, by what the model
            # predicts (the refinement's codes and norms against the quantization pass's, the same head).
            target = (target_states, norm_weight(ckpt, torch.float32, device),
                      head_weight(ckpt, cfg, torch.float32, device), cfg.rms_norm_eps)
            judged = [tracked.index(r) for r in held_out]
            before = next_token_kl(unrefined_states[judged].to(device), final_norm, head, *target)[0].item()
            after = next_token_kl(refined_states[judged], final_norm, head, *target)[0].item()
            model_check = {"kl_before": before, "kl_after": after, "kept": after < before}
        final_states = refined_states[:metric_rows]  # `tracked` starts with the metric's rows
        if not model_check["kept"]:
            final_states = unrefined_states[:metric_rows].to(device)
        written = state_dir if model_check["kept"] else quantized_dir
        for i in range(cfg.num_hidden_layers):
            shutil.copyfile(written / layer_file(i), out_dir / layer_file(i))
        ppl = calibration_perplexity(final_states, ids[:metric_rows], final_norm, head, cfg.rms_norm_eps)
    if temporary is not None:
        temporary.cleanup()
    return {
        "calibration_perplexity": ppl,
        "held_out_rows": len(held_out),
        "layers": layer_metrics,
        "model_check": model_check,
        "codes_changed": sum(m["codes_changed"] for m in layer_metrics) if model_check["kept"] else 0,
        "seconds": time.perf_counter() - started,
        "seconds_steps": steps_seconds,
    }
