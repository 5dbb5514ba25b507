"""The Triton kernels of exlbuild.kernels against their PyTorch references, on fresh random inputs.

On the CPU (CI) the kernels run in Triton's interpreter. Triton decides when it is imported whether
kernels are interpreted (kernels/runtime.py), and other test modules import it first, so every CPU
check runs in one child process started with TRITON_INTERPRET=1: this file, run as a script, reports
each check's outcome as JSON. The `gpu` tests run the same checks at real sizes on CUDA, in-process.

Integer outputs (codes, words) and the fp16 results of exact arithmetic must be equal bit for bit;
the scale search sums in another order, so its errors agree to the rounding of its dtype (float32 or
float64) and its choice must be optimal to that rounding.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from exlbuild.kernels.adam import adam_update_reference, adam_update_triton
import exlbuild.kernels.attention as attention_kernels
from exlbuild.kernels.attention import LaunchConfig, causal_attention_reference, causal_attention_triton
from exlbuild.kernels.attention_received import attention_received_reference, attention_received_triton
from exlbuild.kernels.decoder_ops import (
    gated_activation_reference,
    gated_activation_triton,
    rms_norm_reference,
    rms_norm_triton,
    rotary_reference,
    rotary_triton,
    scale_features_reference,
    scale_features_triton,
    squared_relative_error_reference,
    squared_relative_error_triton,
)
from exlbuild.kernels.expand import (
    Expansion,
    expand_backward_reference,
    expand_backward_triton,
    expand_reference,
    expand_triton,
)
from exlbuild.kernels.gptq_block import BLOCK_ROWS, BlockStep, gptq_block_step_reference, gptq_block_step_triton
from exlbuild.kernels.kl_divergence import kl_divergence_reference, kl_divergence_triton
from exlbuild.kernels.pack import (
    decode_layer_reference,
    decode_layer_triton,
    pack_bitstream_reference,
    pack_bitstream_triton,
    scale_from_nibbles,
    unpack_bitstream_reference,
    unpack_bitstream_triton,
)
from exlbuild.kernels.scale_search import (
    MULTIPLIER_POINTS,
    GroupBatch,
    SearchScratch,
    SearchTarget,
    column_errors_reference,
    find_group_scales,
    group_maximum,
    multiplier_grid,
    pick,
    pick_triton,
    search_batch_triton,
    search_triton,
)
from exlbuild.kernels.straight_through import (
    straight_through_backward_reference,
    straight_through_backward_triton,
    straight_through_weight_reference,
    straight_through_weight_triton,
)
from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import Rope, decoder_layer, rope_tables
from exlbuild.quant.exl2.options import BIT_WIDTHS, MLP_CANDIDATES, Group, QuantOption, head_option
from exlbuild.quant.exl2.quantize import quantize_options
from exlbuild.quant.gptq import prepare_hessian

CHECKS: dict[str, Callable[[str, bool, int], None]] = {}


def check(fn: Callable[[str, bool, int], None]) -> Callable[[str, bool, int], None]:
    """Register fn(device, real_sizes, seed) as a check of a kernel against its reference."""
    CHECKS[fn.__name__] = fn
    return fn


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer(in_features: int, out_features: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (out, in) with a few outlier input features and the Hessian of uneven activations."""
    g = generator(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.02
    weight[:, :4] *= 8
    x = torch.randn(4 * in_features, in_features, generator=g) * torch.rand(in_features, generator=g) * 2
    return weight.half().to(device), (x.T @ x / 8).to(device)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (fp16 compared as int16, so that signed zeros and NaNs count too)."""
    if a.dtype == torch.float16:
        a, b = a.view(torch.int16), b.view(torch.int16)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Route every dispatcher to `mode` ('triton' or 'reference') for the duration."""
    before = os.environ.get("EXLBUILD_KERNELS")
    os.environ["EXLBUILD_KERNELS"] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ["EXLBUILD_KERNELS"]
        else:
            os.environ["EXLBUILD_KERNELS"] = before


# ---------------------------------------------------------------------------------------------
# Checks: each compares a kernel with its reference; small sizes for the interpreter, real on CUDA.

# The GPTQ kernels' work dtypes: float32, and float64 (the passes at `passes.dtype: float64`).
WORK_DTYPES = (torch.float32, torch.float64)


def work_cases(real: bool, real_shapes: list[tuple], float32_shape: tuple, float64_shape: tuple) -> list[tuple]:
    """(shape, work dtype) pairs: on CUDA every real shape in both dtypes; in the interpreter a small shape in float32
    and a smaller one in float64 (the interpreter is slow)."""
    if real:
        return list(itertools.product(real_shapes, WORK_DTYPES))
    return [(float32_shape, torch.float32), (float64_shape, torch.float64)]


@check
def gptq_block_step(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    # (options, in_features, out_features, block starts): SmolLM2's down_proj and head, or small.
    cases = work_cases(real, [(14, 1536, 576, (0, 736, 1504)), (1, 576, 49152, (0, 544))], (3, 64, 40, (0, 32)),
                       (2, 64, 40, (32,)))
    for (options, k, n, starts), dtype in cases:
        weight, hessian = layer(k, n, seed, device)
        factor = prepare_hessian(hessian.to(dtype)).inverse_factor  # column-major, as quantize_options passes it
        spread = (1 + torch.rand(options, 1, 1, generator=g)).to(device)  # options differ in their weights too
        work = weight.to(dtype).T.contiguous().repeat(options, 1, 1) * spread
        bits = torch.tensor(BIT_WIDTHS)[torch.randint(len(BIT_WIDTHS), (options, 1), generator=g)].expand(options, k)
        bits = bits.clone()
        bits[0, 16::32] = 2  # per-row widths inside a block
        zero, maxq = (2 ** (bits - 1)).to(device, dtype), (2**bits - 1).to(device, dtype)
        for a in starts:
            row_weights = (torch.rand(BLOCK_ROWS, generator=g) + 0.5).to(dtype)
            nibbles, scale_max = find_group_scales(work[:, a : a + BLOCK_ROWS].cpu(), bits[:, a].contiguous(), row_weights)
            scale = scale_from_nibbles(nibbles, scale_max).to(device)
            scale[0, :3] = 0  # groups of zeros decode to zero
            outputs = []
            for step in (gptq_block_step_reference, gptq_block_step_triton):
                codes = torch.full((options, k, n), 255, dtype=torch.uint8, device=device)
                values = torch.full((options, k, n), float("nan"), dtype=torch.float16, device=device)
                errors = torch.full((options, BLOCK_ROWS, n), float("nan"), dtype=dtype, device=device)
                before = work.clone()
                step(BlockStep(work, factor, scale, zero, maxq, codes, values, errors), a)
                assert same(work, before), f"{step.__name__} changed work"
                rows = slice(a, a + BLOCK_ROWS)
                outputs.append((codes[:, rows], values[:, rows], errors))
            for name, ours, reference in zip(("codes", "values", "errors"), outputs[1], outputs[0]):
                assert same(ours, reference), f"{name} differ at block {a} of {dtype} {(options, k, n)}, seed {seed}"
            assert not values[:, a : a + BLOCK_ROWS].isnan().any()


@check
def pack_bitstream(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    for rows, columns in [(1536, 576), (576, 49152)] if real else [(96, 200)]:
        for bits in BIT_WIDTHS:
            codes = torch.randint(1 << bits, (rows, columns), generator=g, dtype=torch.uint8).to(device)
            words = pack_bitstream_triton(codes, bits)
            where = f"{bits}-bit {rows}×{columns}, seed {seed}"
            assert same(words, pack_bitstream_reference(codes, bits)), f"words differ: {where}"
            # Every int32 is a valid stretch of stream: unpack random words, and the packed codes.
            noise = torch.randint(-(2**31), 2**31, words.shape, generator=g, dtype=torch.int64).to(torch.int32)
            noise = noise.to(device)
            assert same(unpack_bitstream_triton(noise, bits), unpack_bitstream_reference(noise, bits)), where
            assert same(unpack_bitstream_triton(words, bits), codes), f"round trip: {where}"


def random_groups(in_features: int, g: torch.Generator) -> tuple[Group, ...]:
    """Groups of decreasing width (every width once when the rows allow), sizes 32, 64 or 128."""
    widths = sorted(BIT_WIDTHS, reverse=True)
    groups, start = [], 0
    while start < in_features:
        bits = widths[min(len(groups), len(widths) - 1)]
        rows = min(32 * int(2 ** torch.randint(3, (1,), generator=g)), in_features - start)
        groups.append(Group(bits, start, start + rows))
        start += rows
    return tuple(groups)


@check
def decode_layer(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    for k, n in [(1536, 576), (576, 49152)] if real else [(224, 72)]:
        groups = random_groups(k, g)
        q_weight = torch.randint(-(2**31), 2**31, (sum(x.qrows for x in groups), n), generator=g).to(torch.int32)
        nibbles = torch.randint(16, (len(groups), n), generator=g)
        scale_max = torch.rand(len(groups), generator=g) * 0.5
        scale_max[0] = 1e-6  # m = scale_max/256 underflows: S is zero or subnormal
        scale = scale_from_nibbles(nibbles, scale_max)
        invperm = torch.randperm(k, generator=g)
        args = [t.to(device) for t in (q_weight, scale)]
        ours = decode_layer_triton(*args, groups, invperm.to(torch.int32).to(device))
        assert same(ours, decode_layer_reference(*args, groups, invperm.to(device))), f"{k}×{n}, seed {seed}"


@check
def scale_search(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    grid = multiplier_grid().tolist()
    for (groups, r, n), dtype in work_cases(real, [(14, 128, 576), (13, 32, 1536), (1, 96, 49152)], (3, 64, 40),
                                            (2, 32, 40)):
        bits = torch.tensor(BIT_WIDTHS)[torch.randint(len(BIT_WIDTHS), (groups,), generator=g)].to(device)
        rows = (torch.randn(groups, r, n, generator=g) * 0.02).to(device, dtype)
        rows[:, :, :2] *= 10
        rows[-1, :, 3] = 0  # a dead column
        # The last group's largest |w| raised a little, to an M whose M · p lies just above an fp16 midpoint.
        half_code = (2 ** bits[-1].item() - 1) / 2
        product = above_fp16_midpoint(rows[-1].abs().max().item() / half_code * grid[8])
        rows[-1, 0, 0] = product / grid[8] * half_code
        rows[0] *= 0 if groups > 1 else 1  # a group of zeros: every choice scores zero
        row_weights = (torch.rand(r, generator=g) * 4).to(device, dtype)
        where = f"{dtype} {groups}×{r}×{n}, seed {seed}"
        group_max, totals, choices = search_triton(rows, bits, row_weights)
        assert same(group_max, group_maximum(rows, bits)), f"group maxima differ: {where}"
        reference = column_errors_reference(rows, bits, row_weights, group_max).double()  # (B, P, 16, N)
        best = reference.min(dim=2).values
        # Each column's nibble scores within rounding of its best, and so do the group totals: 1e-5 relative in
        # float32 (84 units of its last place), as many units in float64.
        rounding = 1e-5 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
        picked = reference.gather(2, choices.long()[:, :, None]).squeeze(2)
        assert (picked <= best * (1 + rounding) + 1e-30).all(), f"a column's nibble is not its best: {where}"
        relative = ((totals.double() - best.sum(dim=-1)).abs() / best.sum(dim=-1).clamp(min=1e-30)).max().item()
        assert relative < rounding, f"totals differ by {relative:.2e} relative: {where}"
        # Away from near-ties the choices are the reference's.
        assert (choices.long() == reference.argmin(dim=2)).float().mean() > 0.99, where
        # The pick kernel is the reference's pick exactly, on these and on ties, NaN and infinite totals.
        check_pick(group_max, totals, choices, where)
        tied, nan = totals.clone(), totals.clone()
        tied[-1, 3] = tied[-1, 9] = -1.0  # the first of equal minima
        nan[0, 5] = nan[0, 11] = float("nan")  # argmin takes the first NaN
        check_pick(group_max, tied, choices, f"{where}, ties")
        at_midpoint = group_max.clone()
        at_midpoint[-1] = above_fp16_midpoint(group_max[-1].item() * grid[3]) / grid[3]  # (p of the ties)
        check_pick(at_midpoint, tied, choices, f"{where}, M · p above an fp16 midpoint")
        check_pick(group_max, nan, choices, f"{where}, NaN totals")
        check_pick(group_max, torch.full_like(totals, float("inf")), choices, f"{where}, infinite totals")
    # Columns spanning several of the pick kernel's tiles.
    columns = 2500 if not real else 49152
    choices = torch.randint(16, (2, MULTIPLIER_POINTS, columns), generator=g, dtype=torch.uint8).to(device)
    totals = torch.rand(2, MULTIPLIER_POINTS, generator=g).to(device)
    group_max = torch.rand(2, generator=g).to(device)
    check_pick(group_max, totals, choices, f"{columns} columns, seed {seed}")


def above_fp16_midpoint(value: float) -> float:
    """A number a little above `value` (positive), just above the midpoint of two fp16 numbers of which the lower is
    even, within float32 rounding of it: torch rounds float64 to fp16 through float32, which gives the midpoint and
    then the lower number, where a direct rounding gives the upper. The kernels must round M · p as torch does."""
    lower = torch.tensor([value]).half().view(torch.int16) + 1  # the fp16 numbers' bits count up with their values
    lower += lower & 1
    return float(torch.cat([lower, lower + 1]).view(torch.float16).double().mean()) * (1 + 2**-30)


def check_pick(group_max: torch.Tensor, totals: torch.Tensor, choices: torch.Tensor, where: str) -> None:
    nibbles, scale_max, scale = pick_triton(group_max, totals, choices)
    expected_nibbles, expected_max = pick(group_max, totals, choices)
    assert same(nibbles, expected_nibbles), f"pick: nibbles differ: {where}"
    assert same(scale_max, expected_max), f"pick: q_scale_max differs: {where}"
    assert same(scale, scale_from_nibbles(expected_nibbles, expected_max)), f"pick: scales differ: {where}"


@check
def scale_search_in_place(device: str, real: bool, seed: int) -> None:
    """quantize_options' search: groups of some options read in place from the work stack, the results written
    at their options' and groups' rows, bit for bit what the search of the gathered rows chooses."""
    g = generator(seed)
    for (options, k, n, start, height), dtype in work_cases(real, [(5, 576, 1536, 256, 128)], (3, 96, 40, 32, 64),
                                                            (3, 64, 40, 32, 32)):
        work = (torch.randn(options, k, n, generator=g) * 0.02).to(device, dtype)
        row_bits = torch.tensor(BIT_WIDTHS)[torch.randint(len(BIT_WIDTHS), (options, k), generator=g)].to(device)
        row_weights = (torch.rand(k, generator=g) * 4).to(device, dtype)
        chosen, dest = torch.tensor([2, 0], device=device), torch.tensor([3, 1], device=device)
        target = SearchTarget(
            work, row_bits, row_weights,
            torch.full((options, n), float("nan"), dtype=torch.float16, device=device),
            torch.full((5, n), 255, dtype=torch.uint8, device=device),
            torch.full((5,), float("nan"), dtype=torch.float16, device=device),
        )
        # Slots 1..2 of a scratch of 3, as a batch beside another at the same row.
        scratch = SearchScratch.allocate(3, n, torch.device(device), dtype).part(1, 2)
        search_batch_triton(target, GroupBatch(start, height, chosen, dest, scratch))
        rows = work[chosen, start : start + height]
        searched = search_triton(rows, row_bits[chosen, start], row_weights[start : start + height])
        nibbles, scale_max, scale = pick_triton(*searched)
        where = f"{dtype} {options}×{k}×{n}, rows {start}..{start + height}, seed {seed}"
        assert same(target.nibbles[dest], nibbles) and same(target.scale_max[dest], scale_max), where
        assert same(target.scale[chosen], scale), where
        untouched = [o for o in range(options) if o not in chosen.tolist()]
        assert target.scale[untouched].isnan().all() and (target.nibbles[[0, 2, 4]] == 255).all(), where


def compare_quantized(ours: list, reference: list) -> dict[str, int]:
    """Kernel path against reference path, option by option. The scale search may pick another of two
    scales that tie to float32 rounding; such an option's later rows legitimately differ, so it only
    counts as tied. All others must be identical."""
    tied = 0
    for o, r in zip(ours, reference):
        if not (same(o.nibbles, r.nibbles) and same(o.scale_max, r.scale_max)):
            tied += 1
            continue
        assert same(o.codes, r.codes), f"{o.option}: codes differ"
        assert same(o.weight, r.weight), f"{o.option}: weights differ"
    return {"options": len(ours), "tied": tied}


@check
def quantize_options_end_to_end(device: str, real: bool, seed: int) -> None:
    if real:
        gate = list(MLP_CANDIDATES.reduced().distinct[0])
        down = list(MLP_CANDIDATES.reduced().distinct[2])
        cases = [(576, 1536, gate), (1536, 576, down), (576, 49152, [head_option(6)])]
    else:
        options = [QuantOption((4,), (1,), (32,)), QuantOption((6, 3), (0.5, 0.5), (32, 64))]
        cases = [(64, 40, options + [QuantOption((8,), (1,), (64,))])]
    for k, n, options in cases:
        weight, hessian = layer(k, n, seed, device)
        prepared = prepare_hessian(hessian)
        with kernels("triton"):
            ours = quantize_options(weight, prepared, options)
        with kernels("reference"):
            reference = quantize_options(weight, prepared, options)
        outcome = compare_quantized(ours, reference)
        # Near-ties are rare (about one search in a thousand): most options must match exactly.
        assert outcome["tied"] <= max(1, len(options) // 4), f"{outcome} for {k}×{n}, seed {seed}"


@check
def straight_through(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    # (rows, in, dtypes): SmolLM2's gate_proj and down_proj in the GPU's compute dtype, or small ones spanning tiles.
    cases = [(1536, 576, [torch.bfloat16]), (576, 1536, [torch.bfloat16])] if real else \
        [(40, 200, [torch.float32, torch.float16])]
    for rows, cols, dtypes in cases:
        bits = torch.tensor(BIT_WIDTHS)[torch.randint(len(BIT_WIDTHS), (cols,), generator=g)].float()
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        latent = (torch.rand(rows, cols, generator=g) * 1.2 - 0.6) * (high - low) + low / 0.9  # past both ends too
        latent[:, :8] = torch.round(latent[:, :8]) + 0.5  # halves round to even
        latent[:3] = torch.maximum(torch.minimum(torch.round(latent[:3]), high), low)  # on integers and bounds
        scale = (torch.rand(rows, cols, generator=g) * 0.01).half()
        for dtype in dtypes:
            factor = (torch.rand(cols, generator=g) + 0.5).to(dtype)
            grad = torch.randn(rows, cols, generator=g).to(dtype)
            inputs = [t.to(device) for t in (latent, scale, low, high, factor)]
            weight = straight_through_weight_triton(*inputs)
            assert same(weight, straight_through_weight_reference(*inputs)), f"{dtype}: weights differ"
            ours = straight_through_backward_triton(grad.to(device), *inputs)
            reference = straight_through_backward_reference(grad.to(device), *inputs)
            assert same(ours[0], reference[0]), f"{dtype}: latent gradients differ"
            torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-5 * float(reference[1].abs().max()))


@check
def expand_multipliers(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    # Linears' input features and groups, and norms' features: a SmolLM2 layer's (q, k, v, o, gate, up, down; the two
    # norms), or small ones spanning the kernels' blocks.
    features, groups, norms = ([576] * 6 + [1536], [18] * 6 + [48], [576, 576]) if real else ([300, 24], [7, 3], [9, 5])
    starts = torch.cumsum(torch.tensor([0, *groups]), 0)
    values = int(starts[-1]) + sum(norms)
    source = torch.cat([*(torch.randint(n, (f,), generator=g) + s for f, n, s in zip(features, groups, starts)),
                        torch.arange(int(starts[-1]), values)])
    base = torch.cat([torch.ones(sum(features)), torch.rand(sum(norms), generator=g) + 0.5]).to(device)
    expansion = Expansion.of(source, base, values)
    multipliers = (torch.randn(values, generator=g) * 0.1).exp().to(device)
    for dtype in decoder_dtypes(real):
        where = f"{dtype}, seed {seed}"
        assert same(expand_triton(multipliers, expansion, dtype), expand_reference(multipliers, expansion, dtype)), where
        grad = torch.randn(len(source), generator=g).to(device, dtype)
        reference = expand_backward_reference(grad, multipliers, expansion)
        # (Summed in chunks, as a tree: another order than the reference's.)
        torch.testing.assert_close(expand_backward_triton(grad, multipliers, expansion), reference, rtol=1e-5,
                                   atol=1e-6 * float(reference.abs().max()), msg=where)


def values_and_gradients(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor | None,
                         differentiated: int, *args: object) -> list[torch.Tensor]:
    """fn(*inputs, *args) and the gradients of <output, grad> (of the output itself if grad is None) with respect to
    the first `differentiated` inputs."""
    leaves = [t.detach().clone().requires_grad_(k < differentiated) for k, t in enumerate(inputs)]
    out = fn(*leaves, *args)
    return [out.detach(), *torch.autograd.grad(out, leaves[:differentiated], grad)]


def close(ours: torch.Tensor, reference: torch.Tensor, ulps: float, where: str,
          terms: torch.Tensor | None = None) -> None:
    """Equal within `ulps` units of the last place of the dtype, relative to the largest value of the reference's
    row (last dim), which is a token's or a weight's: the kernels sum in another order than torch, and a few values
    near zero carry the error of their large terms; rows of very different sizes are each held to their own.
    `terms`: where a value is computed from larger terms that cancel, their sizes, which the row's scale is then taken
    from instead."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype, f"{where}: {ours.shape} {ours.dtype}"
    size = (reference if terms is None else terms).float().abs()
    size = size.amax(dim=-1, keepdim=True) if size.dim() else size
    excess = (ours.float() - reference.float()).abs() / (ulps * torch.finfo(reference.dtype).eps * size)
    worst = float(excess.nan_to_num(0.0).max())  # (0/0 where a row is all zeros in both)
    assert worst <= 1, f"{where}: differs by {worst * ulps:.3g} units of the last place (allowed {ulps})"


def decoder_dtypes(real: bool) -> list[torch.dtype]:
    """bfloat16 (the fits' compute dtype) on the GPU, float16 in the interpreter (numpy has no bfloat16); float32
    (the passes over all rows) on both."""
    return [torch.bfloat16, torch.float32] if real else [torch.float16, torch.float32]


@check
def decoder_rms_norm(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    for rows, hidden in [(4 * 2048, 576), (3, 8192)] if real else [(37, 72)]:
        for dtype in decoder_dtypes(real):
            x = (torch.randn(rows, hidden, generator=g) * (torch.rand(rows, 1, generator=g) * 100)).to(dtype)
            weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
            grad = torch.randn(rows, hidden, generator=g).to(dtype)
            inputs = [x.to(device), weight.to(device)]
            ours = values_and_gradients(rms_norm_triton, inputs, grad.to(device), 2, 1e-5)
            reference = values_and_gradients(rms_norm_reference, inputs, grad.to(device), 2, 1e-5)
            for name, a, b in zip(("output", "x's gradient", "weight's gradient"), ours, reference):
                close(a, b, 4, f"{name}, {dtype} {rows}×{hidden}, seed {seed}")


@check
def decoder_rotary(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    for batch, seq, heads, head_dim in [(4, 2048, 9, 64), (1, 16, 64, 128)] if real else [(2, 5, 3, 8)]:
        for dtype in decoder_dtypes(real):
            x = torch.randn(batch, seq, heads, head_dim, generator=g).to(dtype)
            # Tables whose halves differ (the model's repeat them): each half must be read where it belongs.
            cos, sin = (torch.randn(seq, head_dim, generator=g).to(dtype) for _ in range(2))
            grad = torch.randn(x.shape, generator=g).to(dtype)
            inputs = [t.to(device) for t in (x, cos, sin)]
            ours = values_and_gradients(rotary_triton, inputs, grad.to(device), 1)
            reference = values_and_gradients(rotary_reference, inputs, grad.to(device), 1)
            for name, a, b in zip(("output", "x's gradient"), ours, reference):
                assert same(a, b), f"{name} differs: {dtype} {tuple(x.shape)}, seed {seed}"


@check
def decoder_gated_activation(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    for shape in [(4, 2048, 1536)] if real else [(2, 7, 40)]:
        for dtype in decoder_dtypes(real):
            gate, up, grad = (torch.randn(shape, generator=g) * 4).to(dtype), torch.randn(shape, generator=g).to(dtype), \
                torch.randn(shape, generator=g).to(dtype)
            inputs = [gate.to(device), up.to(device)]
            ours = values_and_gradients(gated_activation_triton, inputs, grad.to(device), 2)
            reference = values_and_gradients(gated_activation_reference, inputs, grad.to(device), 2)
            # The GPU's float32 exp and division are approximations a few units of the last place off. The gate's
            # gradient holds 1 − sigmoid(gate), which both paths compute with an error of float32's epsilon that the
            # product then multiplies by gate·grad·up, up to ~20 times the row's largest gradient here: torch's own
            # is 6–7 units of the row's largest value off the float64 value at these sizes (≤ 0.75 of gate·grad·up's).
            cancelled = (gate.float() * grad.float() * up.float()).to(device)
            for name, a, b, terms in zip(("output", "gate's gradient", "up's gradient"), ours, reference,
                                         (None, cancelled, None)):
                close(a, b, 8, f"{name}, {dtype} {shape}, seed {seed}", terms)


@check
def decoder_scale_features(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    # The tuning's 2 rows of SmolLM2's hidden and intermediate widths, and a 70B-shaped intermediate width; small.
    for rows, features, count in [(2 * 2048, 576, 3), (2 * 2048, 1536, 1), (3, 28672, 2)] if real else \
            [(37, 300, 3), (5, 40, 2), (9, 17, 1)]:
        for dtype in decoder_dtypes(real):
            x = (torch.randn(rows, features, generator=g) * 3).to(dtype)
            scales = [(torch.rand(features, generator=g) + 0.5).to(dtype) for _ in range(count)]
            grad = torch.randn(count, rows, features, generator=g).to(dtype)
            inputs = [t.to(device) for t in (x, *scales)]

            def stacked(fn: Callable[..., list[torch.Tensor]]) -> Callable[..., torch.Tensor]:
                return lambda x, *scales: torch.stack(fn(x, list(scales)))

            ours = values_and_gradients(stacked(scale_features_triton), inputs, grad.to(device), 1 + count)
            reference = values_and_gradients(stacked(scale_features_reference), inputs, grad.to(device), 1 + count)
            where = f"{dtype} {rows}×{features}, {count} scales, seed {seed}"
            assert same(ours[0], reference[0]), f"products differ: {where}"
            close(ours[1], reference[1], 4, f"x's gradient, {where}")
            for k in range(count):  # a sum over thousands of tokens
                close(ours[2 + k], reference[2 + k], 16, f"scale {k}'s gradient, {where}")


@check
def refine_squared_relative_error(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    for shape in [(4, 2048, 576)] if real else [(2, 9, 72)]:
        for dtype in decoder_dtypes(real):
            target = torch.randn(shape, generator=g) * (torch.rand(*shape[:-1], 1, generator=g) * 50)
            y = (target + torch.randn(shape, generator=g)).to(dtype)
            target[0, 0], y[0, 0] = 0, 0  # a zero target (its norm is clamped), matched
            inputs = [y.to(device), target.half().to(device)]
            ours = values_and_gradients(squared_relative_error_triton, inputs, None, 1)
            reference = values_and_gradients(squared_relative_error_reference, inputs, None, 1)
            close(ours[0], reference[0], 64, f"loss, {dtype} {shape}, seed {seed}")  # a mean of thousands of sums
            close(ours[1], reference[1], 4, f"y's gradient, {dtype} {shape}, seed {seed}")


@check
def decoder_layer_paths(device: str, real: bool, seed: int) -> None:
    """A whole decoder layer forward and backward with the kernels against the references: the kernels' small
    differences (sums in another order) must stay small through the layer."""
    g = generator(seed)
    hidden, inter, heads, kv_heads, head_dim, rows, seq = (576, 1536, 9, 3, 64, 2, 2048) if real else \
        (64, 96, 4, 2, 16, 2, 12)
    cfg = LlamaConfig("LlamaForCausalLM", hidden, inter, 1, heads, kv_heads, head_dim, 1000, 1e-5, 10000.0, None,
                      4096, False, False, False, False, None, None, None)
    dtype = torch.bfloat16 if real else torch.float32
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    weights = {f"{k}.weight": torch.randn(shape, generator=g) / shape[1] ** 0.5 for k, shape in shapes.items()}
    weights.update({k: torch.rand(hidden, generator=g) + 0.5 for k in ("input_layernorm.weight",
                                                                        "post_attention_layernorm.weight")})
    # The fits' factors on the inputs of some linears (q and v but not k; gate; down), as the tuning gives them.
    weights.update({f"{k}.input_scale": torch.rand(shapes[k][1], generator=g) + 0.5
                    for k in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")})
    weights = {k: v.to(device, dtype) for k, v in weights.items()}
    x = (torch.randn(rows, seq, hidden, generator=g) * 3).to(device, dtype)
    rope = rope_tables(cfg, seq, device)
    rope = Rope(rope.cos.to(dtype), rope.sin.to(dtype))
    grad = torch.randn(x.shape, generator=g).to(device, dtype)
    results = []
    for mode in ("triton", "reference"):
        leaves = {k: v.clone().requires_grad_() for k, v in weights.items()}
        inputs = x.clone().requires_grad_()
        with kernels(mode):
            out = decoder_layer(inputs, leaves, cfg, rope)
            grads = torch.autograd.grad(out, [inputs, *leaves.values()], grad)
        results.append([out.detach(), *grads])
    names = ["output", "input's gradient", *(f"{k}'s gradient" for k in weights)]
    # Within a few roundings of the compute dtype, relative to each tensor's size (float32 in the interpreter).
    allowed = 0.02 if real else 1e-5
    for name, ours, reference in zip(names, *results):
        error = float((ours.float() - reference.float()).norm() / reference.float().norm())
        assert error < allowed, f"{name}: relative error {error:.3g}, seed {seed}"


@check
def adam(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    size = 3_500_000 if real else 3000  # SmolLM2's codes of one layer, or spanning a few blocks
    param = torch.randn(size, generator=g)
    states = [[param.clone().to(device), torch.zeros(size, device=device), torch.zeros(size, device=device)]
              for _ in range(2)]
    betas = (0.9, 0.999)
    # Each step's row of the schedule: step size, c1, c2.
    schedule = torch.tensor([[0.01 * (0.5 + 0.1 * t), *(1 - b**t for b in betas)] for t in range(1, 4)], device=device)
    for t in range(3):  # moments from zero, then after updates
        grad = (torch.randn(size, generator=g) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))).to(device)
        step = torch.tensor(t, device=device)
        for update, state in zip((adam_update_triton, adam_update_reference), states):
            update(*state[:1], grad, *state[1:], schedule, step, betas, 1e-8)
        for name, ours, reference in zip(("parameter", "mean", "square"), *states):
            close(ours, reference, 4, f"{name} after step {t}, seed {seed}")


@check
def kl_divergence(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    # A vocabulary of several of the kernel's blocks and a partial one (SmolLM2's 49,152 is twelve whole ones).
    cases = [(682, 49152), (3, 50000)] if real else [(5, 9000), (3, 300)]
    for tokens, vocab in cases:
        for dtype in decoder_dtypes(real):
            # Logits spread like a model's (a few words far above the rest), the target's a small perturbation of
            # them: the KL is small against the log-sum-exps it is the difference of, as in the tuning.
            logits = torch.randn(tokens, vocab, generator=g) * 3
            logits[:, :7] += 12 * torch.rand(tokens, 7, generator=g)
            target = logits + torch.randn(tokens, vocab, generator=g) * 0.3
            inputs = [logits.to(device, dtype), target.to(device, dtype)]
            grad = torch.tensor(1 / tokens, device=device)
            ours = values_and_gradients(kl_divergence_triton, inputs, grad, 1)
            reference = values_and_gradients(kl_divergence_reference, inputs, grad, 1)
            # Against float64 on the same (rounded) inputs. The gradient q − p cancels, so both paths carry float32
            # errors of the log-sum-exps (~10) times q and p; ours may have the reference's error twice, plus a few
            # float32 roundings of q and p, plus one rounding to the logits' dtype.
            x, t = (v.double() for v in inputs)
            exact_kl = F.kl_div(x.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
            exact_grad = (x.softmax(-1) - t.softmax(-1)) / tokens
            where = f"{dtype} {tokens}×{vocab}, seed {seed}"
            kl_error, reference_kl_error = (abs(float(v[0]) - float(exact_kl)) for v in (ours, reference))
            # The KL of a row is a difference of its log-sum-exps: a few float32 roundings of those.
            lse_sizes = float((x.logsumexp(-1).abs() + t.logsumexp(-1).abs()).sum())
            allowed = 2 * reference_kl_error + 4 * torch.finfo(torch.float32).eps * lse_sizes
            assert kl_error <= allowed, f"the KL, {where}: error {kl_error:.3g}, allowed {allowed:.3g}"
            errors, reference_errors = ((v[1].double() - exact_grad).abs().amax(-1) for v in (ours, reference))
            probabilities = (x.softmax(-1) + t.softmax(-1)).amax(-1) / tokens
            rounding = torch.finfo(dtype).eps * exact_grad.abs().amax(-1) \
                + 4 * torch.finfo(torch.float32).eps * probabilities
            worst = float((errors / (2 * reference_errors + rounding)).max())
            assert worst <= 1, f"the logits' gradient, {where}: {worst:.3g} times the allowed error"


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision for the duration."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@check
def attention_received(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    # (rows, heads, kv heads, seq, head_dim, window): SmolLM2's attention (groups of 3) and a long window-cut row of
    # a Mistral-like one (groups of 4), or small ones whose lengths end inside a block of 64, with groups of 1 and
    # 3 and a window shorter than a block.
    cases = [(4, 9, 3, 2048, 64, None), (1, 8, 2, 1500, 128, 700)] if real else \
        [(2, 3, 3, 150, 16, None), (1, 3, 1, 130, 32, 40)]
    # float32 products as IEEE (torch's "highest") and, on the GPU, as TF32 ("high", the calibration passes');
    # float16 inputs, whose products are exact either way.
    variants = [(torch.float32, "highest"), (torch.float16, "highest")] + ([(torch.float32, "high")] if real else [])
    for rows, heads, kv_heads, seq, dim, window in cases:
        # An attention sink: every query has a component along one direction that the first key carries strongly
        # (logits up to ~30), as trained models' queries do; the rest is noise.
        sink = torch.randn(dim, generator=g)
        q = torch.randn(rows, heads, seq, dim, generator=g) + sink * torch.rand(rows, heads, seq, 1, generator=g)
        k = torch.randn(rows, kv_heads, seq, dim, generator=g)
        k[:, :, 0] += 4 * sink
        # The model's layout: (rows, seq, heads, dim) transposed, so the kernels read strided heads.
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2).to(device) for x in (q, k))
        for dtype, precision in variants:
            where = f"{dtype} ({precision}) {rows}×{heads}/{kv_heads}×{seq}×{dim}, window {window}, seed {seed}"
            with matmul_precision(precision):
                args = (q.to(dtype), k.to(dtype), dim**-0.5, window)
                ours = attention_received_triton(*args)
                reference = attention_received_reference(*args)
                assert same(attention_received_triton(*args), ours), f"{where}: not the same bits twice"
            # Relative to the row's largest weight (the sink's). With the same products, the two differ by float32
            # roundings (q·k summed in another order, exp2 of logit − lse against exp of logit − max over a sum),
            # and each weight is a sum of thousands of probabilities whose errors mostly cancel: measured at most
            # 2.2 float32 units in the interpreter and 0.9 on the H100, so 8. With TF32 products (10 of float32's 23
            # bits, rounded differently by Triton and cuBLAS) the logits differ by up to ~2^-11 of |q|·|k|, and the
            # probabilities by as much relative: measured 1,600 float32 units on the H100, allowed one TF32 unit of
            # the last place (2^-10: 8,192 float32 units).
            close(ours, reference, 2**13 if precision == "high" else 8, where)
            # Each query's probabilities sum to 1: a row's weights to seq.
            sums = torch.full((rows,), float(seq), device=device)
            torch.testing.assert_close(ours.sum(-1), sums, rtol=1e-5, atol=0, msg=where)


@contextmanager
def launch_configs(tiles: tuple[tuple[int, int], ...] | None) -> Iterator[None]:
    """The attention kernels' (forward, key blocks, query blocks) tiles (block_m, block_n) for the duration; None
    leaves them as configured."""
    names = ["FORWARD", "KEY_BLOCKS", "QUERY_BLOCKS"]
    before = [getattr(attention_kernels, name) for name in names]
    for name, config, tile in zip(names, before, tiles or [None] * 3):
        if tile is not None:
            setattr(attention_kernels, name, LaunchConfig(*tile, config.warps, config.stages))
    try:
        yield
    finally:
        for name, config in zip(names, before):
            setattr(attention_kernels, name, config)


@check
def causal_attention(device: str, real: bool, seed: int) -> None:
    g = generator(seed)
    # (rows, heads, kv heads, seq, head_dim): a refinement step's and a tuning step's SmolLM2 attention (groups of 3)
    # and one row of Llama-3-8B's (groups of 4, head_dim 128, as bench/scale.py fits it), or small ones whose lengths
    # end inside a block of 64, with groups of 3 and 2, and head_dims 16, 32 and 128. bfloat16 (the fits') on the GPU,
    # float16 in the interpreter (numpy has no bfloat16) and on the GPU.
    cases = [(4, 9, 3, 2048, 64), (2, 9, 3, 2048, 64), (1, 32, 8, 2048, 128)] if real else \
        [(2, 3, 1, 100, 16), (1, 4, 2, 70, 32), (1, 2, 1, 40, 128)]
    # The kernels' tiles as configured, and in the interpreter also tiles of other sizes for each kernel (the
    # unmasked blocks are found from both tile sizes).
    tiles = [None] if real else [None, ((32, 64), (64, 32), (32, 16))]
    for (rows, heads, kv_heads, seq, dim), tile in itertools.product(cases, tiles):
        for dtype in [torch.bfloat16, torch.float16] if real else [torch.float16]:
            where = f"{dtype} {rows}×{heads}/{kv_heads}×{seq}×{dim}, tiles {tile or 'as configured'}, seed {seed}"
            # The model's layout: q (rows, seq, heads, dim) transposed; an attention sink as in attention_received.
            sink = torch.randn(dim, generator=g)
            q = torch.randn(rows, seq, heads, dim, generator=g) + sink * torch.rand(rows, seq, heads, 1, generator=g)
            k = torch.randn(rows, seq, kv_heads, dim, generator=g)
            k[:, 0] += 4 * sink
            v = torch.randn(rows, seq, kv_heads, dim, generator=g)
            grad_out = torch.randn(rows, seq, heads, dim, generator=g)
            q, k, v, grad_out = (x.to(device, dtype).transpose(1, 2) for x in (q, k, v, grad_out))
            inputs = [x.requires_grad_() for x in (q, k, v)]
            with launch_configs(tile):
                ours = causal_attention_triton(*inputs, dim**-0.5)
                ours_grads = torch.autograd.grad(ours, inputs, grad_out)
                again = causal_attention_triton(*inputs, dim**-0.5)
                assert same(again, ours) and all(same(a, b) for a, b in
                                                 zip(torch.autograd.grad(again, inputs, grad_out), ours_grads)), \
                    f"{where}: not the same bits twice"
            reference = causal_attention_reference(*inputs, dim**-0.5)
            reference_grads = torch.autograd.grad(reference, inputs, grad_out)
            # Relative to the largest value: the kernels round the probabilities and dS to the inputs' dtype before
            # their products (8 bits of bfloat16's, 11 of float16's), the reference keeps them in float32, and D = ΣdO·O
            # of the rounded output is taken from dP. Measured in the interpreter: at most 2.5e-3 in float16 (dK, the
            # sink's key), so 2^-7, and bfloat16's 3 bits fewer: 2^-4.
            bound = 2**-4 if dtype == torch.bfloat16 else 2**-7
            for name, a, b in zip(["output", "dQ", "dK", "dV"], [ours, *ours_grads], [reference, *reference_grads]):
                error = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                assert error <= bound, f"{name}, {where}: {error:.3g} of the largest value, over {bound:.3g}"

# ---------------------------------------------------------------------------------------------
# CPU: the checks in one child process under Triton's interpreter.


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"the interpreter process failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1])


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_matches_reference_interpreted(interpreted: dict[str, str], name: str) -> None:
    assert interpreted[name] == "ok", interpreted[name]


@pytest.mark.kernels
def test_cpu_tensors_go_to_the_references() -> None:
    from exlbuild.kernels.runtime import interpreting
    from exlbuild.quant.exl2.pack import pack_bitstream as public_pack

    codes = torch.randint(8, (32, 16), dtype=torch.uint8)
    assert same(public_pack(codes, 3), pack_bitstream_reference(codes, 3))
    if not interpreting():  # forced onto CPU tensors without the interpreter, a kernel says why it cannot run
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), kernels("triton"):
            public_pack(codes, 3)


@pytest.mark.kernels
def test_references_run_without_triton() -> None:
    """Where Triton is missing (it is a dependency on Linux x86-64 only) everything runs the references."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from exlbuild.quant.exl2.options import QuantOption\n"
        "from exlbuild.quant.exl2.pack import dequantize\n"
        "from exlbuild.quant.exl2.quantize import pack_layer, quantize\n"
        "w = torch.randn(40, 64).half(); x = torch.randn(256, 64)\n"
        "r = quantize(w, x.T @ x, QuantOption((4,), (1,), (32,)))\n"
        "assert torch.equal(dequantize(pack_layer(r), 40), r.weight)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# GPU: the same checks at real sizes (SmolLM2-135M: 576 hidden, 1536 intermediate, 49152 vocabulary).


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_matches_reference_cuda(name: str) -> None:
    CHECKS[name]("cuda", True, int.from_bytes(os.urandom(4), "little"))


def _run_interpreted_checks() -> dict[str, str]:
    """The child process: every check on the CPU, in Triton's interpreter, on fresh inputs."""
    from exlbuild.kernels.runtime import interpreting

    assert interpreting(), "run with TRITON_INTERPRET=1 in the environment"
    outcome = {}
    for name, fn in CHECKS.items():
        seed = int.from_bytes(os.urandom(4), "little")
        try:
            fn("cpu", False, seed)
            outcome[name] = "ok"
        except Exception:  # report every check, not just the first failure
            outcome[name] = f"seed {seed}\n{traceback.format_exc()}"
    return outcome


if __name__ == "__main__":
    print(json.dumps(_run_interpreted_checks()))
