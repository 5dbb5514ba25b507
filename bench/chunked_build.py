"""Build a recipe (exlbuild's CLI, in this process) with the block passes' row chunks of another size: another draw
of the same method on the same machine (bench/results/cpu-vs-gpu.md, "draws").

    python bench/chunked_build.py CHUNK_ELEMENTS recipe.yaml [exlbuild arguments ...]

A block pass runs its rows in chunks of CHUNK_ELEMENTS // (tokens × widest layer) rows (exlbuild.quant.stream). The
chunk changes only the float summation order of the Hessians (one product a chunk, added up) and of the forward's
products (cuBLAS picks its kernel by their size): the kind of difference that separates the GPU path from the CPU
path. The artifacts' keys stay the same, so build each draw in a fresh store.
"""

from __future__ import annotations

import sys

import exlbuild.quant.stream as stream
from exlbuild.cli import main

if __name__ == "__main__":
    stream.CHUNK_ELEMENTS = int(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
