"""The group scale search (docs/exl2-format.md 4.9, Q2–Q4) for B groups at once.

Q2: per column n, a candidate scale c_n from the column's largest weight and the group's largest
(steps t_n = clamp(rint(16·√(base_n / M)), 1, 16), c_n = (t_n/16)²·M). Q3: a global multiplier p
searched on a grid of 97 points, each scored by
err(p) = Σ |clamp(rint(w / (c_n·p)), −z, maxq − z) · c_n·p − w|^3.5 over the group's rows and columns.
Q4: the first p of least error; q_scale_max = fp16(M·p).

The scoring is 97 passes over the group: the reference materialises (multipliers × rows × columns)
temporaries; the Triton kernel keeps a tile of the group in cache across its multipliers. It also
does Q2's per-column arithmetic, so that the Triton path is few operations on the host: on the GPU
machine the host, at ~20 µs per PyTorch operation, was the bottleneck of quantize_options.

The kernel computes Q2 exactly (IEEE division and square root, round half to even: the same nibbles
and M) and the same quantized values in Q3, but sums in its own order and takes the 3.5th power as
e³·√e, so err(p) agrees with the reference to float32 rounding, and the chosen multiplier is the
reference's except where two grid points score within that rounding.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from exlbuild.kernels.runtime import jit, launch, tl, use_triton

# Q3: a global multiplier p on 97 points from 0.70 to 1.20; the error exponent 3.5 is computed as |e|³·√|e|.
MULTIPLIER_POINTS = 97
MULTIPLIER_RANGE = (0.70, 1.20)
# Elements of one reference temporary (multipliers × rows × columns): 1 MiB, within a core's L2 cache.
_SEARCH_CHUNK_ELEMENTS = 1 << 18


def multiplier_grid(device: torch.device | str | None = None) -> Tensor:
    """The 97 candidate multipliers p_i = 0.70·(1 − i/96) + 1.20·(i/96)."""
    low, high = MULTIPLIER_RANGE
    i = torch.arange(MULTIPLIER_POINTS, dtype=torch.float64) / (MULTIPLIER_POINTS - 1)
    return (low * (1 - i) + high * i).to(torch.float32).to(device)


@cache
def _grid_on(device: torch.device) -> Tensor:
    """multiplier_grid, made once per device: made on the CPU and copied over at every call, it cost a
    host-to-device copy that waits for the GPU, once per group."""
    return multiplier_grid(device)


def find_group_scales(rows: Tensor, bits: Tensor) -> tuple[Tensor, Tensor]:
    """Q2–Q4 for B groups at once: rows (B, R, N) float32, bits (B,) → nibbles (B, N) uint8 and
    q_scale_max (B,) float16. Triton on CUDA, else the reference."""
    if use_triton(rows, bits):
        nibbles, group_max, errors = score_multipliers_triton(rows, bits)
    else:
        steps, top, candidate, zero, maxq = candidate_scales(rows, bits)
        nibbles, group_max = (steps - 1).to(torch.uint8), top[:, 0]
        errors = search_errors_reference(rows, candidate, zero, maxq, _grid_on(rows.device))
    best = errors.argmin(dim=1)  # the first of equal minima
    return nibbles, (group_max * _grid_on(rows.device)[best]).half()


def candidate_scales(rows: Tensor, bits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Q2: steps t (B, N), the group maximum M (B, 1), candidates c = (t/16)²·M (B, N), and the zero
    points and largest codes (B, 1), all float32."""
    maxq = (2**bits - 1).to(rows.dtype)[:, None]
    zero = (2 ** (bits - 1)).to(rows.dtype)[:, None]
    base = (rows.abs().amax(dim=1) + 1e-12) / (maxq / 2)
    group_max = base.amax(dim=1, keepdim=True)
    steps = torch.round(16 * torch.sqrt(base / group_max)).clamp(1, 16)
    return steps, group_max, (steps / 16) ** 2 * group_max, zero, maxq


def search_errors_reference(rows: Tensor, candidate: Tensor, zero: Tensor, maxq: Tensor, grid: Tensor) -> Tensor:
    """err(p) of Q3 for every group and multiplier: rows (B, R, N), candidate (B, N), zero and maxq
    (B, 1), grid (P,) → (B, P) float32."""
    # 97 passes over the group, memory-bound: one group at a time, in place, in pieces that stay in a
    # core's L2 cache.
    low, high = (-zero)[:, 0].tolist(), (maxq - zero)[:, 0].tolist()
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // rows[0].numel())
    errors = torch.empty(len(rows), len(grid), device=rows.device)
    for b, group in enumerate(rows):
        for i in range(0, len(grid), chunk):
            scale = candidate[b] * grid[i : i + chunk, None, None]  # (P, 1, N)
            e = torch.div(group, scale).round_().clamp_(low[b], high[b]).mul_(scale).sub_(group).abs_()
            root = e.sqrt()  # |e|^3.5 as |e|³·√|e|, as the kernel does: a third of pow's cost
            errors[b, i : i + chunk] = e.pow_(3).mul_(root).sum(dim=(1, 2))
    return errors


