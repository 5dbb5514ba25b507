"""How the tuning's memory grows with the depth, on the CPU (where the C heap can be read): a step should keep one
input of its rows per layer for the backward pass (the layers are checkpointed), and nothing else that grows.

    python bench/tune_memory.py [--layers 2 4 8] [--out bench/results/tune-memory-cpu.md]

For random models of one small shape at several depths, quantized at ~2.5 bits, three tuning steps of 2 rows × 512
tokens with the layers streamed; the live bytes of glibc's heap (mallinfo2) are read where a step starts (its
embedding), at the end of its forward pass (where the KL is taken) and at every decoder layer call (forward and
recomputation), and reported above the step's start. Uses the test suite's model fixtures (tests/).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from model_fixtures import tiny_model  # noqa: E402
from test_exl2_convert import SHAPE, strategy  # noqa: E402

from exlbuild.quant.exl2 import tune  # noqa: E402
from exlbuild.quant.exl2.convert import quantize_model  # noqa: E402

ROWS, LENGTH, STEP_ROWS, HIDDEN, STEPS = 8, 512, 2, 256, 3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def live_bytes() -> int:
    """Bytes the C heap holds for the process now: small blocks in use plus mmapped large ones."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def measure(layers: int, work: Path) -> dict[str, float]:
    """MiB above the last step's start: at the end of its forward pass and the most at any layer call."""
    model = tiny_model(work / "model", vocab_size=256, num_hidden_layers=layers,
                       **dict(SHAPE, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN))
    ids = torch.randint(0, 256, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    quantize_model(model, ids, strategy(layers, 1, 1), 4, work / "quantized")
    marks: dict[str, list[int]] = {"start": [], "forward": [], "layer": []}

    def recording(name: str, fn):
        def call(*args, **kwargs):
            if name == "forward" and not kwargs.get("grad"):
                return fn(*args, **kwargs)
            marks[name].append(live_bytes())
            out = fn(*args, **kwargs)
            if name == "layer":  # and as the layer's activations stand at its end
                marks[name].append(live_bytes())
            return out
        return call

    patched = {"embed": "start", "next_token_kl": "forward", "decoder_layer": "layer"}
    originals = {attr: getattr(tune, attr) for attr in patched}
    try:
        for attr, name in patched.items():
            setattr(tune, attr, recording(name, originals[attr]))
        tune.tune_model(model, work / "quantized", work / "tuned", ids, steps=STEPS, lr=1e-3, rows_per_step=STEP_ROWS,
                        stream_layers=True)
    finally:
        for attr, fn in originals.items():
            setattr(tune, attr, fn)
    # The last step's marks (the written model's perplexity pass embeds once more, after the steps).
    start = marks["start"][STEPS - 1]
    last_step = marks["layer"][(STEPS - 1) * 2 * layers * 2:]  # two calls a layer (forward, recomputation), each marked twice
    return {"forward": (marks["forward"][-1] - start) / 2**20, "peak": (max(last_step) - start) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune-memory-cpu.md")
    args = ap.parse_args()
    input_mib = STEP_ROWS * LENGTH * HIDDEN * 4 / 2**20  # one layer's input of a step's rows, float32 on the CPU
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            m = measure(layers, Path(tmp) / str(layers))
            rows.append((layers, m))
            print(layers, m, flush=True)
    lines = ["# The tuning's memory against the depth (CPU, glibc heap)", "",
             f"Hidden {HIDDEN}, {STEP_ROWS} rows × {LENGTH} tokens a step: one layer's input is {input_mib:.2f} MiB. "
             "MiB above the step's start:", "",
             "| layers | end of forward | peak at a layer call | growth a layer (from the row before) |",
             "| ---: | ---: | ---: | ---: |"]
    for k, (layers, m) in enumerate(rows):
        growth = "" if k == 0 else f"{(m['peak'] - rows[k - 1][1]['peak']) / (layers - rows[k - 1][0]):.2f}"
        lines.append(f"| {layers} | {m['forward']:.2f} | {m['peak']:.2f} | {growth} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
