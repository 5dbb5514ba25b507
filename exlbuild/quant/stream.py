"""Layer-by-layer passes over calibration states: run a block on every row, collect the Hessians of its
linear layers' inputs, and checkpoint after each layer so that an interrupted pass resumes.

Both EXL2 passes (measurement, quantization) walk the model the same way: the hidden states of all
calibration rows stay in memory (rows, tokens, hidden); one layer's weights are loaded at a time.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from exlbuild.errors import ExlbuildError
from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import Rope, attention_block, mlp_block
from exlbuild.quant.gptq import HessianAccumulator

Block = Literal["attention", "mlp"]

# The block's name in module keys (model.layers.3.self_attn) and in its linears' names (self_attn.q_proj).
BLOCK_MODULES: dict[Block, str] = {"attention": "self_attn", "mlp": "mlp"}
BLOCK_LINEARS: dict[Block, tuple[str, ...]] = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


# The norm at the start of each block (stored unquantized with the layer).
BLOCK_NORMS: dict[Block, str] = {"attention": "input_layernorm.weight", "mlp": "post_attention_layernorm.weight"}
# A layer's linears and norms in model order.
LINEARS = [name for names in BLOCK_LINEARS.values() for name in names]
NORMS = list(BLOCK_NORMS.values())
# Calibration states between blocks are held in float16, as the reference converter holds them: half the
# memory of float32 (3.4 GB instead of 6.7 for 100 × 2048 rows of a 8192-wide model) for a rounding far below
# any quantization error. Each block computes in the passes' dtype (float32, or float64: recipe.PASS_DTYPES).
STATE_DTYPE = torch.float16
# Rows per chunk of a block pass: the widest intermediate of a chunk stays under this many elements.
CHUNK_ELEMENTS = 1 << 26


def check_calibration_ids(ids: Tensor, cfg: LlamaConfig) -> Tensor:
    """The calibration token rows of a pass as int64 on the CPU, after checking their shape and range."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype.is_floating_point:
        raise ExlbuildError(f"calibration ids must be integers of shape (rows, length ≥ 2), got {tuple(ids.shape)}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ExlbuildError(f"calibration ids must lie in [0, {cfg.vocab_size}), got [{ids.min()}, {ids.max()}]")
    return ids.long().cpu()


def block_weights(block: Block, w: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The block's own weights from a layer's `w`, in `dtype` (what its pass computes with; weights already in
    `dtype` are passed through, not copied)."""
    names = [BLOCK_NORMS[block]] + [f"{n}.{s}" for n in BLOCK_LINEARS[block] for s in ("weight", "bias")]
    return {n: w[n].to(dtype) for n in names if n in w}


def chunk_rows(x: Tensor, cfg: LlamaConfig) -> int:
    """Rows per chunk of a block pass over x (rows, tokens, hidden): bounded by CHUNK_ELEMENTS."""
    widest = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
    return max(1, CHUNK_ELEMENTS // (x.shape[1] * widest))


@contextmanager
def pass_precision(device: torch.device) -> Iterator[None]:
    """The calibration passes' precision on CUDA (the block passes, the Hessians, the measurement's candidate
    outputs) where they compute in float32: matrix products in TF32, several times faster on tensor cores, and,
    following that setting, attention on float16 copies of q, k and v (exlbuild.model.llama.attention: flash
    attention, ~5× faster than float32's kernel). Both round their inputs to 10 mantissa bits, as fine as the float16
    the states are held in. GPTQ itself (prepare_hessian, quantize_options) runs outside, in full float32. No effect
    on other devices, nor on float64 passes."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def not_finite(module: str, dtype: torch.dtype) -> ExlbuildError:
    """The error for a block pass whose outputs are NaN or overflow `dtype`, the dtype they are kept in."""
    return ExlbuildError(f"{module}: outputs NaN or values beyond the range of "
                         f"{str(dtype).removeprefix('torch.')} on the calibration rows")


def run_block(block: Block, x: Tensor, w: dict[str, Tensor], cfg: LlamaConfig, rope: Rope,
              out: Tensor | None = None, hessians: bool = False, module: str = "block",
              finite: Tensor | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Run the block on every row of x (rows, tokens, hidden), a chunk of rows at a time in `dtype` (the Hessians
    too).

    The outputs of the first out.shape[0] rows go into `out` (in its dtype), if given; `out` may be x itself,
    since each chunk is read before it is written. Returns the Hessian (H1) of each capture point, keyed by
    capture point, if asked (else an empty dict). Raises `not_finite` (`module` names the block) if an output
    in `out` is NaN or infinite; given `finite` (a 0-dim bool on x's device), the check goes into it instead and
    nothing is read, for a caller that reads its checks all at once (each read waits for the GPU).
    """
    acc: dict[str, HessianAccumulator] = {}

    def capture(point: str, t: Tensor) -> None:
        if point not in acc:
            acc[point] = HessianAccumulator(t.shape[-1], t.device, dtype)
        acc[point].add(t)

    weights = block_weights(block, w, dtype)
    hook = capture if hessians else None
    step = chunk_rows(x, cfg)
    rows = x.shape[0] if hessians or out is None else out.shape[0]  # rows past `out` matter only for Hessians
    read = finite is None
    if read:  # read once at the end: a read waits for the GPU
        finite = torch.ones((), dtype=torch.bool, device=x.device)
    for start in range(0, rows, step):
        chunk = x[start:start + step].to(dtype)
        with pass_precision(x.device):
            if block == "attention":
                y = attention_block(chunk, weights, cfg, rope, hook)
            else:
                y = mlp_block(chunk, weights, cfg, hook)
        if out is not None and start < out.shape[0]:
            kept = y[:out.shape[0] - start].to(out.dtype)
            finite &= torch.isfinite(kept).all()
            out[start:start + kept.shape[0]] = kept
    if read and not finite:
        raise not_finite(module, out.dtype)
    return {point: a.hessian() for point, a in acc.items()}


class LayerCheckpoint:
    """Resume state of a layer-by-layer pass, in a directory that survives a crash of the pass.

    After layer i the pass saves its named state tensors (the hidden states "x", and whatever else it carries)
    and any JSON-able notes; `load` returns where to go on.
    The states file is replaced first and the progress file last (both by rename), so a crash between the
    two only repeats layer i.

    Writing the states (hundreds of MB at the reference calibration size) takes longer than a small layer
    takes to compute, so `save` copies them to host memory and writes them on a background thread: the pass
    goes on with the next layer meanwhile. One write is in flight at a time (the next `save` waits for it),
    so every layer is still a checkpoint. Use it as a context manager: leaving the block waits for the last
    write and raises its error if it failed (unless the block is already raising one of its own).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._host: dict[str, Tensor] = {}  # reused staging buffers (pinned when the states are on a GPU)
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> "LayerCheckpoint":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.wait()
        elif self._writer is not None:  # the pass failed: finish the write, keep the pass's own error
            self._writer.join()

    def load(self) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
        """(next layer, saved state tensors by name ({} when there is no checkpoint), notes)."""
        self.wait()
        progress = self.directory / "progress.json"
        if not progress.is_file():
            return 0, {}, {}
        state = json.loads(progress.read_text())
        return state["next_layer"], load_file(str(self.directory / "states.safetensors")), state["notes"]

    def save(self, next_layer: int, states: dict[str, Tensor], notes: dict[str, Any]) -> None:
        """Start writing the tensors `states` and `notes` as the point to resume at `next_layer`; returns
        before the write is done (see the class docstring)."""
        self.wait()
        self.directory.mkdir(parents=True, exist_ok=True)
        on_gpu = any(t.is_cuda for t in states.values())
        for name, t in states.items():
            host = self._host.get(name)
            if host is None or host.shape != t.shape or host.dtype != t.dtype:
                self._host[name] = host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            host.copy_(t, non_blocking=t.is_cuda)
        self._host = {name: self._host[name] for name in states}  # drop buffers of names no longer saved
        copied = torch.cuda.Event() if on_gpu else None
        if copied is not None:
            copied.record()
        notes = json.loads(json.dumps(notes))  # a snapshot: the caller goes on changing its dicts
        self._writer = threading.Thread(target=self._write, args=(next_layer, dict(self._host), notes, copied),
                                        name="exlbuild-checkpoint")
        self._writer.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, next_layer: int, host: dict[str, Tensor], notes: dict[str, Any], copied: Any) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            tmp = self.directory / "states.safetensors.tmp"
            save_file(host, str(tmp))
            os.replace(tmp, self.directory / "states.safetensors")
            tmp = self.directory / "progress.json.tmp"
            tmp.write_text(json.dumps({"next_layer": next_layer, "notes": notes}))
            os.replace(tmp, self.directory / "progress.json")
        except BaseException as e:  # handed to the pass's thread by wait()
            self._error = e


def resume_point(checkpoint: LayerCheckpoint, fingerprint: str, what: str) -> tuple[int, dict[str, Any]]:
    """Where a pass whose finished layers are its checkpoint goes on: the next layer and the notes saved with it,
    once the notes' "fingerprint" shows they were made from the same inputs; `what` names the pass and its inputs in
    the error otherwise."""
    start, _, notes = checkpoint.load()
    if start and notes.get("fingerprint") != fingerprint:
        raise ExlbuildError(f"{checkpoint.directory} holds {what}; delete it to start over")
    return start, notes


def relative_error(out: Tensor, ref: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Mean over rows (dim 0) of ‖out − ref‖_F / ‖ref‖_F, a scalar in `dtype` on their device: rfn_error of
    the quantization pass (4.8 step 4), 1 − accuracy of the measurement (4.5 step 4)."""
    ref = ref.to(dtype)
    diff = (out.to(dtype) - ref).flatten(1).norm(dim=1)
    return (diff / ref.flatten(1).norm(dim=1)).mean()