@jit
def _search_kernel(
    rows_ptr, column_max_ptr, top_ptr, bits_ptr, grid_ptr, nibbles_ptr, group_max_ptr, partial_ptr,
    N, P,
    R: tl.constexpr, P_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one group, BLOCK_N columns, P_PER_PROGRAM multipliers. It walks the group's rows
    # once per multiplier; the tile (R × BLOCK_N floats) stays in L1 across them.
    # Loop bounds are compile-time constants: Triton 3.6's interpreter cannot loop to a run-time
    # bound under numpy 2 (it converts a one-element array to int). Group heights are few (32..128).
    group = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N

    # Q2, as candidate_scales computes it. M = max_n base_n is computed from the largest column
    # maximum: x ↦ (x + 1e-12) / h is monotonic in float32 too, so this is the same number.
    bits = tl.load(bits_ptr + group)
    maxq = ((1 << bits) - 1).to(tl.float32)
    z = (1 << (bits - 1)).to(tl.float32)
    half = maxq * 0.5  # maxq / 2, exact
    base = tl.math.div_rn(tl.load(column_max_ptr + group * N + cols, mask=col_ok, other=0.0) + 1e-12, half)
    top = tl.math.div_rn(tl.load(top_ptr + group) + 1e-12, half)
    root = 16 * tl.sqrt_rn(tl.math.div_rn(base, top))
    # Round half to even: exact for |x| < 2^22, and root ≤ 16.
    steps = tl.minimum(tl.maximum((root + 12582912.0) - 12582912.0, 1.0), 16.0)
    t = steps * 0.0625  # steps / 16, exact
    c = (t * t) * top  # t² is exact: one rounding, as (t/16)² · M
    if tl.program_id(2) == 0:
        tl.store(nibbles_ptr + group * N + cols, (steps - 1).to(tl.uint8), mask=col_ok)
        if tile == 0:
            tl.store(group_max_ptr + group, top)

    # Q3 for this program's multipliers.
    low = -z
    high = maxq - z
    rows = tl.arange(0, BLOCK_R)
    first_row = rows_ptr + group.to(tl.int64) * R * N
    for k in range(P_PER_PROGRAM):
        i = tl.program_id(2) * P_PER_PROGRAM + k
        if i < P:
            scale = (c * tl.load(grid_ptr + i))[None, :]  # one rounding, as the reference's candidate · p
            total = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                mask = ((r0 + rows) < R)[:, None] & col_ok[None, :]
                w = tl.load(first_row + (r0 + rows)[:, None] * N + cols[None, :], mask=mask, other=0.0)
                ratio = tl.math.div_rn(w, scale)  # `/` is not IEEE-rounded on the GPU
                # Round half to even: exact for |x| < 2^22; larger values clamp the same either way.
                rounded = tl.where(tl.abs(ratio) < 4194304.0, (ratio + 12582912.0) - 12582912.0, ratio)
                q = tl.minimum(tl.maximum(rounded, low), high)
                e = tl.abs(q * scale - w)
                total += tl.where(mask, e * e * e * tl.sqrt(e), 0.0)
            tl.store(partial_ptr + (group * tl.num_programs(1) + tile) * P + i, tl.sum(tl.sum(total, axis=1), axis=0))


_BLOCK_R = 32
_BLOCK_N = 64
_P_PER_PROGRAM = 8  # 13 programs share the 97 multipliers: enough programs to fill the GPU


def score_multipliers_triton(rows: Tensor, bits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q2 and Q3 by the Triton kernel: rows (B, R, N), bits (B,) → nibbles (B, N) uint8, the group
    maxima M (B,) and err(p) (B, P) float32. On CPU tensors it runs in Triton's interpreter."""
    rows = rows.contiguous()
    groups, height, columns = rows.shape
    column_max = rows.abs().amax(dim=1)
    top = column_max.amax(dim=1)
    grid = _grid_on(rows.device)
    tiles = -(-columns // _BLOCK_N)
    points = grid.numel()
    nibbles = torch.empty(groups, columns, dtype=torch.uint8, device=rows.device)
    group_max = torch.empty(groups, dtype=torch.float32, device=rows.device)
    partial = torch.empty(groups, tiles, points, dtype=torch.float32, device=rows.device)
    launch(
        _search_kernel, (groups, tiles, -(-points // _P_PER_PROGRAM)), rows.device,
        rows, column_max, top, bits, grid, nibbles, group_max, partial,
        columns, points,
        R=height, P_PER_PROGRAM=_P_PER_PROGRAM, BLOCK_R=_BLOCK_R, BLOCK_N=_BLOCK_N, num_warps=4,
    )
    return nibbles, group_max, partial.sum(dim=1)
