"""EXL2 options: identity, row assignment, bit accounting and candidate tables (exl2-format.md §3)."""

import json

import pytest

from exlbuild.errors import ExlbuildError
from exlbuild.quant.exl2.options import (
    ATTN_CANDIDATES,
    HEAD_OPTIONS,
    MLP_CANDIDATES,
    Group,
    QuantOption,
    bits_per_weight,
    head_option,
    option_from_json,
    option_to_json,
    total_bits,
)


def opt(*segments):
    """(proportion, bits, group size) segments, like the doc's p×Bb/gG."""
    bits, props, sizes = zip(*((b, p, g) for p, b, g in segments))
    return QuantOption(bits, props, sizes)


SMOLLM2_ATTN = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)}
SMOLLM2_MLP = {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def test_text_identity_and_hash():
    option = opt((0.05, 3, 64), (0.95, 2, 64))
    assert str(option) == "0.05:3b_64g/0.95:2b_64g s4"
    assert str(opt((1, 4, 128))) == "1:4b_128g s4"
    # 1 and 1.0 are one option with one text.
    assert opt((1.0, 8, 128)) == opt((1, 8, 128)) and str(opt((1.0, 8, 128))) == "1:8b_128g s4"
    assert len({option, opt((0.05, 3, 64), (0.95, 2, 64)), opt((1, 4, 128))}) == 2
    assert opt((0.1, 4, 128), (0.9, 3, 128)) != opt((0.1, 4, 64), (0.9, 3, 64))


@pytest.mark.parametrize(
    "segments, rule",
    [
        (((0.5, 3, 64), (0.5, 4, 64)), "strictly decreasing"),
        (((0.5, 4, 64), (0.5, 4, 64)), "strictly decreasing"),
        (((1, 7, 64),), "bit widths must be among"),
        (((0.5, 4, 64), (0.4, 3, 64)), "sum to 1"),
        (((1.2, 4, 64), (-0.2, 3, 64)), "positive"),
        (((1, 4, 48),), "multiples of 32"),
        (((1, 4, 0),), "multiples of 32"),
        (((1, 4.5, 64),), "must be integers"),
    ],
)
def test_invalid_options(segments, rule):
    with pytest.raises(ExlbuildError, match=rule):
        opt(*segments)
    with pytest.raises(ExlbuildError, match="scale_bits"):
        QuantOption((4,), (1,), (128,), scale_bits=3)


@pytest.mark.parametrize(
    "rows, option, counts",
    [
        (4096, opt((0.05, 3, 64), (0.95, 2, 64)), (4, 60)),
        (4096, opt((0.05, 8, 32), (0.1, 5, 128), (0.85, 4, 128)), (7, 4, 27)),
        (576, opt((0.05, 3, 64), (0.95, 2, 64)), (1, 8)),
        (1536, opt((0.05, 8, 32), (0.1, 5, 128), (0.85, 4, 128)), (3, 2, 10)),
        (576, opt((0.15, 8, 128), (0.85, 6, 128)), (1, 4)),
        # The first segment overshoots: later segments are clamped to zero groups.
        (64, opt((0.5, 4, 128), (0.5, 2, 32)), (1, 0)),
    ],
)
def test_group_counts(rows, option, counts):
    assert option.segment_group_counts(rows) == counts
    groups = option.groups(rows)
    assert len(groups) == sum(counts)
    assert groups[0].start == 0 and groups[-1].end == rows
    assert all(a.end == b.start for a, b in zip(groups, groups[1:]))


def test_groups_cut_short_at_the_end():
    groups = opt((0.05, 8, 32), (0.1, 5, 128), (0.85, 4, 128)).groups(1536)
    assert groups[:3] == (Group(8, 0, 32), Group(8, 32, 64), Group(8, 64, 96))
    assert groups[-1] == Group(4, 1504, 1536) and groups[-1].rows == 32 and groups[-1].qrows == 4
    six = opt((0.15, 8, 128), (0.85, 6, 128)).groups(576)
    assert [(g.bits, g.rows) for g in six] == [(8, 128), (6, 128), (6, 128), (6, 128), (6, 64)]


def test_groups_need_rows_multiple_of_32():
    with pytest.raises(ExlbuildError, match="multiple of 32"):
        opt((1, 4, 128)).groups(600)


@pytest.mark.parametrize(
    "shape, option, bits, bpw",
    [
        ((4096, 4096), opt((1, 4, 128)), 67_765_760, 4.0392),
        ((4096, 4096), opt((0.05, 3, 64), (0.95, 2, 64)), 35_785_728, 2.1330),
        ((4096, 4096), opt((0.05, 8, 32), (0.1, 5, 128), (0.85, 4, 128)), 73_631_520, 4.3888),
        ((4096, 4096), opt((0.15, 6, 32), (0.85, 4, 32)), 74_586_112, 4.4457),
        ((576, 576), opt((1, 4, 128)), 1_357_296, 4.0910),
        ((576, 192), opt((0.15, 8, 128), (0.85, 6, 128)), 735_216, 6.6480),
        ((1536, 576), opt((0.05, 8, 32), (0.1, 5, 128), (0.85, 4, 128)), 3_992_016, 4.5121),
        ((576, 49152), opt((0.15, 8, 128), (0.85, 6, 128)), 183_453_936, 6.4798),
        ((64, 32), opt((0.5, 4, 32), (0.5, 2, 32)), 8544, 4.171875),  # worked example of 2.8
    ],
)
def test_total_bits_table(shape, option, bits, bpw):
    assert total_bits(option, *shape) == bits
    assert round(bits_per_weight(option, *shape), 4) == round(bpw, 4)


def test_total_bits_padding_and_bias():
    option = opt((1, 4, 128))
    # 40 outputs are stored as 64 columns; a bias adds 16 bits per padded column.
    assert total_bits(option, 128, 40) == total_bits(option, 128, 64)
    assert total_bits(option, 128, 40, bias=True) == total_bits(option, 128, 64) + 16 * 64
    assert bits_per_weight(option, 128, 40, bias=True) == total_bits(option, 128, 64, True) / (128 * 64 + 64)


ATTN_SMOLLM2 = [
    (1998528, 2.2589), (2023104, 2.2867), (2118144, 2.3941), (2477376, 2.8001), (2956224, 3.3414),
    (2947200, 3.3312), (3644352, 4.1191), (3647616, 4.1228), (3677040, 4.1561), (3726720, 4.2122),
    (3831936, 4.3312), (3775344, 4.2672), (3866304, 4.3700), (3923328, 4.4345), (4811712, 5.4386),
    (4808064, 5.4345), (5413824, 6.1191), (5717376, 6.4622), (7183296, 8.1191),
]
MLP_SMOLLM2 = [
    (6169152, 2.3243), (6365760, 2.3984), (7007328, 2.6401), (7836768, 2.9526), (9159600, 3.4510),
    (9097152, 3.4274), (9756816, 3.6760), (11101728, 4.1827), (11259840, 4.2423), (11758512, 4.4301),
    (11696064, 4.4066), (14357424, 5.4093), (14294976, 5.3858), (16219056, 6.1107), (17182752, 6.4738),
    (18657312, 7.0293), (21409824, 8.0664),
]


@pytest.mark.parametrize(
    "table, shapes, expected",
    [(ATTN_CANDIDATES, SMOLLM2_ATTN, ATTN_SMOLLM2), (MLP_CANDIDATES, SMOLLM2_MLP, MLP_SMOLLM2)],
)
def test_candidate_block_sums(table, shapes, expected):
    assert len(table.candidates) == len(expected)
    weights = sum(k * n for k, n in shapes.values())
    for i, (candidate, (bits, bpw)) in enumerate(zip(table.candidates, expected)):
        block = sum(total_bits(option, *shapes[p]) for p, option in zip(table.projections, candidate))
        assert block == bits, f"candidate {i}"
        assert round(block / weights, 4) == bpw, f"candidate {i}"


def test_candidate_tables_spot_check():
    # Mixed group sizes inside one option (MLP candidate 4, down_proj) and a per-projection difference.
    assert str(MLP_CANDIDATES.candidates[4][2]) == "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g s4"
    assert str(ATTN_CANDIDATES.candidates[17][2]) == "1:8b_32g s4"
    assert str(ATTN_CANDIDATES.candidates[17][0]) == "1:6b_32g s4"


def test_distinct_options():
    attn = ATTN_CANDIDATES.reduced()
    mlp = MLP_CANDIDATES.reduced()
    assert [len(d) for d in attn.distinct] == [14, 14, 15, 14]
    assert [len(d) for d in mlp.distinct] == [13, 13, 14]
    for table, reduced in ((ATTN_CANDIDATES, attn), (MLP_CANDIDATES, mlp)):
        assert len(reduced.indices) == len(table.candidates)
        for candidate, indices in zip(table.candidates, reduced.indices):
            assert tuple(reduced.distinct[j][i] for j, i in enumerate(indices)) == candidate
        for distinct in reduced.distinct:
            assert len({str(o) for o in distinct}) == len(distinct)
    # First-use order: candidates 15 and 16 share down_proj 1×8b/g128.
    assert mlp.indices[15][2] == mlp.indices[16][2] == 13


def test_ungated_mlp_selection():
    ungated = MLP_CANDIDATES.select(["up_proj", "down_proj"])
    assert ungated.projections == ("up_proj", "down_proj")
    assert [len(d) for d in ungated.reduced().distinct] == [13, 14]


@pytest.mark.parametrize(
    "head_bits, bpw_smollm2, bpw_llama",
    [
        (2, 2.7923, 2.7354),
        (3, 3.2923, 3.2823),
        (4, 4.4590, 4.4385),
        (5, 5.2576, 5.1885),
        (6, 6.4798, 6.3448),
        (8, 8.0354, 8.0323),
    ],
)
def test_head_options(head_bits, bpw_smollm2, bpw_llama):
    option = head_option(head_bits)
    assert round(bits_per_weight(option, 576, 49152), 4) == bpw_smollm2
    assert round(bits_per_weight(option, 4096, 32000), 4) == bpw_llama


def test_head_option_keys():
    assert sorted(HEAD_OPTIONS) == [2, 3, 4, 5, 6, 8]
    with pytest.raises(ExlbuildError, match="head_bits"):
        head_option(7)


def test_json_round_trip():
    option = opt((0.05, 8, 32), (0.1, 5, 128), (0.85, 4, 128))
    obj = option_to_json(option)
    assert obj == {
        "group_size": {"8": 32, "5": 128, "4": 128},
        "bits": [8, 5, 4],
        "bits_prop": [0.05, 0.1, 0.85],
        "scale_bits": 4,
    }
    assert option_from_json(json.loads(json.dumps(obj))) == option
    text = '{"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4}'
    assert json.dumps(option_to_json(opt((1, 4, 128)))) == text


def test_json_group_size_forms():
    expected = opt((0.1, 4, 64), (0.9, 3, 64))
    base = {"bits": [4, 3], "bits_prop": [0.1, 0.9], "scale_bits": 4}
    assert option_from_json({**base, "group_size": 64}) == expected
    assert option_from_json({**base, "group_size": [64, 64]}) == expected
    assert option_from_json({**base, "group_size": {4: 64, 3: 64}}) == expected
    with pytest.raises(ExlbuildError, match="here: group_size keys"):
        option_from_json({**base, "group_size": {"4": 64}}, "here")
    with pytest.raises(ExlbuildError, match="here: missing"):
        option_from_json({"bits": [4]}, "here")
    with pytest.raises(ExlbuildError, match="here: .*sum to 1"):
        option_from_json({**base, "bits_prop": [0.2, 0.9], "group_size": 64}, "here")
