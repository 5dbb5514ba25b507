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
  other devices as their PyTorch references; the block step is bit-exact either way. The loop is
  host-bound on the GPU, so everything that does not change from block to block (the dispatch, the
  shape checks, the search batches' index tensors and scratch) is settled before it: a block is then one
  block-step launch and the trailing update, a group start two launches and two reductions.

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
from exlbuild.kernels.gptq_block import (
    BLOCK_ROWS,
    BlockStep,
    gptq_block_step_reference,
    gptq_block_step_triton,
)
from exlbuild.kernels.runtime import use_triton
from exlbuild.kernels.scale_search import (
    GroupBatch,
    SearchScratch,
    SearchTarget,
    search_batch_reference,
    search_batch_triton,
)
from exlbuild.quant.exl2.options import Group, QuantOption, pad_to_32
from exlbuild.quant.exl2.pack import (
    bits_per_row,
    make_q_groups,
    pack_q_weight,
    pack_scale_nibbles,
)
from exlbuild.quant.gptq import PreparedHessian, prepare_hessian
from exlbuild.transfer import to_device


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
    # One path for the whole call (the dispatch is decided once, not at every block).
    triton = use_triton(factor)

    # The float32 work copy is filled from the permuted weight in its own dtype (half the bytes of a float32
    # intermediate for an fp16 weight: 2 GB less at a 128256 × 8192 head).
    work = torch.empty(n_options, in_features, out_features, dtype=torch.float32, device=device)
    work.copy_(weight.to(device).T[prepared.perm].expand_as(work))
    codes = torch.empty(n_options, in_features, out_features, dtype=torch.uint8, device=device)
    values = torch.empty(n_options, in_features, out_features, dtype=torch.float16, device=device)
    # Every option's groups one after another (option o's at rows first_group[o]...): the searches write a group's
    # nibbles and q_scale_max at its row of these.
    group_counts = [len(layout) for layout in layouts]
    first_group = [sum(group_counts[:o]) for o in range(n_options)]
    all_nibbles = torch.empty(sum(group_counts), out_features, dtype=torch.uint8, device=device)
    all_scale_max = torch.empty(sum(group_counts), dtype=torch.float16, device=device)
    scale = torch.empty(n_options, out_features, dtype=torch.float16, device=device)
    block_errors = torch.empty(n_options, BLOCK_ROWS, out_features, device=device)
    row_weights = factor.diagonal().square().reciprocal()
    target = SearchTarget(work, row_bits, row_weights, scale, all_nibbles, all_scale_max)
    searches = _plan_searches(layouts, first_group, out_features, device, triton)

    step = BlockStep(work, factor, scale, row_zero, row_maxq, codes, values, block_errors)
    search = search_batch_triton if triton else search_batch_reference
    block_step = gptq_block_step_triton if triton else gptq_block_step_reference
    for a in range(0, in_features, BLOCK_ROWS):
        e = a + BLOCK_ROWS
        for batch in searches[a]:
            search(target, batch)
        block_step(step, a)
        work[:, e:].sub_(torch.matmul(factor[a:e, e:].T, block_errors))  # (`-=` would also copy_ it onto itself)
    del work, step, target, searches
    # One option's groups are all of the buffers; several options' are copied apart (views would keep, and
    # torch.save write, every option's).
    nibbles = all_nibbles.split(group_counts)
    scale_max = all_scale_max.split(group_counts)
    if n_options > 1:
        nibbles, scale_max = [t.clone() for t in nibbles], [t.clone() for t in scale_max]

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


def _plan_searches(
    layouts: Sequence[Sequence[Group]], first_group: Sequence[int], out_features: int, device: torch.device,
    triton: bool,
) -> dict[int, list[GroupBatch]]:
    """Per start row, the batches of scale searches that run there: the groups of the options that start at that
    row, one batch per group length. Every batch's index tensors are copied over at once, from page-locked memory
    (one made from a list at every group start is a host-to-device copy that waits for the GPU). On the Triton
    path the batches of one row share one scratch, the largest any row needs."""
    starts: dict[int, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for o, layout in enumerate(layouts):
        for g, group in enumerate(layout):
            starts[group.start][group.rows].append((o, first_group[o] + g))
    batches = [(a, rows, members) for a, by_rows in starts.items() for rows, members in by_rows.items()]
    index = torch.tensor([member for *_, members in batches for member in members]).T.contiguous()
    index = to_device(index, device)  # (2, groups): each group's option, then its output row
    slots = max(sum(map(len, by_rows.values())) for by_rows in starts.values())
    scratch = SearchScratch.allocate(slots, out_features, device) if triton else None
    searches: dict[int, list[GroupBatch]] = defaultdict(list)
    for (a, rows, members), (options, dest) in zip(batches, index.split([len(m) for *_, m in batches], dim=1)):
        first = sum(len(batch.options) for batch in searches[a])  # its slots follow the row's earlier batches'
        part = scratch.part(first, len(members)) if scratch is not None else None
        searches[a].append(GroupBatch(a, rows, options, dest, part))
    return searches


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
