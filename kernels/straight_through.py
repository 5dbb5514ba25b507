"""The refinement's straight-through weight (exlbuild.quant.exl2.refine): one pass over a linear's weights forward
and one backward, where the same expression in PyTorch takes 7 and ~16 (each an elementwise kernel of its own: on
small models they made up much of a refinement step's time).

For output rows of one linear: latent codes x (rows, in) float32 (codes minus zero points, moved by the fit), their
fp16 scales s (rows, in), each input feature's code range [low_i, high_i] (float32) and its factor f_i (the tuned
multiplier of the feature's group, in the compute dtype, which the output takes):

    w = dtype(dtype(fp16(s · round(clamp(x, low, high)))) · f)

with round half to even (torch.round) and fp16 as the loader decodes a weight; the factor scales the weight's
input features, the same product as scaling the linear's inputs but on a weight-sized tensor instead of several
activation-sized ones. Backward, from G = ∂L/∂w: the rounding's gradient taken as 1 (straight through), the clamp's
1 inside the range, 0 outside and 1/2 on a bound (as torch.minimum and torch.maximum give it), and

    ∂L/∂x = float(fp16(dtype(G · f))) · s · inside(x),    ∂L/∂f_i = Σ_rows float(G) · float(dtype(fp16(...)))

(products of two bfloat16 or fp16 values are exact in float32). The kernels compute the same roundings in the same
order: the weight and ∂L/∂x equal the references' bit for bit; ∂L/∂f sums its rows in another order (float32
rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from exlbuild.kernels.runtime import jit, launch, tl, use_triton


def _inside(latent: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """1 inside the code range, 1/2 on a bound, 0 outside: the clamp's gradient."""
    return ((latent > low) & (latent < high)).float() + 0.5 * ((latent == low) | (latent == high)).float()


def decoded_weight_reference(latent: Tensor, scale: Tensor, low: Tensor, high: Tensor, dtype: torch.dtype) -> Tensor:
    """dtype(fp16(s · round(clamp(x, low, high)))): the weight of the rounded codes, before the factor."""
    return (scale * torch.round(torch.maximum(torch.minimum(latent, high), low))).half().to(dtype)


def straight_through_weight_reference(latent: Tensor, scale: Tensor, low: Tensor, high: Tensor,
                                      factor: Tensor) -> Tensor:
    return decoded_weight_reference(latent, scale, low, high, factor.dtype) * factor


def straight_through_backward_reference(grad: Tensor, latent: Tensor, scale: Tensor, low: Tensor, high: Tensor,
                                        factor: Tensor) -> tuple[Tensor, Tensor]:
    weight = decoded_weight_reference(latent, scale, low, high, factor.dtype)
    grad_latent = (grad * factor).half().float() * scale * _inside(latent, low, high)
    return grad_latent, (grad.float() * weight.float()).sum(0)


@jit
def _rounded_code(x, low, high):
    """round(clamp(x, low, high)) as torch computes it: half to even (adding and removing 1.5·2^23 leaves the
    nearest integer for |q| < 2^22; codes have at most 8 bits), and −0 where a negative value rounds to zero."""
    q = tl.maximum(tl.minimum(x, high), low)
    rounded = (q + 12582912.0) - 12582912.0
    return tl.where(rounded == 0.0, q * 0.0, rounded)


