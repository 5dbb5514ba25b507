"""Which attention kernel each of exlbuild's attention calls gets on the GPU, what its first call in a process costs,
and how far a float16 flash attention lands from the float32 one the calibration passes use.

    python bench/sdpa_probe.py OUT.json

Shapes: SmolLM2's 9 heads of 64, 2048 positions; 21 rows (a pass's chunk) and 4 rows (a refinement step).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile


def qkv(rows: int, dtype: torch.dtype, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(rows, 9, 2048, 64, device="cuda", generator=g).to(dtype).requires_grad_(grad)
            for _ in range(3)]


def timed(fn, repeat: int = 1) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention through PyTorch's flash attention, KV heads read in place (what the fits ran before
    kernels/attention.py; the benches' yardstick)."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def kernels(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key[:90] for e in prof.key_averages() if e.device_type.name == "CUDA"})


def main() -> None:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cases = {
        "bf16 train, 4 rows": (lambda: F.scaled_dot_product_attention(*qkv(4, torch.bfloat16, True), is_causal=True)
                               .sum().backward()),
        "bf16 inference, 21 rows": lambda: _infer(qkv(21, torch.bfloat16)),
        "f32 inference, 21 rows": lambda: _infer(qkv(21, torch.float32)),
        "f16 inference, 21 rows": lambda: _infer(qkv(21, torch.float16)),
    }
    for name, fn in cases.items():
        first = timed(fn)
        results[name] = {"first_s": first, "then_ms": timed(fn, 5) * 1e3, "kernels": kernels(fn)}
        print(name, results[name], flush=True)
    q, k, v = qkv(21, torch.float32)
    with torch.inference_mode():
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True).double()
            results[f"error {dtype}"] = ((out - exact).norm() / exact.norm()).item()
    print(json.dumps(results, indent=1))
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


@torch.inference_mode()
def _infer(t: list[torch.Tensor]) -> torch.Tensor:
    return F.scaled_dot_product_attention(*t, is_causal=True)


if __name__ == "__main__":
    main()
