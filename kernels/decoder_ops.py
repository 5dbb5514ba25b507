"""The decoder layer's elementwise and per-token work (exlbuild.model.llama), one kernel forward and one backward
each: RMSNorm, the rotary embedding, the gated activation silu(gate)·up, the fits' per-feature scales of the linears'
inputs, and the refinement's loss (each token's squared error relative to its target's squared norm).

In PyTorch each of these is a chain of elementwise and reduction kernels (an RMSNorm in bfloat16 is ~8 forward and
~10 backward, the rotary embedding 4 and 6 for each of q and k, the loss ~8 and ~8), and in the fits' steps
(exlbuild.quant.exl2.refine, tune) on small models those chains took most of a step's GPU time: ~1.8 ms of a
2.55 ms refinement step on SmolLM2 (bench/NOTES.md §22). Each fused kernel reads its inputs once and writes its
outputs once: with them (and kernels/adam.py) the step took 1.52 ms instead of 2.28 on one H100 (§23).

The references below are the layer's definitions. What the kernels reproduce, and how closely:

- rotary: the same roundings in the same order (each product rounded to the tensor's dtype, then their sum), so
  values and gradients equal the reference's bit for bit;
- rms_norm, gated_activation, squared_relative_error: the same formulas in float32 with the reference's roundings
  to the tensor's dtype, but their sums (over a token's features, over tokens for the norm weight's gradient) run in
  another order and exp, rsqrt and division are the GPU's fast ones: equal within a few units of the last place of the output dtype;
- scale_features: the products equal the reference's bit for bit; of the gradients, the input's sums the linears'
  rounded products in float32 and rounds once (autograd adds them in the dtype), and the scales' sum over tokens in
  another order: within a few units of the last place.

CUDA tensors go to the kernels, others to the references (exlbuild.kernels.runtime). The kernels' gradients come
from torch.autograd.Function subclasses, so the layer differentiates the same way on either path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from exlbuild.kernels.runtime import jit, launch, tl, use_triton

# ---------------------------------------------------------------------------------------------
# References


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in float32 whatever the compute dtype, as the reference implementations do (float64 stays float64).
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (batch, seq, heads, head_dim) rotated by position: pairs are (i, i + head_dim/2); cos and sin (seq,
    head_dim) in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def scale_features_reference(x: Tensor, scales: list[Tensor]) -> list[Tensor]:
    """x (..., features) times each per-feature scale (features,): the inputs of linears that read x, each scaled."""
    return [x * scale for scale in scales]


def gated_activation_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def squared_relative_error_reference(y: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of |y − target|² / |target|², in float32."""
    y, target = y.float(), target.float()
    return ((y - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)).mean()


# ---------------------------------------------------------------------------------------------
# RMSNorm


@jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, ROWS, COLS, eps,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    at = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / COLS + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < COLS, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + at, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < ROWS)


