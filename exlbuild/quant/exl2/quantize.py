"""The EXL2 GPTQ variant (docs/exl2-format.md 4.9, Q1–Q7) and the packing of its result (2.1).

Several options of one layer in one pass
----------------------------------------
The measurement quantizes every distinct option of a layer from the same weight and Hessian.
`quantize_options` does them together:

- The Hessian work (act-order permutation, damping, inverse Cholesky factor U) is done once by
  `prepare_hessian`; the same `PreparedHessian` also serves layers that share a Hessian (q/k/v,
  gate/up), so pass it to each of them.
- The row loop runs once for all options, on a (B, K, N) stack of error-compensated weights. This
  works because every group and bit-width boundary of every option lies on a multiple of 32 rows:
  the loop walks 32-row blocks, applies GPTQ's immediate updates inside a block and a lazy update
  of all later rows after it. When a group of some option starts at a block, that option's scales
  are chosen from its rows as they stand then, i.e. after absorbing the error of every earlier row:
  exactly the doc's algorithm, whose lazy block is the group (only float summation order differs).
  Per row, each option has its own bit width, zero point and scales, held as (B, …) tensors.
- Scale searches of options whose groups start at the same row with the same length run batched. The
  search weighs each row by 1 / U_rr², what an error left in that row costs GPTQ's loss
  (exlbuild.kernels.scale_search).
- On CUDA the block's row loop and the scale search run as Triton kernels (exlbuild.kernels), on
  other devices as their PyTorch references; the block step is bit-exact either way.

Memory is about 7 bytes per weight and option (float32 work copy, fp16 values, uint8 codes), so a
caller with a large layer and little memory splits the options into several calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from exlbuild.errors import ExlbuildError
from exlbuild.kernels.gptq_block import BLOCK_ROWS, BlockStep, gptq_block_step
from exlbuild.kernels.scale_search import find_group_scales
from exlbuild.quant.exl2.options import Group, QuantOption, pad_to_32
from exlbuild.quant.exl2.pack import (
    bits_per_row,
    make_q_groups,
    pack_q_weight,
    pack_scale_nibbles,
    scale_from_nibbles,
    to_device,
)
from exlbuild.quant.gptq import PreparedHessian, prepare_hessian

@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    """One layer quantized with one option. K = in_features, N = out_features (not padded)."""

    option: QuantOption
    groups: tuple[Group, ...]  # in stored row order
    codes: Tensor  # (K, N) uint8, stored row order
    nibbles: Tensor  # (G, N) uint8, stored scale codes (t − 1)
    scale_max: Tensor  # (G,) float16, q_scale_max
    perm: Tensor  # (K,) int64: stored row k holds input feature perm[k]
    invperm: Tensor  # (K,) int64
    weight: Tensor  # (N, K) float16: the dequantized nn.Linear weight, as the loader computes it


def quantize_options(
    weight: Tensor, prepared: PreparedHessian, options: Sequence[QuantOption], layer: str = "layer"
) -> list[QuantizedLinear]:
    """Quantize one (out, in) weight with every option in one pass (see the module docstring).

    Runs in float32 on the device of `prepared`; results are in the order of `options`.
    """
    if not options:
        return []
    if weight.dim() != 2:
        raise ValueError(f"{layer}: expected an (out, in) weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    factor = prepared.inverse_factor
    if prepared.perm.numel() != in_features:
        raise ValueError(f"{layer}: Hessian of size {prepared.perm.numel()} for {in_features} input features")
    if in_features % BLOCK_ROWS:
        raise ExlbuildError(f"{layer}: EXL2 needs in_features to be a multiple of {BLOCK_ROWS}, got {in_features}")
    device = factor.device
    layouts = [option.groups(in_features) for option in options]
    n_options = len(options)

    row_bits = torch.stack([bits_per_row(layout, device) for layout in layouts])
    row_zero = (2 ** (row_bits - 1)).float()
    row_maxq = (2**row_bits - 1).float()

    # Which (option, group) pairs start at each row, keyed by group length for batched searches.
    starts: dict[int, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for o, layout in enumerate(layouts):
        for g, group in enumerate(layout):
            starts[group.start][group.rows].append((o, g))
    # Per start row, its batches: (group length, members, their options as an index on the device). The indices
    # are copied over at once, from page-locked memory: one made from a list at every group start is a
    # host-to-device copy that waits for the GPU.
    batches = [(a, rows, members) for a, by_rows in starts.items() for rows, members in by_rows.items()]
    flat = to_device(torch.tensor([o for *_, members in batches for o, _ in members]), device)
    searches: dict[int, list[tuple[int, list[tuple[int, int]], Tensor]]] = defaultdict(list)
    for (a, rows, members), index in zip(batches, flat.split([len(members) for *_, members in batches])):
        searches[a].append((rows, members, index))

    # The float32 work copy is filled from the permuted weight in its own dtype (half the bytes of a float32
    # intermediate for an fp16 weight: 2 GB less at a 128256 × 8192 head).
    work = torch.empty(n_options, in_features, out_features, dtype=torch.float32, device=device)
    work.copy_(weight.to(device).T[prepared.perm].expand_as(work))
    codes = torch.empty(n_options, in_features, out_features, dtype=torch.uint8, device=device)
    values = torch.empty(n_options, in_features, out_features, dtype=torch.float16, device=device)
    nibbles = [torch.empty(len(layout), out_features, dtype=torch.uint8, device=device) for layout in layouts]
    scale_max = [torch.empty(len(layout), dtype=torch.float16, device=device) for layout in layouts]
    scale = torch.empty(n_options, out_features, dtype=torch.float16, device=device)
    block_errors = torch.empty(n_options, BLOCK_ROWS, out_features, device=device)

    step = BlockStep(work, factor, scale, row_zero, row_maxq, codes, values, block_errors)
    row_weights = factor.diagonal().square().reciprocal()
    for a in range(0, in_features, BLOCK_ROWS):
        e = a + BLOCK_ROWS
        for rows, members, chosen in searches[a]:
            group_nibbles, group_max = find_group_scales(
                work[chosen, a : a + rows], row_bits[chosen, a], row_weights[a : a + rows]
            )
            scale[chosen] = scale_from_nibbles(group_nibbles, group_max)
            for (o, g), n, m in zip(members, group_nibbles, group_max):
                nibbles[o][g] = n
                scale_max[o][g] = m
        gptq_block_step(step, a)
        work[:, e:] -= torch.matmul(factor[a:e, e:].T, block_errors)
    del work, step

    return [
        QuantizedLinear(
            option=option,
            groups=layouts[o],
            codes=codes[o],
            nibbles=nibbles[o],
            scale_max=scale_max[o],
            perm=prepared.perm,
            invperm=prepared.invperm,
            weight=values[o].T.index_select(1, prepared.invperm),  # one copy, contiguous
        )
        for o, option in enumerate(options)
    ]


def quantize(weight: Tensor, hessian: Tensor, option: QuantOption, layer: str = "layer") -> QuantizedLinear:
    """Quantize one (out, in) weight with one option, given its (in, in) Hessian."""
    return quantize_options(weight, prepare_hessian(hessian, layer), [option], layer)[0]


def pack_layer(
    result: QuantizedLinear, bias: Tensor | None = None, out_of_range: Tensor | None = None
) -> dict[str, Tensor]:
    """The tensors of 2.1 (keys without the layer prefix), output padded to a multiple of 32.

    Padding columns get zero-point codes and scale nibble 0, so they decode to zero. Codes or nibbles out of range
    raise ValueError, or with `out_of_range` set that flag (see pack_bitstream).
    """
    in_features, out_features = result.codes.shape
    padding = pad_to_32(out_features) - out_features
    zero = (2 ** (bits_per_row(result.groups, result.codes.device) - 1)).to(torch.uint8)
    codes = torch.cat([result.codes, zero[:, None].expand(in_features, padding)], dim=1)
    nibbles = torch.nn.functional.pad(result.nibbles, (0, padding))
    tensors = {
        "q_weight": pack_q_weight(codes, result.groups, out_of_range),
        "q_scale": pack_scale_nibbles(nibbles, out_of_range),
        "q_scale_max": result.scale_max.to(torch.float16).contiguous(),
        "q_groups": to_device(make_q_groups(result.groups), result.codes.device),
        "q_invperm": result.invperm.to(torch.int32),
    }
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for {out_features} output features")
        tensors["bias"] = torch.nn.functional.pad(bias.to(torch.float16), (0, padding))
    return tensors
