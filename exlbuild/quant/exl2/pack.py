"""The tensors of one EXL2 linear layer (docs/exl2-format.md section 2): packing, checks and decoding.

The bit-level work (bitstreams, the layer decoder, the fp16 arithmetic) lives in exlbuild.kernels.pack,
Triton kernels on CUDA beside their PyTorch references; Python loops here only walk the runs of equal
bit width (at most six per layer) and the group list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from exlbuild.errors import ExlbuildError
from exlbuild.kernels.pack import (  # noqa: F401 (re-exported: part of this module's API)
    decode_layer,
    dequantize_codes,
    pack_bitstream,
    row_layout,
    scale_from_nibbles,
    unpack_bitstream,
)
from exlbuild.quant.exl2.options import BIT_WIDTHS, ROW_ALIGN, Group, pad_to_32
from exlbuild.transfer import to_device

REQUIRED_KEYS = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
MAX_IN_FEATURES = 65536  # the kernels hold row indices as uint16


def pack_scale_nibbles(nibbles: Tensor, out_of_range: Tensor | None = None) -> Tensor:
    """(G, N) 4-bit scale codes → q_scale (G, N/8) int32; column n sits at bits 4·(n mod 8) (2.5).
    `out_of_range`: as in pack_bitstream."""
    # Eight nibbles per word along a row is exactly a 4-bit stream along the column axis.
    return pack_bitstream(nibbles.T, 4, out_of_range).T.contiguous()


def unpack_scale_nibbles(q_scale: Tensor) -> Tensor:
    """q_scale (G, N/8) → (G, N) uint8 nibbles."""
    return unpack_bitstream(q_scale.T.contiguous(), 4).T.contiguous()


def bits_per_row(groups: Sequence[Group], device: torch.device | str | None = None) -> Tensor:
    """(K,) int64: the bit width of every stored row."""
    return row_layout(tuple(groups), torch.device(device or "cpu"))[1].long()


def _width_runs(groups: Sequence[Group]) -> list[Group]:
    """Merge consecutive groups of equal width: their streams simply continue each other."""
    runs: list[Group] = []
    for g in groups:
        if runs and runs[-1].bits == g.bits:
            runs[-1] = Group(g.bits, runs[-1].start, g.end)
        else:
            runs.append(g)
    return runs


def pack_q_weight(codes: Tensor, groups: Sequence[Group], out_of_range: Tensor | None = None) -> Tensor:
    """(K, N) codes in stored row order → q_weight (Σ qrows, N) int32. `out_of_range`: as in pack_bitstream."""
    return torch.cat([pack_bitstream(codes[r.start : r.end], r.bits, out_of_range) for r in _width_runs(groups)])


def unpack_q_weight(q_weight: Tensor, groups: Sequence[Group]) -> Tensor:
    """q_weight → (K, N) uint8 codes in stored row order."""
    parts, qrow = [], 0
    for run in _width_runs(groups):
        parts.append(unpack_bitstream(q_weight[qrow : qrow + run.qrows], run.bits))
        qrow += run.qrows
    return torch.cat(parts)


def make_q_groups(groups: Sequence[Group]) -> Tensor:
    """q_groups (2G,) int16: per group its width and its first qrow (2.3)."""
    entries, qrow = [], 0
    for g in groups:
        entries += [g.bits, qrow]
        qrow += g.qrows
    return torch.tensor(entries, dtype=torch.int16)


# ---------------------------------------------------------------------------------------------
# Reading a tensor set back: structure checks (section 8, check 3) and the decoder (section 7).


def parse_q_groups(q_groups: Tensor, qrows: int, layer: str) -> tuple[Group, ...]:
    """Groups described by q_groups and the q_weight height, checking every rule of 2.3."""

    def fail(rule: str) -> ExlbuildError:
        return ExlbuildError(f"{layer}: q_groups: {rule}")

    if q_groups.dim() != 1 or q_groups.numel() < 2 or q_groups.numel() % 2:
        raise fail(f"must be a 1-D tensor of even length 2·G ≥ 2, got shape {tuple(q_groups.shape)}")
    pairs = q_groups.to(torch.int64).reshape(-1, 2).tolist()
    widths = [b for b, _ in pairs]
    offsets = [o for _, o in pairs] + [qrows]
    if any(b not in BIT_WIDTHS for b in widths):
        raise fail(f"bit widths {widths} must be among {list(BIT_WIDTHS)}")
    if any(a < b for a, b in zip(widths, widths[1:])):
        raise fail(f"bit widths {widths} must be non-increasing along the rows")
    if offsets[0] != 0:
        raise fail(f"the first qrow offset must be 0, got {offsets[0]}")
    groups, start = [], 0
    for g, b in enumerate(widths):
        group_qrows = offsets[g + 1] - offsets[g]
        if group_qrows <= 0:
            raise fail(f"qrow offsets must strictly increase and stay below q_weight's {qrows} rows (group {g})")
        rows, remainder = divmod(group_qrows * 32, b)
        if remainder or rows % ROW_ALIGN:
            raise fail(f"group {g} ({group_qrows} qrows at {b} bits) must cover a multiple of {ROW_ALIGN} rows")
        groups.append(Group(b, start, start + rows))
        start += rows
    return tuple(groups)


def _check_tensor(
    tensors: Mapping[str, Tensor], key: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], layer: str
) -> None:
    t = tensors[key]
    if t.dtype not in dtypes:
        raise ExlbuildError(f"{layer}: {key} has dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
    if tuple(t.shape) != shape:
        raise ExlbuildError(f"{layer}: {key} has shape {tuple(t.shape)}, expected {shape}")


def _layer_structure(tensors: Mapping[str, Tensor], layer: str) -> tuple[Group, ...]:
    """Check everything the tensor set must satisfy on its own; return its groups."""
    missing = [k for k in REQUIRED_KEYS if k not in tensors]
    if missing:
        raise ExlbuildError(f"{layer}: missing tensor(s) {missing}")
    unexpected = sorted(set(tensors) - set(REQUIRED_KEYS) - {"bias"})
    if unexpected:
        raise ExlbuildError(
            f"{layer}: unexpected tensor(s) {unexpected}; EXL2 has {list(REQUIRED_KEYS)} and an optional bias"
        )
    q_weight = tensors["q_weight"]
    if q_weight.dim() != 2:
        raise ExlbuildError(f"{layer}: q_weight must be 2-D, got shape {tuple(q_weight.shape)}")
    qrows, columns = q_weight.shape
    if columns % 32:
        raise ExlbuildError(f"{layer}: q_weight width {columns} must be a multiple of 32")
    _check_tensor(tensors, "q_weight", (torch.int32,), (qrows, columns), layer)
    if tensors["q_groups"].dtype != torch.int16:
        raise ExlbuildError(f"{layer}: q_groups has dtype {tensors['q_groups'].dtype}, expected torch.int16")
    groups = parse_q_groups(tensors["q_groups"], qrows, layer)
    in_features = groups[-1].end
    if in_features > MAX_IN_FEATURES:
        raise ExlbuildError(f"{layer}: {in_features} input features exceed the kernels' limit {MAX_IN_FEATURES}")
    _check_tensor(tensors, "q_scale", (torch.int32,), (len(groups), columns // 8), layer)
    _check_tensor(tensors, "q_scale_max", (torch.float16,), (len(groups),), layer)
    invperm_dtypes = (torch.int32, torch.int16) if in_features <= 32768 else (torch.int32,)
    _check_tensor(tensors, "q_invperm", invperm_dtypes, (in_features,), layer)
    sorted_invperm = torch.sort(tensors["q_invperm"].to(torch.int64)).values
    if not torch.equal(sorted_invperm, torch.arange(in_features, device=sorted_invperm.device)):
        raise ExlbuildError(f"{layer}: q_invperm is not a permutation of 0..{in_features - 1}")
    if "bias" in tensors:
        _check_tensor(tensors, "bias", (torch.float16,), (columns,), layer)
    return groups


def validate_layer(
    tensors: Mapping[str, Tensor], *, layer: str, in_features: int, out_features: int, bias: bool
) -> None:
    """Raise ExlbuildError naming `layer` and the rule if the tensors are not a loadable EXL2 linear
    of this shape (section 8, check 3). Keys are the suffixes: q_weight, q_scale, ..., bias."""
    if bias and "bias" not in tensors:
        raise ExlbuildError(f"{layer}: bias missing, but the architecture expects one")
    if not bias and "bias" in tensors:
        raise ExlbuildError(f"{layer}: bias present, but the architecture has none")
    groups = _layer_structure(tensors, layer)
    columns = tensors["q_weight"].shape[1]
    if columns != pad_to_32(out_features):
        raise ExlbuildError(
            f"{layer}: q_weight width {columns}, expected {pad_to_32(out_features)} "
            f"({out_features} output features padded to 32)"
        )
    if groups[-1].end != in_features:
        raise ExlbuildError(f"{layer}: the groups cover {groups[-1].end} rows, expected {in_features} input features")


def dequantize(
    tensors: Mapping[str, Tensor],
    out_features: int | None = None,
    layer: str = "layer",
    device: torch.device | str | None = None,
    groups: tuple[Group, ...] | None = None,
) -> Tensor:
    """Decode an EXL2 tensor set to the nn.Linear weight (out, in) in fp16, as the loader computes it
    (section 7, prescale 1), on `device` (None: where the tensors are). Padding columns are dropped when
    `out_features` is given.

    The structure is checked on the tensors where they are given, before any copy: pass a file's tensors from the
    host (checks that read device values wait for the GPU). `groups`, for tensors the caller made and checks
    itself, is their structure, taken as it is."""
    if groups is None:
        groups = _layer_structure(tensors, layer)
    t = {k: tensors[k] if device is None else to_device(tensors[k], device)
         for k in ("q_weight", "q_scale", "q_scale_max", "q_invperm")}
    scale = scale_from_nibbles(unpack_scale_nibbles(t["q_scale"]), t["q_scale_max"])
    dense = decode_layer(t["q_weight"], scale, groups, t["q_invperm"])
    return dense if out_features is None else dense[:out_features].contiguous()


def input_feature_groups(tensors: Mapping[str, Tensor], layer: str = "layer") -> Tensor:
    """(in_features,) int64: the group (index into q_scale_max) that quantized each input feature. Groups are runs
    of stored rows; q_invperm[i] is the stored row of input feature i (2.2)."""
    groups = _layer_structure(tensors, layer)
    invperm = tensors["q_invperm"]
    return row_layout(groups, invperm.device)[0].long()[invperm.long()]
