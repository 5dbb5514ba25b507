"""Refining GPTQ's codes layer by layer (exlbuild.quant.exl2.refine) on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exlbuild.errors import ExlbuildError
from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.pack import dequantize, validate_layer
from exlbuild.quant.exl2 import refine
from exlbuild.quant.exl2.refine import LinearCodes, RowSlice, fit_parts, held_out_rows, refine_model
from exlbuild.model.config import LlamaConfig
from exlbuild.quant.exl2.convert import linear_shapes, linear_tensors
from exlbuild.quant.exl2.tune import EAGER_STEPS
from exlbuild.quant.stream import LINEARS
from test_exl2_convert import SHAPE, Interrupted, file_bytes, random_ids, strategy
from test_exl2_tune import changed_tensors, kl_to_model, quantized  # noqa: F401 (quantized: the fixture, a 2-layer model at ~2.5 bits)


def layer_tensors(directory: Path, i: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "layers" / f"{i:05d}.safetensors"))


def test_linear_codes_decode_and_pack_as_stored(quantized: dict) -> None:
    """The codes give back the stored weight (as the loader decodes it) and q_weight; latent values moved across a
    rounding boundary change those codes, and past the range are clamped."""
    tensors = layer_tensors(quantized["tmp"] / "quantized")
    for name, out_features in (("self_attn.q_proj", SHAPE["hidden_size"]), ("mlp.down_proj", SHAPE["hidden_size"])):
        linear = linear_tensors(tensors, f"model.layers.0.{name}")
        codes = LinearCodes(linear, name, out_features, torch.device("cpu"))
        assert torch.equal(codes.weight(torch.float16), dequantize(linear, out_features))
        q_weight, out_of_range = codes.pack()
        assert torch.equal(q_weight, linear["q_weight"]) and not out_of_range
        assert codes.changed_from(linear["q_weight"]) == 0
        rows = slice(2, 6)
        latent = codes.latent(rows)
        latent[1, 5] += 0.75
        latent[2, 6] = 1e6
        expected = codes.straight_through(latent, codes.scale(rows), torch.ones(latent.shape[1], dtype=torch.float16))
        largest = int(codes.codes[4, 6]) == int(codes.high[6] + codes.zero[6])
        codes.store(rows, latent)
        assert codes.changed_from(linear["q_weight"]) == 2 - largest
        decoded = dequantize({**linear, "q_weight": codes.pack()[0]}, out_features)
        assert torch.equal(decoded[rows], expected) and torch.equal(decoded, codes.weight(torch.float16))


def test_straight_through_gradient_is_that_of_a_detached_rounding() -> None:
    """The straight-through weight's backward (exlbuild.kernels.straight_through, here its reference) is autograd's
    gradient of the same expression written with torch.minimum, torch.maximum and a detached rounding, for the latent
    values (on, inside and past their bounds) and for the input features' factors."""
    g = torch.Generator().manual_seed(0)
    low, high = torch.tensor([-2.0, -4.0, -8.0, -2.0]), torch.tensor([1.0, 3.0, 7.0, 1.0])
    latent = torch.tensor([[-2.0, 0.4, 7.0, 1.6], [-2.7, 3.0, -0.5, 0.2], [0.5, -4.2, 2.5, 1.0]])
    scale = (torch.rand(3, 4, generator=g) * 0.1 + 0.01).half()
    factor, grad = torch.rand(4, generator=g) + 0.5, torch.randn(3, 4, generator=g)
    ours = [latent.clone().requires_grad_(), factor.clone().requires_grad_()]
    codes = LinearCodes.__new__(LinearCodes)
    codes.low, codes.high = low, high
    weight = codes.straight_through(ours[0], scale, ours[1])
    plain = [latent.clone().requires_grad_(), factor.clone().requires_grad_()]
    clamped = torch.maximum(torch.minimum(plain[0], high), low)
    rounded = clamped + (torch.round(clamped) - clamped).detach()
    expected = (scale * rounded).half().float() * plain[1]
    assert torch.equal(weight, expected)
    for a, b in zip(torch.autograd.grad(weight, ours, grad), torch.autograd.grad(expected, plain, grad)):
        torch.testing.assert_close(a, b)


