"""The EXL2 GPTQ variant (exl2-format.md 4.9) and the packing of its results (2.1, §8 checks 3–5)."""

import pytest
import torch

from exlbuild.errors import ExlbuildError
from exlbuild.quant.exl2.options import ATTN_CANDIDATES, MLP_CANDIDATES, QuantOption
from exlbuild.quant.exl2.pack import bits_per_row, dequantize, dequantize_codes, scale_from_nibbles, validate_layer
from exlbuild.kernels.gptq_block import BLOCK_ROWS, BlockStep, gptq_block_step
from exlbuild.kernels.scale_search import find_group_scales, multiplier_grid
from exlbuild.quant.exl2.quantize import RowLoopGraphs, pack_layer, quantize, quantize_options, row_loop_graphs
from exlbuild.quant.gptq import prepare_hessian

K, N = 256, 72


def realistic_layer(in_features: int = K, out_features: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a few loud channels, like LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(in_features) + torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    loudness = torch.exp(0.5 * torch.randn(in_features, generator=generator))
    x = (torch.randn(2048, in_features, generator=generator) @ mixing) * loudness
    hessian = x.T @ x / 8
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(torch.float16)
    return weight, hessian


def proxy_loss(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    error = (weight.double() - quantized.double())
    return torch.trace(error @ hessian.double() @ error.T).item()


def stored_scales(result) -> torch.Tensor:
    """(K, N) fp16: the scale S of every stored weight."""
    rows = torch.tensor([g.rows for g in result.groups])
    return scale_from_nibbles(result.nibbles, result.scale_max)[torch.repeat_interleave(torch.arange(len(rows)), rows)]


def same_scale_rtn(weight: torch.Tensor, result) -> torch.Tensor:
    """Round the original weight to nearest with the scales the GPTQ result chose (no error feedback)."""
    stored = weight.float().T[result.perm]
    bits = bits_per_row(result.groups)
    zero, maxq = (2 ** (bits - 1)).float()[:, None], (2**bits - 1).float()[:, None]
    scale = stored_scales(result)
    codes = (torch.round(stored / scale.float()) + zero).clamp(torch.zeros_like(maxq), maxq)
    return dequantize_codes(codes, zero, scale)[result.invperm].T


GRID = torch.tensor([0.70 * (1 - i / 16) + 1.20 * (i / 16) for i in range(17)], dtype=torch.float32)


def literal_scale_search(rows: torch.Tensor, bits: int, row_weights: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The scale search written out for one group (R, N): each column's nibble and q_scale_max."""
    maxq, z = 2**bits - 1, 2 ** (bits - 1)
    top = (rows.abs().max() + 1e-12) / (maxq / 2)
    best = None
    for p in GRID:
        scale_max = (top * p).half()
        nibbles, total = [], 0.0
        for n in range(rows.shape[1]):
            errors = []
            for k in range(16):
                s = ((k + 1) ** 2 * (scale_max.float() / 256).half().float()).half().float()
                v = (torch.round(rows[:, n] / s) + z).clamp(0, maxq) - z if s > 0 else torch.zeros(len(rows))
                errors.append((row_weights * (v * s - rows[:, n]) ** 2).sum().item())
            nibbles.append(min(range(16), key=lambda k: (errors[k], k)))
            total += errors[nibbles[-1]]
        if best is None or total < best[0]:
            best = (total, nibbles, scale_max)
    return best[1], best[2]


def reference_quantize(weight, hessian, option: QuantOption) -> tuple[torch.Tensor, torch.Tensor]:
    """Q1–Q7 written out literally for one option, group by group (lazy block = group), with the
    loader's fp16 arithmetic done in fp16 tensors. Returns codes and values in stored order."""
    prepared = prepare_hessian(hessian)
    u = prepared.inverse_factor
    w = weight.float().T[prepared.perm].clone()
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    values = torch.zeros(w.shape, dtype=torch.float16)
    for group in option.groups(w.shape[0]):
        a, e, maxq, z = group.start, group.end, 2**group.bits - 1, 2 ** (group.bits - 1)
        nibbles, scale_max = literal_scale_search(w[a:e], group.bits, u.diagonal()[a:e] ** -2)
        t = torch.tensor(nibbles, dtype=torch.float16) + 1
        scale = (t * t) * (scale_max / 256)
        block = torch.zeros(e - a, w.shape[1])
        for r in range(a, e):
            q = (torch.round(w[r] / scale.float()) + z).clamp(0, maxq)
            v = (q.half() - z) * scale
            codes[r], values[r] = q.to(torch.uint8), v
            err = (w[r] - v.float()) / u[r, r]
            w[r:e] -= u[r, r:e, None] * err[None]
            block[r - a] = err
        w[e:] -= u[a:e, e:].T @ block
    return codes, values


# ---------------------------------------------------------------------------------------------
# Scale search (Q2–Q4)


def test_scale_search_matches_literal_search():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 64, 12, generator=generator) * torch.tensor([0.01, 0.02, 0.05])[:, None, None]
    rows[1, :, 0] = 0  # a dead column
    row_weights = torch.rand(64, generator=generator) + 0.1
    bits = torch.tensor([3, 5, 8])
    nibbles, scale_max = find_group_scales(rows, bits, row_weights)
    for i, b in enumerate(bits.tolist()):
        literal_nibbles, literal_max = literal_scale_search(rows[i], b, row_weights)
        assert nibbles[i].tolist() == literal_nibbles
        assert scale_max[i] == literal_max


def weighted_error(rows: torch.Tensor, bits: int, row_weights: torch.Tensor, nibbles: torch.Tensor,
                   scale_max: torch.Tensor) -> float:
    maxq, z = 2**bits - 1, 2 ** (bits - 1)
    s = scale_from_nibbles(nibbles[None], scale_max[None])[0].float()
    v = ((torch.round(rows / s) + z).clamp(0, maxq) - z) * s
    return (row_weights[:, None] * (v - rows) ** 2).sum().item()


def test_scale_search_beats_the_column_maximum_scales():
    # The reference converter's nibbles (from each column's largest weight) with any multiplier of the
    # grid are among the choices searched, so none of them can do better.
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(4, 32, 24, generator=generator) * 0.02
    rows[:, 3] *= 6  # an outlier row
    row_weights = torch.rand(32, generator=generator) * 4
    bits = torch.tensor([2, 3, 4, 6])
    nibbles, scale_max = find_group_scales(rows, bits, row_weights)
    for g, b in enumerate(bits.tolist()):
        top = (rows[g].abs().max() + 1e-12) / ((2**b - 1) / 2)
        column = (rows[g].abs().amax(dim=0) + 1e-12) / ((2**b - 1) / 2)
        steps = torch.round(16 * torch.sqrt(column / top)).clamp(1, 16)
        by_column_maximum = min(
            weighted_error(rows[g], b, row_weights, (steps - 1).to(torch.uint8), (top * p).half()) for p in GRID
        )
        assert weighted_error(rows[g], b, row_weights, nibbles[g], scale_max[g]) <= by_column_maximum


def test_scale_search_weighs_rows():
    # One outlier among small weights: in a row GPTQ weighs heavily, its scale must reach it; in a row it
    # barely weighs, the scale fits the many small weights and clips it.
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(64, 8, generator=generator) * 0.01
    rows[5] = 0.2
    heavy, light = torch.ones(64), torch.ones(64)
    heavy[5], light[5] = 1000.0, 1e-6
    bits = torch.tensor([3])

    def largest_decoded(row_weights: torch.Tensor) -> torch.Tensor:
        nibbles, scale_max = find_group_scales(rows[None], bits, row_weights)
        s = scale_from_nibbles(nibbles, scale_max)[0].float()
        return s * 3  # the largest positive code of 3 bits

    assert (largest_decoded(heavy) >= 0.19).all()
    assert (largest_decoded(light) < 0.1).all()


def test_multiplier_grid():
    assert torch.equal(multiplier_grid(), GRID)
    assert GRID[0] == pytest.approx(0.70) and GRID[8] == pytest.approx(0.95) and GRID[-1] == pytest.approx(1.20)


# ---------------------------------------------------------------------------------------------
# Quantize → pack → decode


OPTIONS = [
    QuantOption((4,), (1,), (128,)),
    QuantOption((3, 2), (0.05, 0.95), (64, 64)),
    QuantOption((8, 5, 4), (0.05, 0.1, 0.85), (32, 128, 128)),  # K = 256: last 4-bit group of 96
    QuantOption((6, 4), (0.15, 0.85), (32, 32)),
    QuantOption((8,), (1,), (128,)),
]


@pytest.fixture(scope="module")
def layer():
    weight, hessian = realistic_layer()
    return weight, hessian, quantize_options(weight, prepare_hessian(hessian), OPTIONS)


@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=[str(o) for o in OPTIONS])
def test_pack_then_decode_is_bit_exact(layer, index):
    weight, _, results = layer
    result = results[index]
    tensors = pack_layer(result)
    validate_layer(tensors, layer="q_proj", in_features=K, out_features=N, bias=False)
    decoded = dequantize(tensors, N, layer="q_proj")
    assert decoded.dtype == torch.float16 and decoded.shape == weight.shape
    assert torch.equal(decoded.view(torch.int16), result.weight.view(torch.int16))
    # The reference converter's self-check thresholds (4.8 step 3) hold trivially, and more.
    padded = dequantize(tensors)
    assert padded.shape == (96, K) and (padded[N:] == 0).all()


def test_result_structure(layer):
    _, _, results = layer
    for option, result in zip(OPTIONS, results):
        assert result.option == option and result.groups == option.groups(K)
        assert result.codes.shape == (K, N) and result.codes.dtype == torch.uint8
        assert result.nibbles.shape == (len(result.groups), N) and int(result.nibbles.max()) <= 15
        assert result.scale_max.shape == (len(result.groups),) and result.scale_max.dtype == torch.float16
        assert (result.codes.long() < 2 ** bits_per_row(result.groups)[:, None]).all()
        assert torch.equal(result.invperm[result.perm], torch.arange(K))
        tensors = pack_layer(result)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
            "q_weight": (torch.int32, (sum(g.qrows for g in result.groups), 96)),
            "q_scale": (torch.int32, (len(result.groups), 12)),
            "q_scale_max": (torch.float16, (len(result.groups),)),
            "q_groups": (torch.int16, (2 * len(result.groups),)),
            "q_invperm": (torch.int32, (K,)),
        }


