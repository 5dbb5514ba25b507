"""Which Triton kernels a build compiles, when, and for how long: runs `exlbuild` in this process with every
Triton compile (or load from Triton's cache) timed, and writes them as JSON.

    python bench/compile_log.py OUT.json recipe.yaml [exlbuild arguments ...]

Each entry: kernel, seconds since the process started, seconds the compile took, and its constexprs. Run with
TRITON_CACHE_DIR set to an empty folder to see a fresh machine's compiles.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from triton.runtime.jit import JITFunction

STARTED, STARTED_WALL = time.perf_counter(), time.time()


def steps_of(store: Path) -> list[tuple[str, float, float]]:
    """(rule/key, start, end) of every artifact in `store`, in seconds since this process started."""
    steps = []
    for manifest in store.glob("*/*/manifest.json"):
        m = json.loads(manifest.read_text())
        start = datetime.datetime.fromisoformat(m["started"]).timestamp() - STARTED_WALL
        steps.append((f"{manifest.parent.parent.name}/{manifest.parent.name[:8]}", start, start + m["seconds"]))
    return sorted(steps, key=lambda s: s[1])


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    entries: list[dict] = []
    do_compile = JITFunction._do_compile

    def timed(self, key, signature, device, constexprs, options, attrs, warmup):
        t0 = time.perf_counter()
        kernel = do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        entries.append({"kernel": self._fn_name, "at": round(t0 - STARTED, 3),
                        "seconds": round(time.perf_counter() - t0, 4),
                        "constexprs": {str(k): str(v) for k, v in constexprs.items()}})
        return kernel

    JITFunction._do_compile = timed
    from exlbuild.cli import main as exlbuild

    try:
        exlbuild(argv)
    finally:
        steps = steps_of(Path(argv[0]).parent / ".exlbuild" / "store")
        by_step: dict[str, float] = defaultdict(float)
        for e in entries:
            # Steps run one at a time (-j 1) and their start is kept in whole seconds: the last one begun.
            e["step"] = ([name for name, a, _ in steps if a <= e["at"] + 0.5] or ["-"])[-1]
            by_step[e["step"]] += e["seconds"]
        total = sum(e["seconds"] for e in entries)
        out.write_text(json.dumps({"compiles": len(entries), "seconds": round(total, 3),
                                   "steps": [{"step": n, "start": round(a, 2), "end": round(b, 2),
                                              "compile_seconds": round(by_step.get(n, 0.0), 3)}
                                             for n, a, b in steps],
                                   "entries": entries}, indent=1))
        print(f"{len(entries)} Triton compiles, {total:.1f} s")
        for n, a, b in steps:
            print(f"{n:40s} {a:7.1f} {b - a:6.1f} s, compiles {by_step.get(n, 0.0):5.2f} s")


if __name__ == "__main__":
    main()
