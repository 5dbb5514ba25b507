"""GPTQ's step over one 32-row block for a batch of options (docs/exl2-format.md 4.9, Q6).

`quantize_options` walks the stored rows in blocks of 32 for B options at once. Inside a block, every
row is rounded to its option's grid and its error is pushed onto the block's later rows before they are
rounded in turn; the update of all rows below the block is one matrix product afterwards, left to the
caller. `gptq_block_step` is that inner loop:

    reads   work[:, a:a+32]  (B, K, N), the error-compensated weights (left unchanged)
            factor[a:a+32, a:a+32]  the inverse Cholesky factor U, upper triangular
            scale (B, N) fp16, zero[:, a:a+32] and maxq[:, a:a+32] (per option and row)
    writes  codes[:, a:a+32] (B, K, N) uint8, values[:, a:a+32] (B, K, N) fp16, the loader's
            dequantized weights, and errors (B, 32, N) for the caller's trailing update
            work[:, a+32:] -= U[a:a+32, a+32:]ᵀ @ errors

work, factor, zero, maxq and errors share one dtype, the work dtype: float32, or float64 (the passes at
`passes.dtype: float64`, where the CPU and the GPU must give the same bytes). The kernel reproduces the
reference bit for bit in either: the same operations in the work dtype in the same order, IEEE-rounded
divisions, no fused multiply-adds, and the fp16 roundings of `dequantize_codes`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from exlbuild.kernels.pack import dequantize_codes
from exlbuild.kernels.runtime import jit, launch, tl, use_triton

# The row loop's block: the finest granularity of group boundaries in the format (every group and
# bit-width boundary of every option lies on a multiple of 32 rows).
BLOCK_ROWS = 32


@dataclass(frozen=True, eq=False)
class BlockStep:
    """The tensors every block step of one `quantize_options` call reads or writes (B options, K rows, N
    columns; see the module docstring for what each step reads and writes)."""

    work: Tensor  # (B, K, N) float32 or float64: the work dtype, also factor's, zero's, maxq's and errors'
    factor: Tensor  # (K, K), upper triangular
    scale: Tensor  # (B, N) fp16: the scales of the groups the block lies in (the caller updates them)
    zero: Tensor  # (B, K), per option and row
    maxq: Tensor  # (B, K)
    codes: Tensor  # (B, K, N) uint8
    values: Tensor  # (B, K, N) fp16
    errors: Tensor  # (B, 32, N)

    def __post_init__(self) -> None:
        # Checked once here, not at every block: the row loop of quantize_options is host-bound on the GPU.
        options, in_features, out_features = self.work.shape
        work_dtype = self.work.dtype
        if work_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"work: expected float32 or float64, got {work_dtype}")
        expected = {
            "work": (work_dtype, (options, in_features, out_features)),
            "factor": (work_dtype, (in_features, in_features)),
            "scale": (torch.float16, (options, out_features)),
            "zero": (work_dtype, (options, in_features)),
            "maxq": (work_dtype, (options, in_features)),
            "codes": (torch.uint8, (options, in_features, out_features)),
            "values": (torch.float16, (options, in_features, out_features)),
            "errors": (work_dtype, (options, BLOCK_ROWS, out_features)),
        }
        for name, (dtype, shape) in expected.items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
            # factor is read through its strides, zero and maxq through their row strides; the large tensors
            # must be dense.
            if name in ("zero", "maxq") and t.stride(1) != 1:
                raise ValueError(f"{name} must have consecutive rows")
            if name not in ("factor", "zero", "maxq") and not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def gptq_block_step(step: BlockStep, a: int) -> None:
    """Quantize rows a..a+31 of every option (see the module docstring): Triton on CUDA, else the reference.
    (The tensors' shapes are checked when the BlockStep is made.)"""
    in_features = step.work.shape[1]
    if a % BLOCK_ROWS or not 0 <= a <= in_features - BLOCK_ROWS:
        raise ValueError(f"block start {a} must be a multiple of {BLOCK_ROWS} inside {in_features} rows")
    if use_triton(*step.tensors(), float64=True):
        gptq_block_step_triton(step, a)
    else:
        gptq_block_step_reference(step, a)


def gptq_block_step_reference(step: BlockStep, a: int) -> None:
    """The reference: one row at a time, all options and columns at once, in the work dtype."""
    e = a + BLOCK_ROWS
    # A copy, so that the caller's work stays as it was: rows a..e are not read again after the block.
    block = step.work[:, a:e].clone()
    scale, factor = step.scale, step.factor
    s = scale.to(block.dtype)
    for r in range(BLOCK_ROWS):
        c = a + r
        row, z, m = block[:, r], step.zero[:, c : c + 1], step.maxq[:, c : c + 1]
        # A zero scale (a group of near-zero weights whose q_scale_max/256 underflows fp16) decodes every
        # code to zero; take the zero point there instead of dividing by zero.
        ratio = torch.where(s > 0, row / s, 0.0)
        q = (torch.round(ratio) + z).clamp(torch.zeros_like(m), m)
        v = dequantize_codes(q, z, scale)
        step.codes[:, c] = q.to(torch.uint8)
        step.values[:, c] = v
        err = (row - v.to(row.dtype)) / factor[c, c]
        step.errors[:, r] = err
        block[:, r + 1 :] -= factor[c, c + 1 : e, None] * err[:, None, :]


@jit
def _gptq_block_kernel(
    work_ptr, factor_ptr, scale_ptr, zero_ptr, maxq_ptr, codes_ptr, values_ptr, errors_ptr,
    a, K, N,
    factor_stride_row, factor_stride_col, zero_stride, maxq_stride,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one option, BLOCK_N columns, all ROWS rows of the block held in registers.
    dtype = work_ptr.dtype.element_ty  # the work dtype (BlockStep checks that the work tensors share it)
    # Divisions IEEE-rounded, as torch's: tl.math.div_rn in float32 (`/` is div.full.f32 on the GPU, not IEEE),
    # `/` in float64, which div_rn does not take (PTX div.rn.f64: IEEE; the interpreter's numpy is IEEE in both).
    FLOAT64: tl.constexpr = dtype == tl.float64
    # Round half to even, as torch.round: adding and removing 1.5·2^m (m the mantissa's bits, 23 or 52) leaves the
    # nearest integer for |x| < 2^(m−1); a larger |x| lies far outside every code range and clamps the same anyway.
    ROUND_LIMIT: tl.constexpr = 2.0 ** (dtype.fp_mantissa_width - 1)
    option = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = cols < N
    rows = tl.arange(0, ROWS)
    start = a.to(tl.int64)
    first = option.to(tl.int64) * K + start  # the block's first row in the flattened (B·K, N) tensors
    w = tl.load(work_ptr + (first + rows[:, None]) * N + cols[None, :], mask=in_range[None, :], other=0.0)
    s = tl.load(scale_ptr + option * N + cols, mask=in_range, other=0.0).to(dtype)
    # A zero scale decodes every code to zero (see the reference); divide by 1 there instead of 0.
    has_scale = s > 0
    divisor = tl.where(has_scale, s, 1.0)
    # A loop, not tl.static_range: unrolled, the 32 rows made one straight-line body that Triton compiled in
    # 12–25 s (every fresh machine's first build paid it), the loop in 0.5 s; picking row r out of the tile is
    # then a select per row in registers (bench/results/kernels-h100.md).
    for r in range(ROWS):
        u_row = factor_ptr + (start + r) * factor_stride_row + start * factor_stride_col  # U[a + r, a:]
        # Row r with the errors of rows 0..r-1 applied. Picking it out by a masked sum is exact: the
        # other rows contribute zeros.
        w_r = tl.sum(tl.where(rows[:, None] == r, w, 0.0), axis=0)
        z = tl.load(zero_ptr + option * zero_stride + start + r)
        m = tl.load(maxq_ptr + option * maxq_stride + start + r)
        ratio = tl.where(has_scale, w_r / divisor if FLOAT64 else tl.math.div_rn(w_r, divisor), 0.0)
        rounded = tl.where(tl.abs(ratio) < ROUND_LIMIT, (ratio + 3 * ROUND_LIMIT) - 3 * ROUND_LIMIT, ratio)
        q = tl.minimum(tl.maximum(rounded + z, 0.0), m)
        # (q − z)·S is exact in float32 (at most 9 + 11 significant bits): one rounding to fp16, as the loader.
        v = ((q - z) * s).to(tl.float16)
        u_rr = tl.load(u_row + r * factor_stride_col)
        residual = w_r - v.to(dtype)
        err = residual / u_rr if FLOAT64 else tl.math.div_rn(residual, u_rr)
        out = (first + r) * N + cols
        tl.store(codes_ptr + out, q.to(tl.uint8), mask=in_range)
        tl.store(values_ptr + out, v, mask=in_range)
        tl.store(errors_ptr + (option * ROWS + r).to(tl.int64) * N + cols, err, mask=in_range)
        # Push the error onto the later rows of the block (U is upper triangular: rows ≤ r get zero).
        u = tl.load(u_row + rows * factor_stride_col, mask=rows > r, other=0.0)
        w = w - u[:, None] * err[None, :]


# One warp per program, one column per thread: the 32 rows of a column sit in one thread's registers,
# so picking out a row is a reduction inside the thread.
_BLOCK_N = 32
_NUM_WARPS = 1


def gptq_block_step_triton(step: BlockStep, a: int) -> None:
    """The Triton kernel (on CPU tensors it runs in Triton's interpreter). No checks: see gptq_block_step."""
    options, in_features, out_features = step.work.shape
    launch(
        _gptq_block_kernel, (options, -(-out_features // _BLOCK_N)), step.work.device,
        step.work, step.factor, step.scale, step.zero, step.maxq, step.codes, step.values, step.errors,
        a, in_features, out_features, *step.factor.stride(), step.zero.stride(0), step.maxq.stride(0),
        ROWS=BLOCK_ROWS, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS,
        # Separate multiply and subtract, as the reference's tensor operations round them.
        enable_fp_fusion=False,
    )

