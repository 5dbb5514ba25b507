"""What the kernel modules share: which path runs a call, and how a kernel is launched.

Dispatch: CUDA tensors go to the Triton kernels, everything else to the PyTorch references beside them.
The references define the math; the kernels reproduce it. The environment variable EXLBUILD_KERNELS,
read at every call, overrides this: `reference` sends CUDA tensors to the references too (to compare
the two paths, or to step around a kernel problem), `triton` sends CPU tensors to the kernels too
(they then need Triton's interpreter, below: this is for tests).

Triton's interpreter runs a kernel on CPU tensors (with numpy), which is how the tests check kernels
without a GPU. Triton 3.6 decides when a `@triton.jit` function is defined whether it is compiled or
interpreted: `triton.jit` reads TRITON_INTERPRET at decoration time (triton/runtime/jit.py), and
Triton's own library functions (tl.sum, tl.max, ...) are decorated when triton.language is first
imported. So the variable must be set before anything imports Triton, in practice in the environment
of a fresh process (tests/test_kernels.py starts one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is a dependency on Linux x86-64 only (pyproject.toml); elsewhere the references run
    triton = tl = None

__all__ = ["interpreting", "jit", "launch", "tl", "use_triton"]


def jit(fn: Callable | None = None, **options: Any) -> Any:
    """`triton.jit` (also as `@jit(do_not_specialize=...)`), or the plain function where Triton is missing (the
    kernel is then never launched)."""
    if fn is None:
        return lambda f: jit(f, **options)
    return fn if triton is None else triton.jit(fn, **options)


def use_triton(*tensors: torch.Tensor, float64: bool = False) -> bool:
    """Whether a call on these tensors runs its Triton kernel rather than the reference. Float64 tensors (the passes
    at `passes.dtype: float64`, docs/exl2.md) go to the reference unless the kernel takes them (`float64`): most
    kernels compute in float32, which would undo what float64 is for."""
    mode = os.environ.get("EXLBUILD_KERNELS", "")
    if triton is None or mode == "reference":
        return False
    if not float64 and any(t.dtype == torch.float64 for t in tensors):
        return False
    return mode == "triton" or all(t.is_cuda for t in tensors)


def interpreting() -> bool:
    """Whether Triton was set up to interpret kernels (TRITON_INTERPRET=1 before Triton was imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.sum, InterpretedFunction)


def launch(kernel: Any, grid: Sequence[int], device: torch.device, *args: Any, **options: Any) -> None:
    """Run `kernel[grid](*args, **options)`, with a clear error where it cannot run.

    Compile options (num_warps, enable_fp_fusion, ...) only matter to the compiled kernel; the
    interpreter ignores them.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; the Triton kernels cannot run")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "Triton kernels run on CUDA tensors, or on CPU tensors in a process started with TRITON_INTERPRET=1"
        )
    kernel[tuple(grid)](*args, **options)
