"""The group scale search: B groups at once, each for GPTQ's own loss.

EXL2 gives every group one q_scale_max and every column of it one nibble k (0..15); the column's scale is
S(k) = fp16((k+1)² · fp16(q_scale_max / 256)) (pack.scale_from_nibbles). The reference converter takes
k from each column's largest weight and then one multiplier of q_scale_max for the whole group, scored
by Σ |error|^3.5 (docs/exl2-format.md 4.9, Q2–Q4). exlbuild chooses both for the loss GPTQ minimises:
rounding row r of the error-compensated weights costs (w − v)² / U_rr², U the inverse Cholesky factor
(what the rows after it cannot take back), so with row weights h_r = 1 / U_rr²

    err(p, k, n) = Σ_r h_r · (v(w_rn; S_p(k)) − w_rn)²,   v(w; S) = (clamp(rint(w/S) + z, 0, maxq) − z) · S,
    q_scale_max_p = fp16(M · p) for p on a grid of 17 points over [0.70, 1.20], M = (max |w| + 1e-12) / (maxq/2),

each column takes its best nibble for every p, and the group the first p of least Σ_n min_k err(p, k, n)
(ties: the first p, the smallest k). Every column can move its scale by up to the grid's step of 16
nibbles rather than sharing one multiplier, and the rows the Hessian weighs most count most. Measured on
SmolLM2's layers: 3–14 % less output error per linear than the reference's search at every bit width
(bench/NOTES.md §10); a grid of 97 points chose as well as 17.

The Triton kernel computes the same scales (the same fp16 roundings) and quantized values (IEEE division,
round half to even), but sums each column's error in its own order: its errors agree with the
reference's to float32 rounding, and its choices are the reference's except where two score within it.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from exlbuild.kernels.pack import scale_from_nibbles
from exlbuild.kernels.runtime import jit, launch, tl, use_triton

MULTIPLIER_POINTS = 17
MULTIPLIER_RANGE = (0.70, 1.20)
NIBBLES = 16
# Elements of one reference temporary (nibbles × rows × columns): 4 MiB.
_SEARCH_CHUNK_ELEMENTS = 1 << 20


def multiplier_grid(device: torch.device | str | None = None) -> Tensor:
    """The 17 candidate multipliers p_i = 0.70·(1 − i/16) + 1.20·(i/16)."""
    low, high = MULTIPLIER_RANGE
    i = torch.arange(MULTIPLIER_POINTS, dtype=torch.float64) / (MULTIPLIER_POINTS - 1)
    return (low * (1 - i) + high * i).to(torch.float32).to(device)


@cache
def _grid_on(device: torch.device) -> Tensor:
    """multiplier_grid, made once per device: made on the CPU and copied over at every call, it cost a
    host-to-device copy that waits for the GPU, once per group."""
    return multiplier_grid(device)


def find_group_scales(rows: Tensor, bits: Tensor, row_weights: Tensor) -> tuple[Tensor, Tensor]:
    """The search for B groups at once: rows (B, R, N) float32, bits (B,), row_weights (R,) float32 (h_r,
    shared by the groups) → nibbles (B, N) uint8 and q_scale_max (B,) float16. Triton on CUDA, else the
    reference."""
    if use_triton(rows, bits, row_weights):
        group_max, totals, choices = search_triton(rows, bits, row_weights)
    else:
        group_max = group_maximum(rows, bits)
        best, choices = column_errors_reference(rows, bits, row_weights, group_max).min(dim=2)
        totals = best.sum(dim=2)
    chosen = totals.argmin(dim=1)  # the first of equal minima
    nibbles = choices[torch.arange(len(rows), device=rows.device), chosen].to(torch.uint8)
    return nibbles, (group_max * _grid_on(rows.device)[chosen]).half()


def group_maximum(rows: Tensor, bits: Tensor) -> Tensor:
    """M (B,) float32: the group's largest |w| (plus 1e-12) over half its largest code."""
    half = (2**bits - 1).to(torch.float32) / 2
    return (rows.abs().amax(dim=(1, 2)) + 1e-12) / half


def candidate_scales(group_max: Tensor) -> Tensor:
    """S_p(k) (B, P, 16) float32: every multiplier's q_scale_max, every nibble's scale (fp16 values)."""
    scale_max = (group_max[:, None] * _grid_on(group_max.device)).half()  # (B, P)
    nibbles = torch.arange(NIBBLES, dtype=torch.uint8, device=group_max.device)
    return scale_from_nibbles(nibbles[None, None, :, None], scale_max[:, :, None])[..., 0].float()


