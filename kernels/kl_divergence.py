"""The tuning's loss: the KL divergence of a model's next-token distributions from the unquantized model's, from
both models' logits.

    kl_divergence(logits, target_logits) = Σ_tokens Σ_v p_v (log p_v − log q_v),
    p = softmax(target_logits), q = softmax(logits), row by row, in float32;
    its gradient with respect to logits: q − p per token.

In PyTorch this is two float32 copies of the logits, two log-softmaxes, the KL's elementwise terms, and in the
backward as many again: ~8 ms of a tuning step on SmolLM2, whose 49,152-word vocabulary gives 4,096 tokens
200 M logits a step (bench/NOTES.md §25). The kernels read both logits in their own dtype, once forward (each
row's log-sum-exps and the KL in one online pass, as flash attention does its softmax) and once backward (the
gradient written in the logits' dtype): ~2 GB of memory traffic a step instead of ~12.

The kernels compute the same float32 formulas as the reference but sum each row in another order and use the GPU's
fast exp and log: the KL agrees to float32 rounding of its terms, the gradient to a unit or two of the logits'
dtype. CUDA tensors go to the kernels, others to the reference (exlbuild.kernels.runtime).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from exlbuild.kernels.runtime import jit, launch, tl, use_triton

_BLOCK = 4096  # vocabulary entries per iteration of a row's loop


def kl_divergence_reference(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Σ over rows of KL(softmax(target_logits) ‖ softmax(logits)) for (tokens, vocab) logits, a 0-dim float32."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def kl_divergence(logits: Tensor, target_logits: Tensor) -> Tensor:
    """kl_divergence_reference, differentiable with respect to `logits`: Triton on CUDA, else the reference."""
    if use_triton(logits, target_logits):
        return kl_divergence_triton(logits, target_logits)
    return kl_divergence_reference(logits, target_logits)


# ---------------------------------------------------------------------------------------------
# Triton: one program per token.


@jit
def _kl_forward_kernel(logits, target, kl, maxima, sums, vocab, logits_stride, target_stride,
                       BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits += row * logits_stride
    target += row * target_stride
    # Running maxima, sums of exponentials below them, and Σ exp(t − max_t)·(t − x): each rescaled when its
    # maximum rises, so one pass over the row gives both log-sum-exps and the KL.
    max_q = tl.full((), float("-inf"), tl.float32)
    max_p = tl.full((), float("-inf"), tl.float32)
    sum_q = tl.zeros((), tl.float32)
    sum_p = tl.zeros((), tl.float32)
    weighted = tl.zeros((), tl.float32)
    for block in range(BLOCKS):
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < vocab
        x = tl.load(logits + offsets, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(target + offsets, mask=inside, other=0.0).to(tl.float32)
        new_max_q = tl.maximum(max_q, tl.max(tl.where(inside, x, float("-inf")), 0))
        sum_q = sum_q * tl.exp(max_q - new_max_q) + tl.sum(tl.where(inside, tl.exp(x - new_max_q), 0.0), 0)
        max_q = new_max_q
        new_max_p = tl.maximum(max_p, tl.max(tl.where(inside, t, float("-inf")), 0))
        rescale = tl.exp(max_p - new_max_p)
        e = tl.where(inside, tl.exp(t - new_max_p), 0.0)
        sum_p = sum_p * rescale + tl.sum(e, 0)
        weighted = weighted * rescale + tl.sum(e * (t - x), 0)
        max_p = new_max_p
    # The backward takes exp(x − max) / sum rather than exp(x − log-sum-exp): x − max is exact where it matters, a
    # log-sum-exp (~10) would carry its own rounding into every probability.
    tl.store(maxima + 2 * row, max_q)
    tl.store(maxima + 2 * row + 1, max_p)
    tl.store(sums + 2 * row, sum_q)
    tl.store(sums + 2 * row + 1, sum_p)
    tl.store(kl + row, weighted / sum_p + (max_q - max_p) + (tl.log(sum_q) - tl.log(sum_p)))


@jit
def _kl_backward_kernel(logits, target, maxima, sums, grad_out, grad, vocab, logits_stride, target_stride,
                        BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(grad_out).to(tl.float32)  # read on the device: the step may be a replayed CUDA graph
    max_q, max_p = tl.load(maxima + 2 * row), tl.load(maxima + 2 * row + 1)
    sum_q, sum_p = tl.load(sums + 2 * row), tl.load(sums + 2 * row + 1)
    for block in range(BLOCKS):
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < vocab
        x = tl.load(logits + row * logits_stride + offsets, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(target + row * target_stride + offsets, mask=inside, other=0.0).to(tl.float32)
        g = scale * (tl.exp(x - max_q) / sum_q - tl.exp(t - max_p) / sum_p)
        tl.store(grad + row * logits_stride + offsets, g.to(grad.dtype.element_ty), mask=inside)


def _blocks(vocab: int) -> dict[str, int]:
    """The kernels' block options for a vocabulary. The number of blocks is a compile-time constant (one compile per
    vocabulary size): Triton 3.6's interpreter (the tests) cannot loop to a bound known only at run time."""
    return {"BLOCK": _BLOCK, "BLOCKS": -(-vocab // _BLOCK), "num_warps": 8}


class _KLDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target_logits: Tensor) -> Tensor:
        logits, target_logits = logits.contiguous(), target_logits.contiguous()
        tokens, vocab = logits.shape
        kl = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        maxima, sums = (torch.empty(tokens, 2, dtype=torch.float32, device=logits.device) for _ in range(2))
        launch(_kl_forward_kernel, (tokens,), logits.device, logits, target_logits, kl, maxima, sums, vocab,
               logits.stride(0), target_logits.stride(0), **_blocks(vocab))
        ctx.save_for_backward(logits, target_logits, maxima, sums)
        return kl.sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        logits, target_logits, maxima, sums = ctx.saved_tensors
        tokens, vocab = logits.shape
        grad = torch.empty_like(logits)
        launch(_kl_backward_kernel, (tokens,), logits.device, logits, target_logits, maxima, sums,
               grad_out.float().contiguous(), grad, vocab, logits.stride(0), target_logits.stride(0), **_blocks(vocab))
        return grad, None


def kl_divergence_triton(logits: Tensor, target_logits: Tensor) -> Tensor:
    """The kernels' kl_divergence, whatever the tensors' device (tests run it in Triton's interpreter)."""
    return _KLDivergence.apply(logits, target_logits)
