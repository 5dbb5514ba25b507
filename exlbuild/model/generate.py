"""Token rows sampled from a model: calibration data from the model's own distribution (docs/calibration.md,
"Generated rows").

The whole model is on the device (no layer streaming: every step needs every layer), with a key/value cache of
every row; each step feeds one token of every row through all layers and samples the next from the softmax of
the logits over the temperature. Rows start with the model's BOS token (or, without one, a token drawn uniformly).
The same model, seed and device give the same rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exlbuild import progress
from exlbuild.cuda_graph import capture, release
from exlbuild.kernels.attention_received import allowed_keys
from exlbuild.model.checkpoint import (
    Device,
    embedding_weight,
    head_weight,
    layer_weights,
    model_bytes,
    norm_weight,
    open_model,
    require_device_memory,
)
from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import KVCache, Rope, decoder_layer_step, embed, final_logits, rope_tables


class CachedModel:
    """A model on the device that takes one token of each of `rows` rows per call, up to `length` in all.

    On CUDA every step after the first is one replay of a CUDA graph of the whole step: launched one by one from
    Python, a step's ~1,500 small kernels took ~29 ms on the H100 whatever the rows, so that sampling 2,048 tokens
    took a minute. The graph's attention reads every position of the cache, masked past the current one (a graph
    has fixed shapes; the position lives on the device). `close` gives the graph's memory back."""

    def __init__(self, model_dir: Path, rows: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg, ckpt = open_model(model_dir)
        cfg = self.cfg
        self.layers = [layer_weights(ckpt, cfg, i, dtype, device) for i in range(cfg.num_hidden_layers)]
        self.embedding = embedding_weight(ckpt, dtype, device)
        self.norm, self.head = norm_weight(ckpt, dtype, device), head_weight(ckpt, cfg, dtype, device)
        self.rope = rope_tables(cfg, length, device)
        shape = (rows, cfg.num_key_value_heads, length, cfg.head_dim)
        # Zeros, not garbage: a captured step reads the positions not yet written too (masked, but NaN · 0 is NaN).
        self.caches = [KVCache(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device)) for _ in self.layers]
        self.length, self.device = length, device
        self.steps = 0  # the next token's position, on the host
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the same, on the device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph_logits: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, visible: int) -> torch.Tensor:
        """The next-token logits (rows, vocab) in float32 after `tokens` (rows,), attending to the first `visible`
        cache positions; advances the device's position."""
        x = embed(tokens[:, None], self.embedding)
        here = Rope(*(t.index_select(0, self.position).to(x.dtype) for t in (self.rope.cos, self.rope.sin)))
        # The first `visible` positions, those after this one masked: the same mask for every layer.
        allowed = allowed_keys(self.position, visible, self.cfg.sliding_window, self.device)[0]
        for w, cache in zip(self.layers, self.caches):
            x = decoder_layer_step(x, w, self.cfg, here, cache, self.position, allowed)
        self.position += 1
        return final_logits(x[:, 0], self.norm, self.head, self.cfg.rms_norm_eps).float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next-token logits (rows, vocab) in float32 after `tokens` (rows,), the rows' next tokens."""
        if self.device.type != "cuda" or self.steps == 0:  # the first step also compiles and loads the kernels
            logits = self.forward(tokens, self.steps + 1)
        else:
            if self.graph is None:
                side = torch.cuda.Stream(self.device)
                self.graph, self.graph_logits = capture(lambda: self.forward(self.graph_tokens, self.length), side)
            self.graph_tokens.copy_(tokens)
            self.graph.replay()
            logits = self.graph_logits.clone()
        self.steps += 1
        return logits

    def close(self) -> None:
        if self.graph is not None:
            release([self.graph])
            self.graph, self.graph_logits = None, None


def cached_model_bytes(cfg: LlamaConfig, rows: int, length: int, dtype: torch.dtype) -> int:
    """The bytes CachedModel holds on its device: the model's weights and the keys and values of `rows` × `length`
    positions in every layer."""
    cache = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * length * cfg.head_dim
    return model_bytes(cfg, dtype) + cache * dtype.itemsize


def first_tokens(cfg: LlamaConfig, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Each row's first token: BOS, or a token drawn uniformly where the model has no BOS."""
    if cfg.bos_token_id is not None:
        return torch.full((rows,), cfg.bos_token_id, dtype=torch.long)
    return torch.randint(cfg.vocab_size, (rows,), generator=generator)


def sample_rows(model_dir: Path, rows: int, length: int, seed: int, temperature: float = 1.0,
                device: Device = None) -> torch.Tensor:
    """(rows, length) token ids sampled from the model in `model_dir` (module docstring). On CUDA the model runs
    in bfloat16, on the CPU in float32; the logits are float32 either way."""
    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    require_device_memory(cached_model_bytes(LlamaConfig.from_dir(model_dir), rows, length, dtype), device,
                          f"calibration.dataset=generated (the whole model and a key/value cache of {rows} rows × "
                          f"{length} tokens on the GPU)",
                          "use calibration.dataset=default or a .parquet file, or fewer calibration rows")
    model = CachedModel(model_dir, rows, length, dtype, device)
    generator = torch.Generator(device).manual_seed(seed)
    ids = torch.empty(rows, length, dtype=torch.long, device=device)
    ids[:, 0] = first_tokens(model.cfg, rows, torch.Generator().manual_seed(seed)).to(device)
    try:
        for t in progress.track(range(length - 1), "sampling calibration rows"):
            probabilities = torch.softmax(model.step(ids[:, t]) / temperature, dim=-1)
            ids[:, t + 1] = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
    finally:
        model.close()
    return ids.cpu()