@jit
def _rms_norm_backward_kernel(grad_ptr, x_ptr, w_ptr, rstd_ptr, grad_x_ptr, partial_ptr, ROWS, COLS,
                              ROWS_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: ROWS_PER_PROGRAM rows, BLOCK_R at a time; its sum over them of G·normed goes to its row of
    # `partial` (summed over programs afterwards, in a fixed order).
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < COLS
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    grad_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    for first in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        rows = program * ROWS_PER_PROGRAM + first + tl.arange(0, BLOCK_R)
        mask = (rows < ROWS)[:, None] & col_ok[None, :]
        at = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
        g = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < ROWS, other=0.0)[:, None]
        out_dtype = grad_ptr.dtype.element_ty
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        grad_w += tl.sum((g * normed).to(out_dtype).to(tl.float32), axis=0)
        # The gradient reaching the float32 normalised value: G·w as the output dtype rounds it.
        gn = (g * w).to(out_dtype).to(tl.float32)
        dot = tl.sum(gn * x, axis=1)[:, None] / COLS
        tl.store(grad_x_ptr + at, (rstd * (gn - x * rstd * rstd * dot)).to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + program.to(tl.int64) * COLS + cols, grad_w, mask=col_ok)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _row_tiles(cols: int) -> dict[str, int]:
    """Launch options of the kernels that hold whole rows of `cols` values: tiles of ~4,096 values, more warps
    for rows longer than that (8,192 features at 70B) so that a row still fits in registers."""
    block_c = _next_power_of_2(cols)
    return {"BLOCK_R": max(1, min(16, 4096 // block_c)), "BLOCK_C": block_c, "num_warps": 4 if block_c <= 4096 else 8}


def _rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    tiles = _row_tiles(cols)
    launch(_rms_norm_forward_kernel, (-(-rows // tiles["BLOCK_R"]),), x.device, x, weight, out, rstd, rows, cols, eps,
           **tiles)
    return out, rstd


def _rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    rows, cols = rstd.numel(), x.shape[-1]
    tiles = _row_tiles(cols)
    # ~512 programs at most, each a multiple of BLOCK_R rows: the weight's partial sums stay small.
    per_program = tiles["BLOCK_R"] * max(1, -(-rows // (512 * tiles["BLOCK_R"])))
    programs = -(-rows // per_program)
    grad_x = torch.empty_like(x)
    partial = torch.empty(programs, cols, dtype=torch.float32, device=x.device)
    launch(_rms_norm_backward_kernel, (programs,), x.device, grad.contiguous(), x, weight, rstd, grad_x, partial,
           rows, cols, ROWS_PER_PROGRAM=per_program, **tiles)
    return grad_x, partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        grad_x, grad_w = _rms_norm_backward(grad, *ctx.saved_tensors)
        return grad_x, grad_w, None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _RMSNorm.apply(x.contiguous(), weight.contiguous(), eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight · dtype(x / rms(x)) over the last dim, the norm in float32 or float64 (x's dtype, the product in the
    promoted dtype of x and weight). Triton on CUDA, else the reference (and for float64)."""
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


# ---------------------------------------------------------------------------------------------
# Rotary embedding


@jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, POSITIONS, SEQ, HEADS, HALF: tl.constexpr,
                   BACKWARD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    # x viewed as (positions, heads, 2·HALF); element e of a position's first halves is (head e // HALF, e % HALF)
    # (HALF a constant: a power of two in every Llama, so a shift and a mask).
    positions = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    e = tl.arange(0, BLOCK_E)
    head, j = e // HALF, e % HALF
    mask = (positions < POSITIONS)[:, None] & (e < HEADS * HALF)[None, :]
    first = positions.to(tl.int64)[:, None] * (HEADS * 2 * HALF) + (head * 2 * HALF + j)[None, :]
    table = (positions % SEQ).to(tl.int64)[:, None] * (2 * HALF) + j[None, :]
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if BACKWARD:  # the transpose of the rotation: (g1·c1 + g2·s2, g2·c2 − g1·s1)
        partner1, partner2 = (x2 * s2).to(dtype), (-(x1 * s1)).to(dtype)
    else:  # (x1·c1 − x2·s1, x2·c2 + x1·s2)
        partner1, partner2 = (-(x2 * s1)).to(dtype), (x1 * s2).to(dtype)
    out1 = (x1 * c1).to(dtype).to(tl.float32) + partner1.to(tl.float32)
    out2 = (x2 * c2).to(dtype).to(tl.float32) + partner2.to(tl.float32)
    tl.store(out_ptr + first, out1.to(dtype), mask=mask)
    tl.store(out_ptr + first + HALF, out2.to(dtype), mask=mask)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    *_, seq, heads, head_dim = x.shape
    positions, half = x.numel() // (heads * head_dim), head_dim // 2
    out = torch.empty_like(x)
    block_e = _next_power_of_2(heads * half)
    block_p = max(1, 2048 // block_e)
    # Without contracting a product and a sum into one fused multiply-add, the float32 case rounds as torch does.
    launch(_rotary_kernel, (-(-positions // block_p),), x.device, x, cos, sin, out, positions, seq, heads,
           HALF=half, BACKWARD=backward, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4, enable_fp_fusion=False)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _rotate(grad.contiguous(), *ctx.saved_tensors, backward=True), None, None


def rotary_triton(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _Rotary.apply(x.contiguous(), cos.contiguous(), sin.contiguous())


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (batch, seq, heads, head_dim) rotated by position with tables cos, sin (seq, head_dim) in x's dtype.
    Triton on CUDA, else the reference."""
    if use_triton(x, cos, sin):
        return rotary_triton(x, cos, sin)
    return rotary_reference(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# Per-feature scales of the linears' inputs (the fits' group multipliers: exlbuild.quant.exl2.tune)

MAX_SCALES = 3  # q, k and v read one input


@jit
def _scale_features_forward_kernel(x_ptr, s0_ptr, s1_ptr, s2_ptr, o0_ptr, o1_ptr, o2_ptr, ROWS, COLS,
                                   SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    at = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dtype = o0_ptr.dtype.element_ty
    s = tl.load(s0_ptr + cols, mask=cols < COLS, other=0.0).to(tl.float32)[None, :]
    tl.store(o0_ptr + at, (x * s).to(dtype), mask=mask)
    if SCALES > 1:
        s = tl.load(s1_ptr + cols, mask=cols < COLS, other=0.0).to(tl.float32)[None, :]
        tl.store(o1_ptr + at, (x * s).to(dtype), mask=mask)
    if SCALES > 2:
        s = tl.load(s2_ptr + cols, mask=cols < COLS, other=0.0).to(tl.float32)[None, :]
        tl.store(o2_ptr + at, (x * s).to(dtype), mask=mask)


@jit
def _scaled_gradient(g_ptr, s_ptr, x, at, mask, cols, COLS):
    """One linear's share: its gradient times its scale as the dtype rounds the product (the input's gradient), and
    the sum over these rows of its gradient times x, each rounded so (its scale's gradient)."""
    g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + cols, mask=cols < COLS, other=0.0).to(tl.float32)[None, :]
    dtype = g_ptr.dtype.element_ty
    return (g * s).to(dtype).to(tl.float32), tl.sum((g * x).to(dtype).to(tl.float32), axis=0)


@jit
def _scale_features_backward_kernel(x_ptr, s0_ptr, s1_ptr, s2_ptr, g0_ptr, g1_ptr, g2_ptr, grad_x_ptr, partial_ptr,
                                    ROWS, COLS, SCALES: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: ROWS_PER_PROGRAM rows of BLOCK_C columns, BLOCK_R rows at a time; its sums over those rows go to
    # its row of `partial` (programs, SCALES, COLS), summed over programs afterwards in a fixed order.
    program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sum0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for first in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        rows = program * ROWS_PER_PROGRAM + first + tl.arange(0, BLOCK_R)
        mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
        at = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        grad_x, part = _scaled_gradient(g0_ptr, s0_ptr, x, at, mask, cols, COLS)
        sum0 += part
        if SCALES > 1:
            share, part = _scaled_gradient(g1_ptr, s1_ptr, x, at, mask, cols, COLS)
            grad_x += share
            sum1 += part
        if SCALES > 2:
            share, part = _scaled_gradient(g2_ptr, s2_ptr, x, at, mask, cols, COLS)
            grad_x += share
            sum2 += part
        tl.store(grad_x_ptr + at, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    out = partial_ptr + program.to(tl.int64) * SCALES * COLS + cols
    tl.store(out, sum0, mask=cols < COLS)
    if SCALES > 1:
        tl.store(out + COLS, sum1, mask=cols < COLS)
    if SCALES > 2:
        tl.store(out + 2 * COLS, sum2, mask=cols < COLS)


_SCALE_TILE = {"BLOCK_R": 16, "BLOCK_C": 256, "num_warps": 4}


def _up_to_three(tensors: list[Tensor]) -> list[Tensor]:
    """The kernels' three pointers of a kind: the tensors given, the first repeated in the unused places."""
    return [*tensors, *[tensors[0]] * (MAX_SCALES - len(tensors))]


class _ScaleFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *scales: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x, *scales)
        rows, cols = x.numel() // x.shape[-1], x.shape[-1]
        outs = [torch.empty_like(x) for _ in scales]  # (x and the scales share one dtype: see scale_features)
        tile = _SCALE_TILE
        grid = (-(-rows // tile["BLOCK_R"]), -(-cols // tile["BLOCK_C"]))
        launch(_scale_features_forward_kernel, grid, x.device, x, *_up_to_three(list(scales)), *_up_to_three(outs),
               rows, cols, SCALES=len(scales), **tile)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:
        x, *scales = ctx.saved_tensors
        rows, cols = x.numel() // x.shape[-1], x.shape[-1]
        tile = _SCALE_TILE
        # ~256 row programs at most, each a multiple of BLOCK_R rows: the scales' partial sums stay small.
        per_program = tile["BLOCK_R"] * max(1, -(-rows // (256 * tile["BLOCK_R"])))
        programs = -(-rows // per_program)
        grad_x = torch.empty_like(x)
        partial = torch.empty(programs, len(scales), cols, dtype=torch.float32, device=x.device)
        launch(_scale_features_backward_kernel, (programs, -(-cols // tile["BLOCK_C"])), x.device, x,
               *_up_to_three(scales), *_up_to_three([g.to(x.dtype).contiguous() for g in grads]), grad_x, partial,
               rows, cols, SCALES=len(scales), ROWS_PER_PROGRAM=per_program, **tile)
        grad_scales = partial.sum(0)
        return grad_x, *(g.to(s.dtype) for g, s in zip(grad_scales, scales))


def scale_features_triton(x: Tensor, scales: list[Tensor]) -> list[Tensor]:
    return list(_ScaleFeatures.apply(x.contiguous(), *(s.contiguous() for s in scales)))


def scale_features(x: Tensor, scales: list[Tensor]) -> list[Tensor]:
    """x (..., features) times each of 1 to 3 per-feature scales (features,), in the promoted dtype: the inputs of
    linears that read x, each with its own factors, in one pass over x each way. Triton on CUDA, else the
    reference."""
    if not 1 <= len(scales) <= MAX_SCALES:
        raise ValueError(f"scale_features takes 1 to {MAX_SCALES} scales, got {len(scales)}")
    if use_triton(x, *scales) and all(s.dtype == x.dtype for s in scales):  # (the kernel does not promote)
        return scale_features_triton(x, scales)
    return scale_features_reference(x, scales)


# ---------------------------------------------------------------------------------------------
# Gated activation


@jit
def _silu(g):
    return g / (1.0 + tl.exp(-g))


@jit
def _gated_forward_kernel(gate_ptr, up_ptr, out_ptr, N, BLOCK: tl.constexpr):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < N
    g = tl.load(gate_ptr + at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + at, (_silu(g).to(dtype).to(tl.float32) * u).to(dtype), mask=mask)


@jit
def _gated_backward_kernel(grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, N, BLOCK: tl.constexpr):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < N
    d = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dtype = grad_gate_ptr.dtype.element_ty
    # ∂/∂up is G times the forward's silu(gate), as the forward rounded it (what the reference's product saved).
    tl.store(grad_up_ptr + at, (d * _silu(g).to(dtype).to(tl.float32)).to(dtype), mask=mask)
    sigmoid = 1.0 / (1.0 + tl.exp(-g))
    grad_silu = (d * u).to(dtype).to(tl.float32)
    tl.store(grad_gate_ptr + at, (grad_silu * sigmoid * (1.0 + g * (1.0 - sigmoid))).to(dtype), mask=mask)


_ELEMENTWISE_BLOCK = 1024


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        out = torch.empty_like(gate)
        launch(_gated_forward_kernel, (-(-gate.numel() // _ELEMENTWISE_BLOCK),), gate.device, gate, up, out,
               gate.numel(), BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        launch(_gated_backward_kernel, (-(-gate.numel() // _ELEMENTWISE_BLOCK),), gate.device, grad.contiguous(),
               gate, up, grad_gate, grad_up, gate.numel(), BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        return grad_gate, grad_up


def gated_activation_triton(gate: Tensor, up: Tensor) -> Tensor:
    return _GatedActivation.apply(gate.contiguous(), up.contiguous())


def gated_activation(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up, each rounded to the inputs' dtype (the MLP's hidden activation, the input of down_proj).
    Triton on CUDA, else the reference."""
    if use_triton(gate, up) and gate.dtype == up.dtype:  # (the kernel does not promote mixed dtypes)
        return gated_activation_triton(gate, up)
    return gated_activation_reference(gate, up)


# ---------------------------------------------------------------------------------------------
# The refinement's loss


@jit
def _squared_relative_error_kernel(y_ptr, target_ptr, grad_ptr, out_ptr, ROWS, COLS,
                           BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Forward: each token's |y − t|² / |t|² to out (rows,). Backward: ∂L/∂y = grad · 2(y − t) / |t|² to out
    # (rows, cols) in y's dtype, grad (one float32 value on the device) being ∂L/∂(a token's ratio).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    at = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
    y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + at, mask=mask, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sum(t * t, axis=1), 1e-30)
    d = y - t
    if BACKWARD:
        g = tl.load(grad_ptr)
        tl.store(out_ptr + at, ((g / norm)[:, None] * (2.0 * d)).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + rows, tl.sum(d * d, axis=1) / norm, mask=rows < ROWS)


def _squared_relative_error_launch(y: Tensor, target: Tensor, grad: Tensor | None) -> Tensor:
    rows, cols = y.numel() // y.shape[-1], y.shape[-1]
    out = torch.empty(y.shape if grad is not None else (rows,), dtype=y.dtype if grad is not None else torch.float32,
                      device=y.device)
    tiles = _row_tiles(cols)
    launch(_squared_relative_error_kernel, (-(-rows // tiles["BLOCK_R"]),), y.device, y, target,
           grad if grad is not None else out, out, rows, cols, BACKWARD=grad is not None, **tiles)
    return out


class _SquaredRelativeError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, target: Tensor) -> Tensor:
        ctx.save_for_backward(y, target)
        return _squared_relative_error_launch(y, target, None).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        y, target = ctx.saved_tensors
        per_token = (grad.float() / (y.numel() // y.shape[-1])).reshape(1)
        return _squared_relative_error_launch(y, target, per_token), None


def squared_relative_error_triton(y: Tensor, target: Tensor) -> Tensor:
    return _SquaredRelativeError.apply(y.contiguous(), target.contiguous())


def squared_relative_error(y: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of |y − target|² / |target|², in float32 (the refinement's loss; target takes no gradient).
    Triton on CUDA, else the reference."""
    if use_triton(y, target):
        return squared_relative_error_triton(y, target)
    return squared_relative_error_reference(y, target)
