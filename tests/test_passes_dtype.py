"""passes.dtype: float64 calibration passes write the same bytes whatever the order of their sums.

Two machines (a CPU and a GPU, or two CPUs) sum the same products in other orders. In float32 that changes the last
bits of the Hessians and states, which moves a few of GPTQ's roundings and everything after them
(bench/results/cpu-vs-gpu.md). Here the order of sums changes on one machine: the calibration rows come in reverse
order (every sum over rows, the Hessians' among them, in another order), the block passes take one row at a time
and another number of threads. In float64 the quantization pass must write the same bytes, and the measurement the
same accuracies to float64's rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exlbuild import recipe as recipe_module
from exlbuild.hashing import HashCache
from exlbuild.model.checkpoint import embedding_weight, layer_weights, open_model
from exlbuild.model.llama import embed, rope_tables
from exlbuild.quant import stream
from exlbuild.quant.exl2 import measure
from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.rules import recipe_graph
from model_fixtures import recipe_project, tiny_model, tiny_model_with_tokenizer
from test_exl2_convert import file_bytes, strategy

DIMS = dict(hidden_size=64, intermediate_size=128, vocab_size=256, num_hidden_layers=2)
ROWS, LENGTH = 6, 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"), **DIMS)


def _ids() -> torch.Tensor:
    return torch.randint(0, DIMS["vocab_size"], (ROWS, LENGTH), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def other_order(monkeypatch: pytest.MonkeyPatch):
    """The passes one row at a time, on another number of threads (the tests also reverse the rows)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(measure, "EVAL_ELEMENTS", 1)
    torch.set_num_threads(1 if threads > 1 else 2)
    yield
    torch.set_num_threads(threads)


def _hessians(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cfg, ckpt = open_model(model_dir)
    x = embed(ids, embedding_weight(ckpt, torch.float16)).to(stream.STATE_DTYPE)
    return stream.run_block("mlp", x, layer_weights(ckpt, cfg, 0, torch.float16), cfg, rope_tables(cfg, LENGTH),
                            hessians=True, dtype=dtype)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_the_perturbation_moves_the_last_bits(model_dir: Path, dtype: torch.dtype, tolerance: float) -> None:
    """What the other tests rely on: the rows reversed give the Hessians other last bits, in float64 too."""
    forward, reversed_ = _hessians(model_dir, _ids(), dtype), _hessians(model_dir, _ids().flip(0), dtype)
    for point, h in forward.items():
        assert not torch.equal(h, reversed_[point]), point
        assert (h - reversed_[point]).abs().max() <= tolerance * h.abs().max(), point


@pytest.fixture(scope="module")
def float64_build(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("float64")
    measurement = measure.measure_model(model_dir, _ids(), probe_tokens=64, dtype=torch.float64)
    metrics = quantize_model(model_dir, _ids(), strategy(2, 6, 6), 6, tmp / "quantized", dtype=torch.float64)
    return {"measurement": measurement, "metrics": metrics, "quantized": tmp / "quantized"}


def test_float64_measurement_ignores_the_order_of_sums(model_dir: Path, float64_build: dict, other_order) -> None:
    """The same candidates (a rounding moved by float32's differences moves an accuracy by ~1e-5). (The probe reads
    the first rows, so its sensitivities are of other rows here.)"""
    again = measure.measure_model(model_dir, _ids().flip(0), probe_tokens=64, dtype=torch.float64)
    for key, candidates in float64_build["measurement"].modules.items():
        for a, b in zip(candidates or (), again.modules[key] or ()):
            assert a.accuracy == pytest.approx(b.accuracy, rel=1e-12, abs=0), key


def test_float64_quantization_ignores_the_order_of_sums(model_dir: Path, float64_build: dict, other_order,
                                                        tmp_path: Path) -> None:
    quantize_model(model_dir, _ids().flip(0), strategy(2, 6, 6), 6, tmp_path / "quantized", dtype=torch.float64)
    assert file_bytes(tmp_path / "quantized") == file_bytes(float64_build["quantized"])


def test_float64_is_the_float32_method(model_dir: Path, float64_build: dict, tmp_path: Path) -> None:
    """The same algorithm in more bits: the measurement's accuracies agree to float32's rounding, and the quantized
    model does as well against its calibration rows."""
    single = measure.measure_model(model_dir, _ids(), probe_tokens=64)
    for key, candidates in single.modules.items():
        for a, b in zip(candidates or (), float64_build["measurement"].modules[key] or ()):
            assert a.accuracy == pytest.approx(b.accuracy, abs=1e-3), key
    for key, s in single.sensitivity.items():
        assert s.kl == pytest.approx(float64_build["measurement"].sensitivity[key].kl, rel=1e-2), key
    metrics = quantize_model(model_dir, _ids(), strategy(2, 6, 6), 6, tmp_path / "quantized")
    ppl = float64_build["metrics"]["calibration_perplexity"]
    assert metrics["calibration_perplexity"] == pytest.approx(ppl, rel=0.02)


def test_passes_dtype_is_a_parameter_of_the_passes_only(tmp_path: Path) -> None:
    """float64 makes other measurement and quantized artifacts; the default keeps the parameters it always had, and
    the fits and the rest do not see it."""
    model = tiny_model_with_tokenizer(tmp_path / "template", vocab_size=1000)
    project = recipe_project(tmp_path / "project", model, "model:\n  path: model\nsweep:\n  bits: [4.0]\n", 50)

    def params(*overrides: str) -> dict[str, dict]:
        loaded = recipe_module.load(project / "recipe.yaml", list(overrides))
        return {node.name: node.params for node in recipe_graph(loaded, HashCache()).nodes}

    default, wide = params(), params("passes.dtype=float64")
    changed = {name for name in default if default[name] != wide[name]}
    assert changed == {"measurement", "exl2-4.0bpw/quantized"}
    assert "dtype" not in default["measurement"] and wide["measurement"]["dtype"] == "float64"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float64_cpu_and_gpu_write_the_same_bytes(model_dir: Path, float64_build: dict, tmp_path: Path) -> None:
    """The point of float64: the GPU's passes (its kernels, cuBLAS, cuSOLVER, its attention) give the CPU's bytes."""
    measurement = measure.measure_model(model_dir, _ids(), probe_tokens=64, device="cuda", dtype=torch.float64)
    for key, candidates in float64_build["measurement"].modules.items():
        for a, b in zip(candidates or (), measurement.modules[key] or ()):
            assert a.accuracy == pytest.approx(b.accuracy, rel=1e-12, abs=0), key
    for key, s in float64_build["measurement"].sensitivity.items():
        assert s.kl == pytest.approx(measurement.sensitivity[key].kl, rel=1e-9), key
    quantize_model(model_dir, _ids(), strategy(2, 6, 6), 6, tmp_path / "quantized", device="cuda",
                   dtype=torch.float64)
    assert file_bytes(tmp_path / "quantized") == file_bytes(float64_build["quantized"])