def test_fit_parts_cut_consecutive_rows_under_the_budget() -> None:
    shapes = [(8, 4), (2, 4), (6, 3)]  # 32 + 8 + 18 weights
    assert fit_parts(shapes, 1000) == [[RowSlice(0, 0, 8), RowSlice(1, 0, 2), RowSlice(2, 0, 6)]]
    parts = fit_parts(shapes, 20)
    assert parts == [[RowSlice(0, 0, 5)], [RowSlice(0, 5, 8), RowSlice(1, 0, 2)], [RowSlice(2, 0, 6)]]
    for budget in (1, 3, 7, 12, 20, 33, 57):
        parts = fit_parts(shapes, budget)
        for part in parts:  # at most the budget, unless one row is more; one slice of a linear per part
            assert sum((s.stop - s.start) * shapes[s.linear][1] for s in part) <= budget or len(part) == 1
            assert len({s.linear for s in part}) == len(part)
        flat = [s for part in parts for s in part]  # every row exactly once, in order
        assert [(s.linear, r) for s in flat for r in range(s.start, s.stop)] == \
            [(k, r) for k, (out, _) in enumerate(shapes) for r in range(out)]


def test_held_out_rows_are_spread_and_leave_rows_to_train_on() -> None:
    assert held_out_rows(1) == [] and held_out_rows(2) == [1] and held_out_rows(9) == [8]
    assert held_out_rows(100) == list(range(9, 100, 10))
    assert held_out_rows(32) == [9, 20, 31]


