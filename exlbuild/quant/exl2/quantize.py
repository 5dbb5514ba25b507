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
  block-step launch and the trailing update, a group start two launches and two reductions. A pass that
  quantizes many layers passes `RowLoopGraphs`, which captures a loop met again as a CUDA graph and
  replays it: one launch for the loop, the same bytes.

Everything runs in the dtype of the prepared Hessian's factor: float32, or float64 (passes.dtype; the
kernels take both). Memory is about 7 bytes per weight and option in float32 (the work copy, fp16
values, uint8 codes), 11 in float64, so a caller with a large layer and little memory splits the
options into several calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from exlbuild.cuda_graph import capture, release
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

# RowLoopGraphs' buffers of one pass at most (and an eighth of the GPU's free memory). By its count SmolLM2's
# measurement takes ~350 MB, its quantization pass ~35 MB; of a Llama-3-70B only the quantization pass's k/v shape
# fits (~360 MB beside that pass's 15.7 GiB peak, bench/results/scale-h100-*.md).
GRAPH_BYTES = 512 << 20


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
    weight: Tensor, prepared: PreparedHessian, options: Sequence[QuantOption], layer: str = "layer",
    graphs: RowLoopGraphs | None = None,
) -> list[QuantizedLinear]:
    """Quantize one (out, in) weight with every option in one pass (see the module docstring).

    Runs in the dtype of `prepared`'s factor (float32 or float64), on its device; results are in the order of
    `options`. `graphs`: where the row loop of a repeated shape and set of options is captured and replayed (on
    CUDA; the same bytes either way).
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
    layouts = tuple(option.groups(in_features) for option in options)
    # One path for the whole call (the dispatch is decided once, not at every block).
    triton = use_triton(factor, float64=True)
    loop = graphs.loop(layouts, factor, out_features) if graphs is not None and triton else None
    if loop is None:
        loop = _RowLoop.allocate(layouts, _RowBuffers.allocate(len(options), factor, out_features), triton)
    else:
        loop.buffers.factor.copy_(factor)
    # The work copy is filled from the permuted weight in its own dtype (half the bytes of a float32
    # intermediate for an fp16 weight: 2 GB less at a 128256 × 8192 head).
    work = loop.buffers.work
    work.copy_(weight.to(work.device).T[prepared.perm].expand_as(work))
    loop.run()
    # A graph's buffers are overwritten by its next replay: its results are copied out. A loop run directly lets go
    # of its work stack first (the results' copies then fit where it was: 2 GB at a 128256 × 8192 head).
    own = loop.graph is None
    codes, values, nibbles, scale_max = loop.buffers.codes, loop.buffers.values, loop.nibbles, loop.scale_max
    nibbles, scale_max = nibbles.split(loop.group_counts), scale_max.split(loop.group_counts)
    del loop, work
    if not own or len(options) > 1:  # (views of one call's would keep, and torch.save write, every option's)
        nibbles, scale_max = [t.clone() for t in nibbles], [t.clone() for t in scale_max]
    return [
        QuantizedLinear(
            option=option,
            groups=layouts[o],
            codes=codes[o] if own else codes[o].clone(),
            nibbles=nibbles[o],
            scale_max=scale_max[o],
            perm=prepared.perm,
            invperm=prepared.invperm,
            weight=values[o].T.index_select(1, prepared.invperm),  # one copy, contiguous
        )
        for o, option in enumerate(options)
    ]


@dataclass(frozen=True, eq=False)
class _RowBuffers:
    """The row loop's large tensors for B options of a (K, N) weight: `work` and `factor` filled before a run,
    `codes` and `values` read after it (see BlockStep)."""

    work: Tensor  # (B, K, N) in the factor's dtype, as are the row weights and errors
    factor: Tensor  # (K, K): U
    row_weights: Tensor  # (K,): 1 / U_rr², the scale searches' row weights
    codes: Tensor  # (B, K, N) uint8
    values: Tensor  # (B, K, N) float16
    scale: Tensor  # (B, N) float16
    errors: Tensor  # (B, 32, N)

    @classmethod
    def allocate(cls, options: int, factor: Tensor, out_features: int) -> _RowBuffers:
        """Buffers on `factor`'s device; `factor` itself is the factor (a graph's own buffer takes a copy of its
        strides: kernels and cuBLAS pick their variant by the strides)."""
        in_features, device, dtype = factor.shape[0], factor.device, factor.dtype
        shape = (options, in_features, out_features)
        return cls(
            torch.empty(shape, dtype=dtype, device=device),
            factor,
            torch.empty(in_features, dtype=dtype, device=device),
            torch.empty(shape, dtype=torch.uint8, device=device),
            torch.empty(shape, dtype=torch.float16, device=device),
            torch.empty(options, out_features, dtype=torch.float16, device=device),
            torch.empty(options, BLOCK_ROWS, out_features, dtype=dtype, device=device),
        )


@dataclass(frozen=True, eq=False)
class _RowLoop:
    """quantize_options' row loop for one set of group layouts on its buffers, everything that does not change
    from block to block settled: a block is then one block-step launch and the trailing update, a group start
    two launches and two reductions."""

    layouts: tuple[tuple[Group, ...], ...]
    buffers: _RowBuffers
    group_counts: list[int]
    nibbles: Tensor  # (G, N) uint8: every option's groups one after another
    scale_max: Tensor  # (G,) float16
    step: BlockStep
    target: SearchTarget
    searches: dict[int, list[GroupBatch]]  # by start row
    triton: bool
    graph: torch.cuda.CUDAGraph | None = None  # the loop captured (RowLoopGraphs)

    @classmethod
    def allocate(cls, layouts: tuple[tuple[Group, ...], ...], buffers: _RowBuffers, triton: bool) -> _RowLoop:
        """The loop of these layouts (one per option) on `buffers`; `triton`: the kernels, else the references."""
        work = buffers.work
        device, out_features = work.device, work.shape[2]
        row_bits = torch.stack([bits_per_row(layout, device) for layout in layouts])
        step = BlockStep(work, buffers.factor, buffers.scale, (2 ** (row_bits - 1)).to(work.dtype),
                         (2**row_bits - 1).to(work.dtype), buffers.codes, buffers.values, buffers.errors)
        # Every option's groups one after another (option o's at rows first_group[o]...): the searches write a
        # group's nibbles and q_scale_max at its row of these.
        group_counts = [len(layout) for layout in layouts]
        first_group = [sum(group_counts[:o]) for o in range(len(layouts))]
        nibbles = torch.empty(sum(group_counts), out_features, dtype=torch.uint8, device=device)
        scale_max = torch.empty(sum(group_counts), dtype=torch.float16, device=device)
        target = SearchTarget(work, row_bits, buffers.row_weights, buffers.scale, nibbles, scale_max)
        searches = _plan_searches(layouts, first_group, work, triton)
        return cls(layouts, buffers, group_counts, nibbles, scale_max, step, target, searches, triton)

    def run(self) -> None:
        """The loop over 32-row blocks: queued, or its graph replayed."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.queue()

    def queue(self) -> None:
        """Queue the loop's kernels (it reads no device value: it can be captured)."""
        work, factor, errors = self.buffers.work, self.buffers.factor, self.buffers.errors
        torch.reciprocal(factor.diagonal().square(), out=self.buffers.row_weights)
        search = search_batch_triton if self.triton else search_batch_reference
        block_step = gptq_block_step_triton if self.triton else gptq_block_step_reference
        for a in range(0, work.shape[1], BLOCK_ROWS):
            e = a + BLOCK_ROWS
            for batch in self.searches[a]:
                search(self.target, batch)
            block_step(self.step, a)
            work[:, e:].sub_(torch.matmul(factor[a:e, e:].T, errors))  # (`-=` would also copy_ it onto itself)


