"""EXL2 tensor layout: bitstreams, scale nibbles, q_groups, checks and the decoder (exl2-format.md §2, §7, §8)."""

import numpy as np
import pytest
import torch

from exlbuild.errors import ExlbuildError
from exlbuild.quant.exl2.options import BIT_WIDTHS, Group, QuantOption
from exlbuild.quant.exl2.pack import (
    dequantize,
    make_q_groups,
    pack_bitstream,
    pack_q_weight,
    pack_scale_nibbles,
    scale_from_nibbles,
    unpack_bitstream,
    unpack_q_weight,
    unpack_scale_nibbles,
    validate_layer,
)


def unsigned(words: torch.Tensor) -> list[int]:
    return [int(w) & 0xFFFFFFFF for w in words.flatten()]


def stream_words(codes: list[int], bits: int) -> list[int]:
    """The definition of 2.4: the words, read as one little-endian integer, equal Σ c_j·2^(b·j)."""
    stream = sum(c << (bits * j) for j, c in enumerate(codes))
    return [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(len(codes) * bits // 32)]


def column(codes: list[int]) -> torch.Tensor:
    return torch.tensor(codes)[:, None]


@pytest.mark.parametrize(
    "bits, codes, words",
    [
        (4, list(range(8)), [0x76543210]),
        (4, [8] * 8, [0x88888888]),
        (2, [2] * 16, [0xAAAAAAAA]),
        (8, [128] * 4, [0x80808080]),
        (3, list(range(8)) * 4, [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
        (3, [4] * 32, [0x24924924, 0x49249249, 0x92492492]),
        (5, [16] * 32, [0x21084210, 0x08421084, 0x42108421, 0x10842108, 0x84210842]),
        (6, [32] * 16, [0x20820820, 0x08208208, 0x82082082]),
    ],
)
def test_doc_example_words(bits, codes, words):
    packed = pack_bitstream(column(codes), bits)
    assert packed.dtype == torch.int32 and packed.shape == (len(words), 1)
    assert unsigned(packed) == words
    assert unpack_bitstream(packed, bits)[:, 0].tolist() == codes


@pytest.mark.parametrize(
    "bits, straddling",
    [(2, []), (3, [10, 21]), (4, []), (5, [6, 12, 19, 25]), (6, [5, 10]), (8, [])],
)
def test_straddling_codes(bits, straddling):
    per_block = {2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 8: 4}[bits]
    found = []
    for j in range(per_block):
        codes = [0] * per_block
        codes[j] = (1 << bits) - 1
        words = unsigned(pack_bitstream(column(codes), bits))
        # Low bits at the top of the earlier word, high bits at the bottom of the next one.
        nonzero = [i for i, w in enumerate(words) if w]
        if len(nonzero) == 2:
            found.append(j)
            low_bits = 32 - (bits * j) % 32
            assert words[nonzero[0]] == ((1 << low_bits) - 1) << (32 - low_bits)
            assert words[nonzero[1]] == (1 << (bits - low_bits)) - 1
    assert found == straddling
    if bits == 3:
        codes = [0] * 32
        codes[10] = 0b111
        assert unsigned(pack_bitstream(column(codes), 3)) == [0xC0000000, 0x1, 0]


@pytest.mark.parametrize("bits", BIT_WIDTHS)
@pytest.mark.parametrize("rows", [32, 64, 128])
def test_bitstream_round_trip(bits, rows):
    generator = torch.Generator().manual_seed(bits * 1000 + rows)
    codes = torch.randint(0, 1 << bits, (rows, 5), generator=generator)
    packed = pack_bitstream(codes, bits)
    assert packed.shape == (rows * bits // 32, 5)
    for n in range(5):
        assert unsigned(packed[:, n]) == stream_words(codes[:, n].tolist(), bits)
    assert torch.equal(unpack_bitstream(packed, bits), codes.to(torch.uint8))


def test_bitstream_rejects_bad_input():
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack_bitstream(torch.zeros(16, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_bitstream(torch.full((8, 1), 16), 4)


def test_scale_nibbles():
    nibbles = torch.tensor([list(range(8)) + list(range(15, 7, -1)), [15] * 16])
    q_scale = pack_scale_nibbles(nibbles)
    assert q_scale.shape == (2, 2) and q_scale.dtype == torch.int32
    assert unsigned(q_scale) == [0x76543210, 0x89ABCDEF, 0xFFFFFFFF, 0xFFFFFFFF]
    assert torch.equal(unpack_scale_nibbles(q_scale), nibbles.to(torch.uint8))


MIXED_LAYOUTS = [
    QuantOption((4,), (1,), (32,)).groups(256),
    QuantOption((3, 2), (0.05, 0.95), (64, 64)).groups(576),
    QuantOption((8, 5, 4), (0.05, 0.1, 0.85), (32, 128, 128)).groups(320),  # last 4-bit group of 32 rows
    QuantOption((6, 5), (0.15, 0.85), (128, 128)).groups(576),
    QuantOption((8, 6, 5, 4, 3, 2), (0.1, 0.1, 0.2, 0.2, 0.2, 0.2), (32, 64, 32, 128, 64, 32)).groups(640),
]


@pytest.mark.parametrize("groups", MIXED_LAYOUTS, ids=lambda g: "-".join(f"{x.bits}b{x.rows}" for x in g))
def test_q_weight_round_trip(groups):
    rows = groups[-1].end
    generator = torch.Generator().manual_seed(rows)
    codes = torch.cat([torch.randint(0, 1 << g.bits, (g.rows, 64), generator=generator) for g in groups])
    q_weight = pack_q_weight(codes, groups)
    assert q_weight.shape == (sum(g.qrows for g in groups), 64)
    assert torch.equal(unpack_q_weight(q_weight, groups), codes.to(torch.uint8))
    # Each group's words are the group's own stream, at its q_groups offset.
    q_groups = make_q_groups(groups)
    assert q_groups.dtype == torch.int16 and q_groups.shape == (2 * len(groups),)
    for g, group in enumerate(groups):
        assert int(q_groups[2 * g]) == group.bits
        offset = int(q_groups[2 * g + 1])
        words = q_weight[offset : offset + group.qrows, 3]
        assert unsigned(words) == stream_words(codes[group.start : group.end, 3].tolist(), group.bits)


# ---------------------------------------------------------------------------------------------
# The worked example of 2.8: K = 64, N = 32, 32 rows at 4 bits then 32 rows at 2 bits.

EXAMPLE_GROUPS = (Group(4, 0, 32), Group(2, 32, 64))


def example_tensors(codes: torch.Tensor, nibbles: torch.Tensor, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    invperm = torch.argsort(perm)
    return {
        "q_weight": pack_q_weight(codes, EXAMPLE_GROUPS),
        "q_scale": pack_scale_nibbles(nibbles),
        "q_scale_max": torch.tensor([0.0125, 0.02], dtype=torch.float16),
        "q_groups": make_q_groups(EXAMPLE_GROUPS),
        "q_invperm": invperm.to(torch.int32),
    }


def test_worked_example_layout_and_values():
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    codes = torch.cat([torch.full((32, 32), 8), torch.full((32, 32), 2)])
    codes[5, 10] = 11
    codes[5, 11] = 0
    codes[40, 7] = 3
    nibbles = torch.zeros(2, 32, dtype=torch.int64)
    nibbles[0, 10] = 5
    nibbles[0, 11] = 15
    tensors = example_tensors(codes, nibbles, perm)

    assert tensors["q_weight"].shape == (6, 32)
    assert make_q_groups(EXAMPLE_GROUPS).tolist() == [4, 0, 2, 4]
    assert tensors["q_scale"].shape == (2, 4)
    assert (unsigned(tensors["q_weight"][0, 10:11])[0] >> 20) & 0xF == 11
    assert (unsigned(tensors["q_scale"][0, 1:2])[0] >> 8) & 0xF == 5
    assert (unsigned(tensors["q_weight"][4, 7:8])[0] >> 16) & 0x3 == 3

    assert float(tensors["q_scale_max"][0]) == 0.0124969482421875
    assert tensors["q_scale_max"][0].view(torch.int16).item() == 0x2266
    weight = dequantize(tensors, 32)
    assert weight.shape == (32, 64) and weight.dtype == torch.float16
    row = int(perm[5])
    assert float(weight[10, row]) == 0.00527191162109375
    assert float(weight[11, row]) == -0.0999755859375  # nibble 15: the scale is q_scale_max itself
    scale = scale_from_nibbles(torch.tensor([[5, 15]]), tensors["q_scale_max"][:1])
    assert scale[0, 0].item() == 0.0017576217651367188 and scale[0, 0].view(torch.int16).item() == 0x1733
    assert scale[0, 1].item() == 0.0124969482421875
    # Zero-point codes decode to zero whatever the scale.
    mask = torch.ones(32, 64, dtype=torch.bool)
    mask[10, row] = mask[11, row] = mask[7, int(perm[40])] = False
    assert (weight[mask] == 0).all()


def test_scale_arithmetic_matches_fp16_reference():
    """Check 6 of §8: S = fp16(fp16((s+1)²)·fp16(fp16(q_scale_max)/256)), against numpy's float16."""
    generator = torch.Generator().manual_seed(6)
    scale_max = (10 ** (torch.rand(200, generator=generator, dtype=torch.float64) * 4 - 4)).to(torch.float16)
    nibbles = torch.arange(16).expand(200, 16)
    ours = scale_from_nibbles(nibbles, scale_max).numpy()
    m = scale_max.numpy()[:, None] / np.float16(256)
    reference = ((np.arange(16, dtype=np.float16) + np.float16(1)) ** 2)[None, :] * m
    assert reference.dtype == np.float16
    assert np.array_equal(ours.view(np.int16), reference.view(np.int16))
    # Nibble 15 (t² = 256) gives q_scale_max back exactly unless q_scale_max/256 was rounded as an
    # fp16 subnormal, which can only happen below 2^-6.
    normal = scale_max.numpy() >= 2**-6
    assert 0 < normal.sum() < len(normal)
    assert np.array_equal(ours[normal, 15], scale_max.numpy()[normal])
    assert not np.array_equal(ours[~normal, 15], scale_max.numpy()[~normal])


# ---------------------------------------------------------------------------------------------
# Structure checks (§8 check 3) and padding.


def valid_layer(out_features: int = 40, bias: bool = False) -> dict[str, torch.Tensor]:
    groups = QuantOption((8, 5, 4), (0.05, 0.1, 0.85), (32, 128, 128)).groups(320)
    generator = torch.Generator().manual_seed(3)
    codes = torch.cat([torch.randint(0, 1 << g.bits, (g.rows, 64), generator=generator) for g in groups])
    nibbles = torch.randint(0, 16, (len(groups), 64), generator=generator)
    codes[:, out_features:] = torch.cat([torch.full((g.rows, 1), 2 ** (g.bits - 1)) for g in groups])
    tensors = {
        "q_weight": pack_q_weight(codes, groups),
        "q_scale": pack_scale_nibbles(nibbles),
        "q_scale_max": torch.rand(len(groups), generator=generator).to(torch.float16),
        "q_groups": make_q_groups(groups),
        "q_invperm": torch.randperm(320, generator=generator).to(torch.int32),
    }
    if bias:
        tensors["bias"] = torch.zeros(64, dtype=torch.float16)
    return tensors


def test_valid_layer_passes_and_padding_decodes_to_zero():
    tensors = valid_layer(bias=True)
    validate_layer(tensors, layer="model.layers.0.mlp.up_proj", in_features=320, out_features=40, bias=True)
    padded = dequantize(tensors)
    assert padded.shape == (64, 320)
    assert (padded[40:] == 0).all()
    assert torch.equal(dequantize(tensors, 40), padded[:40])
    small = dict(tensors, q_invperm=tensors["q_invperm"].to(torch.int16))
    assert torch.equal(dequantize(small, 40), padded[:40])


def _with(key, value):
    return lambda t: {**t, key: value(t)}


def _without(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


@pytest.mark.parametrize(
    "tamper, rule",
    [
        (_without("q_scale_max"), "missing tensor"),
        (_with("q_perm", lambda t: t["q_invperm"]), "unexpected tensor"),
        (_with("bias", lambda t: torch.zeros(64, dtype=torch.float16)), "bias present"),
        (_with("q_weight", lambda t: t["q_weight"].to(torch.int64)), "q_weight has dtype"),
        (_with("q_scale", lambda t: t["q_scale"].to(torch.int64)), "q_scale has dtype"),
        (_with("q_scale_max", lambda t: t["q_scale_max"].float()), "q_scale_max has dtype"),
        (_with("q_groups", lambda t: t["q_groups"].to(torch.int32)), "q_groups has dtype"),
        (_with("q_invperm", lambda t: t["q_invperm"].to(torch.int64)), "q_invperm has dtype"),
        (_with("q_groups", lambda t: t["q_groups"][:-1]), "even length"),
        (_with("q_groups", lambda t: torch.tensor([8, 0, 4, 8, 5, 28, 4, 36], dtype=torch.int16)), "non-increasing"),
        (_with("q_groups", lambda t: torch.tensor([8, 0, 7, 8, 4, 28, 4, 44], dtype=torch.int16)), "among"),
        (_with("q_groups", lambda t: torch.tensor([8, 1, 5, 8, 4, 28, 4, 44], dtype=torch.int16)), "first qrow offset"),
        (_with("q_groups", lambda t: torch.tensor([8, 0, 5, 8, 4, 8, 4, 44], dtype=torch.int16)), "strictly increase"),
        (_with("q_groups", lambda t: torch.tensor([8, 0, 5, 8, 4, 29, 4, 44], dtype=torch.int16)), "multiple of 32 rows"),
        (_with("q_groups", lambda t: torch.tensor([8, 0, 5, 7, 4, 27, 4, 43], dtype=torch.int16)), "multiple of 32 rows"),
        (_with("q_weight", lambda t: t["q_weight"][:-4]), "stay below q_weight's 44 rows"),
        (_with("q_weight", lambda t: t["q_weight"][:, :32]), "q_scale has shape"),
        (_with("q_weight", lambda t: t["q_weight"][:, :48]), "multiple of 32"),
        (_with("q_scale", lambda t: t["q_scale"][:3]), "q_scale has shape"),
        (_with("q_scale_max", lambda t: t["q_scale_max"][:3]), "q_scale_max has shape"),
        (_with("q_invperm", lambda t: t["q_invperm"][:-1]), "q_invperm has shape"),
        (_with("q_invperm", lambda t: torch.zeros(320, dtype=torch.int32)), "not a permutation"),
    ],
)
def test_structure_violations(tamper, rule):
    tensors = tamper(valid_layer())
    with pytest.raises(ExlbuildError, match=rule) as error:
        validate_layer(tensors, layer="model.layers.3.mlp.down_proj", in_features=320, out_features=40, bias=False)
    assert "model.layers.3.mlp.down_proj" in str(error.value)


def test_expected_shape_violations():
    tensors = valid_layer()
    with pytest.raises(ExlbuildError, match="x: q_weight width 64, expected 96"):
        validate_layer(tensors, layer="x", in_features=320, out_features=70, bias=False)
    with pytest.raises(ExlbuildError, match="x: bias missing"):
        validate_layer(tensors, layer="x", in_features=320, out_features=40, bias=True)
    with pytest.raises(ExlbuildError, match="x: the groups cover 320 rows, expected 352"):
        validate_layer(tensors, layer="x", in_features=352, out_features=40, bias=False)


def test_dequantize_rejects_broken_structure():
    tensors = valid_layer()
    tensors["q_groups"] = torch.tensor([4, 0, 8, 4], dtype=torch.int16)
    with pytest.raises(ExlbuildError, match="lm_head: q_groups: bit widths"):
        dequantize(tensors, layer="lm_head")
