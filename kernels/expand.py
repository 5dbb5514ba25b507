"""The fits' multipliers (exlbuild.quant.exl2.tune.Multipliers) expanded to one factor per feature in the compute
dtype: one kernel each way. As PyTorch expressions the expansion took 13 small kernels forward and 23 backward in
every refinement step (a cast per linear and norm both ways, the norms' products, slices of the multipliers and the
sums of their gradients), each a launch as long as the work of many of them together.

With multipliers e = exp(log) (V values) and, for each output feature f, its value source[f] and a fixed base[f]
(1 for a linear's input feature, the norm's weight for a norm's feature):

    out[f] = dtype(e[source[f]] · base[f])

and backward, from G = ∂L/∂out,

    ∂L/∂log[v] = e[v] · Σ_{f: source[f] = v} float(G[f]) · base[f]

The forward kernel rounds as its reference does: they are equal bit for bit. The backward kernel sums each value's
features (`Expansion.order` lists them) a chunk of CHUNK at a time, the chunk's loads issued together and added as a
tree, so its sums are in another order than the reference's (in increasing f): equal within float32's rounding, and
the same on every run. (Summing one feature at a time, each load waiting for the last, took 46 µs of a 0.82 ms
refinement step on the H100; bench/NOTES.md §43, §44.)
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
    contribution = grad.float() * expansion.base
    return values * torch.zeros_like(values).index_add_(0, expansion.source, contribution)


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
                            BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = v < V
    start = tl.load(starts_ptr + v, mask=valid, other=0)
    count = tl.load(starts_ptr + v + 1, mask=valid, other=0) - start
    total = tl.zeros([BLOCK], dtype=tl.float32)
    j = 0
    while j < MOST:  # (a range over a scalar argument fails in Triton's interpreter)
        k = j + tl.arange(0, CHUNK)
        member = valid[:, None] & (k[None, :] < count[:, None])
        f = tl.load(order_ptr + start[:, None] + k[None, :], mask=member, other=0)
        g = tl.load(grad_ptr + f, mask=member, other=0.0).to(tl.float32)
        total += tl.sum(g * tl.load(base_ptr + f, mask=member, other=0.0), axis=1)
        j += CHUNK
    tl.store(out_ptr + v, tl.load(values_ptr + v, mask=valid, other=0.0) * total, mask=valid)


_BLOCK = 256
# Values a program and features a chunk of the backward: a SmolLM2 layer has ~1,300 values (~150 groups of 32 to 128
# features, then one value for each norm feature), so ~80 programs of at most four chunks.
_BACKWARD_BLOCK, _CHUNK = 16, 32


def expand_triton(values: Tensor, expansion: Expansion, dtype: torch.dtype) -> Tensor:
    out = torch.empty(expansion.source.shape, dtype=dtype, device=values.device)
    launch(_expand_kernel, (-(-len(out) // _BLOCK),), values.device, values, expansion.source, expansion.base, out,
           len(out), BLOCK=_BLOCK, num_warps=4)
    return out


def expand_backward_triton(grad: Tensor, values: Tensor, expansion: Expansion) -> Tensor:
    out = torch.empty_like(values)
    launch(_expand_backward_kernel, (-(-len(values) // _BACKWARD_BLOCK),), values.device, grad.contiguous(), values,
           expansion.base, expansion.order, expansion.starts, out, len(values), expansion.most,
           BLOCK=_BACKWARD_BLOCK, CHUNK=_CHUNK, num_warps=4)
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