def test_batched_equals_one_by_one(layer):
    weight, hessian, results = layer
    prepared = prepare_hessian(hessian)
    for option, batched in zip(OPTIONS[::2], results[::2]):
        single = quantize_options(weight, prepared, [option])[0]
        assert torch.equal(single.codes, batched.codes)
        assert torch.equal(single.weight.view(torch.int16), batched.weight.view(torch.int16))
    assert torch.equal(quantize(weight, hessian, OPTIONS[0]).codes, results[0].codes)


@pytest.mark.parametrize("index", range(len(OPTIONS)))
def test_agrees_with_literal_algorithm(layer, index):
    weight, hessian, results = layer
    codes, values = reference_quantize(weight, hessian, OPTIONS[index])
    ours = results[index]
    stored = ours.weight.T[ours.perm]
    if all(g == 32 for g in OPTIONS[index].group_size):
        # Block and group coincide: the same float operations in the same order.
        assert torch.equal(ours.codes, codes)
    else:
        # Lazy updates per 32 rows instead of per group only change float summation order.
        assert (ours.codes == codes).float().mean() > 0.995
    assert ((stored.float() - values.float()).abs() <= stored_scales(ours).float()).float().mean() > 0.995


@pytest.mark.parametrize("index", [0, 1, 3])
def test_gptq_beats_round_to_nearest(layer, index):
    weight, hessian, results = layer
    result = results[index]
    gptq = proxy_loss(weight, result.weight, hessian)
    rtn = proxy_loss(weight, same_scale_rtn(weight, result), hessian)
    assert gptq < 0.8 * rtn
    # Error feedback moves a weight by a few steps of its grid at most.
    steps = (weight.float() - result.weight.float()).abs() / stored_scales(result).float()[result.invperm].T
    assert steps.max() < 4


