"""The fits' multipliers (exlbuild.quant.exl2.tune.Multipliers) expanded to one factor per feature in the compute
dtype: one kernel each way. As PyTorch expressions the expansion took 13 small kernels forward and 23 backward in
every refinement step (a cast per linear and norm both ways, the norms' products, slices of the multipliers and the
sums of their gradients), each a launch as long as the work of many of them together.

With multipliers e = exp(log) (V values) and, for each output feature f, its value source[f] and a fixed base[f]
(1 for a linear's input feature, the norm's weight for a norm's feature):

    out[f] = dtype(e[source[f]] · base[f])

and backward, from G = ∂L/∂out,

    ∂L/∂log[v] = e[v] · Σ_{f: source[f] = v} float(G[f]) · base[f]

summed from 0 in increasing f (`Expansion.order` lists each value's features so), each product rounded before it is
added. The kernels round as the references do, in the same order: they equal them bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from exlbuild.kernels.runtime import jit, launch, tl, use_triton
from exlbuild.transfer import to_device


class Expansion(NamedTuple):
    """Which value and base each output feature takes, and each value's features (CSR: order[starts[v]:starts[v+1]],
    increasing), all on the device; `most` is the most features of one value."""

    source: Tensor  # (F,) int64
    base: Tensor  # (F,) float32
    order: Tensor  # (F,) int64
    starts: Tensor  # (V + 1,) int64
    most: int

    @staticmethod
    def of(source: Tensor, base: Tensor, values: int) -> Expansion:
        """The expansion of `values` values by each feature's `source` (in host memory: made there, nothing waits
        for the device) and `base` (on the device it is for)."""
        counts = torch.bincount(source, minlength=values)
        starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        order = torch.argsort(source, stable=True)
        source, order, starts = (to_device(t, base.device) for t in (source, order, starts))
        return Expansion(source, base.float(), order, starts, int(counts.max()) if values else 0)


def expand_reference(values: Tensor, expansion: Expansion, dtype: torch.dtype) -> Tensor:
    return (values[expansion.source] * expansion.base).to(dtype)


def expand_backward_reference(grad: Tensor, values: Tensor, expansion: Expansion) -> Tensor:
    # Each value's j-th feature added at pass j, as the kernel adds them (index_add_ adds atomically on CUDA).
    contribution = grad.float() * expansion.base
    first, counts = expansion.starts[:-1], expansion.starts[1:] - expansion.starts[:-1]
    total = torch.zeros_like(values)
    for j in range(expansion.most):
        member = expansion.order[(first + j).clamp(max=len(expansion.order) - 1)]
        total = total + torch.where(j < counts, contribution[member], 0.0)
    return values * total


@jit(do_not_specialize=["F"])
def _expand_kernel(values_ptr, source_ptr, base_ptr, out_ptr, F, BLOCK: tl.constexpr):
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = f < F
    e = tl.load(values_ptr + tl.load(source_ptr + f, mask=mask, other=0), mask=mask, other=0.0)
    tl.store(out_ptr + f, (e * tl.load(base_ptr + f, mask=mask, other=0.0)).to(out_ptr.dtype.element_ty), mask=mask)


# V and MOST unspecialized: they change with each layer's groups, and a fit captured as a CUDA graph without
# ordinary steps first (tune.run_steps) must not meet a new specialization to compile.
@jit(do_not_specialize=["V", "MOST"])
def _expand_backward_kernel(grad_ptr, values_ptr, base_ptr, order_ptr, starts_ptr, out_ptr, V, MOST,
                            BLOCK: tl.constexpr):
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = v < V
    start = tl.load(starts_ptr + v, mask=valid, other=0)
    count = tl.load(starts_ptr + v + 1, mask=valid, other=0) - start
    total = tl.zeros([BLOCK], dtype=tl.float32)
    j = 0
    while j < MOST:  # (a range over a scalar argument fails in Triton's interpreter)
        member = valid & (j < count)
        f = tl.load(order_ptr + start + j, mask=member, other=0)
        g = tl.load(grad_ptr + f, mask=member, other=0.0).to(tl.float32)
        total += g * tl.load(base_ptr + f, mask=member, other=0.0)
        j += 1
    tl.store(out_ptr + v, tl.load(values_ptr + v, mask=valid, other=0.0) * total, mask=valid)


_BLOCK = 256


def expand_triton(values: Tensor, expansion: Expansion, dtype: torch.dtype) -> Tensor:
    out = torch.empty(expansion.source.shape, dtype=dtype, device=values.device)
    launch(_expand_kernel, (-(-len(out) // _BLOCK),), values.device, values, expansion.source, expansion.base, out,
           len(out), BLOCK=_BLOCK, num_warps=4)
    return out


def expand_backward_triton(grad: Tensor, values: Tensor, expansion: Expansion) -> Tensor:
    out = torch.empty_like(values)
    # No contraction to a fused multiply-add: each product is rounded before it is added, as in the reference.
    launch(_expand_backward_kernel, (-(-len(values) // _BLOCK),), values.device, grad.contiguous(), values,
           expansion.base, expansion.order, expansion.starts, out, len(values), expansion.most, BLOCK=_BLOCK,
           num_warps=4, enable_fp_fusion=False)
    return out


def expand(values: Tensor, expansion: Expansion, dtype: torch.dtype) -> Tensor:
    """(F,) in `dtype`: each feature's value times its base (module docstring). Triton on CUDA, else the
    reference."""
    if use_triton(values, expansion.source):
        return expand_triton(values, expansion, dtype)
    return expand_reference(values, expansion, dtype)


def expand_backward(grad: Tensor, values: Tensor, expansion: Expansion) -> Tensor:
    """(V,) float32: ∂L/∂log from ∂L/∂out `grad` (module docstring). Triton on CUDA, else the reference."""
    if use_triton(grad, values, expansion.source):
        return expand_backward_triton(grad, values, expansion)
    return expand_backward_reference(grad, values, expansion)
