"""Perplexity of a model directory through exlbuild's own layer-by-layer forward.

What is counted: the token stream is cut into non-overlapping windows of `window` tokens (a final partial window
is dropped). Each window is run on its own, from position 0, with no BOS added and no context from the previous
window; within it, tokens 1..window-1 are predicted from the tokens before them. So `tokens` is
windows * (window - 1), and perplexity is exp(total negative log-likelihood / tokens), in natural log.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from exlbuild.errors import ExlbuildError
from exlbuild.model.checkpoint import Device, head_weight, norm_weight, open_model
from exlbuild.model.llama import final_logits, forward_hidden
from exlbuild.model.tokenizer import load_tokenizer


@torch.inference_mode()
def perplexity(
    model_dir: Path,
    ids: torch.Tensor,
    window: int = 1024,
    max_windows: int | None = None,
    device: Device = None,
) -> dict[str, float | int]:
    """Perplexity of the model on the 1-D token stream `ids`; returns perplexity, tokens and windows."""
    cfg, ckpt = open_model(model_dir)
    if window < 2:
        raise ExlbuildError(f"evaluation window must be at least 2 tokens, got {window}")
    if window > cfg.max_position_embeddings:
        raise ExlbuildError(
            f"evaluation window {window} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})"
        )
    ids = torch.as_tensor(ids).flatten().long()
    windows = len(ids) // window
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ExlbuildError(f"evaluation text has {len(ids)} tokens, fewer than one window of {window}")
    rows = ids[: windows * window].view(windows, window)

    # All windows go through each layer before the next layer is loaded; only the head runs row by row, since
    # one row's logits (window x vocab) are already the largest tensor here.
    x = forward_hidden(ckpt, cfg, rows, device=device)
    norm_w, head_w = norm_weight(ckpt, device=x.device), head_weight(ckpt, cfg, device=x.device)
    targets = rows.to(x.device)
    nll = 0.0
    for r in range(windows):
        logits = final_logits(x[r, :-1], norm_w, head_w, cfg.rms_norm_eps)
        nll += F.cross_entropy(logits, targets[r, 1:], reduction="sum").item()
    tokens = windows * (window - 1)
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens, "windows": windows}


def read_text(text_path: Path, text_column: str = "text") -> str:
    """The text of a .txt file, or of a .parquet file's `text_column` with rows joined by blank lines."""
    text_path = Path(text_path)
    if not text_path.is_file():
        raise ExlbuildError(f"evaluation text {text_path} does not exist")
    suffix = text_path.suffix.lower()
    if suffix == ".txt":
        return text_path.read_text(encoding="utf-8")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(text_path)
        if text_column not in schema.names:
            raise ExlbuildError(f"{text_path} has no column '{text_column}'; columns: {', '.join(schema.names)}")
        kind = schema.field(text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ExlbuildError(f"column '{text_column}' of {text_path} holds {kind}, not text")
        column = pq.read_table(text_path, columns=[text_column]).column(text_column)
        return "\n\n".join(s for s in column.to_pylist() if s)
    raise ExlbuildError(f"evaluation text {text_path} must be a .txt or .parquet file")


def evaluate(
    model_dir: Path,
    text_path: Path,
    window: int = 1024,
    max_windows: int | None = None,
    text_column: str = "text",
    device: Device = None,
) -> dict[str, float | int]:
    """Tokenize `text_path` with the model's tokenizer (no BOS/EOS) and return `perplexity` on it."""
    ids = load_tokenizer(Path(model_dir)).encode(read_text(text_path, text_column))
    return perplexity(model_dir, torch.tensor(ids, dtype=torch.long), window, max_windows, device)
