"""The SmolLM2 GGUF import: files, config from metadata, tokenizer, logits against transformers, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest
import torch

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import open_model
from exlbuild.model.gguf_import import _unpermute, import_gguf
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