class RowLoopGraphs:
    """The row loops of one pass over a model (its quantization pass or its measurement), captured as CUDA graphs.

    On the GPU the row loop is host-bound: a block is a launch of the block step and the trailing update's product and
    subtraction, each kernel shorter than its launch from Python. A pass quantizes a model's few (K, N) shapes with
    few sets of group layouts, each tens of times. The first call of a set runs the loop as always (compiling its
    kernels and planning its cuBLAS products: nothing may be compiled or planned inside a capture), the second
    captures it, and that call and every later one replay it: one launch for the whole loop. The graphs of one shape
    share its buffers (each call fills the inputs and copies the results out) and all share one memory pool for
    their temporaries (they replay one after another); buffers past `budget` bytes are not made, and their loops
    run as always (a large layer's launches are a small part of its time). A replay runs the same kernels on the
    same values: the same bytes.
    """

    def __init__(self, device: torch.device, budget: int) -> None:
        self.device, self.budget = device, budget
        self._stream = torch.cuda.Stream(device)
        self._pool = torch.cuda.graph_pool_handle()
        self._seen: set[tuple] = set()
        self._loops: dict[tuple, _RowLoop | None] = {}  # None: past the budget
        self._buffers: dict[tuple, _RowBuffers] = {}
        self._factors: dict[tuple, Tensor] = {}
        self._bytes = 0

    def loop(self, layouts: tuple[tuple[Group, ...], ...], factor: Tensor, out_features: int) -> _RowLoop | None:
        """The captured loop of these layouts on this shape (the factor's strides and dtype included), to fill and
        run; None where the loop is to run as always."""
        key = (layouts, out_features, tuple(factor.shape), factor.stride(), factor.dtype)
        if key in self._loops:
            return self._loops[key]
        if key not in self._seen:
            self._seen.add(key)
            return None
        buffers = self._shared_buffers(len(layouts), factor, out_features)
        loop = None
        if buffers is not None:
            loop = _RowLoop.allocate(layouts, buffers, triton=True)
            graph, _ = capture(loop.queue, self._stream, self._pool)
            loop = dataclasses.replace(loop, graph=graph)
        self._loops[key] = loop
        return loop

    def _shared_buffers(self, options: int, factor: Tensor, out_features: int) -> _RowBuffers | None:
        """The buffers of B options on this shape, made if they fit the budget (with as much again for the pool's
        temporaries: the first block's trailing product is as large as the work stack)."""
        factor_key = (tuple(factor.shape), factor.stride(), factor.dtype)
        key = (options, out_features, factor_key)
        if key not in self._buffers:
            weights = options * factor.shape[0] * out_features
            # The work stack and the pool's temporaries in the factor's dtype, uint8 codes, fp16 values.
            cost = weights * (2 * factor.element_size() + 1 + 2) + (0 if factor_key in self._factors else factor.nbytes)
            if self._bytes + cost > self.budget:
                return None
            self._bytes += cost
            if factor_key not in self._factors:
                self._factors[factor_key] = torch.empty_strided(
                    factor.shape, factor.stride(), dtype=factor.dtype, device=factor.device
                )
            self._buffers[key] = _RowBuffers.allocate(options, self._factors[factor_key], out_features)
        return self._buffers[key]

    def close(self) -> None:
        """Give back the graphs' memory: their buffers, then their pool (release empties the allocator's cache, so
        the buffers go first)."""
        graphs = [loop.graph for loop in self._loops.values() if loop is not None]
        self._loops.clear()
        self._buffers.clear()
        self._factors.clear()
        release(graphs)


