"""Refining GPTQ's codes layer by layer (exlbuild.quant.exl2.refine) on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exlbuild.quant.exl2.pack import dequantize, validate_layer
from exlbuild.quant.exl2.refine import LatentCodes, refine_model
from exlbuild.quant.exl2.tune import linear_tensors
from test_exl2_convert import SHAPE, file_bytes
from test_exl2_tune import changed_tensors, kl_to_model, quantized  # noqa: F401 (quantized: the fixture, a 2-layer model at ~2.5 bits)


def layer_tensors(directory: Path, i: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "layers" / f"{i:05d}.safetensors"))


def test_latent_codes_decode_and_pack_as_stored(quantized: dict) -> None:
    """Before any step the latent codes give back the stored weight (as the loader decodes it) and q_weight."""
    tensors = layer_tensors(quantized["tmp"] / "quantized")
    for name, out_features in (("self_attn.q_proj", SHAPE["hidden_size"]), ("mlp.down_proj", SHAPE["hidden_size"])):
        linear = linear_tensors(tensors, f"model.layers.0.{name}")
        latent = LatentCodes(linear, out_features, torch.device("cpu"))
        assert torch.equal(latent.weight(latent.latent), dequantize(linear, out_features))
        assert torch.equal(latent.q_weight(), linear["q_weight"])
        assert latent.changed() == 0
        # a latent value moved across a rounding boundary changes that one code; one past the range is clamped
        latent.latent = latent.latent.clone()
        latent.latent[3, 5] += 0.75
        latent.latent[4, 6] = 1e6
        expected = latent.weight(latent.latent)
        assert latent.changed() == 1 + int(latent.initial[4, 6] != latent.high[6] + latent.zero[6])  # the largest code
        assert torch.equal(dequantize({**linear, "q_weight": latent.q_weight()}, out_features), expected)


def test_refining_lowers_each_layers_loss_and_changes_only_codes_scales_and_norms(quantized: dict) -> None:
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    metrics = refine_model(model, tmp / "quantized", tmp / "refined", ids, steps=200, lr=0.01, rows_per_step=4)
    assert all(m["loss_after"] < 0.95 * m["loss_before"] for m in metrics["layers"]), metrics["layers"]
    assert metrics["codes_changed"] > 0 and metrics["calibration_perplexity"] > 1
    before = kl_to_model(model, tmp / "quantized", ids, tmp / "compiled-quantized")
    after = kl_to_model(model, tmp / "refined", ids, tmp / "compiled-refined")
    assert after < 0.9 * before, (before, after)

    changed = changed_tensors(tmp / "quantized", tmp / "refined")
    assert changed and all(k.endswith(("q_weight", "q_scale_max", "layernorm.weight")) for k in changed)
    assert {k.rsplit(".", 1)[1] for k in changed} == {"q_weight", "q_scale_max", "weight"}
    refined = layer_tensors(tmp / "refined", 1)
    for name, (in_features, out_features) in (("self_attn.o_proj", (SHAPE["hidden_size"],) * 2),
                                             ("mlp.up_proj", (SHAPE["hidden_size"], SHAPE["intermediate_size"]))):
        validate_layer(linear_tensors(refined, f"model.layers.1.{name}"), layer=name, in_features=in_features,
                       out_features=out_features, bias=False)


def test_refining_is_deterministic(quantized: dict, tmp_path: Path) -> None:
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    for out in ("a", "b"):
        refine_model(model, tmp / "quantized", tmp_path / out, ids, steps=4, lr=0.2, rows_per_step=3)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert file_bytes(tmp_path / "a") != file_bytes(tmp / "quantized")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_refining_is_deterministic_on_cuda(quantized: dict, tmp_path: Path) -> None:
    """Two refinements on the GPU write the same bytes (deterministic backward kernels), and they refine."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    for out in ("a", "b"):
        metrics = refine_model(model, tmp / "quantized", tmp_path / out, ids, steps=200, lr=0.01, rows_per_step=4,
                               device="cuda")
    assert all(m["loss_after"] < m["loss_before"] for m in metrics["layers"])
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_a_fit_that_does_not_lower_a_layers_loss_is_dropped(quantized: dict, tmp_path: Path) -> None:
    """A rate far too high for the codes makes each layer worse: its fit is dropped and the layer is written as
    the quantization pass wrote it."""
    tmp, model, ids = quantized["tmp"], quantized["model"], quantized["ids"]
    metrics = refine_model(model, tmp / "quantized", tmp_path / "refined", ids, steps=20, lr=1.0, rows_per_step=4)
    assert all(not m["kept"] and m["loss_after"] >= m["loss_before"] for m in metrics["layers"]), metrics["layers"]
    assert metrics["codes_changed"] == 0
    assert changed_tensors(tmp / "quantized", tmp_path / "refined") == set()
