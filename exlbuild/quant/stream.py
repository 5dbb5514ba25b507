"""Layer-by-layer passes over calibration states: run a block on every row, collect the Hessians of its
linear layers' inputs, and checkpoint after each layer so that an interrupted pass resumes.

Both EXL2 passes (measurement, quantization) walk the model the same way: the hidden states of all
calibration rows stay in memory (rows, tokens, hidden); one layer's weights are loaded at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from exlbuild.model.config import LlamaConfig
from exlbuild.model.llama import Rope, attention_block, mlp_block
from exlbuild.quant.gptq import HessianAccumulator

Block = Literal["attention", "mlp"]

# The capture points (exlbuild.model.llama.LINEAR_INPUTS) whose Hessians each block needs.
BLOCK_INPUTS: dict[Block, tuple[str, ...]] = {"attention": ("attn_input", "attn_output"),
                                               "mlp": ("mlp_input", "mlp_hidden")}
# The block's name in module keys (model.layers.3.self_attn) and in its linears' names (self_attn.q_proj).
BLOCK_MODULES: dict[Block, str] = {"attention": "self_attn", "mlp": "mlp"}
BLOCK_LINEARS: dict[Block, tuple[str, ...]] = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


def run_block(block: Block, x: Tensor, w: dict[str, Tensor], cfg: LlamaConfig, rope: Rope,
              hessians: bool = False, batch_rows: int = 8) -> tuple[Tensor, dict[str, Tensor]]:
    """The block's output for every row of x (rows, tokens, hidden), `batch_rows` rows at a time, and, if
    asked, the Hessian (H1) of each of its capture points, keyed by capture point."""
    acc: dict[str, HessianAccumulator] = {}

    def capture(point: str, t: Tensor) -> None:
        if point not in acc:
            acc[point] = HessianAccumulator(t.shape[-1], t.device)
        acc[point].add(t)

    out = torch.empty_like(x)
    for start in range(0, x.shape[0], batch_rows):
        chunk = x[start:start + batch_rows]
        hook = capture if hessians else None
        out[start:start + batch_rows] = (attention_block(chunk, w, cfg, rope, hook) if block == "attention"
                                         else mlp_block(chunk, w, cfg, hook))
    return out, {point: a.hessian() for point, a in acc.items()}


@dataclass
class LayerCheckpoint:
    """Resume state of a layer-by-layer pass, in a directory that survives a crash of the pass.

    After layer i the pass saves the hidden states and any JSON-able notes; `load` returns where to go on.
    The states file is replaced first and the progress file last (both by rename), so a crash between the
    two only repeats layer i.
    """

    directory: Path

    def load(self) -> tuple[int, Tensor | None, dict[str, Any]]:
        """(next layer, saved states or None, notes)."""
        progress = self.directory / "progress.json"
        if not progress.is_file():
            return 0, None, {}
        state = json.loads(progress.read_text())
        x = load_file(str(self.directory / "states.safetensors"))["x"]
        return state["next_layer"], x, state["notes"]

    def save(self, next_layer: int, x: Tensor, notes: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / "states.safetensors.tmp"
        save_file({"x": x.contiguous().cpu()}, str(tmp))
        os.replace(tmp, self.directory / "states.safetensors")
        tmp = self.directory / "progress.json.tmp"
        tmp.write_text(json.dumps({"next_layer": next_layer, "notes": notes}))
        os.replace(tmp, self.directory / "progress.json")


def relative_error(out: Tensor, ref: Tensor) -> float:
    """Mean over rows (dim 0) of ‖out − ref‖_F / ‖ref‖_F: rfn_error of the quantization pass (4.8 step 4),
    1 − accuracy of the measurement (4.5 step 4)."""
    diff = (out.float() - ref.float()).flatten(1).norm(dim=1)
    return (diff / ref.float().flatten(1).norm(dim=1)).mean().item()
