"""The EXL2 measurement pass (exl2-format.md 4.5) on tiny random Llamas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import exlbuild.quant.exl2.measure as measure
from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import (
    embedding_weight,
    head_weight,
    layer_tensor_shapes,
    layer_weights,
    norm_weight,
    open_model,
)
from exlbuild.model.llama import attention_block, embed, final_logits, mlp_block, rope_tables
from exlbuild.quant.exl2.measure import CANDIDATES, CandidateLinear, candidate_outputs, measure_block
from exlbuild.quant.stream import BLOCK_MODULES
from exlbuild.quant.exl2.measurement_json import (
    LinearShape,
    measurement_to_json,
    read_measurement,
    validate_measurement,
    write_measurement,
)
from exlbuild.quant.exl2.options import total_bits
from exlbuild.quant.stream import STATE_DTYPE, LayerCheckpoint, relative_error, run_block
from model_fixtures import tiny_model

DIMS = dict(hidden_size=64, intermediate_size=128, vocab_size=256, num_hidden_layers=2)
ROWS, LENGTH = 3, 40


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, DIMS["vocab_size"], (ROWS, LENGTH), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"), **DIMS)


@pytest.fixture(scope="module")
def full_run(model_dir: Path):
    return measure.measure_model(model_dir, _ids())


def _layer0_inputs(model_dir: Path):
    cfg, ckpt = open_model(model_dir)
    x = embed(_ids(), embedding_weight(ckpt))
    return cfg, x, layer_weights(ckpt, cfg, 0), rope_tables(cfg, LENGTH)


def _decoder_linears(cfg) -> dict[str, LinearShape]:
    shapes = layer_tensor_shapes(cfg)
    return {
        f"model.layers.{i}.{name.removesuffix('.weight')}": LinearShape(
            shape[1], shape[0], name.replace(".weight", ".bias") in shapes
        )
        for i in range(cfg.num_hidden_layers)
        for name, shape in shapes.items()
        if name.endswith("_proj.weight")
    }


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_batched_candidates_equal_one_by_one(tmp_path: Path, block: str, biases: bool) -> None:
    overrides = dict(attention_bias=True, mlp_bias=True) if biases else {}
    cfg, x, w, rope = _layer0_inputs(tiny_model(tmp_path, **DIMS, **overrides))
    table = CANDIDATES[block]
    n = len(table.candidates)
    generator = torch.Generator().manual_seed(1)
    linears = {}
    for projection in table.projections:
        name = f"{BLOCK_MODULES[block]}.{projection}"
        weight = w[name + ".weight"]
        distinct = weight + 0.05 * torch.randn(5, *weight.shape, generator=generator)
        index = torch.randint(0, 5, (n,), generator=generator)
        linears[projection] = CandidateLinear(distinct, index, w.get(name + ".bias"))

    batched = candidate_outputs(block, x, w, linears, cfg, rope)
    assert batched.shape == (n, *x.shape)
    for c in range(n):
        wc = dict(w)
        for projection, linear in linears.items():
            wc[f"{BLOCK_MODULES[block]}.{projection}.weight"] = linear.weights[linear.index[c]]
        single = attention_block(x, wc, cfg, rope) if block == "attention" else mlp_block(x, wc, cfg)
        torch.testing.assert_close(batched[c], single, rtol=1e-5, atol=1e-5)


def test_candidates_in_groups_from_host_memory(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block too big for CANDIDATE_BYTES keeps its candidates' weights in host memory and evaluates them a
    few at a time: the accuracies are the same as in one batched pass."""
    cfg, x, w, rope = _layer0_inputs(model_dir)
    batched, _, _ = measure_block("mlp", x, w, cfg, rope)
    one_candidate = 4 * sum(w[f"mlp.{p}.weight"].numel() for p in ("gate_proj", "up_proj", "down_proj"))
    monkeypatch.setattr(measure, "CANDIDATE_BYTES", 3 * one_candidate)
    grouped, _, _ = measure_block("mlp", x, w, cfg, rope)
    assert [c.accuracy for c in grouped] == pytest.approx([c.accuracy for c in batched], rel=1e-6)


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_measure_block(model_dir: Path, block: str) -> None:
    cfg, x, w, rope = _layer0_inputs(model_dir)
    if block == "mlp":
        run_block("attention", x, w, cfg, rope, out=x)
    candidates, y_ref, probe = measure_block(block, x, w, cfg, rope, probe=(ROWS, LENGTH))
    table = CANDIDATES[block]

    # The next block reads the unquantized output.
    expected = torch.empty_like(x)
    run_block(block, x, w, cfg, rope, out=expected)
    torch.testing.assert_close(y_ref, expected, rtol=0, atol=0)
    assert len(candidates) == len(table.candidates)
    for candidate, options in zip(candidates, table.candidates):
        assert tuple(candidate.options) == table.projections
        assert tuple(candidate.options.values()) == options
        weights = {p: w[f"{BLOCK_MODULES[block]}.{p}.weight"] for p in table.projections}
        expected = sum(total_bits(o, *weights[p].shape[::-1]) for p, o in candidate.options.items())
        assert candidate.total_bits == expected
        assert 0 < candidate.accuracy <= 1

    # More bits, more accuracy: exceptions only between candidates within a few percent of each other's cost.
    for a in candidates:
        for b in candidates:
            if b.total_bits > 1.05 * a.total_bits:
                assert b.accuracy > a.accuracy, (a.total_bits, a.accuracy, b.total_bits, b.accuracy)
    assert candidates[-1].accuracy > 0.99  # the 8-bit candidate

    # The probe is the output of the candidate closest to PROBE_BITS: on all rows, its error is that
    # candidate's 1 − accuracy.
    weights = sum(w[f"{BLOCK_MODULES[block]}.{p}.weight"].numel() for p in table.projections)
    c = min(range(len(candidates)), key=lambda j: abs(candidates[j].total_bits / weights - measure.PROBE_BITS))
    assert 3.5 < candidates[c].total_bits / weights < 4.5
    assert probe.shape == x.shape and probe.dtype == x.dtype
    assert relative_error(probe, y_ref).item() == pytest.approx(1 - candidates[c].accuracy, rel=1e-3)