@contextlib.contextmanager
def row_loop_graphs(device: torch.device) -> Iterator[RowLoopGraphs | None]:
    """RowLoopGraphs for a pass on `device`, released at its end: on CUDA only, within GRAPH_BYTES and an eighth of
    the GPU's free memory; None elsewhere."""
    if device.type != "cuda":
        yield None
        return
    graphs = RowLoopGraphs(device, min(GRAPH_BYTES, torch.cuda.mem_get_info(device)[0] // 8))
    try:
        yield graphs
    finally:
        graphs.close()


def _plan_searches(
    layouts: Sequence[Sequence[Group]], first_group: Sequence[int], work: Tensor, triton: bool,
) -> dict[int, list[GroupBatch]]:
    """Per start row, the batches of scale searches that run there on the (B, K, N) `work` stack: the groups of the
    options that start at that row, one batch per group length. Every batch's index tensors are copied over at once,
    from page-locked memory (one made from a list at every group start is a host-to-device copy that waits for the
    GPU). On the Triton path the batches of one row share one scratch (in the work dtype), the largest any row
    needs."""
    device, out_features = work.device, work.shape[2]
    starts: dict[int, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for o, layout in enumerate(layouts):
        for g, group in enumerate(layout):
            starts[group.start][group.rows].append((o, first_group[o] + g))
    batches = [(a, rows, members) for a, by_rows in starts.items() for rows, members in by_rows.items()]
    index = torch.tensor([member for *_, members in batches for member in members]).T.contiguous()
    index = to_device(index, device)  # (2, groups): each group's option, then its output row
    slots = max(sum(map(len, by_rows.values())) for by_rows in starts.values())
    scratch = SearchScratch.allocate(slots, out_features, device, work.dtype) if triton else None
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
