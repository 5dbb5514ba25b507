"""Tuning what an EXL2 model keeps in fp16 (docs/exl2.md, "tuned"): after GPTQ has fixed every code and scale
nibble, each group's q_scale_max and every RMSNorm weight are still free. They are fitted to the unquantized
model by minimising the KL divergence of its next-token distributions on the calibration rows, with Adam on
log-multipliers (initially 0: the GPTQ result), so that the later layers compensate the earlier layers' errors,
which GPTQ, one linear at a time, cannot do.

A group's q_scale_max multiplies every scale of its group (2.6), so a multiplier on it scales the input features
that the group quantized; a norm weight scales one input feature of the linears after it. The rule reads and
writes the quantization pass's layout (exlbuild.quant.exl2.convert: layers/, head, globals), changing only
those tensors.

Memory: the unquantized model's final states of every row are computed once, one layer at a time; a step keeps
only each quantized layer's input for the backward pass (the layer runs again there) and takes the KL a slice of
tokens at a time. The decoded layers stay on the device where they fit; otherwise (70B-class) each is decoded
from host memory whenever a step needs it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from exlbuild import progress
from exlbuild.cuda_graph import capture, release
from exlbuild.errors import ExlbuildError
from exlbuild.kernels.adam import adam_update
from exlbuild.kernels.expand import Expansion, expand, expand_backward
from exlbuild.kernels.kl_divergence import kl_divergence
from exlbuild.model.checkpoint import (
    Device,
    free_device_memory,
    head_weight,
    layer_prefix,
    layer_bytes,
    norm_weight,
    open_model,
    require_device_memory,
)
from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import Rope, decoder_layer, embed, final_logits, forward_hidden, rope_tables
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
    linear_bias,
    linear_shapes,
    linear_tensors,
    replay_layer,
)
from exlbuild.quant.exl2.pack import input_feature_groups
from exlbuild.quant.stream import LINEARS, NORMS, check_calibration_ids, chunk_rows
from exlbuild.transfer import to_device

EAGER_STEPS = 3  # ordinary steps on CUDA before the step is captured as a graph
LOGIT_ELEMENTS = 1 << 25  # logits of a slice of tokens in next_token_kl, at most


class ScaledLinear:
    """An EXL2 linear whose groups' q_scale_max are tuned: one multiplier per group, applied to the input features
    the group quantized (the same as scaling its weights, and far cheaper to differentiate). Its bias is on the
    device; the weight is decoded by whoever needs it (the tuning decodes it once, the refinement rebuilds it from
    its latent codes)."""

    def __init__(self, tensors: dict[str, Tensor], key: str, out_features: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.tensors = tensors
        self.key = key
        self.out_features = out_features
        self.bias = linear_bias(tensors, out_features, device, dtype)
        self.feature_group = input_feature_groups(tensors, key)
        self.groups = tensors["q_scale_max"].shape[0]

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
        self.weight = to_device(weight.float(), device)

    def tuned(self, log_multiplier: Tensor) -> Tensor:
        return (self.stored.float() * log_multiplier.cpu().exp()).half()


class _Expanded(torch.autograd.Function):
    """exp(log) expanded to one factor per feature in a compute dtype (exlbuild.kernels.expand), with its gradient:
    one kernel each way, whose sums over each value's features run in a fixed order (index_select's backward adds
    atomically on CUDA)."""

    @staticmethod
    def forward(ctx, log: Tensor, expansion: Expansion, dtype: torch.dtype) -> Tensor:
        values = log.exp()
        ctx.save_for_backward(values)
        ctx.expansion = expansion
        return expand(values, expansion, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (values,) = ctx.saved_tensors
        return expand_backward(grad, values, ctx.expansion), None, None


class Multipliers:
    """The log-multipliers of every tuned tensor in one vector (one tensor for the optimizer), initially 0 (the
    GPTQ result): first the linears' groups, then the norms' features. `expand` gives the factor of every input
    feature of each linear and the weight times the factor of every feature of each norm. Reads no device value: the
    refinement sets up the next layer's multipliers while the GPU runs the steps before."""

    def __init__(self, linears: list[ScaledLinear], norms: list[ScaledNorm], device: torch.device) -> None:
        group_counts = [linear.groups for linear in linears]
        self.group_starts = [sum(group_counts[:k]) for k in range(len(linears) + 1)]
        norm_sizes = [norm.weight.numel() for norm in norms]
        self.norm_starts = [self.group_starts[-1] + sum(norm_sizes[:k]) for k in range(len(norms) + 1)]
        self.features = [linear.feature_group.numel() for linear in linears]
        self.norm_features = norm_sizes
        # Each output feature's value: its group's for a linear's, its own for a norm's; and its base.
        source = torch.cat([*(linear.feature_group.cpu() + start for linear, start in zip(linears, self.group_starts)),
                            torch.arange(self.group_starts[-1], self.norm_starts[-1])])
        base = torch.cat([torch.ones(sum(self.features), device=device), *(norm.weight.to(device) for norm in norms)])
        self.expansion = Expansion.of(source, base, self.norm_starts[-1])
        self.log = torch.zeros(self.norm_starts[-1], device=device, requires_grad=True)

    def expand(self, dtype: torch.dtype) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """(each linear's factor per input feature, each norm's weight times its factor per feature), in the given
        orders, in `dtype`."""
        expanded = _Expanded.apply(self.log, self.expansion, dtype).split([*self.features, *self.norm_features])
        return expanded[: len(self.features)], expanded[len(self.features):]

    def of_linear(self, k: int, log: Tensor | None = None) -> Tensor:
        """Linear k's log-multipliers, of `log` (a copy of them in host memory, say) or else of the live ones."""
        return (self.log.detach() if log is None else log)[self.group_starts[k]:self.group_starts[k + 1]]

    def of_norm(self, k: int, log: Tensor | None = None) -> Tensor:
        """Norm k's log-multipliers, as of_linear."""
        return (self.log.detach() if log is None else log)[self.norm_starts[k]:self.norm_starts[k + 1]]