@pytest.mark.parametrize("index, bound", [(0, 0.2), (1, 0.6), (2, 0.12), (3, 0.12), (4, 0.015)])
def test_relative_error(layer, index, bound):
    weight, _, results = layer
    error = weight.float() - results[index].weight.float()
    assert error.norm() / weight.float().norm() < bound


def test_error_shrinks_with_bits(layer):
    weight, hessian, results = layer
    losses = {str(o): proxy_loss(weight, r.weight, hessian) for o, r in zip(OPTIONS, results)}
    assert losses[str(OPTIONS[1])] > losses[str(OPTIONS[0])] > losses[str(OPTIONS[3])] > losses[str(OPTIONS[4])]


def test_measurement_batch_of_every_distinct_option():
    """All distinct options of one projection in one pass, bit-exact through the packer."""
    weight, hessian = realistic_layer(128, 40, seed=3)
    distinct = MLP_CANDIDATES.reduced().distinct[2] + ATTN_CANDIDATES.reduced().distinct[2]
    results = quantize_options(weight, prepare_hessian(hessian), distinct)
    assert len(results) == 29
    for option, result in zip(distinct, results):
        assert result.option == option
        assert torch.equal(dequantize(pack_layer(result), 40).view(torch.int16), result.weight.view(torch.int16))


