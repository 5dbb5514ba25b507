"""exlbuild's Llama-family forward against transformers on tiny random models of each supported layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import exlbuild.kernels.attention_received as received_kernels
from exlbuild.model.checkpoint import layer_weights, open_model
from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import (
    LINEAR_INPUTS,
    attention_received,
    decoder_layer,
    embed,
    forward_hidden,
    forward_logits,
    rms_norm,
    rope_tables,
)
from model_fixtures import edit_config, hf_logits, tiny_model

SEQ = 48


def _ids(vocab: int = 128, rows: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"relative logit error {rel:.2e}, max abs {(ours - ref).abs().max().item():.2e}"


LAYOUTS = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa-biases": ("llama", {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.5}}),
    "llama-rope-llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-head-dim": ("llama", {"head_dim": 32}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 16}),
    "qwen2-qkv-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_forward_matches_transformers(tmp_path: Path, layout: str) -> None:
    kind, overrides = LAYOUTS[layout]
    model_dir = tiny_model(tmp_path, kind, **overrides)
    cfg = LlamaConfig.from_dir(model_dir)
    assert cfg.architecture.lower().startswith(kind)
    ids = _ids()
    _assert_close(forward_logits(model_dir, ids), hf_logits(model_dir, ids))


def test_layout_details_are_read(tmp_path: Path) -> None:
    qwen = LlamaConfig.from_dir(tiny_model(tmp_path / "q", "qwen2", tie_word_embeddings=True))
    assert (qwen.attention_bias, qwen.attention_out_bias, qwen.tie_word_embeddings) == (True, False, True)
    mistral = LlamaConfig.from_dir(tiny_model(tmp_path / "m", "mistral", sliding_window=16))
    assert mistral.sliding_window == 16
    linear = LlamaConfig.from_dir(tiny_model(tmp_path / "l", rope_scaling={"rope_type": "linear", "factor": 2.5}))
    assert linear.rope_scale == 2.5
    assert LlamaConfig.from_dir(tmp_path / "l", rope_scale=4.0).rope_scale == 4.0  # the recipe wins


def test_ntk_alpha_equals_scaled_theta(tmp_path: Path) -> None:
    """rope_alpha multiplies the base by alpha ** (head_dim / (head_dim - 2)), as exllamav2 defines it."""
    alpha, theta, head_dim = 2.5, 10000.0, 16
    plain = tiny_model(tmp_path / "plain", rope_theta=theta)
    scaled = tmp_path / "scaled"
    shutil.copytree(plain, scaled)
    edit_config(scaled, rope_parameters={"rope_type": "default", "rope_theta": theta * alpha ** (head_dim / (head_dim - 2))})
    ids = _ids()
    ours = forward_logits(plain, ids, rope_alpha=alpha)
    _assert_close(ours, hf_logits(scaled, ids))
    assert not torch.allclose(ours, forward_logits(plain, ids), atol=1e-3)  # alpha really changes the result


def test_recipe_rope_scale_equals_linear_config(tmp_path: Path) -> None:
    plain = tiny_model(tmp_path / "plain")
    linear = tmp_path / "linear"
    shutil.copytree(plain, linear)
    edit_config(linear, rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0})
    ids = _ids()
    _assert_close(forward_logits(plain, ids, rope_scale=3.0), hf_logits(linear, ids))


def test_old_style_rope_keys(tmp_path: Path) -> None:
    """config.json files from transformers 4 carry rope_theta and rope_scaling at the top level."""
    model_dir = tiny_model(tmp_path, rope_theta=5000.0)
    edit_config(model_dir, rope_parameters=None, rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = LlamaConfig.from_dir(model_dir)
    assert (cfg.rope_theta, cfg.rope_scale, cfg.rope_scaling) == (5000.0, 2.0, {"rope_type": "linear", "factor": 2.0})


def test_capture_gives_every_linear_input(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path, attention_bias=True)
    cfg, ckpt = open_model(model_dir)
    ids = _ids()
    w = layer_weights(ckpt, cfg, 0)
    x = embed(ids, ckpt.get("model.embed_tokens.weight"))
    seen: dict[str, torch.Tensor] = {}
    y = decoder_layer(x, w, cfg, rope_tables(cfg, SEQ), capture=lambda point, t: seen.setdefault(point, t))
    assert set(seen) == set(LINEAR_INPUTS.values())
    for linear, point in LINEAR_INPUTS.items():
        assert seen[point].shape[-1] == w[linear + ".weight"].shape[1]
    # The captured tensors are the real inputs: the layer's output can be rebuilt from them.
    h = x + F.linear(seen["attn_output"], w["self_attn.o_proj.weight"], w["self_attn.o_proj.bias"])
    mlp_hidden = F.silu(F.linear(seen["mlp_input"], w["mlp.gate_proj.weight"])) * F.linear(seen["mlp_input"], w["mlp.up_proj.weight"])
    torch.testing.assert_close(seen["mlp_hidden"], mlp_hidden)
    torch.testing.assert_close(y, h + F.linear(mlp_hidden, w["mlp.down_proj.weight"]))


@pytest.mark.parametrize(
    "layout", ["llama-gqa-untied", "llama-rope-llama3", "mistral-sliding-window", "qwen2-qkv-bias-tied"])
def test_attention_received_sums_transformers_probabilities(tmp_path: Path, layout: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Per key position: transformers' attention probabilities of layer 0 summed over heads and queries, / heads."""
    import transformers

    kind, overrides = LAYOUTS[layout]
    model_dir = tiny_model(tmp_path, kind, **overrides)
    cfg, ckpt = open_model(model_dir)
    ids = _ids(rows=3)
    model = getattr(transformers, cfg.architecture).from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions[0]  # (rows, heads, queries, keys)
    expected = probs.sum(dim=(1, 2)) / cfg.num_attention_heads

    w = layer_weights(ckpt, cfg, 0)
    h = rms_norm(embed(ids, ckpt.get("model.embed_tokens.weight")), w["input_layernorm.weight"], cfg.rms_norm_eps)
    q, k = (F.linear(h, w[f"self_attn.{p}_proj.weight"], w.get(f"self_attn.{p}_proj.bias")) for p in "qk")
    rope = rope_tables(cfg, SEQ)
    received = attention_received(q, k, cfg, rope)
    torch.testing.assert_close(received, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(received.sum(-1), torch.full((3,), float(SEQ)))
    # Slices of two rows, of 5 query positions, of one query position give the same weights.
    group = cfg.num_kv_groups
    for elements in (2 * group * SEQ * SEQ, 5 * group * SEQ, 1):
        monkeypatch.setattr(received_kernels, "PROBABILITY_ELEMENTS", elements)
        torch.testing.assert_close(attention_received(q, k, cfg, rope), received)


def test_key_value_input_is_weighted_by_received_attention(tmp_path: Path) -> None:
    cfg, ckpt = open_model(tiny_model(tmp_path))
    ids = _ids()
    w = layer_weights(ckpt, cfg, 0)
    seen: dict[str, torch.Tensor] = {}
    decoder_layer(embed(ids, ckpt.get("model.embed_tokens.weight")), w, cfg, rope_tables(cfg, SEQ),
                  capture=lambda point, t: seen.setdefault(point, t))
    h = seen["attn_input"]
    q, k = (F.linear(h, w[f"self_attn.{p}_proj.weight"]) for p in "qk")
    weight = attention_received(q, k, cfg, rope_tables(cfg, SEQ))
    torch.testing.assert_close(seen["attn_kv_input"], h * weight.sqrt().unsqueeze(-1))
    # Causal attention: the first position is read by every query, the last only by itself.
    assert (weight[:, 0] > weight[:, 1:].max(dim=1).values).all()
    assert (weight[:, -1] < 1).all()


def test_row_batching_does_not_change_states(tmp_path: Path) -> None:
    cfg, ckpt = open_model(tiny_model(tmp_path))
    ids = _ids(rows=5)
    torch.testing.assert_close(forward_hidden(ckpt, cfg, ids, batch_rows=2), forward_hidden(ckpt, cfg, ids, batch_rows=8))


def test_one_dimensional_ids(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path)
    ids = _ids(rows=1)
    torch.testing.assert_close(forward_logits(model_dir, ids[0]), forward_logits(model_dir, ids)[0])
