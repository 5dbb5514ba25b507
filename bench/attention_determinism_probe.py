"""What PyTorch's deterministic mode costs the fits' attention: each SDPA backend at the refinement's and the tuning's
shapes (4 and 2 rows of SmolLM2: 9 query heads and 3 KV heads of 64, 2048 positions, causal, bfloat16), with the
deterministic mode on and off, KV heads grouped in the kernel or expanded: forward and backward time, forward alone,
and whether the gradients repeat bit for bit over five runs. (The fits run in the deterministic mode so that a rebuild
is byte-identical: exlbuild.quant.exl2.tune.deterministic_algorithms.)

    python bench/attention_determinism_probe.py > bench/results/attention-determinism-h100.txt
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sdpa_probe import timed
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, POSITIONS, HEAD_DIM = 9, 3, 2048, 64
REPEAT = 50


def case(rows: int, backend: SDPBackend, deterministic: bool, grouped: bool) -> str:
    torch._C._set_deterministic_algorithms(deterministic)
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(heads: int, grad: bool = True) -> torch.Tensor:
        x = torch.randn(rows, heads, POSITIONS, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        return x.requires_grad_(grad)

    q, k, v, grad_out = randn(HEADS), randn(KV_HEADS), randn(KV_HEADS), randn(HEADS, grad=False)

    def forward() -> torch.Tensor:
        keys, values = k, v
        if not grouped:
            keys, values = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=grouped)

    def step() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(forward(), [q, k, v], grad_out)

    try:
        first = step()
    except RuntimeError as e:
        return f"fails: {str(e).splitlines()[0][:80]}"
    repeatable = all(all(torch.equal(a, b) for a, b in zip(step(), first)) for _ in range(5))

    both = timed(step, REPEAT)
    with torch.no_grad():
        alone = timed(forward, REPEAT)
    return f"forward+backward {both * 1e3:.3f} ms, forward {alone * 1e3:.3f} ms, repeatable {repeatable}"


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), "cuDNN", torch.backends.cudnn.version())
    for rows in (4, 2):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for deterministic in (True, False):
                for grouped in (True, False):
                    print(f"rows={rows} {backend.name:19s} deterministic={deterministic!s:5s} grouped={grouped!s:5s}",
                          case(rows, backend, deterministic, grouped), flush=True)


if __name__ == "__main__":
    main()