@jit
def _forward_kernel(latent_ptr, scale_ptr, low_ptr, high_ptr, factor_ptr, out_ptr, ROWS, COLS,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < COLS
    mask = (rows < ROWS)[:, None] & col_ok[None, :]
    at = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
    x = tl.load(latent_ptr + at, mask=mask, other=0.0)
    s = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
    low = tl.load(low_ptr + cols, mask=col_ok, other=0.0)[None, :]
    high = tl.load(high_ptr + cols, mask=col_ok, other=0.0)[None, :]
    f = tl.load(factor_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w = (s * _rounded_code(x, low, high)).to(tl.float16).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + at, (w * f).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _backward_kernel(grad_ptr, latent_ptr, scale_ptr, low_ptr, high_ptr, factor_ptr, grad_latent_ptr, partial_ptr,
                     ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: a tile of BLOCK_R rows × BLOCK_C columns; its columns' sums of G·w go to row tile_r of `partial`.
    tile_r = tl.program_id(0)
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < COLS
    mask = (rows < ROWS)[:, None] & col_ok[None, :]
    at = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
    g = tl.load(grad_ptr + at, mask=mask, other=0.0)
    x = tl.load(latent_ptr + at, mask=mask, other=0.0)
    s = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
    low = tl.load(low_ptr + cols, mask=col_ok, other=0.0)[None, :]
    high = tl.load(high_ptr + cols, mask=col_ok, other=0.0)[None, :]
    f = tl.load(factor_ptr + cols, mask=col_ok, other=0.0)[None, :]
    gf = (g.to(tl.float32) * f.to(tl.float32)).to(g.dtype)  # as dtype's own product rounds it
    inside = tl.where((x > low) & (x < high), 1.0, tl.where((x == low) | (x == high), 0.5, 0.0))
    tl.store(grad_latent_ptr + at, gf.to(tl.float16).to(tl.float32) * s * inside, mask=mask)
    w = (s * _rounded_code(x, low, high)).to(tl.float16).to(g.dtype).to(tl.float32)
    column = tl.sum(tl.where(mask, g.to(tl.float32) * w, 0.0), axis=0)
    tl.store(partial_ptr + tile_r.to(tl.int64) * COLS + cols, column, mask=col_ok)


_BLOCK_R = 32
_BLOCK_C = 128


def _grid(latent: Tensor) -> tuple[int, int]:
    rows, cols = latent.shape
    return -(-rows // _BLOCK_R), -(-cols // _BLOCK_C)


def straight_through_weight_triton(latent: Tensor, scale: Tensor, low: Tensor, high: Tensor,
                                   factor: Tensor) -> Tensor:
    out = torch.empty(latent.shape, dtype=factor.dtype, device=latent.device)
    launch(_forward_kernel, _grid(latent), latent.device, latent.contiguous(), scale.contiguous(), low.contiguous(),
           high.contiguous(), factor.contiguous(), out, *latent.shape, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
           num_warps=4)
    return out


def straight_through_backward_triton(grad: Tensor, latent: Tensor, scale: Tensor, low: Tensor, high: Tensor,
                                     factor: Tensor) -> tuple[Tensor, Tensor]:
    grid = _grid(latent)
    grad_latent = torch.empty(latent.shape, dtype=torch.float32, device=latent.device)
    partial = torch.empty(grid[0], latent.shape[1], dtype=torch.float32, device=latent.device)
    launch(_backward_kernel, grid, latent.device, grad.contiguous(), latent.contiguous(), scale.contiguous(),
           low.contiguous(), high.contiguous(), factor.contiguous(), grad_latent, partial, *latent.shape,
           BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=4)
    return grad_latent, partial.sum(0)


def straight_through_weight(latent: Tensor, scale: Tensor, low: Tensor, high: Tensor, factor: Tensor) -> Tensor:
    """w (rows, in) in factor's dtype (module docstring). Triton on CUDA, else the reference."""
    if use_triton(latent, scale, low, high, factor):
        return straight_through_weight_triton(latent, scale, low, high, factor)
    return straight_through_weight_reference(latent, scale, low, high, factor)


def straight_through_backward(grad: Tensor, latent: Tensor, scale: Tensor, low: Tensor, high: Tensor,
                              factor: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂x (rows, in) float32, ∂L/∂f (in,) float32) from G = ∂L/∂w (module docstring). Triton on CUDA, else the
    reference."""
    if use_triton(grad, latent, scale, low, high, factor):
        return straight_through_backward_triton(grad, latent, scale, low, high, factor)
    return straight_through_backward_reference(grad, latent, scale, low, high, factor)
