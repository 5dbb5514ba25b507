"""Llama-family forward pass in plain PyTorch, one decoder layer at a time.

Everything is a function of tensors: a layer's weights are a dict keyed by the Hugging Face names relative to the
layer (see `checkpoint.layer_weights`), so quantization code can pass modified weights (and, optionally,
`NAME.input_scale`: a factor on each input feature of linear NAME). `capture(point, tensor)`
receives the input of every linear layer as it is computed (see `LINEAR_INPUTS`), which is what GPTQ needs for its
Hessians (k_proj's and v_proj's weighted by the attention each token receives: `attention_received`). Streaming
(`iter_layers`, `forward_hidden`) keeps one layer's weights in memory at a time, plus the hidden states of all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from exlbuild import progress
from exlbuild.kernels.attention import HEAD_DIMS, causal_attention
from exlbuild.kernels.attention_received import allowed_keys, attention_received as kernel_attention_received
from exlbuild.kernels.decoder_ops import gated_activation, rms_norm, rotary, scale_features
from exlbuild.model.checkpoint import (
    Checkpoint,
    Device,
    embedding_weight,
    head_weight,
    layers_ahead,
    norm_weight,
    open_model,
)
from exlbuild.model.config import LlamaConfig

Capture = Callable[[str, torch.Tensor], None]

# Attention kernels in order of preference. Not cuDNN's, which PyTorch prefers for float16 and bfloat16 on Hopper:
# it builds a plan for every new shape on its first call in a process (0.4–1.3 s each on the H100, paid by the first
# variant of every build), where flash attention is as fast from the first call (bench/results/sdpa-probe-h100.json).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Which captured tensor is the input of each linear layer (k/v share one input, as do gate/up). attn_kv_input is
# attn_input with every token scaled by the square root of the attention it receives: an error in the key or value
# of a token that many queries read (the first token, an attention sink) costs that many times more.
LINEAR_INPUTS = {
    "self_attn.q_proj": "attn_input",
    "self_attn.k_proj": "attn_kv_input",
    "self_attn.v_proj": "attn_kv_input",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "mlp_input",
    "mlp.up_proj": "mlp_input",
    "mlp.down_proj": "mlp_hidden",
}


@dataclass(frozen=True)
class Rope:
    """cos and sin tables, (seq_len, head_dim), for the rotate-half layout."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Angular frequency of each rotary pair, (head_dim / 2,), with NTK alpha, llama3 and linear scaling."""
    d = cfg.head_dim
    inv_freq = cfg.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and those in between blended
        # linearly in (original context / wavelength) between low_freq_factor and high_freq_factor.
        turns = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        keep = ((turns - lo) / (hi - lo)).clamp(0.0, 1.0)
        inv_freq = inv_freq * (keep + (1.0 - keep) / scaling["factor"])
    return (inv_freq / cfg.rope_scale).to(torch.float32)


