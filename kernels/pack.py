"""Bit packing of q_weight and the decoder of a whole layer (docs/exl2-format.md 2.4–2.6).

- `pack_bitstream` / `unpack_bitstream`: codes of one width ↔ the little-endian column bitstream.
- `decode_layer`: q_weight, the per-group scales and q_invperm → the fp16 nn.Linear weight, in one pass
  (unpack, dequantize, undo the act-order permutation, transpose).
- `scale_from_nibbles`, `dequantize_codes`: the loader's fp16 arithmetic, shared by the quantizer (its
  error feedback) and the decoders, so that all produce the same fp16 bits.

Each has its PyTorch reference beside its Triton kernel; `exlbuild.quant.exl2.pack` is the public face.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from exlbuild.kernels.runtime import jit, launch, tl, use_triton
from exlbuild.quant.exl2.options import BIT_WIDTHS, Group

_WORD_MASK = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Dequantization arithmetic (2.6 with prescale 1). Each product below is exact in float32 (at most
# 9 + 11 significant bits), so rounding it once to fp16 is exactly the loader's fp16 multiply.


def scale_from_nibbles(nibbles: Tensor, scale_max: Tensor) -> Tensor:
    """S = fp16((s+1)² · fp16(scale_max / 256)); nibbles (..., G, N), scale_max (..., G) → fp16."""
    m = (scale_max.to(torch.float16).float() / 256).half().float()
    t = nibbles.float() + 1
    return (t * t * m[..., None]).half()


def dequantize_codes(codes: Tensor, zero: Tensor, scale: Tensor) -> Tensor:
    """fp16((q − z) · S), broadcasting codes, zero points and fp16 scales."""
    return ((codes.float() - zero) * scale.float()).half()


# ---------------------------------------------------------------------------------------------
# Bitstreams (2.4): each column is a little-endian stream; code j of a run of width b occupies
# stream bits [b·j, b·j + b). Word w of the stream holds bits [32·w, 32·w + 32).


def pack_bitstream(codes: Tensor, bits: int, out_of_range: Tensor | None = None) -> Tensor:
    """Pack (R, N) codes of `bits` bits into (R·bits/32, N) int32 words, column by column.

    Codes out of range raise ValueError; given `out_of_range` (a 0-dim bool tensor on the codes' device), whether
    there are any is or-ed into it instead: reading device values waits for the GPU, so a caller packing many
    streams reads one flag."""
    rows, _ = codes.shape
    if bits not in BIT_WIDTHS:
        raise ValueError(f"{bits}-bit codes: EXL2 stores widths {', '.join(map(str, BIT_WIDTHS))}")
    per_block = 32 // math.gcd(bits, 32)
    if rows % per_block:
        raise ValueError(f"{rows} rows of {bits}-bit codes do not fill whole 32-bit words")
    if codes.numel() and out_of_range is not None:
        out_of_range |= (codes.min().long() < 0) | (codes.max().long() >= 1 << bits)  # long: 256 overflows uint8
    elif codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if use_triton(codes):
        return pack_bitstream_triton(codes, bits)
    return pack_bitstream_reference(codes, bits)


def unpack_bitstream(words: Tensor, bits: int) -> Tensor:
    """Inverse of pack_bitstream: (Q, N) int32 words → (Q·32/bits, N) uint8 codes."""
    qrows, _ = words.shape
    words_per_block = bits // math.gcd(bits, 32)
    if qrows % words_per_block:
        raise ValueError(f"{qrows} words do not hold whole blocks of {bits}-bit codes")
    if use_triton(words):
        return unpack_bitstream_triton(words, bits)
    return unpack_bitstream_reference(words, bits)


def _block_layout(bits: int, device: torch.device) -> tuple[int, int, Tensor, Tensor]:
    """(codes per block, words per block, word index of each code, bit shift of each code): a run of
    codes repeats its word layout every `codes_per_block` codes."""
    codes_per_block = 32 // math.gcd(bits, 32)
    offsets = torch.arange(codes_per_block, device=device) * bits
    return codes_per_block, codes_per_block * bits // 32, offsets // 32, offsets % 32


def _as_int32(words: Tensor) -> Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bitstream_reference(codes: Tensor, bits: int) -> Tensor:
    """The reference of pack_bitstream (codes already checked)."""
    rows, columns = codes.shape
    per_block, words_per_block, word, shift = _block_layout(bits, codes.device)
    shifted = codes.to(torch.int64).reshape(rows // per_block, per_block, columns) << shift[None, :, None]
    # Codes never share bits, so adding is OR-ing; a code that straddles a word boundary sends its
    # high bits (above bit 31 of the shifted value) to the next word. The extra last word stays zero.
    words = torch.zeros(rows // per_block, words_per_block + 1, columns, dtype=torch.int64, device=codes.device)
    words.index_add_(1, word, shifted & _WORD_MASK)
    words.index_add_(1, word + 1, shifted >> 32)
    return _as_int32(words[:, :words_per_block].reshape(-1, columns))


def unpack_bitstream_reference(words: Tensor, bits: int) -> Tensor:
    """The reference of unpack_bitstream (shape already checked)."""
    qrows, columns = words.shape
    per_block, words_per_block, word, shift = _block_layout(bits, words.device)
    unsigned = words.to(torch.int64) & _WORD_MASK
    blocks = unsigned.reshape(qrows // words_per_block, words_per_block, columns)
    blocks = torch.cat([blocks, torch.zeros_like(blocks[:, :1])], dim=1)
    mask = (1 << bits) - 1
    shift = shift[None, :, None]
    low = blocks[:, word] >> shift
    # Only a straddling code takes bits from the next word; for the others these bits land at or
    # above bit `bits` and the mask drops them. Masking first keeps the shift inside int64.
    high = (blocks[:, word + 1] & mask) << (32 - shift)
    return ((low | high) & mask).reshape(-1, columns).to(torch.uint8)


# The bit width and sizes of pack and unpack are plain arguments, not specialised on: a build packs every width
# at many sizes, and each specialisation is a compile (seconds on a fresh machine) for kernels this light.
@jit(do_not_specialize=["R", "Q", "N", "BITS"])
def _pack_kernel(codes_ptr, words_ptr, R, Q, N, BITS, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                 MAX_CODES: tl.constexpr):
    # One program: BLOCK_Q words × BLOCK_N columns. Word w gathers every code whose bits touch
    # [32·w, 32·w + 32): codes j0 = ⌊32·w / BITS⌋ onwards, at most 32 // BITS + 2 ≤ MAX_CODES of them (a
    # constant bound: the extra codes start past the word and are masked). A loop, not tl.static_range: the
    # 18 copies of its body unrolled took 2.1 s to compile on the GPU machine, the loop 0.2 s.
    qrows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = (qrows * 32) // BITS
    word = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.uint32)
    for k in range(MAX_CODES):
        j = first + k
        shift = j * BITS - qrows * 32  # where code j starts, relative to bit 0 of word w
        touches = (j < R) & (shift < 32)
        mask = touches[:, None] & (cols < N)[None, :]
        code = tl.load(codes_ptr + j.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0).to(tl.uint32)
        # A code that starts in the previous word (shift < 0) contributes its high bits; shifting a
        # uint32 left drops what belongs to the next word. Shift amounts stay in 0..31.
        left = tl.minimum(tl.maximum(shift, 0), 31).to(tl.uint32)[:, None]  # masked codes may start past 31
        right = tl.maximum(-shift, 0).to(tl.uint32)[:, None]
        word = word | tl.where(mask, (code << left) >> right, 0)
    out = words_ptr + qrows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, word.to(tl.int32, bitcast=True), mask=(qrows < Q)[:, None] & (cols < N)[None, :])


@jit(do_not_specialize=["R", "N", "BITS"])
def _unpack_kernel(words_ptr, codes_ptr, R, N, BITS, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: BLOCK_R codes × BLOCK_N columns. Code j starts at bit s = BITS·j mod 32 of word
    # ⌊BITS·j / 32⌋; if it runs past bit 31 its high bits are at the bottom of the next word.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    bit = rows * BITS
    shift = (bit % 32).to(tl.uint32)[:, None]
    word = (bit // 32).to(tl.int64)[:, None] * N + cols[None, :]
    low = tl.load(words_ptr + word, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift
    straddles = mask & (shift + BITS > 32)
    high = tl.load(words_ptr + word + N, mask=straddles, other=0).to(tl.uint32, bitcast=True)
    high = tl.where(straddles, high << (32 - shift), 0)  # shift > 0 wherever a code straddles
    code = (low | high) & ((1 << BITS) - 1)
    tl.store(codes_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], code.to(tl.uint8), mask=mask)


# Tiles of 8 words or 16 codes × 128 columns over 4 warps: 8 to 16 values a thread keeps registers free
# for the loads in flight (32-row tiles spilled in the 3-bit pack kernel).
_PACK_WORDS = 8
_UNPACK_CODES = 16
_BLOCK_COLUMNS = 128


def pack_bitstream_triton(codes: Tensor, bits: int) -> Tensor:
    """The Triton kernel of pack_bitstream (on CPU tensors it runs in Triton's interpreter)."""
    codes = codes.contiguous()
    rows, columns = codes.shape
    qrows = rows * bits // 32
    words = torch.empty(qrows, columns, dtype=torch.int32, device=codes.device)
    grid = (-(-qrows // _PACK_WORDS), -(-columns // _BLOCK_COLUMNS))
    launch(_pack_kernel, grid, codes.device, codes, words, rows, qrows, columns,
           BITS=bits, BLOCK_Q=_PACK_WORDS, BLOCK_N=_BLOCK_COLUMNS, MAX_CODES=32 // min(BIT_WIDTHS) + 2, num_warps=4)
    return words


def unpack_bitstream_triton(words: Tensor, bits: int) -> Tensor:
    """The Triton kernel of unpack_bitstream (on CPU tensors it runs in Triton's interpreter)."""
    words = words.contiguous()
    qrows, columns = words.shape
    rows = qrows * 32 // bits
    codes = torch.empty(rows, columns, dtype=torch.uint8, device=words.device)
    grid = (-(-rows // _UNPACK_CODES), -(-columns // _BLOCK_COLUMNS))
    launch(_unpack_kernel, grid, words.device, words, codes, rows, columns,
           BITS=bits, BLOCK_R=_UNPACK_CODES, BLOCK_N=_BLOCK_COLUMNS, num_warps=4)
    return codes


# ---------------------------------------------------------------------------------------------
# The decoder of a whole layer (2.6, section 7): W_full[q_perm[k], n] = fp16((q[k, n] − z_k) · S[g(k), n]),
# returned as the nn.Linear weight W_fullᵀ (N, K).


def decode_layer(q_weight: Tensor, scale: Tensor, groups: Sequence[Group], q_invperm: Tensor) -> Tensor:
    """q_weight (Q, N) int32, scale (G, N) fp16 (from scale_from_nibbles), the groups q_weight holds
    and q_invperm (K,) → the (N, K) fp16 weight. Triton on CUDA, else the reference."""
    if use_triton(q_weight, scale, q_invperm):
        return decode_layer_triton(q_weight, scale, groups, q_invperm)
    return decode_layer_reference(q_weight, scale, groups, q_invperm)


@lru_cache(maxsize=256)
def row_layout(groups: tuple[Group, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per stored row: its group, its bit width, the q_weight row holding its first bit and that bit's
    position in the word (int32). Every group ends on a word boundary, so each starts a fresh stream.
    Shared by every caller of one layout and device: read them, never write them.

    Built on the CPU in a few vectorized operations and copied over once per layout and device: per-group
    operations, each a kernel launch on the GPU, made the decoder host-bound (1–2 ms for 18 groups on the GPU
    machine), and a copy at every call waited for the GPU."""
    count = torch.tensor([g.rows for g in groups])
    group = torch.repeat_interleave(torch.arange(len(groups)), count)
    bits = torch.tensor([g.bits for g in groups])[group]
    first_qrow = torch.tensor([0] + [g.qrows for g in groups[:-1]]).cumsum(0)[group]
    bit = (torch.arange(group.numel()) - torch.tensor([g.start for g in groups])[group]) * bits
    layout = torch.stack([group, bits, first_qrow + bit // 32, bit % 32]).to(torch.int32)
    return tuple(layout.to(device))


def decode_layer_reference(q_weight: Tensor, scale: Tensor, groups: Sequence[Group], q_invperm: Tensor) -> Tensor:
    """The reference of decode_layer."""
    parts, qrow = [], 0
    for g in groups:
        parts.append(unpack_bitstream_reference(q_weight[qrow : qrow + g.qrows], g.bits))
        qrow += g.qrows
    group, bits, _, _ = (t.to(torch.int64) for t in row_layout(tuple(groups), q_weight.device))
    stored = dequantize_codes(torch.cat(parts), (2 ** (bits - 1))[:, None], scale[group])
    # Stored row k holds input feature q_perm[k], so input feature i is stored row q_invperm[i].
    return stored[q_invperm.to(torch.int64)].T.contiguous()


@jit
def _decode_kernel(
    q_weight_ptr, scale_ptr, invperm_ptr, group_ptr, bits_ptr, word_ptr, shift_ptr, out_ptr,
    K, N,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: an output tile of BLOCK_N rows (output features n) × BLOCK_K columns (input features
    # i). Each column gathers its stored row k = q_invperm[i]; the loads run along n and the stores
    # along i, and Triton transposes between the two layouts through shared memory.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, i_ok = n < N, i < K
    mask = n_ok[:, None] & i_ok[None, :]
    k = tl.load(invperm_ptr + i, mask=i_ok, other=0)
    group = tl.load(group_ptr + k, mask=i_ok, other=0)
    bits = tl.load(bits_ptr + k, mask=i_ok, other=8)
    shift = tl.load(shift_ptr + k, mask=i_ok, other=0).to(tl.uint32)
    word = tl.load(word_ptr + k, mask=i_ok, other=0).to(tl.int64)[None, :] * N + n[:, None]
    # Unpack as in _unpack_kernel, with a per-row width.
    low = tl.load(q_weight_ptr + word, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift[None, :]
    straddles = mask & (shift + bits.to(tl.uint32) > 32)[None, :]
    high = tl.load(q_weight_ptr + word + N, mask=straddles, other=0).to(tl.uint32, bitcast=True)
    high = tl.where(straddles, high << (32 - shift[None, :]), 0)
    code = ((low | high) & ((1 << bits[None, :]) - 1).to(tl.uint32)).to(tl.float32)
    zero = (1 << (bits - 1)).to(tl.float32)[None, :]
    s = tl.load(scale_ptr + group.to(tl.int64)[None, :] * N + n[:, None], mask=mask, other=0.0).to(tl.float32)
    value = ((code - zero) * s).to(tl.float16)  # exact product, one rounding: dequantize_codes
    tl.store(out_ptr + n.to(tl.int64)[:, None] * K + i[None, :], value, mask=mask)


# 64 × 64 outputs over 8 warps: 16 a thread (with 4 warps the kernel used 254 registers).
_DECODE_BLOCK_N = 64
_DECODE_BLOCK_K = 64
_DECODE_WARPS = 8


def decode_layer_triton(q_weight: Tensor, scale: Tensor, groups: Sequence[Group], q_invperm: Tensor) -> Tensor:
    """The Triton kernel of decode_layer (on CPU tensors it runs in Triton's interpreter)."""
    q_weight, scale = q_weight.contiguous(), scale.contiguous()
    invperm = q_invperm.to(torch.int32).contiguous()
    columns, in_features = q_weight.shape[1], invperm.numel()
    group, bits, word, shift = row_layout(tuple(groups), q_weight.device)
    out = torch.empty(columns, in_features, dtype=torch.float16, device=q_weight.device)
    grid = (-(-columns // _DECODE_BLOCK_N), -(-in_features // _DECODE_BLOCK_K))
    launch(_decode_kernel, grid, q_weight.device, q_weight, scale, invperm, group, bits, word, shift, out,
           in_features, columns, BLOCK_N=_DECODE_BLOCK_N, BLOCK_K=_DECODE_BLOCK_K, num_warps=_DECODE_WARPS)
    return out
