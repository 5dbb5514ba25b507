"""The EXL2 quantization pass (docs/exl2-format.md 4.8): GPTQ every decoder linear with its block's chosen
option, layer by layer, each layer fed the outputs of the already quantized layers before it; then the head.

What the pass writes into `out_dir` (read by `exlbuild.quant.exl2.compile`):

    layers/{i:05d}.safetensors   layer i: the EXL2 tensors of its seven linears under their full keys
                                 (model.layers.3.mlp.up_proj.q_weight, …) and its two norm weights in fp16
    head.safetensors             lm_head.q_* (quantized from the embedding when the model ties them)
    globals.safetensors          model.embed_tokens.weight and model.norm.weight in fp16

Source weights are rounded to fp16 first, as the reference loads them (4.2), so the values quantized, the
values the forward passes use and the values written are the same.

Each finished layer's file goes to the state directory and is the checkpoint (LayerCheckpoint records how far the
pass got): an interrupted pass runs the calibration rows through the finished layers again, as written, and goes on
at its next layer. That gives back the states it had bit for bit (the same decoded weights through the same block
passes) for the cost of a forward pass, where writing the states after every layer (236 MB a layer at the
reference sizes, 3.4 GB at 70B) took about as long as the layer on a GPU. `out_dir` is only filled at the end, with a
complete result.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from exlbuild import progress
from exlbuild.errors import ExlbuildError
from exlbuild.hashing import hash_bytes, hash_json
from exlbuild.model.checkpoint import (
    Device,
    embedding_weight,
    head_weight,
    layer_prefix,
    layer_tensor_shapes,
    layers_ahead,
    norm_weight,
    open_model,
)
from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import LINEAR_INPUTS, Rope, embed, rms_norm, rope_tables
from exlbuild.quant.allocate import allocate
from exlbuild.quant.exl2.measurement_json import LinearShape, Measurement, measurement_to_json
from exlbuild.quant.exl2.options import Group, QuantOption, head_option, option_from_json, pad_to_32, total_bits
from exlbuild.quant.exl2.pack import REQUIRED_KEYS, dequantize, validate_layer
from exlbuild.quant.exl2.quantize import RowLoopGraphs, pack_layer, quantize_options, row_loop_graphs
from exlbuild.quant.gptq import HessianAccumulator, PreparedHessian, prepare_hessian
from exlbuild.quant.stream import (  # noqa: F401 (BLOCK_NORMS: re-exported for compile)
    BLOCK_LINEARS,
    BLOCK_MODULES,
    BLOCK_NORMS,
    LINEARS,
    NORMS,
    STATE_DTYPE,
    Block,
    LayerCheckpoint,
    check_calibration_ids,
    not_finite,
    relative_error,
    resume_point,
    run_block,
)
from exlbuild.transfer import to_device, to_host

LAYERS_DIR = "layers"
HEAD_FILE = "head.safetensors"
GLOBALS_FILE = "globals.safetensors"
HEAD_KEY = "lm_head"
EMBEDDING_KEY = "model.embed_tokens.weight"
FINAL_NORM_KEY = "model.norm.weight"
# Strategy keys are `model.layers.{i}.<module>`, as in measurement.json.

Strategy = Mapping[str, Mapping[str, QuantOption]]


def layer_file(i: int) -> str:
    """Path of layer i's tensors, relative to the pass's output (and state) directory."""
    return f"{LAYERS_DIR}/{i:05d}.safetensors"


def linear_shapes(cfg: LlamaConfig) -> dict[str, LinearShape]:
    """Shape of each decoder linear, keyed relative to the layer (self_attn.q_proj, …), in model order."""
    shapes = layer_tensor_shapes(cfg)
    return {
        name: LinearShape(shapes[f"{name}.weight"][1], shapes[f"{name}.weight"][0], f"{name}.bias" in shapes)
        for linears in BLOCK_LINEARS.values()
        for name in linears
    }


def decoder_linears(cfg: LlamaConfig) -> dict[str, LinearShape]:
    """Full key → shape of every decoder linear, in model order (what the bit budget counts)."""
    per_layer = linear_shapes(cfg)
    return {layer_prefix(i) + name: s for i in range(cfg.num_hidden_layers) for name, s in per_layer.items()}


def block_options(strategy: Strategy, cfg: LlamaConfig) -> dict[str, dict[str, QuantOption]]:
    """The strategy checked against the model: block key (model.layers.{i}.self_attn, ….mlp) → relative
    linear name (self_attn.q_proj, …) → option, for every block in model order."""
    resolved: dict[str, dict[str, QuantOption]] = {}
    for i in range(cfg.num_hidden_layers):
        for block, module in BLOCK_MODULES.items():
            key = layer_prefix(i) + module
            if key not in strategy:
                raise ExlbuildError(f"the strategy has no options for {key}")
            options = {}
            for name in BLOCK_LINEARS[block]:
                projection = name.partition(".")[2]
                if projection not in strategy[key]:
                    raise ExlbuildError(f"the strategy for {key} has no option for {projection}")
                options[name] = strategy[key][projection]
            resolved[key] = options
    extra = sorted(set(strategy) - set(resolved))
    if extra:
        raise ExlbuildError(f"the strategy names modules this model does not have: {', '.join(extra[:3])}")
    return resolved


def allocate_strategy(measurement: Measurement, cfg: LlamaConfig, bits: float) -> dict[str, Any]:
    """The allocation (4.7) of `measurement` at `bits` per weight: one candidate per block, as JSON data
    (budget, achieved bits, objective and its lower bound, and `strategy`: block key → the chosen
    candidate's entry of measurement.json with its index).

    With the measurement's sensitivities the objective is the predicted KL divergence at the model's output,
    Σ sensitivity · (1 − accuracy)²; without them (a measurement made by exllamav2) it is Σ (1 − accuracy)²."""
    modules = [k for k, v in measurement.modules.items() if v]
    # The budget counts decoder linears only, output widths padded as stored.
    numel = sum(s.in_features * pad_to_32(s.out_features) for s in decoder_linears(cfg).values())
    budget = int(numel * bits)
    candidates = [measurement.modules[k] for k in modules]
    weights = [measurement.sensitivity[k].weight for k in modules] if measurement.sensitivity else None
    try:
        solution = allocate([[c.total_bits for c in cands] for cands in candidates],
                            [[1.0 - c.accuracy for c in cands] for cands in candidates], budget,
                            weights=weights, numel=numel)
    except ExlbuildError as e:
        raise ExlbuildError(f"bits {bits}: {e}") from None
    chosen = measurement_to_json(measurement)["measurement"]
    return {"bits": bits, "numel": numel, "budget": budget, "total_bits": solution.cost,
            "bits_per_weight": solution.cost / numel,
            "objective_kind": "predicted KL (sensitivity-weighted squared error)" if weights
            else "squared error (no sensitivity measured)",
            "objective": solution.objective, "lower_bound": solution.lower_bound,
            "strategy": {key: {"candidate": j, **chosen[key][j]} for key, j in zip(modules, solution.choice)}}


def strategy_from_json(strategy: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, QuantOption]]:
    """allocate_strategy's `strategy` as options: block key → projection (q_proj, …) → QuantOption."""
    projections = [name.partition(".")[2] for linears in BLOCK_LINEARS.values() for name in linears]
    return {module: {p: option_from_json(entry[p], f"{module}.{p}") for p in projections if p in entry}
            for module, entry in strategy.items()}


def decoder_bits_per_weight(options: Mapping[str, Mapping[str, QuantOption]], cfg: LlamaConfig) -> float:
    """Σ total_bits / Σ in × padded out over the decoder linears: the measure the allocation budgets (4.7)."""
    shapes = linear_shapes(cfg)
    bits = weights = 0
    for block in options.values():
        for name, option in block.items():
            s = shapes[name]
            bits += total_bits(option, s.in_features, s.out_features, s.bias)
            weights += s.in_features * pad_to_32(s.out_features)
    return bits / weights


def linear_tensors(tensors: dict[str, Tensor], key: str) -> dict[str, Tensor]:
    """The tensors of one linear (q_weight, …) from a file's dict of full names."""
    return {s: tensors[f"{key}.{s}"] for s in (*REQUIRED_KEYS, "bias") if f"{key}.{s}" in tensors}


def linear_bias(tensors: dict[str, Tensor], out_features: int, device: torch.device,
                dtype: torch.dtype) -> Tensor | None:
    """The bias (or None) of one EXL2 linear on `device` in `dtype`: stored padded to 32 outputs, cut to
    `out_features`."""
    return to_device(tensors["bias"][:out_features].to(dtype), device) if "bias" in tensors else None


def decode_linear(tensors: dict[str, Tensor], key: str, out_features: int, device: torch.device,
                  dtype: torch.dtype, groups: tuple[Group, ...] | None = None) -> tuple[Tensor, Tensor | None]:
    """The (out, in) weight and the bias (or None) of one EXL2 linear, decoded on `device` (where the kernels
    are; its structure checked where the tensors are, a file's in host memory, unless `groups` gives it: see
    dequantize) and cast to `dtype`."""
    weight = dequantize(tensors, out_features, key, device, groups).to(dtype)
    return weight, linear_bias(tensors, out_features, device, dtype)


def decode_layer_weights(tensors: dict[str, Tensor], i: int, out_features: dict[str, int],
                         device: torch.device, dtype: torch.dtype = torch.float32,
                         groups: dict[str, tuple[Group, ...]] | None = None) -> dict[str, Tensor]:
    """Decoder layer i of the quantization pass's layout (a file's dict of full names) as the forward's weights in
    `dtype`, its linears decoded as the loader decodes them; `groups`, by linear name: their structure, for tensors
    the caller made (not checked, so that tensors on the device are not read)."""
    weights = {name: to_device(tensors[layer_prefix(i) + name].to(dtype), device) for name in NORMS}
    for name in LINEARS:
        key = layer_prefix(i) + name
        weight, bias = decode_linear(linear_tensors(tensors, key), key, out_features[name], device, dtype,
                                     None if groups is None else groups[name])
        weights[f"{name}.weight"] = weight
        if bias is not None:
            weights[f"{name}.bias"] = bias
    return weights


def _quantize_linear(
    weight: Tensor, prepared: PreparedHessian, option: QuantOption, key: str, bias: Tensor | None,
    graphs: RowLoopGraphs | None = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """quantize_linear, its checks left to the caller (reading device values waits for the GPU, so a block reads
    those of all its linears at once): the EXL2 tensors on their way to host memory, the decoded weight, and the
    (3,) int64 `faults` on the device that _check_linear reads."""
    result = quantize_options(weight, prepared, [option], key, graphs)[0]
    out_of_range = torch.zeros((), dtype=torch.bool, device=result.codes.device)
    tensors = pack_layer(result, bias, out_of_range)
    # Decoded with the quantizer's own groups, not parsed from the device (_check_linear checks the host copies).
    decoded = dequantize(tensors, weight.shape[0], key, groups=result.groups)
    differ_bits = (decoded.view(torch.int16) != result.weight.view(torch.int16)).sum()
    faults = torch.stack([out_of_range.long(), differ_bits, (decoded != result.weight).sum()])
    return {suffix: to_host(t) for suffix, t in tensors.items()}, decoded, faults


def _check_linear(key: str, option: QuantOption, tensors: dict[str, Tensor], shape: torch.Size,
                  faults: list[int]) -> None:
    """Raise for what _quantize_linear found in one (out, in) weight of `shape`, given its `faults` as read and its
    EXL2 tensors in host memory: codes out of range, a tensor set the loader rejects, decoded values other than
    the quantizer's."""
    out_of_range, differ_bits, differ = faults
    if out_of_range:
        raise ValueError(f"{key}: codes out of range for their bit widths")
    validate_layer(tensors, layer=key, in_features=shape[1], out_features=shape[0], bias="bias" in tensors)
    if differ_bits:
        raise ExlbuildError(
            f"{key}: the packed tensors decode to values other than the quantizer's in {differ} of "
            f"{shape.numel()} weights (option {option}); this is a bug in the EXL2 packer or decoder"
        )


def quantize_linear(
    weight: Tensor, prepared: PreparedHessian, option: QuantOption, key: str, bias: Tensor | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """GPTQ (4.9) and packing (2.1) of one (out, in) weight: its EXL2 tensors (keys q_weight, …, bias; in host
    memory) and the fp16 weight they decode to.

    Decoding must reproduce the quantizer's own fp16 result bit for bit, or this raises: our counterpart of the
    reference's reconstruction self-check (4.8 step 3), and what makes later layers see what the loader computes.
    """
    tensors, decoded, faults = _quantize_linear(weight, prepared, option, key, bias)
    _check_linear(key, option, tensors, weight.shape, faults.tolist())  # (the read: the copies are done)
    return tensors, decoded


@dataclass(frozen=True)
class QuantizedPass:
    """A block's quantized pass as launched, its checks still on the device: read with the next block's (a read
    waits for the GPU, so the host queues the next block's work while the GPU runs this pass)."""

    module: str  # the block's key (model.layers.3.self_attn)
    finite: Tensor  # 0-dim bool: every output finite in the states' dtype
    rfn_error: Tensor  # 0-dim float32

    def checks(self) -> Tensor:
        """(2,) float64 on the device: what `settle` takes, once read."""
        return torch.stack([self.finite.double(), self.rfn_error.double()])

    def settle(self, read: list[float], rfn_error: dict[str, float]) -> None:
        """Raise if the outputs were not finite, else put rfn_error into `rfn_error`, from `checks` as read."""
        finite, error = read
        if not finite:
            raise not_finite(f"{self.module} (quantized)", STATE_DTYPE)
        rfn_error[self.module] = error


def _quantize_linears(
    block: Block, w: dict[str, Tensor], hessians: dict[str, Tensor], options: Mapping[str, QuantOption], prefix: str,
    speculative: bool, graphs: RowLoopGraphs | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[tuple[str, QuantOption, dict[str, Tensor], torch.Size]],
           list[Tensor], list[Tensor]]:
    """Every linear of the block quantized from its input's Hessian (popped from `hessians`): the decoded weights by
    name, the EXL2 tensors by full key (on their way to host memory), what _check_linear needs of each linear besides
    its faults, each linear's faults and, where `speculative` (prepare_hessian), each prepared Hessian's `usable`."""
    prepared: dict[str, PreparedHessian] = {}
    decoded_w: dict[str, Tensor] = {}
    packed: dict[str, Tensor] = {}
    checks, faults, usable = [], [], []
    for name in BLOCK_LINEARS[block]:
        point, key = LINEAR_INPUTS[name], prefix + name
        if point not in prepared:  # k/v share one Hessian, as do gate/up
            prepared[point] = prepare_hessian(hessians.pop(point), key, speculative)
            if speculative:
                usable.append(prepared[point].usable)
        weight = w[f"{name}.weight"]
        tensors, decoded, found = _quantize_linear(weight, prepared[point], options[name], key, w.get(f"{name}.bias"),
                                                   graphs)
        decoded_w[f"{name}.weight"] = decoded
        packed.update({f"{key}.{suffix}": t for suffix, t in tensors.items()})
        checks.append((key, options[name], tensors, weight.shape))
        faults.append(found.double())
    return decoded_w, packed, checks, faults, usable


def quantize_block(
    block: Block,
    x: Tensor,
    w: dict[str, Tensor],
    options: Mapping[str, QuantOption],
    cfg: LlamaConfig,
    rope: Rope,
    prefix: str,
    rfn_error: dict[str, float],
    previous: QuantizedPass | None = None,
    error_rows: int = 16,
    graphs: RowLoopGraphs | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], QuantizedPass]:
    """4.8 steps 1–4 for one block: Hessians of the unquantized block `w` (fp16 weights) on inputs x (rows,
    tokens, hidden), each linear quantized with options[name], then the block rerun with the decoded weights; the
    passes and GPTQ in `dtype` (float32 or float64: recipe.PASS_DTYPES).

    The quantized block's outputs (the next block's inputs) replace x in place: the pass holds one copy of the
    states. Returns the EXL2 tensors keyed by full name (on the CPU) and the quantized pass as launched: its
    rfn_error against the unquantized outputs (over the first `error_rows` rows, whose unquantized outputs are all
    that is kept) goes into `rfn_error` when the next block reads it (or the caller: QuantizedPass.settle). `w` is
    not modified. `graphs`: the pass's row loop graphs (quantize_options).

    The block reads device values once (each read waits for the GPU): after its quantization is queued and before
    its quantized pass, `previous` block's checks with its own, the Hessians prepared speculatively. Where one did not
    work at the first damping, the block's Hessians are made and prepared again, reading as they go (the retries, or
    the error), and its linears quantized again: the same result as preparing them so at first.
    """
    module = prefix + BLOCK_MODULES[block]
    reference = torch.empty_like(x[:error_rows])
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    hessians = run_block(block, x, w, cfg, rope, out=reference, hessians=True, finite=finite, dtype=dtype)
    decoded_w, packed, checks, faults, usable = _quantize_linears(block, w, hessians, options, prefix, True, graphs)
    del hessians
    earlier = [] if previous is None else [previous.checks()]
    # The read (float64 holds the counts and the float32 error exactly); the host copies queued before are done then.
    read = torch.cat([*earlier, finite.double()[None], torch.stack(usable).all().double()[None], *faults]).tolist()
    if previous is not None:
        previous.settle(read[:2], rfn_error)
        read = read[2:]
    finite_outputs, usable_hessians, *counts = read
    if not finite_outputs:
        raise not_finite(f"{module} (unquantized)", reference.dtype)
    if not usable_hessians:
        hessians = run_block(block, x, w, cfg, rope, out=reference, hessians=True, module=f"{module} (unquantized)",
                             dtype=dtype)
        decoded_w, packed, checks, faults, _ = _quantize_linears(block, w, hessians, options, prefix, False, graphs)
        del hessians
        counts = torch.cat(faults).tolist()
    for k, check in enumerate(checks):
        _check_linear(*check, [int(c) for c in counts[3 * k : 3 * k + 3]])
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    run_block(block, x, {**w, **decoded_w}, cfg, rope, out=x, finite=finite, dtype=dtype)
    return packed, QuantizedPass(module, finite, relative_error(x[:error_rows], reference))


def replay_layer(x: Tensor, tensors: dict[str, Tensor], i: int, out_features: dict[str, int], cfg: LlamaConfig,
                 rope: Rope, dtype: torch.dtype = torch.float32) -> None:
    """x (rows, tokens, hidden) through layer i as the pass wrote it (`tensors`, its file), in place: the same block
    passes (in `dtype`) on the same decoded weights as the pass's own update of x (quantize_block), so the same
    states."""
    weights = decode_layer_weights(tensors, i, out_features, x.device, dtype)
    for block, module in BLOCK_MODULES.items():
        run_block(block, x, weights, cfg, rope, out=x, module=layer_prefix(i) + module, dtype=dtype)


def final_norm_hessian(states: Tensor, norm_w: Tensor, eps: float) -> Tensor:
    """The Hessian of the head's input: the final norm of `states` (rows, length, hidden), row by row, in the norm
    weight's dtype."""
    hessian = HessianAccumulator(states.shape[-1], states.device, norm_w.dtype)
    for row in states:
        hessian.add(rms_norm(row.to(norm_w.dtype), norm_w, eps))
    return hessian.hessian()


def calibration_perplexity(states: Tensor, ids: Tensor, norm_w: Tensor, head_w: Tensor, eps: float) -> float:
    """4.8 step 5: exp(−mean log p(ids[t+1] | logits[t])) over t < length−1 of every row, logits in float32
    from the final norm of `states` (rows, length, hidden) and the head weight (vocab, hidden)."""
    # Summed on the device in float64, as Python floats would sum the rows' values: a read per row waits for the GPU.
    nll = torch.zeros((), dtype=torch.float64, device=states.device)
    for row, target in zip(states, to_device(ids, states.device)):
        logits = F.linear(rms_norm(row[:-1].float(), norm_w, eps), head_w).float()
        nll += F.cross_entropy(logits, target[1:], reduction="sum").double()
    return math.exp(nll.item() / (ids.shape[0] * (ids.shape[1] - 1)))


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


@torch.inference_mode()
def quantize_model(
    model_dir: Path,
    ids: Tensor,
    strategy: Strategy,
    head_bits: int,
    out_dir: Path,
    state_dir: Path | None = None,
    rope_scale: float | None = None,
    rope_alpha: float | None = None,
    device: Device = None,
    metric_rows: int = 16,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Quantize the model in `model_dir` with `strategy` (block key → projection → option, as the allocation
    chose), calibrated on token rows `ids` (rows, length), the head with head_option(head_bits); write the
    tensors to `out_dir` (see the module docstring). The passes and GPTQ compute in `dtype` (recipe.PASS_DTYPES).

    `state_dir` holds the per-layer checkpoints (a temporary directory when None). Returns metrics:
    calibration_perplexity and rfn_error per block key (both on the first `metric_rows` rows), bits_per_weight of the
    decoder linears and head_bits_per_weight (from the options' exact storage), seconds.
    """
    started = time.perf_counter()
    cfg, ckpt = open_model(model_dir, rope_scale=rope_scale, rope_alpha=rope_alpha)
    ids = check_calibration_ids(ids, cfg)
    options = block_options(strategy, cfg)
    bits_per_weight = decoder_bits_per_weight(options, cfg)  # also checks every option against its shape
    head = head_option(head_bits)
    head_bpw = total_bits(head, cfg.hidden_size, cfg.vocab_size) / (cfg.hidden_size * pad_to_32(cfg.vocab_size))
    if metric_rows < 1:
        raise ExlbuildError(f"metric_rows must be at least 1, got {metric_rows}")
    device = torch.device(device or "cpu")
    # What the saved layers depend on, so that a state directory of other inputs is never resumed.
    fingerprint = hash_json({
        "ids": hash_bytes(ids.numpy().tobytes()),
        "shape": list(ids.shape),
        "config": dataclasses.asdict(cfg),
        "strategy": {key: {name: str(o) for name, o in block.items()} for key, block in options.items()},
        **({} if dtype == torch.float32 else {"dtype": str(dtype)}),
    })

    with ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="exlbuild-exl2-")))
        state_dir = Path(state_dir)
        checkpoint = stack.enter_context(LayerCheckpoint(state_dir))
        graphs = stack.enter_context(row_loop_graphs(device))
        start, notes = resume_point(checkpoint, fingerprint,
                                    "a quantization pass of other inputs (model config, calibration or strategy)")
        embedding = embedding_weight(ckpt, torch.float16, device)
        x = embed(ids.to(device), embedding).to(STATE_DTYPE)
        embedding = embedding.cpu()  # only written at the end: 2 GB less on the device for a 128256 × 8192 table
        rfn_error: dict[str, float] = notes.get("rfn_error", {})
        rope = rope_tables(cfg, ids.shape[1], device, dtype)
        out_features = {name: s.out_features for name, s in linear_shapes(cfg).items()}
        for i in progress.track(range(start), "resuming: the finished layers again"):
            replay_layer(x, load_file(str(state_dir / layer_file(i))), i, out_features, cfg, rope, dtype)
        (state_dir / LAYERS_DIR).mkdir(parents=True, exist_ok=True)

        layers = range(start, cfg.num_hidden_layers)
        for i, w in zip(progress.track(layers, "quantizing layers"), layers_ahead(ckpt, cfg, layers, torch.float16,
                                                                                    device)):
            prefix = layer_prefix(i)
            tensors = {prefix + n: to_host(w[n]) for n in BLOCK_NORMS.values()}  # (done at quantize_block's read)
            launched = None
            for block, module in BLOCK_MODULES.items():
                key = prefix + module
                packed, launched = quantize_block(block, x, w, options[key], cfg, rope, prefix, rfn_error, launched,
                                                  metric_rows, graphs, dtype)
                tensors.update(packed)
            del w  # free this layer before the next one loads
            # The layer's last read, before its checkpoint: every layer a resumed pass starts after was checked.
            launched.settle(launched.checks().tolist(), rfn_error)
            _save_atomic(tensors, state_dir / layer_file(i))
            checkpoint.save(i + 1, {}, {"fingerprint": fingerprint, "rfn_error": rfn_error})

        # The head, from the Hessian of the final norm's output on the quantized states (4.8 step 1).
        norm_w = norm_weight(ckpt, torch.float16, device)
        head_hessian = final_norm_hessian(x, norm_w.to(dtype), cfg.rms_norm_eps)
        rows = min(metric_rows, ids.shape[0])
        x = x[:rows].clone()  # all the rest needs; the states of the other rows are freed before the head
        head_tensors, head_decoded = quantize_linear(
            head_weight(ckpt, cfg, torch.float16, device), prepare_hessian(head_hessian, HEAD_KEY), head, HEAD_KEY
        )
        ppl = calibration_perplexity(x, ids[:rows], norm_w.float(), head_decoded.float(), cfg.rms_norm_eps)

        out_dir = Path(out_dir)
        (out_dir / LAYERS_DIR).mkdir(parents=True, exist_ok=True)
        for i in range(cfg.num_hidden_layers):
            shutil.copyfile(state_dir / layer_file(i), out_dir / layer_file(i))
        save_file({f"{HEAD_KEY}.{k}": t for k, t in head_tensors.items()}, str(out_dir / HEAD_FILE))
        save_file({EMBEDDING_KEY: embedding.cpu(), FINAL_NORM_KEY: norm_w.cpu()}, str(out_dir / GLOBALS_FILE))

    return {
        "calibration_perplexity": ppl,
        "rfn_error": rfn_error,
        "bits_per_weight": bits_per_weight,
        "head_bits_per_weight": head_bpw,
        "seconds": time.perf_counter() - started,
    }
