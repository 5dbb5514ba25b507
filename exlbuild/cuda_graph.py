"""CUDA graphs: captures that other threads may use the GPU beside, and the release of what captures keep.

Loops of thousands of small kernels (a fit's step, GPTQ's row loop) took longer to launch from Python than to run;
captured once and replayed, each is one launch. A replay runs the captured kernels on the captured tensors, so a
caller fills its inputs in place before and copies its outputs out after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], stream: torch.cuda.Stream, pool: tuple[int, int] | None = None
            ) -> tuple[torch.cuda.CUDAGraph, T]:
    """The kernels `fn` queues, captured on `stream` (a side stream: the current one cannot capture), and what `fn`
    returned; nothing runs until a replay. The side stream first waits for the current one (the captured kernels
    read what the current stream's queued work writes), and the current stream then waits for whatever the side
    stream held before the capture, so replays on the current stream come after both. `pool`: a memory pool shared
    with other graphs (their temporaries then take the same memory: replay them one after another). Not
    torch.cuda.graph, which also waits for the device and empties the allocator's cache first. Thread-local: the
    layers' reader thread may pin host memory meanwhile, which a global capture forbids to every thread."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        result = fn()
        graph.capture_end()
    current.wait_stream(stream)
    return graph, result


def release(graphs: Iterable[torch.cuda.CUDAGraph]) -> None:
    """Give back the memory of `graphs`' pools. cuBLAS keeps a workspace per (handle, stream) for the process's
    life; one first taken inside a capture lies in that graph's pool and would keep all of it (GBs) allocated, so
    the workspaces go too (as PyTorch's own graph trees do). Even empty, a pool stays reserved until the cache is
    emptied: one pool per tuned variant filled the H100 at the fifth."""
    for graph in graphs:
        graph.reset()
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
