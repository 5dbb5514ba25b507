"""The host process's memory allocator, set up for the CPU passes' pattern of allocation."""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h) and the values set: blocks up to 32 MiB (glibc's largest mmap threshold on
# 64-bit hosts) come from the heap, and up to 1 GiB of free heap top is kept rather than handed back.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse; True if it took the settings (False off glibc).

    The CPU passes (measurement, quantization, evaluation) allocate and free temporaries of megabytes thousands of
    times. By default glibc maps each block over its threshold afresh and returns it on free, or trims the heap's
    free top, and the kernel then faults every page of the next one in and zeroes it: the CPU demo took 121 million
    minor page faults and 16 % of its CPU time in the kernel (bench/NOTES.md §33). Nothing computed changes."""
    try:
        process = ctypes.CDLL(None)  # the symbols the process has loaded, libc's among them (no library search)
    except (OSError, TypeError):  # (Windows)
        return False
    mallopt = getattr(process, "mallopt", None)
    if mallopt is None or not hasattr(process, "gnu_get_libc_version"):  # not glibc (musl, macOS)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