@pytest.fixture(scope="module")
def calibrated(quantized: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model quantized as `quantized` but with 48 calibration rows: enough for a fit that carries over to
    the held-out rows (8 are not: see test_a_fit_that_only_learnt_its_training_rows_is_dropped)."""
    tmp = tmp_path_factory.mktemp("refine")
    ids = random_ids(256, rows=48)
    quantize_model(quantized["model"], ids, strategy(2, 1, 1), 4, tmp / "quantized")
    return {"model": quantized["model"], "ids": ids, "tmp": tmp}


def test_refining_lowers_each_layers_loss_and_changes_only_codes_scales_and_norms(calibrated: dict) -> None:
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    metrics = refine_model(model, tmp / "quantized", tmp / "refined", ids, steps=200, lr=0.01, rows_per_step=4)
    assert metrics["held_out_rows"] == 4
    assert all(m["kept"] == m["parts"] == 1 for m in metrics["layers"]), metrics["layers"]
    assert all(m["loss_after"] < 0.95 * m["loss_before"] for m in metrics["layers"]), metrics["layers"]
    assert metrics["codes_changed"] > 0 and metrics["calibration_perplexity"] > 1
    assert 0 < metrics["seconds_steps"] < metrics["seconds"]  # 200 steps a layer: most of the time
    check = metrics["model_check"]
    assert check["kept"] and 0 < check["kl_after"] < 0.98 * check["kl_before"], check
    before = kl_to_model(model, tmp / "quantized", ids, tmp / "compiled-quantized")
    after = kl_to_model(model, tmp / "refined", ids, tmp / "compiled-refined")
    assert after < 0.9 * before, (before, after)

    changed = changed_tensors(tmp / "quantized", tmp / "refined")
    assert changed and all(k.endswith(("q_weight", "q_scale_max", "layernorm.weight")) for k in changed)
    assert {k.rsplit(".", 1)[1] for k in changed} == {"q_weight", "q_scale_max", "weight"}
    assert_valid_layout(tmp / "refined")


def assert_valid_layout(directory: Path) -> None:
    refined = layer_tensors(directory, 1)
    for name, (in_features, out_features) in (("self_attn.o_proj", (SHAPE["hidden_size"],) * 2),
                                             ("mlp.up_proj", (SHAPE["hidden_size"], SHAPE["intermediate_size"]))):
        validate_layer(linear_tensors(refined, f"model.layers.1.{name}"), layer=name, in_features=in_features,
                       out_features=out_features, bias=False)


def test_a_large_layer_is_fitted_in_parts(calibrated: dict, tmp_path: Path) -> None:
    """With a budget of 3,000 weights a fit, each layer (36,864 weights) is fitted in 13 parts; every part lowers
    the loss on the held-out rows or is dropped, and the result is a valid layout closer to the model."""
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    metrics = refine_model(model, tmp / "quantized", tmp_path / "parts", ids, steps=100, lr=0.02, rows_per_step=4,
                           weights_per_fit=3000)
    assert all(m["parts"] == 13 and m["kept"] > 0 for m in metrics["layers"]), metrics["layers"]
    assert all(m["loss_after"] < m["loss_before"] for m in metrics["layers"]), metrics["layers"]
    assert metrics["codes_changed"] > 0 and changed_tensors(tmp / "quantized", tmp_path / "parts")
    assert_valid_layout(tmp_path / "parts")


def test_refining_is_deterministic(calibrated: dict, tmp_path: Path) -> None:
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    for out in ("a", "b"):
        refine_model(model, tmp / "quantized", tmp_path / out, ids, steps=8, lr=0.05, rows_per_step=3)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert file_bytes(tmp_path / "a") != file_bytes(tmp / "quantized")


def test_the_next_layer_is_set_up_while_the_last_part_s_steps_run(calibrated: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Where it fits under AHEAD_BYTES, the next layer is set up once the last part's steps are queued (on CUDA while
    the GPU runs them), else when the layer starts: the same bytes either way."""
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    fit = {"steps": 8, "lr": 0.05, "rows_per_step": 3, "weights_per_fit": 3000}  # 13 parts a layer
    given = []
    run_steps = refine.run_steps

    def recording(*args, meanwhile=None, **kwargs):
        given.append(meanwhile is not None)
        return run_steps(*args, meanwhile=meanwhile, **kwargs)

    monkeypatch.setattr(refine, "run_steps", recording)
    refine_model(model, tmp / "quantized", tmp_path / "ahead", ids, **fit)
    assert given == [False] * 12 + [True] + [False] * 13  # layer 1, the last, has no next layer
    given.clear()
    monkeypatch.setattr(refine, "AHEAD_BYTES", 0)
    refine_model(model, tmp / "quantized", tmp_path / "in-turn", ids, **fit)
    assert given == [False] * 26
    assert file_bytes(tmp_path / "ahead") == file_bytes(tmp_path / "in-turn")


def test_only_a_part_of_new_shapes_runs_ordinary_steps_before_its_capture(calibrated: dict, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit is captured as a CUDA graph at once (no ordinary steps first) where a part of the same shapes was fitted
    before in the run: the first layer's parts warm up, the second layer's reuse what they compiled."""
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    given = []
    run_steps = refine.run_steps

    def recording(*args, eager_steps, **kwargs):
        given.append(eager_steps)
        return run_steps(*args, eager_steps=eager_steps, **kwargs)

    monkeypatch.setattr(refine, "run_steps", recording)
    refine_model(model, tmp / "quantized", tmp_path / "parts", ids, steps=4, lr=0.05, rows_per_step=3,
                 weights_per_fit=3000)
    linears = linear_shapes(LlamaConfig.from_dir(model))
    in_features = [linears[name].in_features for name in LINEARS]
    shapes = [[(s.stop - s.start, in_features[s.linear]) for s in part] for part in fit_parts(
        [(linears[name].out_features, linears[name].in_features) for name in LINEARS], 3000)]
    first_layer = [EAGER_STEPS if part not in shapes[:n] else 0 for n, part in enumerate(shapes)]
    assert given == first_layer + [0] * len(shapes) and 0 < given.count(EAGER_STEPS) < len(shapes)


def test_resume_after_interruption(calibrated: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted refinement goes on at its next layer (the finished one is not fitted again) and writes what an
    uninterrupted one writes, with the same metrics; a state directory of other parameters is refused."""
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    fit = {"steps": 8, "lr": 0.05, "rows_per_step": 3}
    whole = refine_model(model, tmp / "quantized", tmp_path / "whole", ids, **fit)
    assert file_bytes(tmp_path / "whole") != file_bytes(tmp / "quantized")
    calls = []
    run_steps = refine.run_steps

    def interrupted(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:  # the first run stops in layer 1's fit
            raise Interrupted
        return run_steps(*args, **kwargs)

    monkeypatch.setattr(refine, "run_steps", interrupted)
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        refine_model(model, tmp / "quantized", tmp_path / "resumed", ids, state_dir=state, **fit)
    resumed = refine_model(model, tmp / "quantized", tmp_path / "resumed", ids, state_dir=state, **fit)
    assert len(calls) == 3  # layer 0 once, layer 1 twice
    assert file_bytes(tmp_path / "resumed") == file_bytes(tmp_path / "whole")
    for key in ("layers", "model_check", "calibration_perplexity", "codes_changed"):
        assert resumed[key] == whole[key], key
    with pytest.raises(ExlbuildError, match="holds a refinement of other inputs"):
        refine_model(model, tmp / "quantized", tmp_path / "other", ids, state_dir=state, **{**fit, "steps": 9})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_refining_is_deterministic_on_cuda(calibrated: dict, tmp_path: Path) -> None:
    """Two refinements on the GPU write the same bytes (deterministic backward kernels), and they refine, in one
    part and in several."""
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    for weights_per_fit in (1 << 27, 3000):
        for out in ("a", "b"):
            metrics = refine_model(model, tmp / "quantized", tmp_path / out, ids, steps=200, lr=0.01,
                                   rows_per_step=4, weights_per_fit=weights_per_fit, device="cuda")
            assert all(m["loss_after"] < m["loss_before"] for m in metrics["layers"])
        assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fits_captured_at_once_write_what_warmed_up_fits_write(calibrated: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit captured as a CUDA graph before any ordinary step of its own (its shapes fitted before) writes the
    same bytes as one that runs its ordinary steps first, in one part and in several."""
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    run_steps = refine.run_steps
    for weights_per_fit in (1 << 27, 3000):
        fit = {"steps": 20, "lr": 0.05, "rows_per_step": 4, "weights_per_fit": weights_per_fit, "device": "cuda"}
        runs = {}
        for name, eager_steps in (("at-once", None), ("warmed", EAGER_STEPS)):
            monkeypatch.setattr(refine, "run_steps", lambda *args, eager_steps, forced=eager_steps, **kwargs: run_steps(
                *args, eager_steps=eager_steps if forced is None else forced, **kwargs))
            state = tmp_path / f"{name}-{weights_per_fit}"  # the refined layers, written whether or not kept
            refine_model(model, tmp / "quantized", tmp_path / name, ids, state_dir=state, **fit)
            runs[name] = file_bytes(state / "layers"), file_bytes(tmp_path / name)
        assert runs["at-once"] == runs["warmed"]
        assert runs["at-once"][0] != file_bytes(tmp / "quantized" / "layers")


def test_a_fit_that_only_learnt_its_training_rows_is_dropped(quantized: dict, tmp_path: Path) -> None:
    """Seven rows of 64 random tokens are far too few for a layer's codes: the fit does not lower the loss on the
    held-out row, and the layer is written as the quantization pass wrote it."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    metrics = refine_model(model, tmp / "quantized", tmp_path / "refined", ids, steps=200, lr=0.01, rows_per_step=4)
    assert metrics["held_out_rows"] == 1
    assert all(not m["kept"] and m["loss_after"] == m["loss_before"] for m in metrics["layers"]), metrics["layers"]
    assert metrics["codes_changed"] == 0
    assert changed_tensors(tmp / "quantized", tmp_path / "refined") == set()


def test_a_refinement_that_makes_the_model_worse_is_dropped(calibrated: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer's fit is kept (each lowered its own held-out loss), but if the model's next-token KL on the
    held-out rows did not fall, the quantization pass's layers are written, with their calibration perplexity."""
    tmp, model, ids = calibrated["tmp"], calibrated["model"], calibrated["ids"]
    unrefined = refine_model(model, tmp / "quantized", tmp_path / "zero", ids, steps=0, lr=0.01, rows_per_step=4)
    assert unrefined["model_check"]["kl_after"] == unrefined["model_check"]["kl_before"]  # nothing changed
    kls = iter([1.0, 1.5])  # before, after
    monkeypatch.setattr(refine, "next_token_kl", lambda *args, **kwargs: (torch.tensor(next(kls)), None, None))
    metrics = refine_model(model, tmp / "quantized", tmp_path / "worse", ids, steps=200, lr=0.01, rows_per_step=4)
    assert all(m["kept"] == 1 for m in metrics["layers"]), metrics["layers"]
    assert metrics["model_check"] == {"kl_before": 1.0, "kl_after": 1.5, "kept": False}
    assert metrics["codes_changed"] == 0
    assert file_bytes(tmp_path / "worse") == file_bytes(tmp / "quantized") == file_bytes(tmp_path / "zero")
    assert metrics["calibration_perplexity"] == unrefined["calibration_perplexity"]