def rope_tables(cfg: LlamaConfig, seq_len: int, device: Device = None, dtype: torch.dtype = torch.float32) -> Rope:
    """Rotary tables for positions 0..seq_len-1, in float32 (cast to the compute dtype when applied), or float64 for
    passes in float64."""
    inv_freq = rope_inv_freq(cfg).to(device, dtype)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return Rope(angles.cos(), angles.sin())


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate (batch, seq, heads, head_dim) by position; pairs are (i, i + head_dim/2). (In this layout, that of the
    projections, the elementwise work runs on contiguous memory.)"""
    return rotary(x, rope.cos[: x.shape[1]].to(x.dtype), rope.sin[: x.shape[1]].to(x.dtype))


def embed(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)


def _linears(x: torch.Tensor, w: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """The outputs of the linears `names`, which all read x, each of whose inputs is first multiplied by its
    `input_scale` where it has one (the EXL2 fits' factors per input feature: cheaper than scaling the weight), one
    pass over x for all of them."""
    scaled = [name for name in names if name + ".input_scale" in w]
    inputs = dict(zip(scaled, scale_features(x, [w[name + ".input_scale"] for name in scaled]))) if scaled else {}
    return [F.linear(inputs.get(name, x), w[name + ".weight"], w.get(name + ".bias")) for name in names]


def _attention_mask(cfg: LlamaConfig, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """None for plain causal attention; a boolean mask when a sliding window cuts into the sequence."""
    if cfg.sliding_window is None or seq_len <= cfg.sliding_window:
        return None
    return allowed_keys(range(seq_len), seq_len, cfg.sliding_window, device)


def _split_heads(y: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """(..., seq, heads·head_dim) → (batch, seq, heads, head_dim), the leading dims flattened into one batch dim
    (scaled_dot_product_attention takes a slow path for more than one)."""
    t = y.shape[-2]
    return y.reshape(-1, t, y.shape[-1] // cfg.head_dim, cfg.head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LlamaConfig, rope: Rope) -> torch.Tensor:
    """Causal self-attention of projected q (..., seq, heads·head_dim) and k, v (..., seq, kv_heads·head_dim).

    Leading dims are batch dims (rows, or candidates × rows in the measurement); returns (..., seq, heads·head_dim).
    """
    *lead, t, _ = q.shape
    q, k = apply_rope(_split_heads(q, cfg), rope), apply_rope(_split_heads(k, cfg), rope)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), _split_heads(v, cfg).transpose(1, 2)  # (batch, heads, seq, dim)
    mask = _attention_mask(cfg, t, q.device)
    dtype = q.dtype
    if q.is_cuda and dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        # Where float32 products may take TF32's 10-bit mantissas (the calibration passes: stream.pass_precision),
        # attention takes float16's 10 bits: flash attention instead of float32's ~5× slower kernel. (q, k and v
        # project normalized states: far inside float16's range; an overflow would fail the pass's finite check.)
        q, k, v = q.half(), k.half(), v.half()
    in_place = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and mask is None
    if in_place and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)) \
            and cfg.head_dim in HEAD_DIMS:
        # The fits' steps (differentiated). Flash attention's backward adds dQ atomically; in the deterministic mode
        # the fits run in it runs fewer, longer programs: 0.64 against 0.41 ms a refinement step's attention on the
        # H100. This kernel's backward is deterministic by construction and reads the KV heads in place: 0.37 ms
        # (kernels/attention.py, bench/results/attention-bench-h100.txt); at Llama-3's heads of 128, 8–33 % under
        # flash attention's deterministic time (bench/NOTES.md §36).
        a = causal_attention(q, k, v, 1 / math.sqrt(cfg.head_dim)).to(dtype)
        return a.transpose(1, 2).reshape(*lead, t, cfg.num_attention_heads * cfg.head_dim)
    # Each KV head serves num_kv_groups consecutive query heads. Flash attention (CUDA, 16-bit) reads them in place
    # in SDPA's grouped mode: copies of k and v expanded to every query head, and the sums of their gradients, took
    # 0.80 ms of a refinement step's attention where it takes 0.68, with the same bits (bench/NOTES.md §25). The
    # other kernels (and flash with a window's mask) have no grouped mode (PyTorch would fall back to the math
    # kernel): there an expanded view copied once.
    grouped = cfg.num_kv_groups > 1 and in_place
    if cfg.num_kv_groups > 1 and not grouped:
        b, kv_heads, _, d = k.shape
        k, v = (y[:, :, None].expand(b, kv_heads, cfg.num_kv_groups, t, d).reshape(b, -1, t, d) for y in (k, v))
    with sdpa_kernel(ATTENTION_BACKENDS):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=grouped).to(dtype)
    return a.transpose(1, 2).reshape(*lead, t, cfg.num_attention_heads * cfg.head_dim)


def attention_received(q: torch.Tensor, k: torch.Tensor, cfg: LlamaConfig, rope: Rope) -> torch.Tensor:
    """How much attention each position receives as a key, (..., seq), for projected q (..., seq, heads·head_dim)
    and k (..., seq, kv_heads·head_dim): the attention probabilities summed over query heads and query positions,
    divided by the number of query heads (so that a row's weights sum to seq). In float32 (float64 for float64
    inputs)."""
    *lead, t, _ = q.shape
    # Roped in float32 whatever the compute dtype (float64 stays); (batch, heads, seq, head_dim) views of the
    # projections' layout.
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = apply_rope(_split_heads(q.to(dtype), cfg), rope).transpose(1, 2)
    k = apply_rope(_split_heads(k.to(dtype), cfg), rope).transpose(1, 2)
    received = kernel_attention_received(q, k, 1 / math.sqrt(cfg.head_dim), cfg.sliding_window)
    return received.reshape(*lead, t)


def attention_block(
    x: torch.Tensor, w: dict[str, torch.Tensor], cfg: LlamaConfig, rope: Rope, capture: Capture | None = None
) -> torch.Tensor:
    """x + attention(norm(x)) for x of shape (batch, seq, hidden)."""
    h = rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
    q, k, v = _linears(h, w, [f"self_attn.{p}_proj" for p in "qkv"])
    if capture:
        capture("attn_input", h)
        capture("attn_kv_input", h * attention_received(q, k, cfg, rope).sqrt().unsqueeze(-1))
    a = attention(q, k, v, cfg, rope)
    if capture:
        capture("attn_output", a)
    (o,) = _linears(a, w, ["self_attn.o_proj"])
    return x + o


def mlp_block(
    x: torch.Tensor, w: dict[str, torch.Tensor], cfg: LlamaConfig, capture: Capture | None = None
) -> torch.Tensor:
    """x + down(silu(gate(norm(x))) * up(norm(x)))."""
    h = rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    if capture:
        capture("mlp_input", h)
    m = gated_activation(*_linears(h, w, ["mlp.gate_proj", "mlp.up_proj"]))
    if capture:
        capture("mlp_hidden", m)
    (down,) = _linears(m, w, ["mlp.down_proj"])
    return x + down


def decoder_layer(
    x: torch.Tensor, w: dict[str, torch.Tensor], cfg: LlamaConfig, rope: Rope, capture: Capture | None = None
) -> torch.Tensor:
    return mlp_block(attention_block(x, w, cfg, rope, capture), w, cfg, capture)


@dataclass
class KVCache:
    """One layer's keys (after rotation) and values of every row so far: (rows, kv_heads, capacity, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor


def decoder_layer_step(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: LlamaConfig, here: Rope, cache: KVCache,
                       position: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """decoder_layer for one new token of every row, x (rows, 1, hidden) at `position` (a (1,) tensor on x's device;
    `here`: the rotary tables' row at it), against the earlier positions' keys and values in `cache` (this token's
    are stored there): the same outputs as decoder_layer's at that position on the whole rows. The attention reads
    the cache's first len(`allowed`) positions, masked where `allowed` (allowed_keys' row for `position`) is False."""
    h = rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
    q, k, v = _linears(h, w, [f"self_attn.{p}_proj" for p in "qkv"])
    q, k = apply_rope(_split_heads(q, cfg), here), apply_rope(_split_heads(k, cfg), here)
    cache.keys.index_copy_(2, position, k.transpose(1, 2))
    cache.values.index_copy_(2, position, _split_heads(v, cfg).transpose(1, 2))
    keys, values = (c[:, :, : len(allowed)] for c in (cache.keys, cache.values))
    # One query against the cached positions, written out: scaled_dot_product_attention sends this shape to cuDNN
    # on CUDA, which plans anew for each length (2.5 ms of host time a call, measured on the H100). The query heads
    # that share a key/value head are grouped, so the cache is never expanded.
    rows, kv_heads = keys.shape[:2]
    q = q.reshape(rows, kv_heads, cfg.num_kv_groups, cfg.head_dim)
    scores = torch.einsum("bkgd,bktd->bkgt", q, keys).float() / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    a = torch.einsum("bkgt,bktd->bkgd", torch.softmax(scores, dim=-1).to(values.dtype), values)
    (o,) = _linears(a.reshape(rows, 1, -1), w, ["self_attn.o_proj"])
    return mlp_block(x + o, w, cfg)


def final_logits(x: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.linear(rms_norm(x, norm_w, eps), head_w)


def iter_layers(
    ckpt: Checkpoint, cfg: LlamaConfig, dtype: torch.dtype = torch.float32, device: Device = None
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index, weights) of each decoder layer, loaded one at a time (each next one read ahead: layers_ahead)."""
    layers = range(cfg.num_hidden_layers)
    yield from zip(progress.track(layers, "layers"), layers_ahead(ckpt, cfg, layers, dtype, device))


@torch.inference_mode()
def forward_hidden(
    ckpt: Checkpoint,
    cfg: LlamaConfig,
    ids: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    batch_rows: int = 8,
) -> torch.Tensor:
    """Hidden states after the last decoder layer (before the final norm) for token rows `ids` (rows, seq).

    The states of all rows stay on `device`; each layer is applied `batch_rows` rows at a time so that
    attention and MLP intermediates stay small.
    """
    device = torch.device(device or "cpu")
    ids = ids.to(device)
    x = embed(ids, embedding_weight(ckpt, dtype, device))
    rope = rope_tables(cfg, ids.shape[1], device)
    for _, w in iter_layers(ckpt, cfg, dtype, device):
        for start in range(0, x.shape[0], batch_rows):
            x[start : start + batch_rows] = decoder_layer(x[start : start + batch_rows], w, cfg, rope)
        del w  # free this layer before the next one loads
    return x


@torch.inference_mode()
def forward_logits(
    model_dir: Path,
    ids: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    rope_scale: float | None = None,
    rope_alpha: float | None = None,
) -> torch.Tensor:
    """Logits (rows, seq, vocab) for token rows `ids` (rows, seq), or (seq, vocab) for one row given as 1-D.

    `rope_scale`/`rope_alpha` override the model's rope settings as a recipe would (see `LlamaConfig`).
    """
    cfg, ckpt = open_model(model_dir, rope_scale=rope_scale, rope_alpha=rope_alpha)
    x = forward_hidden(ckpt, cfg, ids.view(-1, ids.shape[-1]), dtype, device)
    norm_w, head_w = norm_weight(ckpt, dtype, x.device), head_weight(ckpt, cfg, dtype, x.device)
    logits = final_logits(x, norm_w, head_w, cfg.rms_norm_eps)
    return logits.view(*ids.shape, -1)
