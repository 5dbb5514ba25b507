"""LayerCheckpoint: states written in the background, errors of the write surfaced, resume state exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import exlbuild.quant.stream as stream
from exlbuild.quant.stream import LayerCheckpoint, tf32_matmuls


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    x = torch.randn(3, 8, 4).half()
    with LayerCheckpoint(tmp_path) as checkpoint:
        assert checkpoint.load() == (0, {}, {})
        checkpoint.save(2, {"x": x, "y": x[:1] + 1}, {"done": ["a"]})
        expected = x.clone()
        x.zero_()  # the caller goes on with its states: the checkpoint holds the values saved
    step, saved, notes = LayerCheckpoint(tmp_path).load()
    assert step == 2 and notes == {"done": ["a"]}
    assert saved["x"].dtype == torch.float16 and torch.equal(saved["x"], expected)
    assert torch.equal(saved["y"], expected[:1] + 1)


def test_a_failed_write_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(stream, "save_file", disk_full)
    checkpoint = LayerCheckpoint(tmp_path)
    checkpoint.save(1, {"x": torch.zeros(2, 2)}, {})
    with pytest.raises(OSError, match="No space"):
        checkpoint.wait()
    assert not (tmp_path / "progress.json").exists()  # nothing claims a checkpoint that was not written
    with pytest.raises(OSError, match="No space"):
        with LayerCheckpoint(tmp_path) as c:
            c.save(1, {"x": torch.zeros(2, 2)}, {})


def test_the_pass_keeps_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(KeyboardInterrupt):
        with LayerCheckpoint(tmp_path) as checkpoint:
            checkpoint.save(1, {"x": torch.zeros(2, 2)}, {})
            raise KeyboardInterrupt


def test_tf32_matmuls_only_on_cuda_and_restored() -> None:
    before = torch.get_float32_matmul_precision()
    with tf32_matmuls(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError), tf32_matmuls(torch.device("cuda")):  # setting it needs no GPU
        assert torch.get_float32_matmul_precision() == "high"
        raise RuntimeError("the block failed")
    assert torch.get_float32_matmul_precision() == before