def test_shared_hessian_gives_identical_invperm():
    weight, hessian = realistic_layer(64, 32, seed=4)
    prepared = prepare_hessian(hessian)
    q = pack_layer(quantize_options(weight, prepared, [OPTIONS[0]])[0])
    k = pack_layer(quantize_options(weight[:16] * 2, prepared, [OPTIONS[1]])[0])
    assert torch.equal(q["q_invperm"], k["q_invperm"])


def test_bias_is_padded():
    weight, hessian = realistic_layer(64, 40, seed=5)
    bias = torch.linspace(-1, 1, 40)
    tensors = pack_layer(quantize(weight, hessian, OPTIONS[0]), bias)
    validate_layer(tensors, layer="q_proj", in_features=64, out_features=40, bias=True)
    assert tensors["bias"].dtype == torch.float16 and tensors["bias"].shape == (64,)
    assert torch.equal(tensors["bias"][:40], bias.half()) and (tensors["bias"][40:] == 0).all()


def test_zero_weights_and_zero_columns():
    weight, hessian = realistic_layer(64, 32, seed=6)
    weight[:, 5] = 0  # a dead input feature
    weight[7] = 0  # an output that is always zero
    zeros = torch.zeros_like(weight)
    for w in (weight, zeros):
        result = quantize(w, hessian, OPTIONS[1])
        assert torch.isfinite(result.weight).all()
        assert (result.weight[7] == 0).all()
        assert torch.equal(dequantize(pack_layer(result), 32).view(torch.int16), result.weight.view(torch.int16))
    assert (result.weight == 0).all()


def test_rejects_unaligned_input_features():
    weight, hessian = realistic_layer(48, 32, seed=7)
    with pytest.raises(ExlbuildError, match="down_proj: EXL2 needs in_features to be a multiple of 32, got 48"):
        quantize(weight, hessian, OPTIONS[0], layer="down_proj")


