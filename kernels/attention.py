"""Causal attention with a backward that is deterministic by construction, for the fits' steps (the refinement and the
tuning differentiate through every layer's attention).

PyTorch's flash attention adds each key block's share of dQ atomically; in the deterministic mode the fits run in (so
that a rebuild is byte-identical) it runs fewer, longer programs instead, which cost the refinement's attention 0.68
against 0.43 ms a step on the H100 (bench/results/attention-determinism-h100.txt). Here no two programs add into the
same memory: the backward is two kernels, one program per key block and query head for that head's share of dK and dV
(over the query blocks that see the keys) and one per query block for dQ (over the key blocks it sees; it runs first
and also stores each query's D = Σ dO·O for the other), each recomputing the probabilities from the forward's
log-sum-exp; the query heads' shares of their KV head's dK and dV are then added in a fixed order. Each kernel's grid
launches the programs with the most blocks to walk first. At that shape they take 0.37 ms forward and backward, where
flash attention takes 0.64 deterministic and 0.41 not on the same H100 (bench/results/attention-bench-h100.txt; session
28's form, one program per key block for all the query heads of its KV head, took 0.46): ~2 s less for each refined
variant of the default sweep than flash attention's deterministic mode (bench/NOTES.md §35, §36).

q (batch, heads, seq, dim), k and v (batch, kv_heads, seq, dim), heads a multiple of kv_heads (each KV head serves
heads / kv_heads consecutive query heads), causal, softmax(scale · q·kᵀ)·v. Products of float16 or bfloat16 inputs,
summed in float32; the probabilities and dS are rounded to the inputs' dtype before their products (as flash attention
does), the softmax and every sum in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from exlbuild.kernels.runtime import interpreting, jit, launch, tl, use_triton

# The head sizes the kernels are checked at (tests/test_kernels.py: 16, 32 and 128 in the interpreter, 64 and 128 on
# the GPU); callers send attention of other sizes elsewhere.
HEAD_DIMS = (16, 32, 64, 128)

# ---------------------------------------------------------------------------------------------
# Reference


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The attention in PyTorch's own ops (its backward by autograd): KV heads expanded to their query heads, the
    logits and the softmax in float32, the output in q's dtype."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    t = q.shape[2]
    logits = (q.float() @ k.float().mT) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    p = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return (p @ v.float()).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Triton
#
# As in attention_received.py: Triton 3.6's interpreter cannot loop to a run-time bound, so with INTERPRETED the loops
# are while loops; compiled they are for loops, which Triton pipelines.


@jit
def _query_program(HEADS: tl.constexpr, BLOCK_M: tl.constexpr):
    # A program of a grid (rows × heads, query blocks): its query block, row × head, row, head and query positions.
    # The last query blocks see the most keys: every row's and head's start first.
    block = tl.num_programs(1) - 1 - tl.program_id(1)
    row_head = tl.program_id(0)
    return block, row_head, row_head // HEADS, row_head % HEADS, block * BLOCK_M + tl.arange(0, BLOCK_M)


@jit
def _forward_step(q, k_base, v_base, kv_st, start, i, d, m, total, acc, T, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    # One block of keys: the running maximum m and sum of exp2(logit − m) (log2 units), and acc = Σ p·v. MASKED: the
    # block holds keys after some of the queries (the causal mask applies); the others need no mask.
    j = start + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + j[None, :] * kv_st + d[:, None], mask=(j < T)[None, :], other=0.0)  # (D, BLOCK_N)
    s = tl.dot(q, k) * qk_scale
    if MASKED:
        s = tl.where(i[:, None] >= j[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    rescale = tl.exp2(m - m_new)
    total = total * rescale + tl.sum(p, axis=1)
    v = tl.load(v_base + j[:, None] * kv_st + d[None, :], mask=(j < T)[:, None], other=0.0)  # (BLOCK_N, D)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, total, acc


@jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, T, qk_scale, q_sb, q_sh, q_st, kv_sb, kv_sh, kv_st,
                    o_sb, o_sh, o_st,
                    HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    # One program: one row, one query head, BLOCK_M query positions, against the key blocks up to the last of them.
    block, row_head, b, h, i = _query_program(HEADS, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + h * q_sh + i[:, None] * q_st + d[None, :], mask=(i < T)[:, None],
                other=0.0)
    kv_at = b.to(tl.int64) * kv_sb + (h // GROUP) * kv_sh
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    # The key blocks wholly before the block's first query need no mask; those from there to its last query do.
    unmasked = block * BLOCK_M // BLOCK_N * BLOCK_N
    last = tl.minimum(T, (block + 1) * BLOCK_M)
    if INTERPRETED:
        start = 0
        while start < unmasked:
            m, total, acc = _forward_step(q, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, m, total, acc, T,
                                          qk_scale, BLOCK_N, False)
            start += BLOCK_N
        while start < last:
            m, total, acc = _forward_step(q, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, m, total, acc, T,
                                          qk_scale, BLOCK_N, True)
            start += BLOCK_N
    else:
        for start in range(0, unmasked, BLOCK_N):
            m, total, acc = _forward_step(q, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, m, total, acc, T,
                                          qk_scale, BLOCK_N, False)
        for start in range(unmasked, last, BLOCK_N):
            m, total, acc = _forward_step(q, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, m, total, acc, T,
                                          qk_scale, BLOCK_N, True)
    o = acc / total[:, None]
    tl.store(o_ptr + b.to(tl.int64) * o_sb + h * o_sh + i[:, None] * o_st + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(i < T)[:, None])
    tl.store(lse_ptr + row_head.to(tl.int64) * T + i, m + tl.log2(total), mask=i < T)


@jit
def _key_block_step(k, v, q_base, do_base, lse_base, delta_base, q_st, start, j, d, dk, dv, T, qk_scale,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    # One block of queries of one head against this program's keys: pᵀ and dSᵀ (keys × queries), dV += pᵀ·dO and
    # dK += dSᵀ·q (dK still without the logits' scale). Queries past the end take lse = +inf: p = 0. MASKED: some
    # of the block's queries come before some of the keys.
    i = start + tl.arange(0, BLOCK_M)
    inside = (i < T)[:, None]
    q = tl.load(q_base + i[:, None] * q_st + d[None, :], mask=inside, other=0.0)
    do = tl.load(do_base + i[:, None] * q_st + d[None, :], mask=inside, other=0.0)
    lse = tl.load(lse_base + i, mask=i < T, other=float("inf"))
    delta = tl.load(delta_base + i, mask=i < T, other=0.0)
    s = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
    p = tl.exp2(s - lse[None, :])
    if MASKED:
        p = tl.where(j[:, None] <= i[None, :], p, 0.0)
    dv += tl.dot(p.to(do.dtype), do)
    dp = tl.dot(v, tl.trans(do))
    ds = p * (dp - delta[None, :])
    dk += tl.dot(ds.to(q.dtype), q)
    return dk, dv


@jit
def _key_block_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, shares_ptr, T, qk_scale,
                      q_sb, q_sh, q_st, kv_sb, kv_sh, kv_st,
                      HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    # One program of a grid (rows × heads, key blocks): one row, one query head, BLOCK_N key positions of its KV
    # head, against the query blocks from the one holding the first key to the end: that head's shares of dK (still
    # without the logits' scale) and dV, float32, into shares (2, batch, heads, seq, dim). dO has q's layout (q_s*);
    # lse and delta are (batch, heads, seq). The first key blocks are seen by the most queries: every row's and
    # head's start first.
    row_head = tl.program_id(0)
    block = tl.program_id(1)
    b, h = row_head // HEADS, row_head % HEADS
    j = block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    kv_at = b.to(tl.int64) * kv_sb + (h // GROUP) * kv_sh + j[:, None] * kv_st + d[None, :]
    k = tl.load(k_ptr + kv_at, mask=(j < T)[:, None], other=0.0)
    v = tl.load(v_ptr + kv_at, mask=(j < T)[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    q_base = q_ptr + b.to(tl.int64) * q_sb + h * q_sh
    do_base = do_ptr + b.to(tl.int64) * q_sb + h * q_sh
    lse_base = lse_ptr + row_head.to(tl.int64) * T
    delta_base = delta_ptr + row_head.to(tl.int64) * T
    # From the query block holding the first key; the query blocks wholly after the last key need no mask.
    first = block * BLOCK_N // BLOCK_M * BLOCK_M
    unmasked = tl.minimum(((block + 1) * BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, T)
    if INTERPRETED:
        start = first
        while start < unmasked:
            dk, dv = _key_block_step(k, v, q_base, do_base, lse_base, delta_base, q_st, start, j, d, dk, dv, T,
                                     qk_scale, BLOCK_M, True)
            start += BLOCK_M
        while start < T:
            dk, dv = _key_block_step(k, v, q_base, do_base, lse_base, delta_base, q_st, start, j, d, dk, dv, T,
                                     qk_scale, BLOCK_M, False)
            start += BLOCK_M
    else:
        for start in range(first, unmasked, BLOCK_M):
            dk, dv = _key_block_step(k, v, q_base, do_base, lse_base, delta_base, q_st, start, j, d, dk, dv, T,
                                     qk_scale, BLOCK_M, True)
        for start in range(unmasked, T, BLOCK_M):
            dk, dv = _key_block_step(k, v, q_base, do_base, lse_base, delta_base, q_st, start, j, d, dk, dv, T,
                                     qk_scale, BLOCK_M, False)
    share_at = row_head.to(tl.int64) * T * HEAD_DIM + j[:, None] * HEAD_DIM + d[None, :]
    tl.store(shares_ptr + share_at, dk, mask=(j < T)[:, None])
    tl.store(shares_ptr + tl.num_programs(0).to(tl.int64) * T * HEAD_DIM + share_at, dv, mask=(j < T)[:, None])


@jit
def _query_block_step(q, do, lse, delta, k_base, v_base, kv_st, start, i, d, dq, T, qk_scale,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    # One block of keys against this program's queries: dQ += dS·k (still without the logits' scale). MASKED: as in
    # _forward_step.
    j = start + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + j[:, None] * kv_st + d[None, :], mask=(j < T)[:, None], other=0.0)
    v = tl.load(v_base + j[:, None] * kv_st + d[None, :], mask=(j < T)[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(i[:, None] >= j[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@jit
def _query_block_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, T, qk_scale, scale,
                        q_sb, q_sh, q_st, kv_sb, kv_sh, kv_st,
                        HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    # One program: one row, one query head, BLOCK_M query positions, against the key blocks up to the last of them;
    # dQ in q's layout (as are O and dO). First its queries' D = Σ_d dO·O (each query's share of the softmax's
    # gradient), stored for the dK/dV kernel, which runs after this one.
    block, row_head, b, h, i = _query_program(HEADS, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_at = b.to(tl.int64) * q_sb + h * q_sh + i[:, None] * q_st + d[None, :]
    q = tl.load(q_ptr + q_at, mask=(i < T)[:, None], other=0.0)
    do = tl.load(do_ptr + q_at, mask=(i < T)[:, None], other=0.0)
    o = tl.load(o_ptr + q_at, mask=(i < T)[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(delta_ptr + row_head.to(tl.int64) * T + i, delta, mask=i < T)
    lse = tl.load(lse_ptr + row_head.to(tl.int64) * T + i, mask=i < T, other=float("inf"))
    kv_at = b.to(tl.int64) * kv_sb + (h // GROUP) * kv_sh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    unmasked = block * BLOCK_M // BLOCK_N * BLOCK_N  # as in _forward_kernel
    last = tl.minimum(T, (block + 1) * BLOCK_M)
    if INTERPRETED:
        start = 0
        while start < unmasked:
            dq = _query_block_step(q, do, lse, delta, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, dq, T,
                                   qk_scale, BLOCK_N, False)
            start += BLOCK_N
        while start < last:
            dq = _query_block_step(q, do, lse, delta, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, dq, T,
                                   qk_scale, BLOCK_N, True)
            start += BLOCK_N
    else:
        for start in range(0, unmasked, BLOCK_N):
            dq = _query_block_step(q, do, lse, delta, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, dq, T,
                                   qk_scale, BLOCK_N, False)
        for start in range(unmasked, last, BLOCK_N):
            dq = _query_block_step(q, do, lse, delta, k_ptr + kv_at, v_ptr + kv_at, kv_st, start, i, d, dq, T,
                                   qk_scale, BLOCK_N, True)
    tl.store(dq_ptr + q_at, (dq * scale).to(dq_ptr.dtype.element_ty), mask=(i < T)[:, None])


@dataclass(frozen=True)
class LaunchConfig:
    """A kernel's tiles (query and key positions a block) and its compile options."""

    block_m: int
    block_n: int
    warps: int
    stages: int


