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
from typing import Any, Callable, Iterator

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
    model_bytes,
    norm_weight,
    open_model,
    require_device_memory,
)
from exlbuild.model.llama import Rope, decoder_layer, embed, final_logits, rope_tables
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
)
from exlbuild.quant.exl2.pack import input_feature_groups
from exlbuild.quant.stream import LINEARS, NORMS, check_calibration_ids

EAGER_STEPS = 3  # ordinary steps on CUDA before the step is captured as a graph


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
        self.weight = weight.to(device, torch.float32)

    def tuned(self, log_multiplier: Tensor) -> Tensor:
        return (self.stored.float() * log_multiplier.cpu().exp()).half()


class _ExpandGroups(torch.autograd.Function):
    """values[index] with a backward that sums each value's features in a fixed order (gathered into a padded
    (values, members) table, then summed along rows): index_select's backward adds atomically on CUDA."""

    @staticmethod
    def forward(ctx, values: Tensor, index: Tensor, members: Tensor) -> Tensor:
        ctx.save_for_backward(members)
        return values[index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (members,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros(1)])[members].sum(1), None, None


class Multipliers:
    """The log-multipliers of every tuned tensor in one vector (one tensor for the optimizer), initially 0 (the
    GPTQ result): first the linears' groups, then the norms' features. `expand` gives the factor of every input
    feature of each linear and of every feature of each norm."""

    def __init__(self, linears: list[ScaledLinear], norms: list[ScaledNorm], device: torch.device) -> None:
        group_counts = [linear.groups for linear in linears]
        self.group_starts = [sum(group_counts[:k]) for k in range(len(linears) + 1)]
        index = torch.cat([linear.feature_group.cpu() + start for linear, start in zip(linears, self.group_starts)])
        # members[g] lists the features of group g, padded with len(index) (a zero appended to the gradient).
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=self.group_starts[-1])
        first = torch.cumsum(counts, 0) - counts
        members = torch.full((len(counts), int(counts.max())), len(index), dtype=torch.long)
        members[index[order], torch.arange(len(index)) - first[index[order]]] = order
        self.index, self.members = index.to(device), members.to(device)
        self.features = [linear.feature_group.numel() for linear in linears]
        norm_sizes = [norm.weight.numel() for norm in norms]
        self.norm_starts = [self.group_starts[-1] + sum(norm_sizes[:k]) for k in range(len(norms) + 1)]
        self.norm_features = norm_sizes
        self.log = torch.zeros(self.norm_starts[-1], device=device, requires_grad=True)

    def expand(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """(each linear's factor per input feature, each norm's factor per feature), in the given orders."""
        factor = self.log.exp()
        groups = self.group_starts[-1]
        per_feature = _ExpandGroups.apply(factor[:groups], self.index, self.members)
        return per_feature.split(self.features), factor[groups:].split(self.norm_features)

    def of_linear(self, k: int) -> Tensor:
        return self.log.detach()[self.group_starts[k]:self.group_starts[k + 1]]

    def of_norm(self, k: int) -> Tensor:
        return self.log.detach()[self.norm_starts[k]:self.norm_starts[k + 1]]


class Adam:
    """Adam (Kingma & Ba, default betas) on one tensor, in place, with its state and step count on the tensor's
    device so that a step can be captured in a CUDA graph. (Not torch.optim: constructing one imports PyTorch's
    compiler stack, ~900 modules, seconds of the first tuned variant where they are not byte-compiled.)"""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.mean, self.square = torch.zeros_like(param), torch.zeros_like(param)
        self.count = torch.zeros((), dtype=torch.float64, device=param.device)  # 1 − 0.999ᵗ needs the digits

    @torch.no_grad()
    def step(self, grad: Tensor, lr_factor: float | Tensor = 1.0) -> None:
        """One update; `lr_factor` scales the learning rate (a schedule)."""
        b1, b2 = self.betas
        self.count += 1
        self.mean.lerp_(grad, 1 - b1)
        self.square.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        unbiased_mean = self.mean / (1 - b1 ** self.count).to(self.param.dtype)
        unbiased_square = self.square / (1 - b2 ** self.count).to(self.param.dtype)
        self.param.sub_(self.lr * lr_factor * unbiased_mean / (unbiased_square.sqrt() + self.eps))


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


def run_steps(train_step: Callable[[], Tensor], prepare: Callable[[int], None], steps: int, device: torch.device,
              label: str | None = None) -> list[float]:
    """`steps` times: prepare(step), then train_step(), which returns the step's loss; the losses, read once at the
    end (no wait for the GPU within the loop). train_step may read only tensors that prepare fills in place: on
    CUDA, after EAGER_STEPS ordinary steps (on a side stream, as a capture requires), it is captured once as a
    CUDA graph and replayed. A step is thousands of small kernels, and launching them one by one from Python
    took longer than running them."""
    cuda = device.type == "cuda"
    losses = torch.zeros(steps, device=device)
    graph, static_loss = None, None
    side = torch.cuda.Stream(device) if cuda else None
    if cuda:
        side.wait_stream(torch.cuda.current_stream(device))
    for step in progress.track(range(steps), label) if label else range(steps):
        if cuda and step >= EAGER_STEPS:
            if graph is None:
                # Captured on the side stream, once its steps are done (torch.cuda.graph would also empty the
                # allocator's cache, a second lost here).
                side.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.stream(side):
                    graph.capture_begin()
                    static_loss = train_step()
                    graph.capture_end()
                torch.cuda.current_stream(device).wait_stream(side)
            prepare(step)
            graph.replay()
            losses[step] = static_loss
        else:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                prepare(step)
                losses[step] = train_step()
    if cuda:
        torch.cuda.current_stream(device).wait_stream(side)
    values = losses.tolist()
    if graph is not None:
        # Give the graph's memory pool back. cuBLAS keeps a workspace per (handle, stream) for the process's life;
        # one first taken inside the capture lies in the graph's pool and would keep all of it (GBs) allocated, so
        # the workspaces go too (as PyTorch's own graph trees do). Even empty, the pool stays reserved until the
        # cache is emptied: one pool per tuned variant filled the H100 at the fifth.
        del static_loss
        graph.reset()
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
    return values


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

    # On CUDA both models run in bfloat16, weights and activations (the multipliers and their updates stay float32).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    both = 2 * model_bytes(cfg, dtype) - cfg.vocab_size * cfg.hidden_size * dtype.itemsize  # one embedding, shared
    require_device_memory(both, device, "the tuning (tune.steps > 0: the FP16 and the quantized model on the GPU "
                          "together, before any activation)", "set tune.steps=0 for this model")
    out_features = {name: shape.out_features for name, shape in linear_shapes(cfg).items()}
    linears = [[ScaledLinear(linear_tensors(layer, layer_prefix(i) + name), layer_prefix(i) + name, out_features[name],
                             device, dtype) for name in LINEARS] for i, layer in enumerate(layers)]
    norms = [[ScaledNorm(layer[layer_prefix(i) + name], device) for name in NORMS] for i, layer in enumerate(layers)]
    head = ScaledLinear(linear_tensors(head_tensors, HEAD_KEY), HEAD_KEY, cfg.vocab_size, device, dtype)
    final_norm = ScaledNorm(global_tensors[FINAL_NORM_KEY], device)
    all_linears = [linear for layer in linears for linear in layer] + [head]
    all_norms = [norm for layer in norms for norm in layer] + [final_norm]
    multipliers = Multipliers(all_linears, all_norms, device)
    fixed = [{f"{name}.weight": decode_linear(linear.tensors, linear.key, linear.out_features, device, dtype)[0]
              for name, linear in zip(LINEARS, layer)} for layer in linears]
    student_head, _ = decode_linear(head.tensors, HEAD_KEY, cfg.vocab_size, device, dtype)
    for layer, weights in zip(linears, fixed):
        weights.update({f"{name}.bias": linear.bias for name, linear in zip(LINEARS, layer) if linear.bias is not None})
    embedding = global_tensors[EMBEDDING_KEY].to(device, dtype)
    teacher = [{k: v.to(dtype) for k, v in layer_weights(ckpt, cfg, i, torch.float16, device).items()}
               for i in range(cfg.num_hidden_layers)]
    teacher_norm = norm_weight(ckpt, torch.float16, device).to(dtype)
    teacher_head = head_weight(ckpt, cfg, torch.float16, device).to(dtype)
    rope = rope_tables(cfg, ids.shape[1], device)  # float32, for the perplexity of what is written
    compute_rope = Rope(rope.cos.to(dtype), rope.sin.to(dtype))

    def hidden(x: Tensor, weights: Callable[[int], dict[str, Tensor]]) -> Tensor:
        for i in range(cfg.num_hidden_layers):
            x = decoder_layer(x, weights(i), cfg, compute_rope)
        return x

    def student_logits(x: Tensor) -> Tensor:
        linear_factors, norm_factors = multipliers.expand()
        per_layer = len(LINEARS), len(NORMS)

        def layer(i: int) -> dict[str, Tensor]:
            w = dict(fixed[i])
            for j, name in enumerate(LINEARS):
                w[f"{name}.input_scale"] = linear_factors[i * per_layer[0] + j].to(dtype)
            for j, (name, norm) in enumerate(zip(NORMS, norms[i])):
                w[name] = (norm.weight * norm_factors[i * per_layer[1] + j]).to(dtype)
            return w

        # The head's multipliers scale its input features, as the final norm's do.
        norm = (final_norm.weight * norm_factors[-1] * linear_factors[-1]).to(dtype)
        return final_logits(hidden(x, layer), norm, student_head, cfg.rms_norm_eps)

    def train_step(batch: Tensor) -> Tensor:
        """One Adam step on the KL divergence over the rows `batch`; returns the KL (per token, nats)."""
        x = embed(batch, embedding)
        with torch.no_grad():
            target = F.log_softmax(final_logits(hidden(x, teacher.__getitem__), teacher_norm, teacher_head,
                                               cfg.rms_norm_eps).float(), dim=-1)
        logits = student_logits(x).float()
        kl = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="sum") / batch.numel()
        (grad,) = torch.autograd.grad(kl, multipliers.log)
        optimizer.step(grad)
        return kl.detach()

    optimizer = Adam(multipliers.log, lr)
    rows = ids.shape[0]
    device_ids = ids.to(device)
    step_rows = min(rows_per_step, rows)
    static_batch = device_ids[:step_rows].clone()

    def prepare(step: int) -> None:
        static_batch.copy_(device_ids[(torch.arange(step_rows, device=device) + step * step_rows) % rows])

    with deterministic_algorithms():
        kl_per_step = run_steps(lambda: train_step(static_batch), prepare, steps, device, "tuning")
    if not all(math.isfinite(k) for k in kl_per_step):
        raise ExlbuildError("tuning diverged (the KL divergence became NaN or infinite); lower tune.lr")

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
            x = decoder_layer(x, decode_layer_weights(layer, i, out_features, device), cfg, rope)
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
        "seconds": time.perf_counter() - started,
    }

