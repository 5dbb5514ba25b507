"""Copies between host memory and the GPU that do not make the host wait for the GPU.

A copy from pageable host memory to the GPU, and any copy from the GPU that the host then reads (`.cpu()`), first
waits for the GPU to finish everything queued before it; on the quantization pass's host-bound loops those waits
were most of the wall time (bench/NOTES.md §25). Through page-locked memory both directions are queued like kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

PINNED_COPY_BYTES = 1 << 28  # to_device: larger host tensors are copied from where they are


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """t on `device`. A host tensor bound for a GPU crosses from page-locked memory without waiting: a copy from
    pageable memory first waits for the GPU to finish its queue. Past PINNED_COPY_BYTES it does wait (rare, and
    short beside such a copy): page-locked blocks stay allocated, rounded up to a power of two."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu" or (
        t.nbytes > PINNED_COPY_BYTES and not t.is_pinned()
    ):
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # (pin_memory of a pinned tensor is the tensor itself)


def to_host(t: Tensor) -> Tensor:
    """A contiguous copy of t in host memory. From a GPU it goes into page-locked memory without waiting (`.cpu()`
    waits for the GPU): read it only after a read of a device value issued later (which waits for the copy too)."""
    if t.device.type != "cuda":
        return t.contiguous().cpu()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
