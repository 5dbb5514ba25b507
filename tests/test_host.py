"""The host allocator's setup (exlbuild.host): freed blocks are reused, not faulted in afresh."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import textwrap

import pytest

# A CPU pass's pattern between its GEMMs, in a fresh process: temporaries of megabytes, written, then freed
# (16 × 2 MiB, 30 times over); the page faults after the first round.
CHURN = textwrap.dedent("""
    import resource, torch
    from exlbuild.host import reuse_freed_memory
    assert reuse_freed_memory()
    torch.set_num_threads(1)
    def churn():
        blocks = [torch.empty(1 << 19).fill_(1.0) for _ in range(16)]
        del blocks
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
ROUND_PAGES = 16 * (2 << 20) // resource.getpagesize()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc")
def test_freed_blocks_are_reused() -> None:
    faults = int(subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True).stdout)
    # Without the settings glibc maps and trims such blocks afresh for the first rounds: 8,700–16,900 faults here
    # (2–4 rounds' pages in all); with them, under one round's pages over all 30 rounds.
    assert faults < ROUND_PAGES