def test_measure_block_aborts_naming_the_module(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    cfg, x, w, rope = _layer0_inputs(model_dir)
    real = measure.quantize_options

    def scaled(factor: float):
        def quantize_options(*args, **kwargs):
            results = real(*args, **kwargs)
            return [type(r)(**{**r.__dict__, "weight": r.weight * factor}) for r in results]

        return quantize_options

    monkeypatch.setattr(measure, "quantize_options", scaled(-50.0))
    with pytest.raises(ExlbuildError, match=r"model\.layers\.0\.mlp: the best candidate's accuracy"):
        measure_block("mlp", x, w, cfg, rope, module="model.layers.0.mlp")
    monkeypatch.setattr(measure, "quantize_options", scaled(float("nan")))
    with pytest.raises(ExlbuildError, match=r"model\.layers\.0\.self_attn: .*NaN"):
        measure_block("attention", x, w, cfg, rope, module="model.layers.0.self_attn")


def test_measurement_file_round_trip(model_dir: Path, full_run, tmp_path: Path) -> None:
    cfg, _ = open_model(model_dir)
    keys = [k for i in range(2) for k in (f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp")]
    assert list(full_run.modules) == [*keys, "model.norm.norm", "lm_head.linear"]
    assert full_run.last_module_idx == 2 * 2 + 2
    write_measurement(tmp_path / "measurement.json", full_run)
    back = read_measurement(tmp_path / "measurement.json")
    assert measurement_to_json(back) == measurement_to_json(full_run)
    validate_measurement(back, _decoder_linears(cfg))


def test_resume_after_interruption(monkeypatch: pytest.MonkeyPatch, model_dir: Path, full_run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    save = LayerCheckpoint.save

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(LayerCheckpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        measure.measure_model(model_dir, _ids(), state_dir=state)
    monkeypatch.setattr(LayerCheckpoint, "save", save)

    blocks = []
    real = measure.measure_block
    monkeypatch.setattr(measure, "measure_block", lambda *a, **k: blocks.append(k["module"]) or real(*a, **k))
    resumed = measure.measure_model(model_dir, _ids(), state_dir=state)
    assert blocks == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    assert measurement_to_json(resumed) == measurement_to_json(full_run)
    assert resumed.sensitivity == full_run.sensitivity  # the probe's copies were saved and resumed too

    with pytest.raises(ExlbuildError, match="another measurement"):
        measure.measure_model(model_dir, _ids()[:2], state_dir=tmp_path / "state")


def test_output_divergence_is_the_mean_kl_per_token() -> None:
    g = torch.Generator().manual_seed(3)
    reference = torch.randn(2, 5, 8, generator=g)
    norm_w, head_w = 1 + torch.rand(8, generator=g), torch.randn(11, 8, generator=g)
    perturbed = torch.stack([reference, reference + 0.3 * torch.randn(2, 5, 8, generator=g)])
    kl = measure.output_divergence(reference, perturbed, norm_w, head_w, 1e-5)
    p = torch.distributions.Categorical(logits=final_logits(reference, norm_w, head_w, 1e-5))
    q = torch.distributions.Categorical(logits=final_logits(perturbed[1], norm_w, head_w, 1e-5))
    assert kl[0].item() == pytest.approx(0.0, abs=1e-9)
    assert kl[1].item() == pytest.approx(torch.distributions.kl_divergence(p, q).mean().item(), rel=1e-5)


@pytest.mark.parametrize("probe_tokens, probe_shape", [(64, (2, LENGTH)), (25, (1, 25))])
def test_sensitivity_carries_each_blocks_perturbation_to_the_output(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, probe_tokens: int, probe_shape: tuple[int, int]
) -> None:
    """With known perturbations in place of the probe candidates' outputs, each block's sensitivity is the KL
    of the model run with that one perturbation, computed here independently, block by block, on the probe's
    tokens alone (the first tokens of the first rows: attention is causal)."""
    real = measure.measure_block
    deltas = {}

    def perturbing(*args, **kwargs):
        measured, y_ref, probe = real(*args, **kwargs)
        assert probe.shape == (*probe_shape, DIMS["hidden_size"])
        g = torch.Generator().manual_seed(len(deltas))
        delta = 0.05 * y_ref.float().std() * torch.randn(probe.shape, generator=g)
        deltas[kwargs["module"]] = delta
        return measured, y_ref, (y_ref[: probe.shape[0], : probe.shape[1]].float() + delta).to(probe.dtype)

    monkeypatch.setattr(measure, "measure_block", perturbing)
    result = measure.measure_model(model_dir, _ids(), probe_tokens=probe_tokens)
    cfg, ckpt = open_model(model_dir)
    rope = rope_tables(cfg, LENGTH)
    blocks = [(i, b) for i in range(cfg.num_hidden_layers) for b in ("attention", "mlp")]
    weights = [layer_weights(ckpt, cfg, i, torch.float16) for i in range(cfg.num_hidden_layers)]

    def final_states(inject: str | None) -> torch.Tensor:
        x = embed(_ids()[: probe_shape[0], : probe_shape[1]], embedding_weight(ckpt, torch.float16))
        for i, block in blocks:
            run_block(block, x, weights[i], cfg, rope, out=x)
            key = f"model.layers.{i}.{BLOCK_MODULES[block]}"
            if key == inject:
                e = (x.float() + deltas[key]).to(STATE_DTYPE)
                assert result.sensitivity[key].error == pytest.approx(relative_error(e, x).item(), rel=1e-4)
                x = e
        return x

    norm_w, head_w = norm_weight(ckpt), head_weight(ckpt, cfg)
    reference = final_states(None)
    assert list(result.sensitivity) == list(deltas)
    for key in deltas:
        expected = measure.output_divergence(reference, final_states(key)[None], norm_w, head_w, cfg.rms_norm_eps)
        assert result.sensitivity[key].kl == pytest.approx(expected.item(), rel=1e-3)
        assert result.sensitivity[key].kl > 0


def test_no_probe_no_sensitivity(model_dir: Path, full_run) -> None:
    plain = measure.measure_model(model_dir, _ids(), probe_tokens=0)
    assert plain.sensitivity == {} and len(full_run.sensitivity) == 4
    assert measurement_to_json(plain) == measurement_to_json(full_run)  # the accuracies do not depend on it


def test_bad_calibration_ids(model_dir: Path) -> None:
    with pytest.raises(ExlbuildError, match=r"calibration ids must lie in \[0, 256\), got \[2"):
        measure.measure_model(model_dir, _ids() + 256)
    with pytest.raises(ExlbuildError, match=r"integers of shape \(rows, length ≥ 2\), got \(40,\)"):
        measure.measure_model(model_dir, _ids()[0])
