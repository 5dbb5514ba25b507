"""The refinement step's attention, forward and backward, two ways: key and value heads expanded to the query heads
before SDPA (exlbuild.model.llama.attention today) or SDPA's own grouped-query mode (enable_gqa=True); each with
PyTorch's deterministic algorithms on (the fits' setting) and off. Which kernels run, the time of one forward and
backward, and how far the gradients of the two ways differ.

    python bench/gqa_attention_probe.py OUT.json

Shape: a refinement step on SmolLM2 (4 rows of 2048 tokens, 9 query heads and 3 KV heads of 64, bfloat16).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdpa_probe import kernels

ROWS, HEADS, KV_HEADS, LENGTH, HEAD_DIM = 4, 9, 3, 2048, 64
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def inputs() -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(ROWS, HEADS, LENGTH, HEAD_DIM), *[(ROWS, KV_HEADS, LENGTH, HEAD_DIM)] * 2]
    return [torch.randn(s, device="cuda", generator=g).to(torch.bfloat16).requires_grad_() for s in shapes]


def expanded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = HEADS // KV_HEADS
    k, v = (t[:, :, None].expand(ROWS, KV_HEADS, group, LENGTH, HEAD_DIM).reshape(ROWS, HEADS, LENGTH, HEAD_DIM)
            for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def step(attention, leaves: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    with sdpa_kernel(BACKENDS):
        return list(torch.autograd.grad(attention(*leaves), leaves, grad))


def milliseconds(fn, repeat: int = 50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    leaves = inputs()
    grad = torch.randn(ROWS, HEADS, LENGTH, HEAD_DIM, device="cuda").to(torch.bfloat16)
    grads = {}
    for deterministic in (True, False):
        torch._C._set_deterministic_algorithms(deterministic)
        for name, attention in (("expanded", expanded), ("enable_gqa", grouped)):
            case = f"{name}, deterministic {deterministic}"
            try:
                grads[case] = step(attention, leaves, grad)
                results[case] = {"ms": milliseconds(lambda: step(attention, leaves, grad)),
                                 "kernels": kernels(lambda: step(attention, leaves, grad))}
            except RuntimeError as error:
                results[case] = {"error": str(error)[:300]}
            print(case, results[case], flush=True)
    torch._C._set_deterministic_algorithms(False)
    a, b = grads.get("expanded, deterministic True"), grads.get("enable_gqa, deterministic True")
    if a and b:
        results["gradient difference (max |a-b| / max |a|, q k v)"] = [
            float((x.float() - y.float()).abs().max() / x.float().abs().max()) for x, y in zip(a, b)]
    print(json.dumps(results, indent=1))
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