class Adam:
    """Adam (Kingma & Ba, default betas) on one tensor, in place, for `len(factors)` steps whose learning rate is `lr`
    times factors[t] at step t. Its state and every step's constants (a schedule, exlbuild.kernels.adam) are on the
    tensor's device, and a step takes its number as a tensor there, so that a step can be captured in a CUDA graph.
    (Not torch.optim: constructing one imports PyTorch's compiler stack, ~900 modules, seconds of the first tuned
    variant where they are not byte-compiled.)"""

    def __init__(self, param: Tensor, lr: float, factors: list[float], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.betas, self.eps = param, betas, eps
        self.mean, self.square = torch.zeros_like(param), torch.zeros_like(param)
        count = torch.arange(1, len(factors) + 1, dtype=torch.float64, device=param.device)  # 1 − 0.999ᵗ needs them
        # (From page-locked memory: a copy from pageable memory would wait for the GPU's queue.)
        step_size = to_device(torch.tensor(factors, dtype=param.dtype), param.device) * lr
        self.schedule = torch.stack([step_size, *((1 - b**count).to(param.dtype) for b in betas)], dim=1)

    @torch.no_grad()
    def step(self, grad: Tensor, step: Tensor) -> None:
        """The update of step number `step` (a 0-dim integer tensor on the device, from 0)."""
        adam_update(self.param, grad, self.mean, self.square, self.schedule, step, self.betas, self.eps)


class _Recomputed(torch.autograd.Function):
    """fn(*inputs), keeping only the inputs for the backward pass, which runs fn again with gradients on (activation
    checkpointing). torch.utils.checkpoint does the same but imports PyTorch's compiler stack on its first call
    (the same ~900 modules as torch.optim, ~1 s), once a build."""

    @staticmethod
    def forward(ctx, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)  # (autograd records nothing inside a Function's forward)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        inputs = [t.detach().requires_grad_(wanted) for t, wanted in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad))
        return None, *(next(grads) if t.requires_grad else None for t in inputs)


def activation_bytes(cfg: LlamaConfig, tokens: int, dtype: torch.dtype) -> int:
    """An upper estimate of what one decoder layer's forward keeps for its backward pass over `tokens` tokens, in
    `dtype`: per token, the norms' and linears' inputs and the projections (about 10 × hidden), the keys and values
    (4 × their width), the gate, up and activation of the MLP and the scaled copy of it (5 × intermediate)."""
    kv_width = cfg.num_key_value_heads * cfg.head_dim
    return tokens * (10 * cfg.hidden_size + 4 * kv_width + 5 * cfg.intermediate_size) * dtype.itemsize


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """PyTorch's deterministic kernels for the tuning loop, so that a rebuild on CUDA is byte-identical too (the
    fused attention's and the feature expansion's backward otherwise add atomically, in varying order). PyTorch
    allows cuBLAS in this mode only with a fixed workspace configuration; set it unless the user has.

    The switch is torch._C's: `torch.use_deterministic_algorithms` sets the same flag but first imports
    torch._inductor.config for its compiler's copy of it (the same ~900 modules as torch.optim, above), and
    nothing here is compiled."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch._C._set_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid the mode turns on; costly here
    try:
        yield
    finally:
        torch._C._set_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def cycled_rows(rows: int, rows_per_step: int, steps: int, device: torch.device) -> Tensor:
    """(steps, rows_per_step): the rows each step trains on, 0 … rows − 1 in order, cycling."""
    return (torch.arange(steps * rows_per_step, device=device) % rows).view(steps, rows_per_step)


def at_step(table: Tensor, step: Tensor) -> Tensor:
    """Row `step` (a 0-dim integer tensor) of `table`, on the device: the host never reads the step."""
    return table.index_select(0, step.view(1))[0]


def run_steps(train_step: Callable[[Tensor], Tensor], steps: int, device: torch.device, label: str | None = None,
              graph: bool = True, meanwhile: Callable[[], None] | None = None,
              eager_steps: int = EAGER_STEPS) -> list[float]:
    """`steps` times train_step(step), which returns the step's loss; step is the step's number (from 0) as a 0-dim
    integer tensor on the device, counted there, so that what changes from step to step (the rows, the rate) is
    looked up on the device (`at_step`). The losses are read once at the end (no wait for the GPU within the loop).
    On CUDA, after `eager_steps` ordinary steps (on a side stream, as a capture requires), the step is captured once
    as a CUDA graph and replayed (unless not `graph`: a step that waits for the device cannot be captured). A step is
    thousands of small kernels, and launching them one by one from Python took longer than running them.
    The ordinary steps first compile, load and allocate what the step needs; a caller that has run a step of the
    same kernels and shapes in this process already may pass 0: the step is then captured at once, while the GPU
    still runs the work queued before (the same steps either way, so the same bits).
    `meanwhile` is called once every step is queued, before the read: host work that reads no device value and
    needs none of the steps' results runs there while the GPU runs the steps."""
    cuda = device.type == "cuda"
    replayed = cuda and graph
    losses = torch.zeros(steps, device=device)
    counter = torch.zeros((), dtype=torch.long, device=device)

    def counted_step() -> Tensor:
        loss = train_step(counter)
        counter.add_(1)
        return loss

    captured, static_loss = None, None
    side = torch.cuda.Stream(device) if cuda else None
    if cuda:
        side.wait_stream(torch.cuda.current_stream(device))
    for step in progress.track(range(steps), label) if label else range(steps):
        if replayed and step >= eager_steps:
            if captured is None:
                # Captured on the side stream, once its ordinary steps are done.
                if eager_steps:
                    side.synchronize()
                captured, static_loss = capture(counted_step, side)
            captured.replay()
            losses[step] = static_loss
        else:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                losses[step] = counted_step()
    if cuda:
        torch.cuda.current_stream(device).wait_stream(side)
    if meanwhile is not None:
        meanwhile()
    values = losses.tolist()
    if captured is not None:
        del static_loss
        release([captured])
    return values


def next_token_kl(states: Tensor, norm_w: Tensor, head_w: Tensor, target_states: Tensor, target_norm_w: Tensor,
                  target_head_w: Tensor, eps: float, grad: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mean over tokens of KL(target ‖ model): the next-token distributions of the final states `target_states`
    (..., hidden) through their final norm and head, against those of `states` through theirs. Each side computes in
    its head's dtype, the distributions in float32, a slice of tokens at a time: the logits of all tokens at once
    are vocabulary × tokens floats (GBs at large vocabularies). Returns the KL as a 0-dim tensor (nothing waits for
    the device) and, with `grad`, its gradients with respect to `states` and `norm_w`."""
    flat, target_flat = states.flatten(0, -2), target_states.flatten(0, -2)
    tokens = flat.shape[0]
    per_slice = max(1, LOGIT_ELEMENTS // head_w.shape[0])
    total = torch.zeros((), device=flat.device)
    grad_states = torch.empty_like(flat) if grad else None
    norm = norm_w.detach().requires_grad_(grad)
    grad_norm = torch.zeros_like(norm_w) if grad else None
    for start in range(0, tokens, per_slice):
        x = flat[start:start + per_slice].detach().to(head_w.dtype).requires_grad_(grad)
        with torch.no_grad():
            t = target_flat[start:start + per_slice].to(target_head_w.dtype)
            target_logits = final_logits(t, target_norm_w, target_head_w, eps)
        with torch.enable_grad() if grad else torch.no_grad():
            kl = kl_divergence(final_logits(x, norm, head_w, eps), target_logits) / tokens
        if grad:
            grad_x, grad_n = torch.autograd.grad(kl, [x, norm])
            grad_states[start:start + per_slice] = grad_x
            grad_norm += grad_n
        total += kl.detach()
    return total, None if grad_states is None else grad_states.view_as(states), grad_norm


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
    stream_layers: bool | None = None,
    recompute: bool | None = None,
) -> dict[str, Any]:
    """Tune the quantization pass in `quantized_dir` towards the model in `model_dir` (module docstring) for
    `steps` Adam steps of `rows_per_step` calibration rows each (rows taken in order, cycling); write the result
    to `out_dir` in the same layout. `stream_layers`: decode each layer from host memory whenever a step needs it
    rather than keep every decoded layer on the device (None: only when they would take more than half of the
    device's free memory). `recompute`: keep only each layer's input for the backward pass and run the layer again
    there (None: where the layers are streamed, or where what every layer keeps for its backward would take more than
    a quarter of the device's free memory; never on the CPU); the same bits either way. Returns metrics: the mean
    KL per token (nats) of the first and the last pass over the rows, calibration_perplexity on the first
    `metric_rows` rows, whether the layers were streamed and recomputed, seconds (in all, and of the steps, their
    graph capture included)."""
    started = time.perf_counter()
    cfg, ckpt = open_model(model_dir, rope_scale=rope_scale, rope_alpha=rope_alpha)
    ids = check_calibration_ids(ids, cfg)
    device = torch.device(device or "cpu")
    quantized_dir, out_dir = Path(quantized_dir), Path(out_dir)
    layers = [load_file(str(quantized_dir / layer_file(i))) for i in range(cfg.num_hidden_layers)]
    head_tensors = load_file(str(quantized_dir / HEAD_FILE))
    global_tensors = load_file(str(quantized_dir / GLOBALS_FILE))

    # On CUDA both models run in bfloat16, weights and activations (the multipliers and their updates stay float32).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, length = ids.shape
    step_rows = min(rows_per_step, rows)
    states_bytes = (rows + cfg.num_hidden_layers * step_rows) * length * cfg.hidden_size * dtype.itemsize
    decoded_bytes = layer_bytes(cfg, dtype)
    if stream_layers is None:
        stream_layers = device.type == "cuda" and \
            cfg.num_hidden_layers * decoded_bytes > free_device_memory(device) // 2
    saved_bytes = cfg.num_hidden_layers * activation_bytes(cfg, step_rows * length, dtype)
    if recompute is None:
        recompute = stream_layers or device.type == "cuda" and saved_bytes > free_device_memory(device) // 4
    require_device_memory(
        states_bytes + 3 * cfg.vocab_size * cfg.hidden_size * dtype.itemsize
        + (2 if stream_layers else cfg.num_hidden_layers) * decoded_bytes + (0 if recompute else saved_bytes), device,
        "the tuning (tune.steps > 0: the FP16 model's final states of every calibration row, each layer's inputs "
        "of a step's rows, the embedding and both heads, the decoded layers, and unless recomputed what each layer "
        "keeps for the backward pass)",
        "set tune.steps=0 or lower tune.rows_per_step for this model")
    if stream_layers and device.type == "cuda":
        # Each layer's tensors wait in page-locked host memory and are decoded on the device at every use (its
        # forward, and again in the backward pass).
        layers = [{k: t.pin_memory() for k, t in layer.items()} for layer in layers]
    out_features = {name: shape.out_features for name, shape in linear_shapes(cfg).items()}
    linears = [[ScaledLinear(linear_tensors(layer, layer_prefix(i) + name), layer_prefix(i) + name, out_features[name],
                             device, dtype) for name in LINEARS] for i, layer in enumerate(layers)]
    norms = [[ScaledNorm(layer[layer_prefix(i) + name], device) for name in NORMS] for i, layer in enumerate(layers)]
    head = ScaledLinear(linear_tensors(head_tensors, HEAD_KEY), HEAD_KEY, cfg.vocab_size, device, dtype)
    final_norm = ScaledNorm(global_tensors[FINAL_NORM_KEY], device)
    all_linears = [linear for layer in linears for linear in layer] + [head]
    all_norms = [norm for layer in norms for norm in layer] + [final_norm]
    multipliers = Multipliers(all_linears, all_norms, device)
    rope = rope_tables(cfg, length, device)  # float32, for the perplexity of what is written
    compute_rope = Rope(rope.cos.to(dtype), rope.sin.to(dtype))

    # The FP16 model's part is the same at every step: its final states of every row, computed once, one layer at a
    # time; only its head stays on the device.
    targets = forward_hidden(ckpt, cfg, ids, dtype, device, batch_rows=chunk_rows(ids, cfg))
    target_norm, target_head = norm_weight(ckpt, dtype, device), head_weight(ckpt, cfg, dtype, device)

    def decoded_layer(i: int) -> dict[str, Tensor]:
        return decode_layer_weights(layers[i], i, out_features, device, dtype)  # its norms: see student_layer

    resident = [] if stream_layers else [decoded_layer(i) for i in range(cfg.num_hidden_layers)]

    def fixed(i: int) -> dict[str, Tensor]:
        return resident[i] if resident else decoded_layer(i)

    student_head, _ = decode_linear(head.tensors, HEAD_KEY, cfg.vocab_size, device, dtype)
    embedding = global_tensors[EMBEDDING_KEY].to(device, dtype)

    def student_layer(x: Tensor, i: int, linear_factors: list[Tensor], norm_weights: list[Tensor]) -> Tensor:
        w = dict(fixed(i))
        for name, factor in zip(LINEARS, linear_factors):
            w[f"{name}.input_scale"] = factor
        w.update(zip(NORMS, norm_weights))
        return decoder_layer(x, w, cfg, compute_rope)

    def train_step(step: Tensor) -> Tensor:
        """Adam step number `step` on the KL divergence over its rows; returns the KL (per token, nats)."""
        rows_now = at_step(batches, step)
        batch, batch_targets = device_ids[rows_now], targets[rows_now]
        linear_factors, norm_weights = multipliers.expand(dtype)
        per_layer = len(LINEARS), len(NORMS)
        x = embed(batch, embedding)
        for i in range(cfg.num_hidden_layers):
            factors = [*linear_factors[i * per_layer[0]:(i + 1) * per_layer[0]],
                       *norm_weights[i * per_layer[1]:(i + 1) * per_layer[1]]]

            def layer(x: Tensor, *f: Tensor, i: int = i) -> Tensor:
                return student_layer(x, i, f[:per_layer[0]], f[per_layer[0]:])

            # Recomputed, each layer keeps only its input for the backward pass: the activations of every layer at
            # once would not fit at 70B. (A quarter of the layer's work more where they fit: ~1 s of a SmolLM2 tuning
            # predicted; measured only together with the KL kernels, bench/NOTES.md §25.)
            x = _Recomputed.apply(layer, x, *factors) if recompute else layer(x, *factors)
        # The head's multipliers scale its input features, as the final norm's do.
        norm = norm_weights[-1] * linear_factors[-1]
        kl, grad_x, grad_norm = next_token_kl(x, norm, student_head, batch_targets, target_norm, target_head,
                                              cfg.rms_norm_eps, grad=True)
        (grad,) = torch.autograd.grad([x, norm], multipliers.log, grad_outputs=[grad_x, grad_norm])
        optimizer.step(grad, step)
        return kl

    optimizer = Adam(multipliers.log, lr, [1.0] * steps)
    device_ids = ids.to(device)
    batches = cycled_rows(rows, step_rows, steps, device)

    steps_started = time.perf_counter()
    with deterministic_algorithms():
        # Streamed layers are decoded at every step, which reads their group layout on the host: no CUDA graph.
        kl_per_step = run_steps(train_step, steps, device, "tuning", graph=not stream_layers)
    steps_seconds = time.perf_counter() - steps_started
    if not all(math.isfinite(k) for k in kl_per_step):
        raise ExlbuildError("tuning diverged (the KL divergence became NaN or infinite); lower tune.lr")
    del targets, target_head, embedding
    resident.clear()

    out_layers = []
    for i, layer in enumerate(layers):
        tuned = dict(layer)
        for j, linear in enumerate(linears[i]):
            tuned.update({f"{linear.key}.{s}": t
                          for s, t in linear.tuned(multipliers.of_linear(i * len(LINEARS) + j)).items()})
        for j, (name, norm) in enumerate(zip(NORMS, norms[i])):
            tuned[layer_prefix(i) + name] = norm.tuned(multipliers.of_norm(i * len(NORMS) + j))
        out_layers.append(tuned)
    head_out = {f"{HEAD_KEY}.{s}": t for s, t in head.tuned(multipliers.of_linear(len(all_linears) - 1)).items()}
    globals_out = {**global_tensors, FINAL_NORM_KEY: final_norm.tuned(multipliers.of_norm(len(all_norms) - 1))}

    # The calibration perplexity of what is written (its fp16 scales decoded as the loader does).
    with torch.no_grad():
        metric_ids = ids[: min(metric_rows, rows)].to(device)
        x = embed(metric_ids, global_tensors[EMBEDDING_KEY].to(device, torch.float32))
        for i, layer in enumerate(out_layers):
            replay_layer(x, layer, i, out_features, cfg, rope)
        head_decoded, _ = decode_linear(linear_tensors(head_out, HEAD_KEY), HEAD_KEY, cfg.vocab_size, device,
                                        torch.float32)
        ppl = calibration_perplexity(x, metric_ids, globals_out[FINAL_NORM_KEY].to(device).float(), head_decoded,
                                     cfg.rms_norm_eps)

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
        "streamed_layers": stream_layers,
        "recomputed_layers": recompute,
        "seconds": time.perf_counter() - started,
        "seconds_steps": steps_seconds,
    }