# bench/attention_bench.py --blocks tried blocks of 64 and 128, 4 and 8 warps, 2 and 3 stages for each kernel on the
# H100 (sessions 28 and 29): none beat these beyond the timing's noise (~4 %); 8 warps and the dK/dV kernel's 128-key
# blocks with 4 warps lose.
FORWARD = LaunchConfig(64, 64, 4, 2)
KEY_BLOCKS = LaunchConfig(64, 64, 4, 2)
QUERY_BLOCKS = LaunchConfig(64, 64, 4, 2)


def _options(q: Tensor, config: LaunchConfig) -> dict:
    return dict(HEAD_DIM=q.shape[3], BLOCK_M=config.block_m, BLOCK_N=config.block_n, INTERPRETED=interpreting(),
                num_warps=config.warps, num_stages=config.stages)


def causal_attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The output (q's layout and dtype) and each query's log-sum-exp of its scaled logits in log2 units (batch, heads,
    seq) float32, for q (batch, heads, seq, dim) and k, v (batch, kv_heads, seq, dim) of one layout (last dim
    contiguous), float16 or bfloat16, dim a power of two ≥ 16."""
    batch, heads, t, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, t, dtype=torch.float32, device=q.device)
    launch(_forward_kernel, (batch * heads, -(-t // FORWARD.block_m)), q.device, q, k, v, o, lse, t,
           scale * math.log2(math.e), *q.stride()[:3], *k.stride()[:3], *o.stride()[:3], HEADS=heads,
           GROUP=heads // k.shape[1], **_options(q, FORWARD))
    return o, lse


def causal_attention_backward_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV for the forward's output o and log-sum-exp lse (causal_attention_forward_triton). dO is copied to
    q's layout if it has another. Holds each query head's share of dK and dV in float32 meanwhile (2 × q's size in
    float32)."""
    batch, heads, t, _ = q.shape
    kv_heads = k.shape[1]
    if grad_out.stride() != q.stride():
        grad_out = torch.empty_like(q).copy_(grad_out)
    qk_scale = scale * math.log2(math.e)
    strides = (*q.stride()[:3], *k.stride()[:3])
    group = heads // kv_heads
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    launch(_query_block_kernel, (batch * heads, -(-t // QUERY_BLOCKS.block_m)), q.device, q, k, v, o, grad_out, lse,
           delta, dq, t, qk_scale, scale, *strides, HEADS=heads, GROUP=group, **_options(q, QUERY_BLOCKS))
    shares = torch.empty(2, batch, kv_heads, group, t, q.shape[3], dtype=torch.float32, device=q.device)
    launch(_key_block_kernel, (batch * heads, -(-t // KEY_BLOCKS.block_n)), q.device, q, k, v, grad_out, lse, delta,
           shares, t, qk_scale, *strides, HEADS=heads, GROUP=group, **_options(q, KEY_BLOCKS))
    # Each KV head's query heads' shares added in one reduction (the same order every run).
    dk_shares, dv_shares = shares.sum(dim=3)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    torch.mul(dk_shares, scale, out=dk)
    return dq, dk, dv.copy_(dv_shares)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        o, lse = causal_attention_forward_triton(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        return (*causal_attention_backward_triton(grad_out, *ctx.saved_tensors, ctx.scale), None)


def causal_attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """causal_attention_reference by the Triton kernels, differentiable (the backward deterministic). k and v are made
    to share one layout with a contiguous last dim; on CPU tensors the kernels run in Triton's interpreter."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride() != v.stride() or k.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    return _CausalAttention.apply(q, k, v, scale)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention, differentiable: Triton on CUDA (a deterministic backward), else the reference."""
    if use_triton(q, k, v):
        return causal_attention_triton(q, k, v, scale)
    return causal_attention_reference(q, k, v, scale)
