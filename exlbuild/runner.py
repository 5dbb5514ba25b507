"""Run a graph: decide what is stale, build it in order under per-artifact locks, report.

A node is up to date when the store holds an artifact with its key. Otherwise it is built under the lock
of its key; a process that finds the lock taken waits, then finds the artifact published and reuses it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exlbuild import progress
from exlbuild.errors import ExlbuildError
from exlbuild.graph import BuildContext, Graph, Node, explain
from exlbuild.store import Store, tree_size

UP_TO_DATE, BUILT, REUSED, FAILED, STALE = "up to date", "built", "reused", "failed", "stale"


@dataclass
class Outcome:
    node: Node
    state: str
    seconds: float = 0.0
    size: int = 0


@dataclass
class NodeStatus:
    node: Node
    state: str  # UP_TO_DATE or STALE
    reasons: list[str]


def status(graph: Graph, store: Store, previous: dict[str, Any]) -> list[NodeStatus]:
    """Each node's state, and for stale ones why (against the previous lock entries)."""
    out = []
    for node in graph.nodes:
        if node.is_source or store.has(node.rule_name, node.key):
            out.append(NodeStatus(node, UP_TO_DATE, []))
            continue
        prev = previous.get(node.name)
        reasons = explain(node, prev)
        if prev is not None and prev.get("key") == node.key:
            reasons = ["artifact missing from the store (cleaned or collected)"]
        out.append(NodeStatus(node, STALE, reasons))
    return out


def build(graph: Graph, store: Store, previous: dict[str, Any], say: Callable[[str], None]) -> list[Outcome]:
    """Build every stale node in order. Stops at the first failure (its dependents cannot be built)."""
    outcomes: list[Outcome] = []
    for st in status(graph, store, previous):
        node = st.node
        start = time.perf_counter()
        if st.state == UP_TO_DATE:
            state = UP_TO_DATE
        else:
            try:
                with store.lock(node.key, on_wait=lambda who: say(f"waiting for {node.name}: {who} is building it")):
                    if store.has(node.rule_name, node.key):
                        state = REUSED
                    else:
                        say(f"building {node.name} ({node.kind}): {'; '.join(st.reasons)}")
                        _build_one(node, store)
                        state = BUILT
            except BaseException as e:
                outcomes.append(Outcome(node, FAILED, time.perf_counter() - start))
                raise BuildFailed(outcomes, e) from e
        if node.export_dir is not None and store.export(node.rule_name, node.key, node.export_dir):
            say(f"exported {node.name} to {node.export_dir}")
        seconds = time.perf_counter() - start if state != UP_TO_DATE else 0.0
        outcomes.append(Outcome(node, state, seconds, _size(node, store)))
    return outcomes


class BuildFailed(Exception):
    def __init__(self, outcomes: list[Outcome], cause: BaseException):
        super().__init__(str(cause))
        self.outcomes = outcomes
        self.cause = cause


def _build_one(node: Node, store: Store) -> None:
    assert node.rule is not None
    out, state = store.begin(node.rule_name, node.key)
    inputs = {label: (dep.source_dir or store.data_dir(dep.rule_name, dep.key)) for label, dep in node.deps.items()}
    manifests = {label: store.manifest(dep.rule_name, dep.key) for label, dep in node.deps.items() if not dep.is_source}
    before = {label: _stamp(p) for label, p in node.sources.items()}
    started = datetime.datetime.now(datetime.timezone.utc)
    _reset_gpu_peak()
    t0 = time.perf_counter()
    with progress.task(f"{node.name}", None):
        metrics = node.rule.run(BuildContext(out=out, state=state, inputs=inputs, manifests=manifests,
                                             sources=node.sources, params=node.params)) or {}
    seconds = time.perf_counter() - t0
    peak = _gpu_peak()
    if peak is not None:
        metrics = {**metrics, "peak_gpu_bytes": peak}
    for label, p in node.sources.items():
        if _stamp(p) != before[label]:
            raise ExlbuildError(f"{p} changed while {node.name} was being built from it; run the build again")
    store.publish(node.rule_name, node.key, {
        "target": node.name,
        "kind": node.kind,
        "rule": node.rule_name,
        "version": node.rule.version,
        "key": node.key,
        "params": node.params,
        "inputs": {label: dep.key for label, dep in node.deps.items()},
        "sources": {label: {"path": str(p), "hash": node.key_inputs["sources"][label]} for label, p in node.sources.items()},
        "metrics": metrics,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "environment": environment(),
    })


def _reset_gpu_peak() -> None:
    torch = sys.modules.get("torch")  # a rule imports torch; never import it here just to ask
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> int | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def _stamp(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _size(node: Node, store: Store) -> int:
    if node.source_dir is not None:
        return tree_size(node.source_dir)
    manifest = store.manifest(node.rule_name, node.key)
    return sum(f["size"] for f in manifest["files"].values())


def environment() -> dict[str, Any]:
    """Versions that can change an artifact's bytes. Never imports torch just to ask."""
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("exlbuild", "torch", "triton", "safetensors", "tokenizers"):
        env[dist] = version(dist)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
