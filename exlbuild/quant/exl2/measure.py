"""The EXL2 measurement pass (docs/exl2-format.md 4.5): the accuracy and cost of every candidate of every block.

For each block (attention, then MLP, per layer) with its reference inputs, every distinct option of each linear
is quantized from the reference Hessians, and every candidate of the block's list (3.4) is scored by how far
the block's output moves: accuracy = 1 − mean over rows of ‖Y_c − Y_ref‖_F / ‖Y_ref‖_F.

All candidates of a block are evaluated together, with a leading candidate dimension: each linear's
dequantized options are stacked; a projection of the block's normed input (q/k/v, gate/up), which every
candidate shares, is one GEMM over its distinct options whose outputs are then picked per candidate;
attention, the activation and the output projection (o, down) run batched over candidates. The next block
reads the reference outputs, never quantized states.

Sensitivity (exlbuild's addition; the reference has none). A block's accuracy says how far its own output
moves, not what that costs at the model's output, and the two differ by two orders of magnitude between
blocks: where one token's residual is huge, a change that matters is small relative to the block's output.
So the pass also carries a probe to the output: on the first `probe_tokens` calibration tokens (the first
tokens of the first rows: attention is causal, so they do not depend on the rest), each block's output is
replaced by that of one candidate (the one closest to PROBE_BITS bits per weight), and that perturbed copy of
the states runs through the rest of the unquantized model, beside the reference states. At the end, each
copy's next-token distribution is compared with the reference's (KL divergence): the block's Sensitivity.
The allocation weighs each block's squared error by it (exlbuild.quant.allocate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from exlbuild import progress
from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import Device, embedding_weight, head_weight, layers_ahead, norm_weight, open_model
from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import (
    LINEAR_INPUTS,
    Rope,
    attention,
    embed,
    final_logits,
    gated_activation,
    rms_norm,
    rope_tables,
)
from exlbuild.quant.exl2.measurement_json import (
    MeasuredCandidate,
    Measurement,
    Sensitivity,
    make_measurement,
    measurement_to_json,
    parse_measurement,
)
from exlbuild.quant.exl2.options import ATTN_CANDIDATES, MLP_CANDIDATES, CandidateTable, QuantOption, total_bits
from exlbuild.quant.exl2.quantize import RowLoopGraphs, quantize_options, row_loop_graphs
from exlbuild.quant.gptq import PreparedHessian, prepare_hessian
from exlbuild.quant.stream import (
    BLOCK_MODULES,
    STATE_DTYPE,
    Block,
    LayerCheckpoint,
    block_weights,
    check_calibration_ids,
    pass_precision,
    relative_error,
    run_block,
)

CANDIDATES: dict[Block, CandidateTable] = {"attention": ATTN_CANDIDATES, "mlp": MLP_CANDIDATES}

# quantize_options needs ~7 bytes per weight and option (11 in float64); options beyond this budget go in further
# calls.
QUANTIZE_BYTES = 1 << 30
# Candidate-pass intermediates are (candidates, rows, tokens, width); rows per chunk keep one under this many elements.
EVAL_ELEMENTS = 1 << 25
# A block's dequantized candidate weights wait in host memory when they take more than this in float16 (a
# 70B-shaped MLP's 40 distinct options: 19 GB), and the candidate pass takes as many candidates at a time as
# fit this in the passes' dtype on the device (for small models: all of them, in one pass).
CANDIDATE_BYTES = 4 << 30
MIN_BEST_ACCURACY = 0.1
# The sensitivity probe's default size in tokens (recipe: measurement.probe_tokens), and the bits per weight of
# the candidate that perturbs each block (KL grows with the square of a small error, so any mid-range candidate
# gauges the slope; 4 bits keeps the perturbation well above rounding noise and below breakage).
PROBE_TOKENS = 1024
PROBE_BITS = 4.0


@dataclass(frozen=True, eq=False)
class CandidateLinear:
    """One linear layer's weights for all candidates: candidate c uses weights[index[c]]."""

    weights: Tensor  # (distinct, out, in): the dequantized values (float16 where stored, float32 to compute)
    index: Tensor  # (candidates,) int64, on the weights' device
    bias: Tensor | None  # (out,), unquantized and shared

    def select(self, candidates: Sequence[int], device: torch.device, dtype: torch.dtype) -> "CandidateLinear":
        """The weights that `candidates` use, in `dtype` on `device`, indexed by position in `candidates`."""
        used, index = torch.unique(self.index[list(candidates)], return_inverse=True)
        weights = self.weights[used.to(self.weights.device)].to(device, dtype)
        return CandidateLinear(weights, index.to(device), self.bias)

    def shared_input(self, x: Tensor) -> Tensor:
        """(…, in) read by every candidate → (candidates, …, out): one GEMM over the distinct weights."""
        distinct, out, _ = self.weights.shape
        y = F.linear(x, self.weights.flatten(0, 1))
        y = y.unflatten(-1, (distinct, out)).movedim(-2, 0)[self.index]
        return y if self.bias is None else y + self.bias

    def per_candidate(self, x: Tensor) -> Tensor:
        """(candidates, …, in), one input per candidate → (candidates, …, out): a batched GEMM."""
        y = torch.bmm(x.flatten(1, -2), self.weights[self.index].transpose(1, 2)).unflatten(1, x.shape[1:-1])
        return y if self.bias is None else y + self.bias


