"""Small fake rules and a graph made of them, for engine tests (also run as a script in subprocesses).

    source dir ──► text ──► upper ──► joined
                    └──────────────────┘

Every rule run appends a line to the file $ENGINE_TEST_LOG (its name, process and start time), so tests can count
how often each rule really ran, and where and when. `upper` fails while $ENGINE_TEST_UPPER_FAILS is set (the
environment reaches worker processes, which a monkeypatch does not). While $ENGINE_TEST_RENDEZVOUS names a file,
`slow` creates it as it starts and `text` waits for it: a build then succeeds only if the two run at once.
`slow` runs in steps of `step_seconds`, checkpointing each finished step into ctx.state.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from exlbuild.graph import BuildContext, Graph, Node, Rule
from exlbuild.runner import build
from exlbuild.store import Store


def log_run(name: str, extra: str = "") -> None:
    log = Path(os.environ["ENGINE_TEST_LOG"])
    with open(log, "a") as f:
        f.write(f"{name} {os.getpid()} {time.time():.3f} {extra}\n")


class Text(Rule):
    name = "text"
    version = 1

    def run(self, ctx: BuildContext):
        log_run(self.name)
        rendezvous = os.environ.get("ENGINE_TEST_RENDEZVOUS")
        if rendezvous:
            waited = 0.0
            while not Path(rendezvous).exists():
                if waited > 60:
                    raise RuntimeError("text: slow never started")
                time.sleep(0.05)
                waited += 0.05
        words = (ctx.inputs["src"] / "words.txt").read_text().split()
        (ctx.out / "text.txt").write_text(ctx.params["sep"].join(words))
        return {"words": len(words)}


class Upper(Rule):
    name = "upper"
    version = int(os.environ.get("ENGINE_TEST_UPPER_VERSION", "1"))

    def run(self, ctx: BuildContext):
        log_run(self.name)
        if os.environ.get("ENGINE_TEST_UPPER_FAILS"):
            raise RuntimeError("upper failed on purpose")
        (ctx.out / "upper.txt").write_text((ctx.inputs["text"] / "text.txt").read_text().upper())


class Slow(Rule):
    """Counts to `steps`, one checkpoint file per finished step; resumes after the last one."""

    name = "slow"
    version = 1

    def run(self, ctx: BuildContext):
        done = len(list(ctx.state.glob("step-*")))
        log_run(self.name, f"start={done}")
        if os.environ.get("ENGINE_TEST_RENDEZVOUS"):
            Path(os.environ["ENGINE_TEST_RENDEZVOUS"]).touch()
        for i in range(done, ctx.params["steps"]):
            time.sleep(ctx.params["step_seconds"])
            (ctx.state / f"step-{i:03d}").write_text(str(i))
        (ctx.out / "count.txt").write_text(str(ctx.params["steps"]))


class Joined(Rule):
    name = "joined"
    version = 1

    def run(self, ctx: BuildContext):
        log_run(self.name)
        parts = [(ctx.inputs[k] / f).read_text() for k, f in (("text", "text.txt"), ("upper", "upper.txt"),
                                                               ("slow", "count.txt"))]
        (ctx.out / "joined.txt").write_text("|".join(parts))


def make_graph(src: Path, sep: str = " ", steps: int = 1, step_seconds: float = 0.0,
               export: str | None = None) -> Graph:
    source = Node("src", "model", source_dir=src)
    text = Node("text", "calibration", rule=Text(), params={"sep": sep}, deps={"src": source})
    upper = Node("upper", "measurement", rule=Upper(), deps={"text": text})
    slow = Node("slow", "quantized", rule=Slow(), params={"steps": steps, "step_seconds": step_seconds})
    joined = Node("joined", "compiled", rule=Joined(), deps={"text": text, "upper": upper, "slow": slow},
                  export_dir=Path(export) if export else None)
    return Graph([joined])


def run(store_root: Path, src: Path, jobs: int = 1, **kw) -> list:
    store = Store(store_root)
    graph = make_graph(src, **kw)
    graph.resolve(store.hashes)
    try:
        return build(graph, store, {}, say=lambda m: print(m, flush=True), jobs=jobs)
    finally:
        store.close()


if __name__ == "__main__":
    # python engine_graph.py STORE SRC '{"steps": 5, "step_seconds": 0.2}'
    outcomes = run(Path(sys.argv[1]), Path(sys.argv[2]), **json.loads(sys.argv[3]))
    print(json.dumps({o.node.name: o.state for o in outcomes}), flush=True)