def test_block_step_checks_its_tensors_when_made():
    """The shapes are checked once, when quantize_options makes the BlockStep, not at every block."""
    b, k, n = 2, 64, 8
    tensors = dict(
        work=torch.zeros(b, k, n), factor=torch.eye(k), scale=torch.ones(b, n, dtype=torch.float16),
        zero=torch.full((b, k), 8.0), maxq=torch.full((b, k), 15.0), codes=torch.empty(b, k, n, dtype=torch.uint8),
        values=torch.empty(b, k, n, dtype=torch.float16), errors=torch.empty(b, BLOCK_ROWS, n),
    )
    step = BlockStep(**tensors)
    gptq_block_step(step, 32)
    assert (step.codes[:, 32:] == 8).all() and (step.values[:, 32:] == 0).all()
    with pytest.raises(ValueError, match="block start 16"):
        gptq_block_step(step, 16)
    with pytest.raises(ValueError, match="scale: expected torch.float16"):
        BlockStep(**{**tensors, "scale": torch.ones(b, n)})
    with pytest.raises(ValueError, match="codes must be contiguous"):
        BlockStep(**{**tensors, "codes": torch.empty(b, n, k, dtype=torch.uint8).transpose(1, 2)})
    with pytest.raises(ValueError, match="zero must have consecutive rows"):
        BlockStep(**{**tensors, "zero": torch.full((k, b), 8.0).T})


def test_row_loop_graphs_only_on_cuda():
    with row_loop_graphs(torch.device("cpu")) as graphs:
        assert graphs is None


def assert_same_results(got: list, want: list) -> None:
    assert [r.option for r in got] == [r.option for r in want]
    for g, w in zip(got, want):
        for name in ("codes", "nibbles", "scale_max", "perm"):
            assert torch.equal(getattr(g, name), getattr(w, name)), f"{g.option}: {name} differ"
        assert torch.equal(g.weight.view(torch.int16), w.weight.view(torch.int16)), f"{g.option}: weights differ"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_row_loop_graphs_give_the_loops_bytes():
    """Row loops replayed from CUDA graphs give what the loop run directly gives, call after call: a set of options
    runs directly the first time, is captured the second and replayed from then on; shapes share buffers, and a
    call's results stay as they were through later replays. With no budget, nothing is captured. Afterwards the
    graphs' memory is given back, to the device too."""
    device = torch.device("cuda")
    cases = [(256, 72, OPTIONS), (256, 72, OPTIONS[1:2]), (512, 300, OPTIONS[3:4]), (256, 200, OPTIONS[:2])]
    for k, n, options in cases:  # (the layouts' device tensors, cached for the process, made before the baseline)
        weight, hessian = realistic_layer(k, n)
        quantize_options(weight.to(device), prepare_hessian(hessian.to(device)), options)
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()  # (closing the graphs clears them and empties the cache: the baseline too)
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for budget, captured in ((1 << 30, True), (0, False)):
        kept, factors = [], {}
        graphs = RowLoopGraphs(device, budget)
        for round in range(4):
            for k, n, options in cases:
                weight, hessian = realistic_layer(k, n, seed=10 * round + k + n)
                prepared = prepare_hessian(hessian.to(device))
                factors[k] = prepared.inverse_factor
                got = quantize_options(weight.to(device), prepared, options, graphs=graphs)
                assert_same_results(got, quantize_options(weight.to(device), prepared, options))
                if round == 1:
                    kept.append((got, [r.codes.clone() for r in got], [r.weight.clone() for r in got]))
        for k, n, options in cases:
            loop = graphs.loop(tuple(option.groups(k) for option in options), factors[k], n)
            assert (loop is not None and loop.graph is not None) is captured, (k, n, options)
        for got, codes, weights in kept:  # (later replays wrote other values into the graphs' buffers)
            assert all(torch.equal(r.codes, c) and torch.equal(r.weight, w) for r, c, w in zip(got, codes, weights))
        graphs.close()
        del kept, factors, got, codes, weights, loop, prepared, graphs
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated, budget
        # The results and the direct loops' temporaries, freed after close, wait in the allocator's cache; once that
        # is emptied nothing of the graphs' may stay reserved (a pool still in use would).
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() <= reserved, budget
