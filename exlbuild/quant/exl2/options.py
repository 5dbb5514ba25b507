"""EXL2 quantization options: what an option is, how it cuts a tensor into groups, what it costs.

Everything here follows docs/exl2-format.md section 3 (and 2.3 for the group rules the kernels need).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exlbuild.errors import ExlbuildError

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
SCALE_BITS = 4
# Every group boundary must fall on a multiple of 32 stored rows (the GEMM kernel walks 32-row blocks).
ROW_ALIGN = 32


def pad_to_32(features: int) -> int:
    """Output width after the loader's padding to a multiple of 32 (section 2.7)."""
    return -(-features // 32) * 32


@dataclass(frozen=True)
class Group:
    """Stored rows [start, end) quantized at `bits` bits with one scale per column."""

    bits: int
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start

    @property
    def qrows(self) -> int:
        """Rows of 32-bit words the group occupies in q_weight."""
        return self.rows * self.bits // 32


def _normalized_proportion(p: float) -> float:
    # Integral proportions are kept as int so that the text identity and the JSON form read `1`,
    # as in the packaged candidate lists; 1 and 1.0 are then one option, not two.
    return int(p) if float(p).is_integer() else float(p)


@dataclass(frozen=True)
class QuantOption:
    """One EXL2 quantization option (section 3.1).

    `bits` are strictly decreasing widths, `bits_prop` the fraction of rows per width (each > 0, sum 1),
    `group_size` the group size of each width (parallel to `bits`). `str(option)` is the human-readable
    text of 3.1, e.g. `0.05:3b_64g/0.95:2b_64g s4`; equality and hashing agree with it.
    """

    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    group_size: tuple[int, ...]
    scale_bits: int = SCALE_BITS

    def __post_init__(self) -> None:
        for name in ("bits", "group_size"):
            values = tuple(getattr(self, name))
            if any(isinstance(v, bool) or not float(v).is_integer() for v in values):
                raise ExlbuildError(f"invalid EXL2 option: {name} must be integers, got {list(values)}")
            object.__setattr__(self, name, tuple(int(v) for v in values))
        object.__setattr__(self, "bits_prop", tuple(_normalized_proportion(p) for p in self.bits_prop))
        self._validate()

    def _validate(self) -> None:
        def fail(rule: str) -> ExlbuildError:
            return ExlbuildError(
                f"invalid EXL2 option bits={list(self.bits)} bits_prop={list(self.bits_prop)} "
                f"group_size={list(self.group_size)} scale_bits={self.scale_bits}: {rule}"
            )

        if not self.bits:
            raise fail("it needs at least one bit width")
        if not len(self.bits) == len(self.bits_prop) == len(self.group_size):
            raise fail("bits, bits_prop and group_size must have the same length")
        if any(b not in BIT_WIDTHS for b in self.bits):
            raise fail(f"bit widths must be among {list(BIT_WIDTHS)}")
        if any(a <= b for a, b in zip(self.bits, self.bits[1:])):
            raise fail("bit widths must be strictly decreasing (the kernels decode wider rows first)")
        if any(not p > 0 for p in self.bits_prop) or abs(math.fsum(self.bits_prop) - 1) > 1e-9:
            raise fail("proportions must be positive and sum to 1")
        if any(g <= 0 or g % ROW_ALIGN for g in self.group_size):
            raise fail(f"group sizes must be positive multiples of {ROW_ALIGN}")
        if self.scale_bits != SCALE_BITS:
            raise fail(f"scale_bits must be {SCALE_BITS}")

    def __str__(self) -> str:
        parts = (f"{p}:{b}b_{g}g" for b, p, g in zip(self.bits, self.bits_prop, self.group_size))
        return "/".join(parts) + f" s{self.scale_bits}"

    def segment_group_counts(self, rows: int) -> tuple[int, ...]:
        """Groups per bit width for a tensor of `rows` stored rows (section 3.2, clamped to >= 0)."""
        counts = []
        remaining = rows
        for p, g in zip(self.bits_prop, self.group_size):
            # Same float expression as the reference, so rounding at exact multiples agrees.
            count = max(0, math.ceil(min(rows * p, remaining) / g))
            counts.append(count)
            remaining -= count * g
        if remaining > 0:
            raise ExlbuildError(f"option {self} leaves {remaining} of {rows} rows without a group")
        return tuple(counts)

    def groups(self, rows: int) -> tuple[Group, ...]:
        """The groups in stored-row order; the very last group is cut short at `rows`."""
        if rows <= 0 or rows % ROW_ALIGN:
            raise ExlbuildError(f"in_features must be a positive multiple of {ROW_ALIGN} for EXL2, got {rows}")
        groups = []
        start = 0
        for b, g, count in zip(self.bits, self.group_size, self.segment_group_counts(rows)):
            for _ in range(count):
                groups.append(Group(b, start, min(start + g, rows)))
                start += g
        return tuple(groups)


def total_bits(option: QuantOption, in_features: int, out_features: int, bias: bool = False) -> int:
    """Exact storage cost in bits of one layer (section 3.3), with the output padded to 32."""
    columns = pad_to_32(out_features)
    groups = option.groups(in_features)
    weight_bits = sum(g.rows * columns * g.bits for g in groups)
    n_groups = len(groups)
    bits = weight_bits + 16 * n_groups + 32 * n_groups + option.scale_bits * n_groups * columns
    bits += 32 * in_features  # q_invperm
    if bias:
        bits += 16 * columns
    return bits


def bits_per_weight(option: QuantOption, in_features: int, out_features: int, bias: bool = False) -> float:
    """total_bits divided by the padded weight count (plus the bias length, if any)."""
    columns = pad_to_32(out_features)
    weights = in_features * columns + (columns if bias else 0)
    return total_bits(option, in_features, out_features, bias) / weights


# ---------------------------------------------------------------------------------------------
# Serialized form (measurement.json, job files): group_size keys are bit widths as strings.


def option_to_json(option: QuantOption) -> dict[str, Any]:
    return {
        "group_size": {str(b): g for b, g in zip(option.bits, option.group_size)},
        "bits": list(option.bits),
        "bits_prop": list(option.bits_prop),
        "scale_bits": option.scale_bits,
    }


def option_from_json(obj: Any, where: str = "option") -> QuantOption:
    """Parse the serialized form; `group_size` may be one int, a list parallel to bits or a mapping.

    `where` names the value in error messages (e.g. the measurement key and candidate index).
    """
    if not isinstance(obj, Mapping):
        raise ExlbuildError(f"{where}: expected an object with bits, bits_prop, group_size, got {obj!r}")
    missing = [k for k in ("bits", "bits_prop", "group_size") if k not in obj]
    if missing:
        raise ExlbuildError(f"{where}: missing key(s) {missing}")
    bits, props, sizes = obj["bits"], obj["bits_prop"], obj["group_size"]
    if not isinstance(bits, list) or not isinstance(props, list):
        raise ExlbuildError(f"{where}: bits and bits_prop must be lists")
    if isinstance(sizes, Mapping):
        by_width = {str(k): v for k, v in sizes.items()}
        if set(by_width) != {str(b) for b in bits}:
            raise ExlbuildError(f"{where}: group_size keys {sorted(by_width)} do not match bits {bits}")
        sizes = [by_width[str(b)] for b in bits]
    elif isinstance(sizes, int):
        sizes = [sizes] * len(bits)
    try:
        return QuantOption(tuple(bits), tuple(props), tuple(sizes), obj.get("scale_bits", SCALE_BITS))
    except (TypeError, ValueError) as e:
        raise ExlbuildError(f"{where}: malformed option {dict(obj)!r} ({e})") from e
    except ExlbuildError as e:
        raise ExlbuildError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The packaged candidate lists (section 3.4), transcribed from the doc's tables.


def _option(*segments: tuple[float, int, int]) -> QuantOption:
    """Build an option from (proportion, bits, group size) segments, as in the doc's `p×Bb/gG`."""
    return QuantOption(
        bits=tuple(b for _, b, _ in segments),
        bits_prop=tuple(p for p, _, _ in segments),
        group_size=tuple(g for _, _, g in segments),
    )


@dataclass(frozen=True)
class CandidateTable:
    """Whole-block candidates: one option per projection (columns) for each candidate (rows)."""

    projections: tuple[str, ...]
    candidates: tuple[tuple[QuantOption, ...], ...]

    def select(self, projections: Sequence[str]) -> CandidateTable:
        """The table restricted to some projections (e.g. without gate_proj for ungated MLPs)."""
        columns = [self.projections.index(p) for p in projections]
        return CandidateTable(tuple(projections), tuple(tuple(c[i] for i in columns) for c in self.candidates))

    def reduced(self) -> ReducedCandidates:
        """Distinct options per projection, in order of first use, and each candidate as indices (3.5)."""
        distinct: list[list[QuantOption]] = [[] for _ in self.projections]
        indices = []
        for candidate in self.candidates:
            row = []
            for options, option in zip(distinct, candidate):
                if option not in options:
                    options.append(option)
                row.append(options.index(option))
            indices.append(tuple(row))
        return ReducedCandidates(self.projections, tuple(tuple(d) for d in distinct), tuple(indices))


@dataclass(frozen=True)
class ReducedCandidates:
    """`distinct[j]` lists the options measured for projection j; `indices[i][j]` points into it."""

    projections: tuple[str, ...]
    distinct: tuple[tuple[QuantOption, ...], ...]
    indices: tuple[tuple[int, ...], ...]


ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

_A3_2_05 = _option((0.05, 3, 64), (0.95, 2, 64))
_A3_2_10 = _option((0.1, 3, 64), (0.9, 2, 64))
_A3_2_25 = _option((0.25, 3, 64), (0.75, 2, 64))
_A3_2_30 = _option((0.3, 3, 64), (0.7, 2, 64))
_A4_3_128 = _option((0.1, 4, 128), (0.9, 3, 128))
_A4_3_64 = _option((0.1, 4, 64), (0.9, 3, 64))
_A4_3_32 = _option((0.1, 4, 32), (0.9, 3, 32))
_A5_4_128 = _option((0.1, 5, 128), (0.9, 4, 128))
_A5_4_64 = _option((0.1, 5, 64), (0.9, 4, 64))
_A5_4_32 = _option((0.1, 5, 32), (0.9, 4, 32))
_A6_5_128 = _option((0.1, 6, 128), (0.9, 5, 128))
_A6_5_32 = _option((0.1, 6, 32), (0.9, 5, 32))
_A8_6_128 = _option((0.1, 8, 128), (0.9, 6, 128))
_B4_128 = _option((1, 4, 128))
_B4_64 = _option((1, 4, 64))
_B4_32 = _option((1, 4, 32))
_B5_64 = _option((1, 5, 64))
_B5_32 = _option((1, 5, 32))
_B6_128 = _option((1, 6, 128))
_B6_32 = _option((1, 6, 32))
_B8_128 = _option((1, 8, 128))
_B8_32 = _option((1, 8, 32))

ATTN_CANDIDATES = CandidateTable(
    ATTN_PROJECTIONS,
    (
        (_A3_2_05, _A3_2_05, _A3_2_05, _A3_2_05),
        (_A3_2_10, _A3_2_10, _A3_2_25, _A3_2_10),
        (_A3_2_10, _A3_2_10, _A4_3_128, _A3_2_10),
        (_A3_2_10, _A3_2_10, _A4_3_128, _A4_3_128),
        (_A4_3_128, _A4_3_128, _A4_3_128, _A4_3_128),
        (_A4_3_128, _A4_3_128, _A4_3_64, _A4_3_128),
        (_B4_128, _B4_128, _B4_128, _B4_128),
        (_B4_128, _B4_128, _B4_64, _B4_128),
        (_B4_64, _B4_64, _B4_32, _B4_64),
        (_B4_32, _B4_32, _B4_32, _B4_32),
        (_A5_4_128, _A5_4_128, _A5_4_64, _A5_4_128),
        (_A5_4_64, _A5_4_64, _A5_4_32, _A5_4_64),
        (_A5_4_64, _A5_4_64, _B5_64, _A5_4_64),
        (_A5_4_32, _A5_4_32, _B5_32, _A5_4_32),
        (_A6_5_128, _A6_5_128, _B6_128, _A6_5_128),
        (_A6_5_32, _A6_5_32, _B6_32, _A6_5_32),
        (_B6_128, _B6_128, _B6_128, _B6_128),
        (_B6_32, _B6_32, _B8_32, _B6_32),
        (_B8_128, _B8_128, _B8_128, _B8_128),
    ),
)

MLP_CANDIDATES = CandidateTable(
    MLP_PROJECTIONS,
    (
        (_A3_2_05, _A3_2_05, _option((0.05, 6, 32), (0.2, 3, 64), (0.75, 2, 64))),
        (_A3_2_10, _A3_2_25, _option((0.05, 6, 32), (0.2, 3, 64), (0.75, 2, 64))),
        (_A3_2_10, _A3_2_30, _option((0.05, 5, 32), (0.95, 3, 32))),
        (_A3_2_10, _A3_2_30, _option((0.05, 5, 32), (0.95, 4, 32))),
        (_A4_3_128, _option((0.25, 4, 128), (0.75, 3, 128)), _option((0.05, 8, 32), (0.1, 4, 128), (0.85, 3, 128))),
        (_A4_3_32, _option((0.25, 4, 32), (0.75, 3, 32)), _option((0.05, 8, 32), (0.1, 4, 32), (0.85, 3, 32))),
        (_A4_3_32, _option((0.25, 4, 32), (0.75, 3, 32)), _option((0.05, 8, 32), (0.95, 4, 128))),
        (_B4_128, _B4_32, _option((0.05, 8, 32), (0.95, 4, 128))),
        (_B4_32, _B4_32, _option((0.05, 8, 32), (0.95, 4, 32))),
        (_A5_4_128, _option((0.25, 5, 128), (0.75, 4, 128)), _option((0.05, 8, 32), (0.1, 5, 128), (0.85, 4, 128))),
        (_A5_4_32, _option((0.25, 5, 32), (0.75, 4, 32)), _option((0.05, 8, 32), (0.1, 5, 32), (0.85, 4, 32))),
        (_A6_5_128, _option((0.25, 6, 128), (0.75, 5, 128)), _option((0.05, 8, 32), (0.1, 6, 128), (0.85, 5, 128))),
        (_A6_5_32, _option((0.25, 6, 32), (0.75, 5, 32)), _option((0.05, 8, 32), (0.1, 6, 32), (0.85, 5, 32))),
        (_B6_128, _B6_128, _option((0.05, 8, 32), (0.95, 6, 128))),
        (_A8_6_128, _A8_6_128, _option((0.15, 8, 128), (0.85, 6, 128))),
        (_A8_6_128, _A8_6_128, _B8_128),
        (_B8_128, _B8_128, _B8_128),
    ),
)

# Head options by --head_bits (section 3.6). The reference writes the 8-bit one as `1.0`; it is the
# same option as `1` here (see _normalized_proportion).
HEAD_OPTIONS: Mapping[int, QuantOption] = {
    2: _option((0.3, 4, 32), (0.7, 2, 32)),
    3: _option((0.15, 4, 32), (0.85, 3, 32)),
    4: _option((0.15, 6, 32), (0.85, 4, 32)),
    5: _option((0.15, 6, 128), (0.85, 5, 128)),
    6: _option((0.15, 8, 128), (0.85, 6, 128)),
    8: _option((1, 8, 128)),
}


def head_option(head_bits: int) -> QuantOption:
    try:
        return HEAD_OPTIONS[head_bits]
    except KeyError:
        raise ExlbuildError(f"head_bits must be one of {sorted(HEAD_OPTIONS)}, got {head_bits!r}") from None
