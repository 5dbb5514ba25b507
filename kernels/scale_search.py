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

The search computes in the rows' dtype, float32 or float64 (the passes at `passes.dtype: float64`): M, the
products M · p (of the float32 multipliers) before their fp16 rounding, the errors and their sums. The
Triton kernel computes the same scales (the same fp16 roundings) and quantized values (IEEE division,
round half to even), but sums each column's error in its own order: its errors agree with the
reference's to the rows' rounding, and its choices are the reference's except where two score within it.

quantize_options searches at every group start, and on the GPU its host time is the wall time, so the
Triton path does there (search_batch_triton) only what needs the device: one torch reduction for max |w|,
the search kernel (which reads the groups' rows in place in the work stack, by option index), torch's
sum of its per-tile totals, and the pick kernel, which takes the multiplier and writes the scales,
nibbles and q_scale_max straight to where quantize_options keeps them. `pick` is the pick in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """The search for B groups at once: rows (B, R, N) float32 or float64, bits (B,), row_weights (R,) in the
    rows' dtype (h_r, shared by the groups) → nibbles (B, N) uint8 and q_scale_max (B,) float16. Triton on
    CUDA, else the reference."""
    if use_triton(rows, bits, row_weights, float64=True):
        nibbles, scale_max, _ = pick_triton(*search_triton(rows, bits, row_weights))
        return nibbles, scale_max
    group_max = group_maximum(rows, bits)
    best, choices = column_errors_reference(rows, bits, row_weights, group_max).min(dim=2)
    return pick(group_max, best.sum(dim=2), choices)


def pick(group_max: Tensor, totals: Tensor, choices: Tensor) -> tuple[Tensor, Tensor]:
    """From M (B,), Σ_n min_k err (B, P) and the columns' best nibbles (B, P, N): the first multiplier of
    least total (ties: the first), its nibbles (B, N) uint8 and q_scale_max (B,) float16 (what the pick
    kernel computes on the Triton path)."""
    chosen = totals.argmin(dim=1)  # the first of equal minima
    nibbles = choices[torch.arange(len(choices), device=choices.device), chosen].to(torch.uint8)
    return nibbles, (group_max * _grid_on(group_max.device)[chosen]).half()


def group_maximum(rows: Tensor, bits: Tensor) -> Tensor:
    """M (B,) in the rows' dtype: the group's largest |w| (plus 1e-12) over half its largest code."""
    half = (2**bits - 1).to(rows.dtype) / 2
    return (rows.abs().amax(dim=(1, 2)) + 1e-12) / half


def candidate_scales(group_max: Tensor) -> Tensor:
    """S_p(k) (B, P, 16) in M's dtype: every multiplier's q_scale_max, every nibble's scale (fp16 values). (torch
    rounds float64 to fp16 through float32, as the kernels do.)"""
    scale_max = (group_max[:, None] * _grid_on(group_max.device)).half()  # (B, P)
    nibbles = torch.arange(NIBBLES, dtype=torch.uint8, device=group_max.device)
    return scale_from_nibbles(nibbles[None, None, :, None], scale_max[:, :, None])[..., 0].to(group_max.dtype)


def column_errors_reference(rows: Tensor, bits: Tensor, row_weights: Tensor, group_max: Tensor) -> Tensor:
    """err(p, k, n) for every group: (B, P, 16, N) in the rows' dtype."""
    groups, height, columns = rows.shape
    scales = candidate_scales(group_max)
    low = (-(2 ** (bits - 1))).to(torch.float32).tolist()
    high = (2 ** (bits - 1) - 1).to(torch.float32).tolist()
    width = max(1, _SEARCH_CHUNK_ELEMENTS // (NIBBLES * height))
    errors = torch.empty(groups, MULTIPLIER_POINTS, NIBBLES, columns, dtype=rows.dtype, device=rows.device)
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


# Pointers to views at a batch's offset (its index rows, its slots of a shared scratch) are not specialized on
# their alignment: each alignment would be another compiled variant.
@jit(do_not_specialize_on_alignment=["options_ptr", "group_max_ptr", "choices_ptr", "partial_ptr"])
def _search_kernel(
    work_ptr, options_ptr, bits_ptr, row_weights_ptr, amax_ptr, grid_ptr, group_max_ptr, choices_ptr, partial_ptr,
    start, K, N, P, bits_stride,
    R: tl.constexpr, NIBBLES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one group, BLOCK_N columns, one multiplier. Group g is rows start..start+R−1 of option
    # options[g], read in place from work (B, K, N). It walks the group's rows once per nibble; the tile
    # (R × BLOCK_N floats) stays in L1 across them.
    # Loop bounds are compile-time constants: Triton 3.6's interpreter cannot loop to a run-time
    # bound under numpy 2 (it converts a one-element array to int). Group heights are few (32..128).
    dtype = work_ptr.dtype.element_ty  # float32 or float64, as row_weights, amax and the scratch
    # IEEE-rounded divisions and rounding half to even, as in _gptq_block_kernel (which says why).
    FLOAT64: tl.constexpr = dtype == tl.float64
    ROUND_LIMIT: tl.constexpr = 2.0 ** (dtype.fp_mantissa_width - 1)
    group = tl.program_id(0)
    tile = tl.program_id(1)
    p = tl.program_id(2)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    option = tl.load(options_ptr + group)
    bits = tl.load(bits_ptr + option * bits_stride + start)
    maxq = ((1 << bits) - 1).to(dtype)
    z = (1 << (bits - 1)).to(dtype)
    # M = (max |w| + 1e-12) / (maxq / 2), as group_maximum rounds it; amax holds max |w| of every option's rows.
    largest = tl.load(amax_ptr + option) + 1e-12
    group_max = largest / (maxq * 0.5) if FLOAT64 else tl.math.div_rn(largest, maxq * 0.5)
    if (tile == 0) & (p == 0):
        tl.store(group_max_ptr + group, group_max)
    # q_scale_max = fp16(M · p) and fp16(q_scale_max / 256), as candidate_scales rounds them (float64 through float32,
    # as torch rounds it to fp16: c10::Half is made from a float).
    scale_max = (group_max * tl.load(grid_ptr + p)).to(tl.float32).to(tl.float16).to(dtype)
    step = (scale_max * 0.00390625).to(tl.float16).to(dtype)  # / 256, exact

    rows = tl.arange(0, BLOCK_R)
    first_row = work_ptr + (option.to(tl.int64) * K + start) * N
    best = tl.full((BLOCK_N,), float("inf"), dtype=dtype)
    choice = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k in range(NIBBLES):
        t = (k + 1) * (k + 1) * 1.0
        s = (t * step).to(tl.float16).to(dtype)
        total = tl.zeros((BLOCK_R, BLOCK_N), dtype=dtype)
        for r0 in range(0, R, BLOCK_R):
            row_ok = (r0 + rows) < R
            mask = row_ok[:, None] & col_ok[None, :]
            w = tl.load(first_row + (r0 + rows)[:, None] * N + cols[None, :], mask=mask, other=0.0)
            h = tl.load(row_weights_ptr + start + r0 + rows, mask=row_ok, other=0.0)
            ratio = tl.where(s > 0, w / s if FLOAT64 else tl.math.div_rn(w, s), 0.0)
            rounded = tl.where(tl.abs(ratio) < ROUND_LIMIT, (ratio + 3 * ROUND_LIMIT) - 3 * ROUND_LIMIT, ratio)
            v = (tl.minimum(tl.maximum(rounded + z, 0.0), maxq) - z) * s
            e = v - w
            total += tl.where(mask, (e * e) * h[:, None], 0.0)
        column = tl.sum(total, axis=0)
        better = column < best  # strictly: the smallest nibble of equal errors
        best = tl.where(better, column, best)
        choice = tl.where(better, k, choice)
    tl.store(choices_ptr + (group * P + p).to(tl.int64) * N + cols, choice.to(tl.uint8), mask=col_ok)
    tl.store(partial_ptr + (group * tl.num_programs(1) + tile) * P + p, tl.sum(tl.where(col_ok, best, 0.0), axis=0))


@jit(do_not_specialize_on_alignment=["options_ptr", "dest_ptr", "group_max_ptr", "choices_ptr"])
def _pick_kernel(
    totals_ptr, group_max_ptr, grid_ptr, choices_ptr, options_ptr, dest_ptr, scale_ptr, nibbles_ptr, scale_max_ptr,
    N, P,
    P_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one group, BLOCK_N columns. Every program of a group takes the same multiplier (a
    # few dozen comparisons), the first of tile 0 writes q_scale_max.
    group = tl.program_id(0)
    tile = tl.program_id(1)
    ps = tl.arange(0, P_BLOCK)
    totals = tl.load(totals_ptr + group * P + ps, mask=ps < P, other=float("inf"))
    # torch.argmin: the first of equal minima; a NaN counts as the least (the first NaN).
    nan = totals != totals
    least = tl.min(tl.where(nan, float("inf"), totals), axis=0)
    first_nan = tl.min(tl.where(nan, ps, P_BLOCK), axis=0)
    p = tl.where(first_nan < P_BLOCK, first_nan, tl.min(tl.where(totals == least, ps, P_BLOCK), axis=0))
    # q_scale_max = fp16(M · p) (float64 through float32, as in the search kernel) and S = fp16((k+1)² ·
    # fp16(q_scale_max / 256)), as scale_from_nibbles rounds them.
    scale_max = (tl.load(group_max_ptr + group) * tl.load(grid_ptr + p)).to(tl.float32).to(tl.float16)
    option = tl.load(options_ptr + group).to(tl.int64)
    dest = tl.load(dest_ptr + group).to(tl.int64)
    if tile == 0:
        tl.store(scale_max_ptr + dest, scale_max)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    nibble = tl.load(choices_ptr + (group * P + p).to(tl.int64) * N + cols, mask=col_ok, other=0)
    tl.store(nibbles_ptr + dest * N + cols, nibble, mask=col_ok)
    step = (scale_max.to(tl.float32) * 0.00390625).to(tl.float16).to(tl.float32)  # / 256, exact
    t = nibble.to(tl.float32) + 1.0
    tl.store(scale_ptr + option * N + cols, (t * t * step).to(tl.float16), mask=col_ok)


_BLOCK_R = 32
_BLOCK_N = 64
_PICK_BLOCK_N = 1024


@dataclass(frozen=True, eq=False)
class SearchScratch:
    """The Triton path's intermediate results for `slots` groups searched at once (see search_batch_triton)."""

    group_max: Tensor  # (slots,) in the work dtype: M
    choices: Tensor  # (slots, P, N) uint8: each column's best nibble for every multiplier
    partial: Tensor  # (slots, tiles, P) in the work dtype: Σ over a tile's columns of their least error

    @classmethod
    def allocate(
        cls, slots: int, columns: int, device: torch.device, dtype: torch.dtype = torch.float32,
    ) -> SearchScratch:
        """Scratch for searches of rows of `dtype` (the work dtype: float32 or float64)."""
        tiles = -(-columns // _BLOCK_N)
        return cls(
            torch.empty(slots, dtype=dtype, device=device),
            torch.empty(slots, MULTIPLIER_POINTS, columns, dtype=torch.uint8, device=device),
            torch.empty(slots, tiles, MULTIPLIER_POINTS, dtype=dtype, device=device),
        )

    def part(self, first: int, count: int) -> SearchScratch:
        """Slots first..first+count−1: views, for a batch of groups searched beside others."""
        end = first + count
        return SearchScratch(self.group_max[first:end], self.choices[first:end], self.partial[first:end])


@dataclass(frozen=True, eq=False)
class GroupBatch:
    """Groups of `height` rows that start at row `start`, one of each option in `options`, searched at
    once. Made once per quantize_options call, before its row loop (the index tensors then cost no
    host-to-device copy per search)."""

    start: int
    height: int
    options: Tensor  # (n,) int64 on the device: each group's option (its (K, N) slice of work)
    dest: Tensor  # (n,) int64 on the device: each group's row in the nibbles and q_scale_max outputs
    scratch: SearchScratch | None = None  # the Triton path's, n slots (possibly views of a shared one)


@dataclass(frozen=True, eq=False)
class SearchTarget:
    """What the searches of one quantize_options call read and write (B options, K rows, N columns, G
    groups of all options together)."""

    work: Tensor  # (B, K, N) float32 or float64 (the work dtype): the rows searched, read in place
    row_bits: Tensor  # (B, K) int64: the bit width of every option's rows
    row_weights: Tensor  # (K,) in the work dtype: h_r
    scale: Tensor  # (B, N) float16: written: every option's current scales (row of the group's option)
    nibbles: Tensor  # (G, N) uint8: written at the groups' `dest` rows
    scale_max: Tensor  # (G,) float16: written at the groups' `dest` rows


def search_batch_reference(target: SearchTarget, batch: GroupBatch) -> None:
    """Choose the scales of a batch of groups from target.work's rows as they stand, and write them to the
    target: find_group_scales on the gathered rows."""
    rows = slice(batch.start, batch.start + batch.height)
    group_rows, bits = target.work[batch.options, rows], target.row_bits[batch.options, batch.start]
    nibbles, scale_max = find_group_scales(group_rows, bits, target.row_weights[rows])
    target.scale[batch.options] = scale_from_nibbles(nibbles, scale_max)
    target.nibbles[batch.dest] = nibbles
    target.scale_max[batch.dest] = scale_max


def search_batch_triton(target: SearchTarget, batch: GroupBatch) -> None:
    """search_batch_reference by the Triton kernels (batch.scratch is needed). Two launches and two torch
    reductions, no other device work: max |w| of every option's rows, the search kernel (reading the rows in
    place), the sum of its per-tile totals, the pick kernel (writing scales, nibbles and q_scale_max where the
    target keeps them)."""
    scratch = batch.scratch
    _search_launch(target.work, batch.options, target.row_bits, target.row_weights, scratch, batch.start, batch.height)
    _pick_launch(
        scratch.group_max, scratch.partial.sum(dim=1), scratch.choices, batch.options, batch.dest,
        target.scale, target.nibbles, target.scale_max,
    )


def _search_launch(
    work: Tensor, options: Tensor, row_bits: Tensor, row_weights: Tensor, scratch: SearchScratch,
    start: int, height: int,
) -> None:
    """The search kernel over rows start..start+height−1 of the given options of work (B, K, N); row_bits
    (B, ≥ start+1) and row_weights (≥ start+height,) are indexed from row 0."""
    _, in_features, columns = work.shape
    if scratch.partial.dtype != work.dtype:  # the kernel would round M and the totals to the scratch's dtype
        raise ValueError(f"{work.dtype} rows need a scratch of their dtype, got {scratch.partial.dtype}")
    # max |w| of every option's rows (the search needs the largest before it starts): one reduction, exact in
    # any order. Over all B options: cheaper than gathering the batch's (B is small where it differs).
    amax = torch.linalg.vector_norm(work[:, start : start + height], float("inf"), dim=(1, 2))
    launch(
        _search_kernel, (len(options), scratch.partial.shape[1], MULTIPLIER_POINTS), work.device,
        work, options, row_bits, row_weights, amax, _grid_on(work.device),
        scratch.group_max, scratch.choices, scratch.partial,
        start, in_features, columns, MULTIPLIER_POINTS, row_bits.stride(0),
        R=height, NIBBLES=NIBBLES, BLOCK_R=_BLOCK_R, BLOCK_N=_BLOCK_N, num_warps=4,
    )


def search_triton(rows: Tensor, bits: Tensor, row_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The search by the Triton kernel: rows (B, R, N), bits (B,), row_weights (R,) → M (B,) in the rows' dtype,
    Σ_n min_k err(p, k, n) (B, P) and each column's best nibble (B, P, N) uint8. On CPU tensors it runs
    in Triton's interpreter."""
    rows = rows.contiguous()
    groups, height, columns = rows.shape
    scratch = SearchScratch.allocate(groups, columns, rows.device, rows.dtype)
    options = torch.arange(groups, device=rows.device)
    _search_launch(rows, options, bits[:, None], row_weights.contiguous(), scratch, 0, height)
    return scratch.group_max, scratch.partial.sum(dim=1), scratch.choices


def pick_triton(group_max: Tensor, totals: Tensor, choices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """pick by the pick kernel, and the chosen scales: nibbles (B, N) uint8, q_scale_max (B,) float16 and
    S (B, N) float16 (scale_from_nibbles of the two)."""
    groups, _, columns = choices.shape
    index = torch.arange(groups, device=choices.device)
    scale = torch.empty(groups, columns, dtype=torch.float16, device=choices.device)
    nibbles = torch.empty(groups, columns, dtype=torch.uint8, device=choices.device)
    scale_max = torch.empty(groups, dtype=torch.float16, device=choices.device)
    _pick_launch(
        group_max.contiguous(), totals.contiguous(), choices.contiguous(), index, index, scale, nibbles, scale_max
    )
    return nibbles, scale_max, scale


def _pick_launch(
    group_max: Tensor, totals: Tensor, choices: Tensor, options: Tensor, dest: Tensor,
    scale: Tensor, nibbles: Tensor, scale_max: Tensor,
) -> None:
    """The pick kernel: group g's choice to row options[g] of scale (B, N) and row dest[g] of nibbles (G, N)
    and scale_max (G,)."""
    columns = choices.shape[2]
    launch(
        _pick_kernel, (len(options), -(-columns // _PICK_BLOCK_N)), choices.device,
        totals, group_max, _grid_on(choices.device), choices, options, dest, scale, nibbles, scale_max,
        columns, MULTIPLIER_POINTS,
        P_BLOCK=32, BLOCK_N=_PICK_BLOCK_N, num_warps=4,
    )
