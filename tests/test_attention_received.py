"""llama.attention_received (the weights of k_proj's and v_proj's Hessians) against its definition, computed directly
in float64 with explicit softmaxes, on the CPU (the reference path of exlbuild.kernels.attention_received)."""

from __future__ import annotations

import pytest
import torch

from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import Rope, apply_rope, attention_received, rope_tables


def _config(heads: int, kv_heads: int, head_dim: int, window: int | None) -> LlamaConfig:
    return LlamaConfig("MistralForCausalLM", heads * head_dim, 64, 1, heads, kv_heads, head_dim, 100, 1e-5, 10000.0,
                       None, 4096, False, False, False, False, window, None, None)


def _definition(q: torch.Tensor, k: torch.Tensor, cfg: LlamaConfig, rope: Rope) -> torch.Tensor:
    """Per key position, softmax(q·k / √head_dim) over the keys each query may see (itself and earlier positions,
    within the window), summed over query heads and query positions, / query heads; in float64."""
    *lead, t, _ = q.shape
    d = cfg.head_dim
    q = apply_rope(q.double().reshape(-1, t, cfg.num_attention_heads, d), rope).transpose(1, 2)
    k = apply_rope(k.double().reshape(-1, t, cfg.num_key_value_heads, d), rope).transpose(1, 2)
    k = k.repeat_interleave(cfg.num_kv_groups, dim=1)  # query head h reads KV head h // groups
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < cfg.sliding_window) if cfg.sliding_window is not None else True)
    logits = (q @ k.mT / d**0.5).masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1).sum(dim=(1, 2)) / cfg.num_attention_heads).reshape(*lead, t)


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, window, lead",
    [(6, 2, 16, None, (3,)), (4, 4, 32, None, (2, 2)), (4, 1, 16, 5, (2,)), (6, 3, 32, 40, (1,))],
)
def test_attention_received_is_its_definition(heads: int, kv_heads: int, head_dim: int, window: int | None,
                                               lead: tuple[int, ...]) -> None:
    cfg, t = _config(heads, kv_heads, head_dim, window), 37
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    q = torch.randn(*lead, t, heads * head_dim, generator=g) * 2
    k = torch.randn(*lead, t, kv_heads * head_dim, generator=g) * 2
    tables = rope_tables(cfg, t)
    received = attention_received(q, k, cfg, tables)
    assert received.dtype == torch.float32 and received.shape == (*lead, t)
    exact = _definition(q, k, cfg, Rope(tables.cos.double(), tables.sin.double()))
    torch.testing.assert_close(received.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(received.sum(-1), torch.full(lead, float(t)))  # each query's probabilities sum to 1
