"""One Adam update (exlbuild.quant.exl2.tune.Adam) of a float32 tensor in place: one kernel reading the parameter,
its gradient and both moments once and writing them once, where the update as PyTorch expressions takes ~9
elementwise passes over the tensor (the refinement's codes: a few million values a step, every step).

With gradient g, moments m and v, bias corrections c1 = 1 − β1ᵗ and c2 = 1 − β2ᵗ and step size α (the learning
rate times its schedule's factor):

    m ← m + (1 − β1)(g − m),    v ← β2·v + (1 − β2)·g²,    p ← p − α·(m / c1) / (√(v / c2) + ε)

α, c1 and c2 are row t of a (steps, 3) schedule, t a step number held on the device: a step captured in a CUDA graph
then replays with nothing from the host, and the scalars of a step cost no kernels of their own (they were eight an
optimizer a step, each a launch as long as a small update's).

The kernel computes the same operations in float32 in the same order, but the GPU may contract a product and a sum
into one fused multiply-add and takes its fast square root and division: results agree with the reference to a few
units of float32's last place, not bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from exlbuild.kernels.runtime import jit, launch, tl, use_triton


def adam_update_reference(param: Tensor, grad: Tensor, mean: Tensor, square: Tensor, schedule: Tensor, step: Tensor,
                          betas: tuple[float, float], eps: float) -> None:
    step_size, c1, c2 = schedule.index_select(0, step.view(1))[0]  # no read of the step on the host
    b1, b2 = betas
    mean.lerp_(grad, 1 - b1)
    square.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    param.sub_(step_size * (mean / c1) / ((square / c2).sqrt() + eps))


# N unspecialized: the refinement's multipliers differ in length from layer to layer, and a fit captured as a CUDA
# graph without ordinary steps first (tune.run_steps) must not meet a new specialization to compile.
@jit(do_not_specialize=["N"])
def _adam_kernel(param_ptr, grad_ptr, mean_ptr, square_ptr, schedule_ptr, step_ptr, N, one_minus_b1, b2,
                 one_minus_b2, eps, BLOCK: tl.constexpr):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < N
    g = tl.load(grad_ptr + at, mask=mask, other=0.0)
    m = tl.load(mean_ptr + at, mask=mask, other=0.0)
    v = tl.load(square_ptr + at, mask=mask, other=0.0)
    p = tl.load(param_ptr + at, mask=mask, other=0.0)
    m = m + one_minus_b1 * (g - m)  # torch.lerp's form for a weight under 1/2
    v = v * b2 + g * g * one_minus_b2
    row = schedule_ptr + tl.load(step_ptr) * 3  # this step's α, c1, c2
    p = p - tl.load(row) * (m / tl.load(row + 1)) / (tl.sqrt(v / tl.load(row + 2)) + eps)
    tl.store(mean_ptr + at, m, mask=mask)
    tl.store(square_ptr + at, v, mask=mask)
    tl.store(param_ptr + at, p, mask=mask)


_BLOCK = 1024


def adam_update_triton(param: Tensor, grad: Tensor, mean: Tensor, square: Tensor, schedule: Tensor, step: Tensor,
                       betas: tuple[float, float], eps: float) -> None:
    if not all(t.is_contiguous() and t.dtype == torch.float32 for t in (param, grad, mean, square, schedule)):
        raise ValueError("the Adam kernel updates contiguous float32 tensors with a float32 schedule")
    b1, b2 = betas  # 1 − β taken here in double precision, as the reference's scalars are (in float32 it is 1e-5 off)
    launch(_adam_kernel, (-(-param.numel() // _BLOCK),), param.device, param, grad, mean, square, schedule, step,
           param.numel(), 1 - b1, b2, 1 - b2, eps, BLOCK=_BLOCK, num_warps=4)


def adam_update(param: Tensor, grad: Tensor, mean: Tensor, square: Tensor, schedule: Tensor, step: Tensor,
                betas: tuple[float, float], eps: float) -> None:
    """Update param, mean and square in place (module docstring) with row `step` (a 0-dim integer tensor) of
    `schedule` (steps, 3): α, c1, c2, all on param's device. Triton on CUDA, else the reference."""
    if use_triton(param, grad, mean, square):
        adam_update_triton(param, grad, mean, square, schedule, step, betas, eps)
    else:
        adam_update_reference(param, grad, mean, square, schedule, step, betas, eps)
