"""Checks that read device values once, later (a read waits for the GPU), still catch what they caught: the pack
range check as a flag, the quantization pass's checks at the end of a block, the damping on the device, the finite
check of a checkpoint read on the host. All on the CPU, where they run the same code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import Checkpoint
from exlbuild.quant.exl2 import convert
from exlbuild.quant.exl2.options import Group, head_option
from exlbuild.quant.exl2.pack import bits_per_row, dequantize, pack_bitstream, pack_q_weight
from exlbuild.quant.exl2.quantize import pack_layer, quantize_options
from exlbuild.quant.gptq import DAMPING_FLOOR, DAMPING_FRACTION, damping, prepare_hessian
from model_fixtures import tiny_model


def test_pack_range_check_as_a_flag() -> None:
    flag = torch.zeros((), dtype=torch.bool)
    pack_bitstream(torch.full((8, 2), 15, dtype=torch.uint8), 4, flag)
    assert not flag
    pack_bitstream(torch.full((32, 2), 255, dtype=torch.uint8), 8, flag)  # 256 would overflow uint8: no false alarm
    assert not flag
    pack_q_weight(torch.full((32, 2), 16, dtype=torch.uint8), (Group(4, 0, 32),), flag)
    assert flag
    with pytest.raises(ValueError, match="out of range"):
        pack_bitstream(torch.full((8, 2), 16, dtype=torch.uint8), 4)


def _quantized(out_features: int = 40, in_features: int = 256):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(out_features, in_features, generator=generator).half()
    x = torch.randn(256, in_features, generator=generator)
    return weight, prepare_hessian(x.T @ x / 256)


def test_quantize_linear_checks_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    weight, prepared = _quantized()
    tensors, decoded = convert.quantize_linear(weight, prepared, head_option(6), "lm_head")
    assert torch.equal(dequantize(tensors, 40, "lm_head"), decoded)

    def bad_codes(*args, **kwargs):
        results = quantize_options(*args, **kwargs)
        results[0].codes[-1, 0] = 64  # a 6-bit row (the first 128 of 256 are 8-bit)
        return results

    monkeypatch.setattr(convert, "quantize_options", bad_codes)
    with pytest.raises(ValueError, match="lm_head: codes out of range"):
        convert.quantize_linear(weight, prepared, head_option(6), "lm_head")

    def bad_groups(result, bias=None, out_of_range=None):
        tensors = pack_layer(result, bias, out_of_range)
        tensors["q_groups"] = tensors["q_groups"].flip(0)
        return tensors

    monkeypatch.setattr(convert, "quantize_options", quantize_options)
    monkeypatch.setattr(convert, "pack_layer", bad_groups)
    with pytest.raises(ExlbuildError, match="lm_head: q_groups"):
        convert.quantize_linear(weight, prepared, head_option(6), "lm_head")


def test_bits_per_row_is_a_fresh_tensor() -> None:
    groups = (Group(4, 0, 32), Group(2, 32, 64))
    bits = bits_per_row(groups)
    bits.zero_()
    assert bits_per_row(list(groups)).tolist() == [4] * 32 + [2] * 32


def test_damping_on_the_device_is_the_python_float() -> None:
    generator = torch.Generator().manual_seed(5)
    for scale in (1e-9, 1e-3, 1.0, 7.3, 1e4):
        x = torch.randn(64, 32, generator=generator) * scale
        hessian = x.T @ x / 64
        expected = max(DAMPING_FRACTION * torch.diagonal(hessian).mean().item(), DAMPING_FLOOR)
        assert damping(hessian).item() == expected
    hessian = torch.diag(torch.tensor([1.0, -0.1]))  # the second attempt works: the total is 2 · d exactly
    d = max(DAMPING_FRACTION * torch.diagonal(hessian).mean().item(), DAMPING_FLOOR)
    assert prepare_hessian(hessian).damping == 2 * d


@pytest.mark.parametrize("value, finite", [(65519.0, True), (65520.0, False), (-65520.0, False),
                                           (float("nan"), False)])
def test_checkpoint_finite_check_at_the_rounding_edge(tmp_path: Path, value: float, finite: bool) -> None:
    """Checked on the host before the copy: finite in float16 exactly when the smallest and largest values are."""
    model = tiny_model(tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"][7] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint(model)
    if value == value:
        assert ckpt.get("model.norm.weight")[7] == value  # finite in float32
    if finite:
        assert ckpt.get("model.norm.weight", torch.float16)[7] == 65504
    else:
        with pytest.raises(ExlbuildError, match="NaN or Inf"):
            ckpt.get("model.norm.weight", torch.float16)
