"""attention_received on CUDA: the PyTorch reference (explicit probabilities) against the Triton kernels.

    python attention_received_bench.py [--rows 100] [--seq 2048] [--reps 10] [--out results/attention-received.txt]

At SmolLM2-135M's attention (9 query heads, 3 KV heads, head_dim 64) for the quantization pass's rows (100 × 2048
tokens), on float32 inputs under torch.set_float32_matmul_precision("high") as the calibration passes run (TF32
products in both paths), and under "highest" for comparison. Times are medians of CUDA-event timings of whole
calls; errors are the largest difference from a float64 computation of the definition on a few rows, relative to
each row's largest weight. Prints a table and writes it to --out.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from exlbuild.kernels.attention_received import attention_received_reference, attention_received_triton

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def inputs(rows: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Roped-like q (rows, heads, seq, dim) and k in the model's layout (heads strided), with an attention sink: the
    first key aligned with a direction every query shares (logits up to ~30, as trained models' are)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    sink = torch.randn(HEAD_DIM, device="cuda", generator=g)
    q = torch.randn(rows, seq, HEADS, HEAD_DIM, device="cuda", generator=g)
    q += sink * torch.rand(rows, seq, HEADS, 1, device="cuda", generator=g)
    k = torch.randn(rows, seq, KV_HEADS, HEAD_DIM, device="cuda", generator=g)
    k[:, 0] += 4 * sink
    return q.transpose(1, 2), k.transpose(1, 2)


def exact(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The definition in float64, one row at a time: causal softmax over the keys, summed over heads and queries,
    / heads."""
    seq = q.shape[2]
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    out = []
    for r in range(q.shape[0]):
        keys = k[r].double().repeat_interleave(HEADS // KV_HEADS, dim=0)
        logits = q[r].double() @ keys.mT / HEAD_DIM**0.5
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        out.append(probs.sum(dim=(0, 1)) / HEADS)
    return torch.stack(out)


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # compile and warm the allocator outside the timing
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(ours: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((ours.double() - truth).abs() / truth.abs().amax(-1, keepdim=True)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--check-rows", type=int, default=4, help="rows compared with the float64 computation")
    parser.add_argument("--out", type=Path, default=Path("results/attention-received.txt"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    q, k = inputs(args.rows, args.seq)
    truth = exact(q[: args.check_rows], k[: args.check_rows])
    scale = HEAD_DIM**-0.5
    lines = [
        f"attention_received, {torch.cuda.get_device_name()}: {args.rows} rows × {args.seq} tokens, "
        f"{HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}, float32 inputs",
        f"{'path':<10} {'precision':<9} {'ms':>9} {'max rel error':>14}",
    ]
    times = {}
    for precision in ("high", "highest"):
        torch.set_float32_matmul_precision(precision)
        for name, fn in (("reference", attention_received_reference), ("triton", attention_received_triton)):
            ms = median_ms(lambda: fn(q, k, scale, None), args.reps)
            error = relative_error(fn(q[: args.check_rows], k[: args.check_rows], scale, None), truth)
            times[name, precision] = ms
            lines.append(f"{name:<10} {precision:<9} {ms:9.2f} {error:14.2e}")
    torch.set_float32_matmul_precision("high")
    ours = attention_received_triton(q, k, scale, None)
    deterministic = all(torch.equal(attention_received_triton(q, k, scale, None), ours) for _ in range(3))
    lines.append(f"speed-up at 'high': {times['reference', 'high'] / times['triton', 'high']:.1f}×; "
                 f"Triton's bits the same on every run: {deterministic}")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
