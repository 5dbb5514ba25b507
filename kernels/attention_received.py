"""How much attention each key position receives: the weights of k_proj's and v_proj's Hessians.

For roped queries q (batch, heads, seq, dim) and keys k (batch, kv_heads, seq, dim), causal attention (within a
sliding window where the model has one) gives each query position a softmax over the keys it may see. Summed over
query heads and query positions and divided by the number of query heads, that is the weight of each key position
(a row's weights sum to seq): an error in the key or value of a token that many queries read costs that much more
(exlbuild.model.llama.attention_received, capture point attn_kv_input).

The reference forms the probabilities explicitly, in slices. On the H100 that cost ~32 ms of GPU time per SmolLM2
layer (100 rows × 2048 tokens), a quarter of the quantization pass. The Triton kernel never forms them, as flash
attention does not: pass 1 takes each query's log-sum-exp of its scaled logits (online maximum and sum), pass 2
recomputes the logits a block of keys at a time and sums exp(logit − lse) over the queries and over the query heads
of the key's KV head. Each program writes its own sums (no atomics), so the results are the same bits on every run.

What the kernel reproduces, and how closely: the logits' products follow torch's rule for float32 matrix products
(TF32 where torch.get_float32_matmul_precision() is not "highest", as the reference's baddbmm does on CUDA; float16
and bfloat16 products are exact, summed in float32), the softmax is in float32 with exp2 (log2 e folded into the
scale), and the sums run in another order: within float32 rounding of the reference on the same products.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from exlbuild.kernels.runtime import interpreting, jit, launch, tl, use_triton

# The reference forms attention probabilities explicitly, one KV head's query heads for a slice of rows (or of query
# positions, for long rows) at a time, each slice under this many elements.
PROBABILITY_ELEMENTS = 1 << 26


# ---------------------------------------------------------------------------------------------
# Reference


def allowed_keys(queries: range | Tensor, seq: int, window: int | None, device: torch.device) -> Tensor:
    """(len(queries), seq) booleans: the keys each query position attends to (itself and earlier positions, within
    the sliding window if there is one): the attention mask of exlbuild.model.llama. `queries`: the positions, as a
    range or as a tensor of them on `device` (a CUDA graph's step, whose position lives there)."""
    i = (torch.arange(queries.start, queries.stop, device=device) if isinstance(queries, range) else queries)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def attention_received_reference(q: Tensor, k: Tensor, scale: float, window: int | None) -> Tensor:
    """(batch, seq) float32 (float64 for float64 inputs): for roped q (batch, heads, seq, dim) and k (batch, kv_heads,
    seq, dim), the attention probabilities of softmax(scale · q·k) under the causal (and sliding-window) mask, summed
    over query heads and query positions, divided by the number of query heads."""
    batch, heads, t, dim = q.shape
    group = heads // k.shape[1]
    # q / (1 / scale): the division the model has always made (q / √head_dim), so the CPU keeps its results' bits.
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = q.to(dtype) / (1 / scale)
    k = k.to(dtype)
    # Slices of whole rows while one row's probabilities fit under PROBABILITY_ELEMENTS, else of query positions
    # (each query's probabilities are a softmax of their own, so the sum over queries can be taken in parts).
    queries = max(1, min(t, PROBABILITY_ELEMENTS // (group * t)))
    rows = max(1, PROBABILITY_ELEMENTS // (group * t * t)) if queries == t else 1
    received = torch.zeros(batch, t, dtype=dtype, device=q.device)
    for start in range(0, t, queries):
        positions = range(start, min(start + queries, t))
        bias = torch.zeros(len(positions), t, dtype=dtype, device=q.device)
        bias.masked_fill_(~allowed_keys(positions, t, window, q.device), float("-inf"))
        for kv in range(k.shape[1]):
            for r in range(0, batch, rows):
                # The query heads of KV head kv against that key: one batched product with the mask added.
                head_queries = q[r : r + rows, kv * group : (kv + 1) * group, positions.start : positions.stop]
                keys = k[r : r + rows, kv : kv + 1].expand(-1, group, -1, -1).reshape(-1, t, dim)
                logits = torch.baddbmm(bias, head_queries.reshape(-1, len(positions), dim), keys.mT)
                received[r : r + rows] += logits.softmax(-1).sum(1).view(-1, group, t).sum(1)
    return received / heads


# ---------------------------------------------------------------------------------------------
# Triton
#
# Triton 3.6's interpreter cannot loop to a run-time bound under numpy 2 (it converts a one-element array to int; see
# scale_search.py), and the blocks each program visits depend on its position. So with INTERPRETED the loops are
# while loops; compiled they are for loops, which Triton pipelines (the next block's loads overlap this block's math).


@jit
def _lse_step(q, k_base, k_st, start, i, d, m, total, T, WINDOW, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # One block of keys: the running maximum m and sum `total` of exp2(logit − m), in log2 units.
    j = start + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + j[None, :] * k_st + d[:, None], mask=(j < T)[None, :] & (d < HEAD_DIM)[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    gap = i[:, None] - j[None, :]
    s = tl.where((gap >= 0) & (gap < WINDOW), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # A query whose keys all lie outside this block (a window shorter than the block) keeps m = −inf: subtract 0.
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    total = total * tl.exp2(m - base) + tl.sum(tl.exp2(s - base[:, None]), axis=1)
    return m_new, total


@jit
def _lse_kernel(q_ptr, k_ptr, lse_ptr, T, WINDOW, qk_scale, q_sb, q_sh, q_st, k_sb, k_sh, k_st,
                HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # Pass 1. One program: one row, one query head, BLOCK_M query positions, against every key block they may see.
    # The last query blocks see the most keys: they start first.
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    row_head = tl.program_id(1)
    b, h = row_head // HEADS, row_head % HEADS
    i = block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_at = q_ptr + b.to(tl.int64) * q_sb + h * q_sh + i[:, None] * q_st + d[None, :]
    q = tl.load(q_at, mask=(i < T)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * k_sb + (h // GROUP) * k_sh
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # From the key block holding the block's first query's first key to the block's last query.
    first = tl.maximum(block * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    last = tl.minimum(T, (block + 1) * BLOCK_M)
    if INTERPRETED:
        start = first
        while start < last:
            m, total = _lse_step(q, k_base, k_st, start, i, d, m, total, T, WINDOW, qk_scale,
                                 HEAD_DIM, BLOCK_N, PRECISION)
            start += BLOCK_N
    else:
        for start in range(first, last, BLOCK_N):
            m, total = _lse_step(q, k_base, k_st, start, i, d, m, total, T, WINDOW, qk_scale,
                                 HEAD_DIM, BLOCK_N, PRECISION)
    tl.store(lse_ptr + row_head.to(tl.int64) * T + i, m + tl.log2(total), mask=i < T)


@jit
def _received_step(k, q_base, q_st, lse_base, start, j, d, acc, T, WINDOW, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    # One block of queries of one head: their probabilities of this block's keys, added to acc (BLOCK_M, BLOCK_N).
    # Queries past the end take lse = +inf (and q = 0): their probabilities are 0.
    i = start + tl.arange(0, BLOCK_M)
    q = tl.load(q_base + i[:, None] * q_st + d[None, :], mask=(i < T)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    lse = tl.load(lse_base + i, mask=i < T, other=float("inf"))
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    gap = i[:, None] - j[None, :]
    return acc + tl.where((gap >= 0) & (gap < WINDOW), tl.exp2(s - lse[:, None]), 0.0)


@jit
def _received_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, T, WINDOW, qk_scale, q_sb, q_sh, q_st, k_sb, k_sh, k_st,
                     HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    # Pass 2. One program: one row, one KV head, BLOCK_N key positions, against the query blocks that may see them
    # (from the block holding the first key to the last key's window), for each query head of the group. The
    # probabilities add up elementwise in acc and are summed over queries once, at the end. The first key blocks are
    # seen by the most queries: they start first.
    block = tl.program_id(0)
    row_kv = tl.program_id(1)
    b, kv = row_kv // KV_HEADS, row_kv % KV_HEADS
    j = block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k_at = k_ptr + b.to(tl.int64) * k_sb + kv * k_sh + j[None, :] * k_st + d[:, None]
    k = tl.load(k_at, mask=(j < T)[None, :] & (d < HEAD_DIM)[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = block * BLOCK_N // BLOCK_M * BLOCK_M
    last = tl.minimum(T, block * BLOCK_N + BLOCK_N - 1 + WINDOW)
    for g in range(GROUP):
        h = kv * GROUP + g
        q_base = q_ptr + b.to(tl.int64) * q_sb + h * q_sh
        lse_base = lse_ptr + (b * HEADS + h).to(tl.int64) * T
        if INTERPRETED:
            start = first
            while start < last:
                acc = _received_step(k, q_base, q_st, lse_base, start, j, d, acc, T, WINDOW, qk_scale,
                                     HEAD_DIM, BLOCK_M, PRECISION)
                start += BLOCK_M
        else:
            for start in range(first, last, BLOCK_M):
                acc = _received_step(k, q_base, q_st, lse_base, start, j, d, acc, T, WINDOW, qk_scale,
                                     HEAD_DIM, BLOCK_M, PRECISION)
    tl.store(out_ptr + row_kv.to(tl.int64) * T + j, tl.sum(acc, axis=0), mask=j < T)


# Blocks of 64 query and 64 key positions, 4 warps, 2 pipeline stages: the fastest tried on the H100 at SmolLM2's
# shape (3.1 ms for 100 rows × 2048 tokens in TF32; blocks of 128 or 32, 8 warps or 3–4 stages: 3–70 % slower).
_BLOCK_M = 64
_BLOCK_N = 64


def _dot_precision(q: Tensor) -> str:
    """torch's rule for float32 products (TF32 unless the precision is "highest"); other dtypes' products are exact."""
    return "tf32" if q.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"


def attention_received_triton(q: Tensor, k: Tensor, scale: float, window: int | None) -> Tensor:
    """attention_received_reference by the Triton kernels (q and k in float32, float16 or bfloat16, in any layout whose
    last dim is contiguous). On CPU tensors it runs in Triton's interpreter."""
    batch, heads, t, dim = q.shape
    kv_heads = k.shape[1]
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    # No window is a window of the whole row: the kernels test every key against one.
    window = t if window is None else max(1, min(window, t))
    block_d = max(16, 1 << (dim - 1).bit_length())  # tl.dot takes 16 or more, a power of two
    common = dict(HEAD_DIM=dim, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=block_d, PRECISION=_dot_precision(q),
                  INTERPRETED=interpreting(), num_warps=4, num_stages=2)
    strides = (*q.stride()[:3], *k.stride()[:3])
    qk_scale = scale * math.log2(math.e)
    lse = torch.empty(batch, heads, t, dtype=torch.float32, device=q.device)
    launch(_lse_kernel, (-(-t // _BLOCK_M), batch * heads), q.device, q, k, lse, t, window, qk_scale, *strides,
           HEADS=heads, GROUP=heads // kv_heads, **common)
    partial = torch.empty(batch, kv_heads, t, dtype=torch.float32, device=q.device)
    launch(_received_kernel, (-(-t // _BLOCK_N), batch * kv_heads), q.device, q, k, lse, partial, t, window, qk_scale,
           *strides, HEADS=heads, KV_HEADS=kv_heads, GROUP=heads // kv_heads, **common)
    return partial.sum(1) / heads


def attention_received(q: Tensor, k: Tensor, scale: float, window: int | None) -> Tensor:
    """(batch, seq) float32: the attention each key position receives, summed over query heads and query positions
    and divided by the number of query heads, for roped q (batch, heads, seq, dim) and k (batch, kv_heads, seq, dim),
    logits scale · q·k, causal within `window` positions (None: no window). Triton on CUDA, else the reference (and
    for float64 inputs, in float64)."""
    if use_triton(q, k):
        return attention_received_triton(q, k, scale, window)
    return attention_received_reference(q, k, scale, window)
