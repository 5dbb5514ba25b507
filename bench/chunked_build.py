"""Build a recipe (exlbuild's CLI, in this process) with the block passes' row chunks of another size: another draw
of the same method on the same machine (bench/results/cpu-vs-gpu.md, "draws").

    [PASS_PRECISION=MODE] python bench/chunked_build.py CHUNK_ELEMENTS recipe.yaml [exlbuild arguments ...]

A block pass runs its rows in chunks of CHUNK_ELEMENTS // (tokens × widest layer) rows (exlbuild.quant.stream). The
chunk changes only the float summation order of the Hessians (one product a chunk, added up) and of the forward's
products (cuBLAS picks its kernel by their size): the kind of difference that separates the GPU path from the CPU
path. The artifacts' keys stay the same, so build each draw in a fresh store.

PASS_PRECISION (`sweep.py --pass-precision`) sets the precision of the GPU's calibration passes for an experiment
(cpu-vs-gpu.md, session 25), by holding torch's float32 matmul precision where stream.pass_precision would change
it: `default` as built (TF32 products, float16 attention); `fp32attn` TF32 products, attention (and
attention_received) in float32; `fp32all` no TF32 and no float16 attention (what the CPU computes); `fp32meas` so in
the measurement only; `fp32quant` so everywhere but the measurement. No effect on the CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

import exlbuild.quant.exl2.measure as measure
import exlbuild.quant.stream as stream
from exlbuild.cli import main

# Where each mode holds the precision: (inside the measurement, outside it).
HELD = {"fp32all": (True, True), "fp32meas": (True, False), "fp32quant": (False, True)}
PRECISIONS = ("default", "fp32attn", *HELD)


def hold_precision(mode: str) -> None:
    """Patch torch for PASS_PRECISION `mode` (the default precision, "highest", is then kept where asked)."""
    if mode not in PRECISIONS:
        raise SystemExit(f"PASS_PRECISION={mode!r}: one of {', '.join(PRECISIONS)}")
    if mode == "fp32attn":  # llama.attention and attention_received read it to choose float16 / TF32
        torch.get_float32_matmul_precision = lambda: "highest"
    if mode not in HELD:
        return
    real_set, held = torch.set_float32_matmul_precision, (lambda precision: None)
    inside, outside = (held if hold else real_set for hold in HELD[mode])
    torch.set_float32_matmul_precision = outside
    measure_model: Callable[..., Any] = measure.measure_model  # (the rule imports it when it runs)

    def measure_at_precision(*args: Any, **kwargs: Any) -> Any:
        torch.set_float32_matmul_precision = inside
        try:
            return measure_model(*args, **kwargs)
        finally:
            torch.set_float32_matmul_precision = outside

    measure.measure_model = measure_at_precision


if __name__ == "__main__":
    hold_precision(os.environ.get("PASS_PRECISION", "default"))
    stream.CHUNK_ELEMENTS = int(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
