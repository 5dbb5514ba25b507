"""The SmolLM2 GGUF import: files, config from metadata, tokenizer, logits against transformers, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import open_model
from exlbuild.model.gguf_import import _unpermute, import_gguf, read_gguf
from exlbuild.model.llama import forward_logits
from model_fixtures import hf_smollm, sample_text, smollm_dir, smollm_gguf  # noqa: F401 (fixture)

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_unpermute_inverts_gguf_row_order() -> None:
    n_heads, head_dim, cols = 3, 8, 5
    w = torch.arange(n_heads * head_dim * cols, dtype=torch.float32).view(n_heads * head_dim, cols)
    # GGUF interleaves each head's two rotary halves: row (h, j, half) <- HF row (h, half, j).
    permuted = w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(w.shape)
    assert torch.equal(_unpermute(permuted, n_heads), w)
    bias = torch.arange(n_heads * head_dim, dtype=torch.float32)
    assert torch.equal(_unpermute(bias.view(n_heads, 2, -1).transpose(1, 2).reshape(-1), n_heads), bias)


def test_files_and_config(smollm_dir: Path) -> None:
    assert sorted(p.name for p in smollm_dir.iterdir()) == FILES
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float16"
    expected = {
        "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    cfg, ckpt = open_model(smollm_dir)
    assert "lm_head.weight" not in ckpt
    assert all(ckpt.dtype_of(n) == torch.float16 for n in ckpt.names())
    tokenizer_config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]


def test_tokenizer(smollm_dir: Path) -> None:
    tok = _tokenizer(smollm_dir)
    assert tok.get_vocab_size() == 49152
    ids = tok.encode("<|im_start|>user\nHello world, 2024!<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # control tokens are single special tokens
    assert [tok.id_to_token(i) for i in tok.encode(" 2024").ids] == ["Ġ", "2", "0", "2", "4"]  # digits alone
    text = sample_text()[:3000]
    assert tok.decode(tok.encode(text).ids) == text
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(smollm_dir)(text).input_ids == tok.encode(text).ids


def test_logits_match_transformers(smollm_dir: Path) -> None:
    ids = torch.tensor(_tokenizer(smollm_dir).encode(sample_text()).ids[:512]).view(2, 256)
    ours = forward_logits(smollm_dir, ids)
    with torch.no_grad():
        ref = hf_smollm(smollm_dir)(ids).logits
    max_abs = (ours - ref).abs().max().item()
    rel = ((ours - ref).norm() / ref.norm()).item()
    print(f"SmolLM2 logits vs transformers: max abs {max_abs:.2e}, relative {rel:.2e}")
    assert rel < 1e-5 and max_abs < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_import_is_deterministic(smollm_dir: Path, tmp_path: Path) -> None:
    import_gguf(smollm_gguf(), tmp_path)
    for name in FILES:
        first, second = (hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (smollm_dir, tmp_path))
        assert first == second, name


def test_rejects_other_architectures(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExlbuildError, match="architecture 'gpt2' is not supported"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")
    with pytest.raises(ExlbuildError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_reader_agrees_with_gguf_package(tmp_path: Path) -> None:
    """read_gguf gives the metadata values and tensor bytes that the gguf package's own reader gives, for every
    value type, arrays of them, an alignment other than the default, and quantized and float tensors."""
    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_int32("t.i32", -(2**31))
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 1e-5)
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁ wörld")
    writer.add_array("t.strings", ["a", "", "ĠĠ", "<|im_start|>"])
    writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((3, 64)).astype(np.float32)
    writer.add_tensor("a.weight", floats)
    writer.add_tensor("b.weight", floats.astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    metadata, tensors = read_gguf(path)
    expected = gguf.GGUFReader(path)
    assert metadata == {name: field.contents() for name, field in expected.fields.items()
                        if not name.startswith("GGUF.")}
    assert [t.name for t in tensors] == [t.name for t in expected.tensors]
    for ours, theirs in zip(tensors, expected.tensors):
        assert ours.dims == tuple(int(d) for d in theirs.shape) and ours.tensor_type == theirs.tensor_type
        np.testing.assert_array_equal(gguf.quants.dequantize(ours.data, ours.tensor_type),
                                      gguf.quants.dequantize(theirs.data, theirs.tensor_type))


def test_rejects_truncated_files(tmp_path: Path) -> None:
    for size in (2, 1000, 400_000, 50_000_000):  # the header, the table of values, the vocabulary, the weights
        path = tmp_path / "cut.gguf"
        with open(smollm_gguf(), "rb") as f:
            path.write_bytes(f.read(size))
        with pytest.raises(ExlbuildError, match=f"{path} is not a readable GGUF file"):
            import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
