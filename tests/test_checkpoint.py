"""The checkpoint reader and config parser: shards, dtypes, and the errors a user sees for bad directories."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    expected_tensors,
    free_device_memory,
    head_weight,
    layer_weights,
    layers_ahead,
    read_ahead,
    open_model,
    require_device_memory,
)
from exlbuild.model.config import SUPPORTED_ARCHITECTURES, LlamaConfig
from exlbuild.model.llama import forward_logits
from model_fixtures import edit_config, hf_logits, tiny_model

IDS = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "model")


def _rewrite_tensors(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sharded_and_unsharded_agree(tmp_path: Path, dtype: torch.dtype) -> None:
    single = tiny_model(tmp_path / "single", dtype=dtype)
    sharded = tiny_model(tmp_path / "sharded", dtype=dtype, save_kwargs={"max_shard_size": "40KB"})
    assert (sharded / INDEX_NAME).is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    no_index = tmp_path / "no_index"
    shutil.copytree(sharded, no_index)
    (no_index / INDEX_NAME).unlink()

    a, b, c = Checkpoint(single), Checkpoint(sharded), Checkpoint(no_index)
    assert a.names() == b.names() == c.names()
    name = "model.layers.1.mlp.down_proj.weight"
    assert a.dtype_of(name) == b.dtype_of(name) == c.dtype_of(name) == dtype
    assert a.shape(name) == (64, 96)
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)) and torch.equal(a.get(n), c.get(n))

    logits = forward_logits(single, IDS)
    assert torch.equal(logits, forward_logits(sharded, IDS))
    assert torch.equal(logits, forward_logits(no_index, IDS))
    ref = hf_logits(single, IDS)  # transformers upcasts the same stored values to float32
    assert ((logits - ref).norm() / ref.norm()).item() < 1e-5


def test_get_converts_dtype(model_dir: Path) -> None:
    ckpt = Checkpoint(model_dir)
    w = ckpt.get("model.norm.weight", dtype=torch.float16)
    assert w.dtype == torch.float16 and w.shape == (64,)


def test_tied_head_is_the_embedding(tmp_path: Path) -> None:
    cfg, ckpt = open_model(tiny_model(tmp_path, tie_word_embeddings=True))
    assert "lm_head.weight" not in ckpt
    assert "lm_head.weight" not in expected_tensors(cfg)
    assert torch.equal(head_weight(ckpt, cfg), ckpt.get("model.embed_tokens.weight"))


def test_missing_config(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    with pytest.raises(ExlbuildError, match=f"{model_dir}.*config.json"):
        open_model(model_dir)


def test_unsupported_architecture(model_dir: Path) -> None:
    edit_config(model_dir, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ExlbuildError) as e:
        LlamaConfig.from_dir(model_dir)
    assert "GPTNeoXForCausalLM" in str(e.value)
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "missing key 'hidden_size'"),
        ({"num_hidden_layers": "two"}, "'num_hidden_layers' must be a positive integer"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"rope_parameters": {"rope_type": "linear"}}, "rope scaling 'factor'"),
    ],
)
def test_invalid_config_fields(model_dir: Path, change: dict, message: str) -> None:
    edit_config(model_dir, **change)
    with pytest.raises(ExlbuildError, match=message) as e:
        LlamaConfig.from_dir(model_dir)
    assert "config.json" in str(e.value)


def test_invalid_json(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ExlbuildError, match="config.json is not valid JSON"):
        LlamaConfig.from_dir(model_dir)


def test_missing_tensor(model_dir: Path) -> None:
    _rewrite_tensors(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ExlbuildError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        open_model(model_dir)


def test_misnamed_tensor(model_dir: Path) -> None:
    _rewrite_tensors(model_dir, lambda t: t.update({"model.layers.0.self_attn.qproj.weight": t.pop("model.layers.0.self_attn.q_proj.weight")}))
    with pytest.raises(ExlbuildError) as e:
        open_model(model_dir)
    assert "model.layers.0.self_attn.q_proj.weight" in str(e.value)
    assert "look close: model.layers.0.self_attn.qproj.weight" in str(e.value)
    with pytest.raises(ExlbuildError, match=rf"not in the checkpoint {model_dir}; close names: model\.layers\.0\.self_attn\.qproj"):
        Checkpoint(model_dir).get("model.layers.0.self_attn.q_proj.weight")


def test_wrong_shape(model_dir: Path) -> None:
    edit_config(model_dir, intermediate_size=80)
    with pytest.raises(ExlbuildError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight .* shape \[96, 64\], config.json implies \[80, 64\]"):
        open_model(model_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(model_dir: Path, bad: float) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.self_attn.v_proj.weight"][3, 5] = bad

    _rewrite_tensors(model_dir, poison)
    with pytest.raises(ExlbuildError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight .* NaN or Inf"):
        forward_logits(model_dir, IDS)


@pytest.mark.parametrize("reader", ["read_ahead", "layers_ahead"])
def test_layers_read_ahead(model_dir: Path, reader: str) -> None:
    """The layers read by a background thread, one ahead (as on CUDA), and those layers_ahead gives on the CPU
    (read in the caller's thread) are the layers read in turn; a bad tensor in a later layer is reported when the
    caller reaches that layer, after the earlier ones."""
    cpu = torch.device("cpu")
    read = {"read_ahead": read_ahead, "layers_ahead": layers_ahead}[reader]
    cfg, ckpt = open_model(model_dir)
    layers = range(1, cfg.num_hidden_layers)
    threads = []
    for i, ahead in zip(layers, read(ckpt, cfg, layers, torch.float16, cpu), strict=True):
        threads.append({t.name.split("_")[0] for t in threading.enumerate()})
        expected = layer_weights(ckpt, cfg, i, torch.float16)
        assert ahead.keys() == expected.keys() and all(torch.equal(ahead[k], expected[k]) for k in expected)
    assert all(("exlbuild-read-ahead" in names) == (reader == "read_ahead") for names in threads)

    _rewrite_tensors(model_dir, lambda t: t["model.layers.1.mlp.up_proj.weight"].fill_(float("nan")))
    cfg, ckpt = open_model(model_dir)
    reached = []
    with pytest.raises(ExlbuildError, match=r"model\.layers\.1\.mlp\.up_proj\.weight .* NaN or Inf"):
        for i, _ in zip(range(2), read(ckpt, cfg, range(2), torch.float32, cpu)):
            reached.append(i)
    assert reached == [0]


def test_overflow_on_conversion(model_dir: Path) -> None:
    _rewrite_tensors(model_dir, lambda t: t["model.norm.weight"].fill_(1e6))
    Checkpoint(model_dir).get("model.norm.weight")  # fine in float32
    with pytest.raises(ExlbuildError, match=r"model\.norm\.weight .* NaN or Inf .*float16"):
        Checkpoint(model_dir).get("model.norm.weight", dtype=torch.float16)


def test_no_safetensors(model_dir: Path) -> None:
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ExlbuildError, match="no .safetensors files.*pytorch_model.bin"):
        Checkpoint(model_dir)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    sharded = tiny_model(tmp_path, save_kwargs={"max_shard_size": "40KB"})
    shard = sorted(json.loads((sharded / INDEX_NAME).read_text())["weight_map"].values())[0]
    (sharded / shard).unlink()
    with pytest.raises(ExlbuildError, match=f"names shard {shard}"):
        Checkpoint(sharded)


def test_memory_the_allocator_holds_unused_counts_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build's earlier steps leave blocks in PyTorch's cache: reusable, so a check counts them as free."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    cuda = torch.device("cuda")
    assert free_device_memory(cuda) == 4 * gib
    require_device_memory(4 * gib, cuda, "this", "that")
    with pytest.raises(ExlbuildError, match=r"this needs 4.5 GiB of GPU memory, but 4.0 GiB are free; that"):
        require_device_memory(4 * gib + gib // 2, cuda, "this", "that")