def candidate_outputs(
    block: Block, x: Tensor, w: dict[str, Tensor], linears: dict[str, CandidateLinear], cfg: LlamaConfig, rope: Rope
) -> Tensor:
    """The block's output (candidates, rows, tokens, hidden) for x (rows, tokens, hidden), with each candidate's
    weights in place of `linears` (keyed by projection) and the rest of `w`: llama.py's block math, batched."""
    if block == "attention":
        h = rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
        q, k, v = (linears[p].shared_input(h) for p in ("q_proj", "k_proj", "v_proj"))
        return x + linears["o_proj"].per_candidate(attention(q, k, v, cfg, rope))
    h = rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    m = gated_activation(linears["gate_proj"].shared_input(h), linears["up_proj"].shared_input(h))
    return x + linears["down_proj"].per_candidate(m)


def distinct_layouts(weight_shape: Sequence[int], options: Sequence[QuantOption]) -> list:
    """The group layouts of `options` on a weight of this (out, in) shape, each once, in first-use order.

    Options that cut a weight into the same groups quantize identically (the quantizer sees only the groups),
    so the de-duplication is by layout, which also merges options that differ only at other shapes.
    """
    return list(dict.fromkeys(option.groups(weight_shape[1]) for option in options))


def quantize_candidates(
    weight: Tensor, bias: Tensor | None, prepared: PreparedHessian, options: Sequence[QuantOption], layer: str,
    storage: torch.device | str | None = None, graphs: RowLoopGraphs | None = None,
) -> CandidateLinear:
    """Quantize one linear for a column of the candidate table (3.5): each distinct layout once. The float16
    results are kept on `storage` (default: the weight's device). `graphs`: quantize_options' row loop graphs."""
    layouts = [option.groups(weight.shape[1]) for option in options]
    distinct = distinct_layouts(weight.shape, options)
    chosen = [options[layouts.index(layout)] for layout in distinct]
    storage = torch.device(storage or weight.device)
    per_call = max(1, QUANTIZE_BYTES // ((3 + prepared.inverse_factor.element_size()) * weight.numel()))
    weights = []
    for start in range(0, len(chosen), per_call):
        results = quantize_options(weight, prepared, chosen[start : start + per_call], layer, graphs)
        weights += [r.weight.to(storage) for r in results]
        del results  # the quantizer's work tensors of this call, before the next one
    index = torch.tensor([distinct.index(layout) for layout in layouts], device=storage)
    return CandidateLinear(torch.stack(weights), index, bias)


@torch.inference_mode()
def measure_block(
    block: Block,
    x: Tensor,
    w: dict[str, Tensor],
    cfg: LlamaConfig,
    rope: Rope,
    module: str | None = None,
    probe: tuple[int, int] | None = None,
    graphs: RowLoopGraphs | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[MeasuredCandidate], Tensor, Tensor | None]:
    """Measure every candidate of one block (4.5) on reference inputs x (rows, tokens, hidden), computing in
    `dtype` (the passes' dtype: float32 or float64).

    Returns the candidates in list order, the reference output Y_ref (the next block's input, in x's dtype)
    and, if `probe` = (rows, tokens) is given, the output of the candidate closest to PROBE_BITS on
    x[:rows, :tokens] (in x's dtype; else None). `module` names the block in errors (e.g. model.layers.3.mlp).
    `graphs`: the measurement's row loop graphs (quantize_options).
    """
    module = module or BLOCK_MODULES[block]
    table = CANDIDATES[block]
    y_ref = torch.empty_like(x)
    hessians = run_block(block, x, w, cfg, rope, out=y_ref, hessians=True, module=f"{module} (unquantized)",
                         dtype=dtype)
    w = block_weights(block, w, dtype)

    columns = {p: [candidate[c] for candidate in table.candidates] for c, p in enumerate(table.projections)}
    weight_of = {p: w[f"{BLOCK_MODULES[block]}.{p}.weight"] for p in table.projections}
    stored_bytes = sum(2 * weight_of[p].numel() * len(distinct_layouts(weight_of[p].shape, columns[p]))
                       for p in table.projections)
    storage = x.device if stored_bytes <= CANDIDATE_BYTES else torch.device("cpu")
    prepared: dict[str, PreparedHessian] = {}  # k/v share attn_kv_input's, gate/up mlp_input's
    linears: dict[str, CandidateLinear] = {}
    for projection in table.projections:
        name = f"{BLOCK_MODULES[block]}.{projection}"
        point = LINEAR_INPUTS[name]
        if point not in prepared:
            prepared[point] = prepare_hessian(hessians.pop(point), f"{module}.{projection}")
        linears[projection] = quantize_candidates(weight_of[projection], w.get(name + ".bias"), prepared[point],
                                                  columns[projection], f"{module}.{projection}", storage, graphs)
    del prepared

    rows, tokens, _ = x.shape
    n = len(table.candidates)
    per_candidate = dtype.itemsize * sum(weight_of[p].numel() for p in table.projections)
    group = max(1, CANDIDATE_BYTES // per_candidate)
    width = max(linear.weights.shape[1] for linear in linears.values())
    error_sums = torch.zeros(n, dtype=torch.float64)
    for first in range(0, n, group):
        candidates = range(first, min(first + group, n))
        chosen = {p: linear.select(candidates, x.device, dtype) for p, linear in linears.items()}
        chunk = max(1, EVAL_ELEMENTS // (len(candidates) * tokens * width))
        for start in range(0, rows, chunk):
            with pass_precision(x.device):
                y = candidate_outputs(block, x[start : start + chunk].to(dtype), w, chosen, cfg, rope)
            ref = y_ref[start : start + chunk]
            # Each candidate's relative_error (the row mean of the chunk), read once for all of them (a read waits
            # for the GPU), weighed by the chunk's rows for the mean over all rows.
            errors = torch.stack([relative_error(y_c, ref, dtype) for y_c in y]).cpu()
            error_sums[first : first + len(candidates)] += errors.double() * ref.shape[0]
        del chosen
    if torch.isnan(error_sums).any():
        raise ExlbuildError(f"{module}: a quantized candidate of this block outputs NaN on the calibration rows")
    accuracies = (1.0 - error_sums / rows).clamp(min=1e-6).tolist()
    if max(accuracies) < MIN_BEST_ACCURACY:
        raise ExlbuildError(
            f"{module}: the best candidate's accuracy is {max(accuracies):.4f}, below {MIN_BEST_ACCURACY}; "
            f"this block cannot be quantized to EXL2 with these calibration rows"
        )

    shapes = {p: weight.shape for p, weight in weight_of.items()}
    has_bias = {p: f"{BLOCK_MODULES[block]}.{p}.bias" in w for p in table.projections}
    measured = []
    for accuracy, candidate in zip(accuracies, table.candidates):
        options = dict(zip(table.projections, candidate))
        bits = sum(total_bits(o, shapes[p][1], shapes[p][0], has_bias[p]) for p, o in options.items())
        measured.append(MeasuredCandidate(accuracy, bits, options))

    if probe is None:
        return measured, y_ref, None
    weights = sum(weight.numel() for weight in weight_of.values())
    c = min(range(n), key=lambda j: abs(measured[j].total_bits / weights - PROBE_BITS))
    chosen = {p: linear.select([c], x.device, dtype) for p, linear in linears.items()}
    probe_x = x[: probe[0], : probe[1]].to(dtype)
    with pass_precision(x.device):
        return measured, y_ref, candidate_outputs(block, probe_x, w, chosen, cfg, rope)[0].to(x.dtype)


@torch.inference_mode()
def output_divergence(reference: Tensor, perturbed: Tensor, norm_w: Tensor, head_w: Tensor, eps: float) -> Tensor:
    """Mean KL(p_reference ‖ p_perturbed) per token, in nats, of the next-token distributions that final hidden
    states give: reference (rows, tokens, hidden), perturbed (copies, rows, tokens, hidden) → (copies,), computed in
    the head weight's dtype. One row of logits at a time (a row's logits are the largest tensor here)."""
    kl = torch.zeros(perturbed.shape[0], dtype=torch.float64)
    dtype = head_w.dtype
    for r in range(reference.shape[0]):
        ref = F.log_softmax(final_logits(reference[r].to(dtype), norm_w, head_w, eps), dim=-1)
        for c in range(perturbed.shape[0]):
            out = F.log_softmax(final_logits(perturbed[c, r].to(dtype), norm_w, head_w, eps), dim=-1)
            kl[c] += F.kl_div(out, ref, log_target=True, reduction="sum").item()
    return (kl / reference.shape[:2].numel()).clamp(min=0.0)


def _notes(modules: dict[str, list[MeasuredCandidate]]) -> dict[str, Any]:
    """The modules measured so far as measurement.json data (a resume note)."""
    return measurement_to_json(make_measurement(modules))


def _from_notes(notes: dict[str, Any], source: str) -> dict[str, list[MeasuredCandidate]]:
    if not notes:
        return {}
    partial = parse_measurement(notes, source)
    return {key: list(candidates) for key, candidates in partial.modules.items() if candidates is not None}


@torch.inference_mode()
def measure_model(
    model_dir: Path,
    ids: Tensor,
    state_dir: Path | None = None,
    rope_scale: float | None = None,
    rope_alpha: float | None = None,
    device: Device = None,
    probe_tokens: int = PROBE_TOKENS,
    dtype: torch.dtype = torch.float32,
) -> Measurement:
    """Measure every decoder block of a model on calibration token rows `ids` (rows, length), with each block's
    Sensitivity (module docstring) from a probe of about `probe_tokens` tokens (0: none, and no sensitivity);
    blocks, GPTQ and the probe's divergences compute in `dtype` (recipe.PASS_DTYPES), the states between blocks
    are held in STATE_DTYPE.

    Streams one layer's weights at a time; the hidden states of all rows stay on `device` (None: CPU), and so
    do the probe's perturbed copies (one per block measured). With `state_dir`, progress is saved after every
    layer and a later call with the same directory resumes there.
    """
    cfg, ckpt = open_model(model_dir, rope_scale=rope_scale, rope_alpha=rope_alpha)
    device = torch.device(device or "cpu")
    ids = check_calibration_ids(ids, cfg).to(device)
    rope = rope_tables(cfg, ids.shape[1], device, dtype)
    # The probe: x[:rows, :tokens]. perturbed[j] is it with block j's output replaced by its probe candidate's.
    probe = (min(ids.shape[0], -(-probe_tokens // ids.shape[1])), min(ids.shape[1], probe_tokens))
    perturbed = torch.empty(2 * cfg.num_hidden_layers if probe_tokens else 0, *probe, cfg.hidden_size,
                            dtype=STATE_DTYPE, device=device)

    checkpoint = LayerCheckpoint(Path(state_dir)) if state_dir is not None else None
    start, saved, notes = checkpoint.load() if checkpoint else (0, {}, {})
    modules = _from_notes(notes, f"{state_dir}/progress.json")
    probe_errors: list[float] = notes.get("probe_errors", [])
    expected_shape = (*ids.shape, cfg.hidden_size)
    if not saved:
        x = embed(ids, embedding_weight(ckpt, torch.float16, device))
    elif tuple(saved["x"].shape) != expected_shape or saved["perturbed"].shape[1:] != perturbed.shape[1:]:
        raise ExlbuildError(
            f"{state_dir}: saved states have shape {tuple(saved['x'].shape)}, this run needs {expected_shape}; "
            f"it belongs to another measurement (delete it to start over)"
        )
    else:
        x = saved["x"]
        perturbed[: len(probe_errors)] = saved["perturbed"]
    x = x.to(device, STATE_DTYPE)
    del saved

    with checkpoint or contextlib.nullcontext(), row_loop_graphs(device) as graphs:
        layers = range(start, cfg.num_hidden_layers)
        # (float16: rounded as the reference loads them, 4.2)
        for i, w in zip(progress.track(layers, "measuring layers"), layers_ahead(ckpt, cfg, layers, torch.float16,
                                                                                   device)):
            for block in ("attention", "mlp"):
                key = f"model.layers.{i}.{BLOCK_MODULES[block]}"
                w_block = block_weights(block, w, dtype)  # converted once: what the block's passes compute with
                if probe_errors:  # the copies perturbed at earlier blocks go on through this one
                    carried = perturbed[: len(probe_errors)].flatten(0, 1)
                    run_block(block, carried, w_block, cfg, rope, out=carried, module=f"{key} (sensitivity probe)",
                              dtype=dtype)
                modules[key], x, probe_out = measure_block(block, x, w_block, cfg, rope, module=key,
                                                           probe=probe if probe_tokens else None, graphs=graphs,
                                                           dtype=dtype)
                del w_block
                if probe_tokens:
                    probe_errors.append(relative_error(probe_out, x[: probe[0], : probe[1]], dtype).item())
                    perturbed[len(probe_errors) - 1] = probe_out
            del w  # free this layer before the next one loads
            if checkpoint:
                checkpoint.save(i + 1, {"x": x, "perturbed": perturbed[: len(probe_errors)]},
                                {**_notes(modules), "probe_errors": probe_errors})

    if not probe_tokens:
        return make_measurement(modules)
    kl = output_divergence(x[: probe[0], : probe[1]], perturbed, norm_weight(ckpt, dtype, device),
                           head_weight(ckpt, cfg, dtype, device), cfg.rms_norm_eps).tolist()
    sensitivity = {key: Sensitivity(k, e) for key, k, e in zip(modules, kl, probe_errors)}
    return make_measurement(modules, sensitivity=sensitivity)
