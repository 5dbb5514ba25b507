"""LayerCheckpoint: states written in the background, errors of the write surfaced, resume state exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import exlbuild.quant.stream as stream
from exlbuild.quant.stream import LayerCheckpoint, pass_precision


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


def test_pass_precision_only_on_cuda_and_restored() -> None:
    before = torch.get_float32_matmul_precision()
    with pass_precision(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError), pass_precision(torch.device("cuda")):  # setting it needs no GPU
        assert torch.get_float32_matmul_precision() == "high"
        raise RuntimeError("the block failed")
    assert torch.get_float32_matmul_precision() == before



def test_block_outputs_beyond_the_state_dtype_are_an_error() -> None:
    """A block whose outputs overflow float16 in one chunk (here the last of three) stops the pass with an error
    naming the block; the check is read once after the chunks, not after each (a read waits for the GPU)."""
    from exlbuild.model.config import LlamaConfig
    from exlbuild.model.llama import rope_tables

    cfg = LlamaConfig("LlamaForCausalLM", 8, 16, 1, 2, 2, 4, 10, 1e-5, 10000.0, None, 16, False, False, False, False,
                      None, None, None)
    x = torch.ones(3, 4, 8, dtype=torch.float16)
    x[2] = 6e4  # the residual: the MLP's output added to 60,000 leaves float16's range (65,504)
    w = {"post_attention_layernorm.weight": torch.ones(8), "mlp.gate_proj.weight": torch.ones(16, 8),
         "mlp.up_proj.weight": torch.ones(16, 8), "mlp.down_proj.weight": torch.full((8, 16), 0.01)}
    rope = rope_tables(cfg, 4, "cpu")
    saved, stream.CHUNK_ELEMENTS = stream.CHUNK_ELEMENTS, 4 * 16  # one row a chunk
    try:
        stream.run_block("mlp", x, w, cfg, rope, out=x.clone(), module="model.layers.0.mlp")  # +~10: fine
        w["mlp.down_proj.weight"] = torch.full((8, 16), 10.0)  # +~10,000
        with pytest.raises(stream.ExlbuildError, match="model.layers.0.mlp: outputs NaN or values beyond the range "
                                                       "of float16 on the calibration rows"):
            stream.run_block("mlp", x, w, cfg, rope, out=x.clone(), module="model.layers.0.mlp")
    finally:
        stream.CHUNK_ELEMENTS = saved
