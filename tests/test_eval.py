"""Perplexity through exlbuild's forward against transformers on the same windows."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exlbuild.errors import ExlbuildError
from exlbuild.eval import evaluate, perplexity, read_text
from exlbuild.model.tokenizer import load_tokenizer
from model_fixtures import hf_logits, hf_smollm, hf_window_perplexity, sample_text, smollm_dir, tiny_model  # noqa: F401

WINDOW, WINDOWS = 256, 3


def test_smollm_perplexity_matches_transformers(smollm_dir: Path) -> None:
    ids = torch.tensor(load_tokenizer(smollm_dir).encode(sample_text()))
    assert len(ids) > (WINDOWS + 1) * WINDOW  # max_windows is what limits the run
    ours = perplexity(smollm_dir, ids, window=WINDOW, max_windows=WINDOWS)
    ref = hf_window_perplexity(hf_smollm(smollm_dir), ids, WINDOW, WINDOWS)
    print(f"SmolLM2 perplexity: exlbuild {ours['perplexity']:.6f}, transformers {ref:.6f}")
    assert ours["windows"] == WINDOWS and ours["tokens"] == WINDOWS * (WINDOW - 1)
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert 2 < ours["perplexity"] < 40  # a wrong tokenizer or weight layout lands in the hundreds


def test_evaluate_reads_txt_and_parquet(smollm_dir: Path, tmp_path: Path) -> None:
    text = sample_text()
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    paragraphs = text.split("\n\n")
    pq.write_table(pa.table({"id": list(range(len(paragraphs))), "body": paragraphs}), tmp_path / "eval.parquet")
    assert read_text(tmp_path / "eval.parquet", "body") == "\n\n".join(p for p in paragraphs if p)

    ids = torch.tensor(load_tokenizer(smollm_dir).encode(text))
    expected = perplexity(smollm_dir, ids, window=128, max_windows=2)
    assert evaluate(smollm_dir, tmp_path / "eval.txt", window=128, max_windows=2) == expected
    from_parquet = evaluate(smollm_dir, tmp_path / "eval.parquet", window=128, max_windows=2, text_column="body")
    assert from_parquet["perplexity"] == pytest.approx(expected["perplexity"], rel=0.05)  # blank rows dropped

    with pytest.raises(ExlbuildError, match="no column 'text'; columns: id, body"):
        evaluate(smollm_dir, tmp_path / "eval.parquet")
    with pytest.raises(ExlbuildError, match="column 'id' .* not text"):
        evaluate(smollm_dir, tmp_path / "eval.parquet", text_column="id")


def test_all_windows_of_a_tiny_model(tmp_path: Path) -> None:
    """With max_windows unset every whole window counts and the partial tail is dropped."""
    model_dir = tiny_model(tmp_path)
    ids = torch.randint(0, 128, (5 * 32 + 7,), generator=torch.Generator().manual_seed(4))
    ours = perplexity(model_dir, ids, window=32)
    assert (ours["windows"], ours["tokens"]) == (5, 5 * 31)
    logits = hf_logits(model_dir, ids[: 5 * 32].view(5, 32))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[: 5 * 32].view(5, 32)[:, 1:].reshape(-1))
    assert ours["perplexity"] == pytest.approx(nll.exp().item(), rel=1e-5)


def test_bad_inputs(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model")
    with pytest.raises(ExlbuildError, match="10 tokens, fewer than one window of 32"):
        perplexity(model_dir, torch.arange(10), window=32)
    with pytest.raises(ExlbuildError, match="exceeds the model's max_position_embeddings"):
        perplexity(model_dir, torch.arange(1000) % 128, window=512)
    with pytest.raises(ExlbuildError, match="must be a .txt or .parquet file"):
        (tmp_path / "eval.csv").write_text("a,b")
        read_text(tmp_path / "eval.csv")
    with pytest.raises(ExlbuildError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