def column_errors_reference(rows: Tensor, bits: Tensor, row_weights: Tensor, group_max: Tensor) -> Tensor:
    """err(p, k, n) for every group: (B, P, 16, N) float32."""
    groups, height, columns = rows.shape
    scales = candidate_scales(group_max)
    low = (-(2 ** (bits - 1))).to(torch.float32).tolist()
    high = (2 ** (bits - 1) - 1).to(torch.float32).tolist()
    width = max(1, _SEARCH_CHUNK_ELEMENTS // (NIBBLES * height))
    errors = torch.empty(groups, MULTIPLIER_POINTS, NIBBLES, columns, device=rows.device)
    for b in range(groups):
        # A zero scale (a group of near-zero weights whose q_scale_max/256 underflows fp16) decodes every code
        # to zero, as gptq_block_step takes the zero point there.
        zero_scales = bool((scales[b] == 0).any())
        for p in range(MULTIPLIER_POINTS):
            s = scales[b, p, :, None, None]  # (16, 1, 1)
            for c in range(0, columns, width):
                w = rows[b, :, c : c + width]
                # rint(w/S) clamped to [−z, maxq − z]: the same values as clamp(rint(w/S) + z, 0, maxq) − z.
                v = torch.div(w, s).round_().clamp_(low[b], high[b]).mul_(s)
                if zero_scales:
                    v = torch.where(s > 0, v, 0.0)
                errors[b, p, :, c : c + width] = torch.matmul(row_weights, v.sub_(w).square_())
    return errors


@jit
def _search_kernel(
    rows_ptr, row_weights_ptr, group_max_ptr, bits_ptr, grid_ptr, choices_ptr, partial_ptr,
    N, P,
    R: tl.constexpr, NIBBLES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one group, BLOCK_N columns, one multiplier. It walks the group's rows once per
    # nibble; the tile (R × BLOCK_N floats) stays in L1 across them.
    # Loop bounds are compile-time constants: Triton 3.6's interpreter cannot loop to a run-time
    # bound under numpy 2 (it converts a one-element array to int). Group heights are few (32..128).
    group = tl.program_id(0)
    tile = tl.program_id(1)
    p = tl.program_id(2)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    bits = tl.load(bits_ptr + group)
    maxq = ((1 << bits) - 1).to(tl.float32)
    z = (1 << (bits - 1)).to(tl.float32)
    # q_scale_max = fp16(M · p) and fp16(q_scale_max / 256), as candidate_scales rounds them.
    scale_max = (tl.load(group_max_ptr + group) * tl.load(grid_ptr + p)).to(tl.float16).to(tl.float32)
    step = (scale_max * 0.00390625).to(tl.float16).to(tl.float32)  # / 256, exact

    rows = tl.arange(0, BLOCK_R)
    first_row = rows_ptr + group.to(tl.int64) * R * N
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    choice = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k in range(NIBBLES):
        t = (k + 1) * (k + 1) * 1.0
        s = (t * step).to(tl.float16).to(tl.float32)
        total = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            row_ok = (r0 + rows) < R
            mask = row_ok[:, None] & col_ok[None, :]
            w = tl.load(first_row + (r0 + rows)[:, None] * N + cols[None, :], mask=mask, other=0.0)
            h = tl.load(row_weights_ptr + r0 + rows, mask=row_ok, other=0.0)
            ratio = tl.where(s > 0, tl.math.div_rn(w, s), 0.0)  # `/` is not IEEE-rounded on the GPU
            # Round half to even: exact for |x| < 2^22; larger values clamp the same either way.
            rounded = tl.where(tl.abs(ratio) < 4194304.0, (ratio + 12582912.0) - 12582912.0, ratio)
            v = (tl.minimum(tl.maximum(rounded + z, 0.0), maxq) - z) * s
            e = v - w
            total += tl.where(mask, (e * e) * h[:, None], 0.0)
        column = tl.sum(total, axis=0)
        better = column < best  # strictly: the smallest nibble of equal errors
        best = tl.where(better, column, best)
        choice = tl.where(better, k, choice)
    tl.store(choices_ptr + (group * P + p) * N + cols, choice.to(tl.uint8), mask=col_ok)
    tl.store(partial_ptr + (group * tl.num_programs(1) + tile) * P + p, tl.sum(tl.where(col_ok, best, 0.0), axis=0))


_BLOCK_R = 32
_BLOCK_N = 64


def search_triton(rows: Tensor, bits: Tensor, row_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The search by the Triton kernel: rows (B, R, N), bits (B,), row_weights (R,) → M (B,) float32,
    Σ_n min_k err(p, k, n) (B, P) and each column's best nibble (B, P, N) uint8. On CPU tensors it runs
    in Triton's interpreter."""
    rows = rows.contiguous()
    groups, height, columns = rows.shape
    group_max = group_maximum(rows, bits)
    tiles = -(-columns // _BLOCK_N)
    choices = torch.empty(groups, MULTIPLIER_POINTS, columns, dtype=torch.uint8, device=rows.device)
    partial = torch.empty(groups, tiles, MULTIPLIER_POINTS, dtype=torch.float32, device=rows.device)
    launch(
        _search_kernel, (groups, tiles, MULTIPLIER_POINTS), rows.device,
        rows, row_weights.contiguous(), group_max, bits, _grid_on(rows.device), choices, partial,
        columns, MULTIPLIER_POINTS,
        R=height, NIBBLES=NIBBLES, BLOCK_R=_BLOCK_R, BLOCK_N=_BLOCK_N, num_warps=4,
    )
    return group_max, partial.sum(dim=1), choices
