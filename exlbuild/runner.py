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
from exlbuild.host import reuse_freed_memory
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
            reasons = ["artifact missing from the store (cleaned, collected, or locked on another machine)"]
        out.append(NodeStatus(node, STALE, reasons))
    return out


def build(graph: Graph, store: Store, previous: dict[str, Any], say: Callable[[str], None],
          jobs: int = 1) -> list[Outcome]:
    """Build every stale node, inputs first; `jobs` > 1 builds up to that many at once, each in a worker process
    (`_build_in_parallel`). Stops at the first failure: its dependents cannot be built, and no other node is
    started after it."""
    statuses = status(graph, store, previous)
    if jobs > 1:
        return _build_in_parallel(statuses, store, say, jobs)
    outcomes: list[Outcome] = []
    rehearsals: dict[str, Callable[[], str | None]] = {}
    try:
        for st in statuses:
            _start_rehearsals(statuses, store, rehearsals)
            start = time.perf_counter()
            state = UP_TO_DATE
            if st.state == STALE:
                try:
                    state = _build_locked(st, store, say)
                except BaseException as e:
                    outcomes.append(Outcome(st.node, FAILED, time.perf_counter() - start))
                    raise BuildFailed(outcomes, e) from e
            outcomes.append(_finished(st.node, state, time.perf_counter() - start, store, say))
    finally:
        for stop in rehearsals.values():
            failure = stop()
            if failure:  # only a lost speed-up: the build itself is unaffected
                say(f"note: {failure}")
    return outcomes


def _start_rehearsals(statuses: list[NodeStatus], store: Store,
                      rehearsals: dict[str, Callable[[], str | None]]) -> None:
    """Start the rehearsal (Rule.rehearse) of each rule's first stale node not yet built, once per rule and build,
    as soon as the rule starts one with the inputs there now (into `rehearsals`: rule name -> what ends it)."""
    for st in statuses:
        node = st.node
        if st.state != STALE or node.rule is None or node.rule_name in rehearsals:
            continue
        if store.has(node.rule_name, node.key):
            continue
        ready = {label: dep.source_dir or store.data_dir(dep.rule_name, dep.key) for label, dep in node.deps.items()
                 if dep.is_source or store.has(dep.rule_name, dep.key)}
        stop = node.rule.rehearse(node, ready)
        if stop is not None:
            rehearsals[node.rule_name] = stop


def _build_locked(st: NodeStatus, store: Store, say: Callable[[str], None]) -> str:
    """Build a stale node under its lock, unless another process published it meanwhile: BUILT or REUSED."""
    node = st.node
    with store.lock(node.key, on_wait=lambda who: say(f"waiting for {node.name}: {who} is building it")):
        if store.has(node.rule_name, node.key):
            return REUSED
        say(f"building {node.name} ({node.kind}): {'; '.join(st.reasons)}")
        _build_one(node, store)
        return BUILT


def _finished(node: Node, state: str, seconds: float, store: Store, say: Callable[[str], None]) -> Outcome:
    """The outcome of a node that is up to date, built or reused, its export refreshed."""
    if node.export_dir is not None and store.export(node.rule_name, node.key, node.export_dir):
        say(f"exported {node.name} to {node.export_dir}")
    return Outcome(node, state, seconds if state != UP_TO_DATE else 0.0, _size(node, store))


def _build_in_parallel(statuses: list[NodeStatus], store: Store, say: Callable[[str], None],
                       jobs: int) -> list[Outcome]:
    """Up to `jobs` stale nodes at once, each as soon as its inputs are there, in a pool of worker processes
    (spawned: a forked CUDA context is unusable). Processes rather than threads because the rules set
    process-wide switches (deterministic kernels, TF32) around their own work. Worker k builds on GPU k modulo the
    GPUs there are, so that a sweep's variants spread over a multi-GPU host. The per-artifact locks are those of
    separate builds, and what a node writes does not depend on where it was built. The workers' messages come
    back through a queue and are said here, in order, while they run."""
    import concurrent.futures as futures
    import contextlib
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")
    slots, messages = context.Queue(), context.Queue()
    for k in range(jobs):
        slots.put(k)

    def relay() -> None:
        while True:
            try:
                say(messages.get_nowait())
            except queue.Empty:
                return

    done = {st.node.name for st in statuses if st.state == UP_TO_DATE}
    outcomes = {st.node.name: _finished(st.node, UP_TO_DATE, 0.0, store, say)
                for st in statuses if st.state == UP_TO_DATE}
    waiting = [st for st in statuses if st.state == STALE]
    running: dict[futures.Future, tuple[NodeStatus, float, contextlib.ExitStack]] = {}
    failure: BaseException | None = None
    with futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                                     initargs=(slots, messages)) as pool:
        try:
            while running or (waiting and failure is None):
                ready = [st for st in waiting if all(d.name in done for d in st.node.deps.values())]
                for st in ready[: jobs - len(running)] if failure is None else []:
                    waiting.remove(st)
                    bar = contextlib.ExitStack()
                    bar.enter_context(progress.task(st.node.name, None))
                    running[pool.submit(_build_in_worker, st, store.root)] = (st, time.perf_counter(), bar)
                if not running:
                    break  # what is left waits for a node that failed
                finished, _ = futures.wait(running, timeout=0.2, return_when=futures.FIRST_COMPLETED)
                relay()
                for future in finished:
                    st, start, bar = running.pop(future)
                    bar.close()
                    seconds = time.perf_counter() - start
                    try:
                        state = future.result()
                    except BaseException as e:
                        outcomes[st.node.name] = Outcome(st.node, FAILED, seconds)
                        failure = failure or e
                        continue
                    done.add(st.node.name)
                    outcomes[st.node.name] = _finished(st.node, state, seconds, store, say)
        except BaseException as e:  # an interrupt: the workers, in the same process group, got it too
            failure = failure or e
            pool.shutdown(cancel_futures=True)
    relay()
    ordered = [outcomes[st.node.name] for st in statuses if st.node.name in outcomes]
    if failure is not None:
        ordered.sort(key=lambda o: o.state == FAILED)  # the failed node last, as a sequential build has it
        raise BuildFailed(ordered, failure) from failure
    return ordered


_worker: dict[str, Any] = {"busy": False}  # a worker process's message queue and store, and whether it is building


def _start_worker(slots: Any, messages: Any) -> None:
    """A worker process's first step: take a slot number and build on that GPU (modulo their count). An interrupt
    (Ctrl-C reaches every process of the terminal's group) stops the target being built, which fails the build as
    in a sequential one; a worker waiting for its next target lets it pass instead of dying with a traceback."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        if _worker["busy"]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    reuse_freed_memory()
    slot = slots.get()
    _worker["messages"] = messages
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(slot % torch.cuda.device_count())


def _build_in_worker(st: NodeStatus, store_root: Path) -> str:
    if _worker.get("store") is None or _worker["store"].root != store_root:
        _worker["store"] = Store(store_root)
    _worker["busy"] = True
    try:
        return _build_locked(st, _worker["store"], _worker["messages"].put)
    finally:
        _worker["busy"] = False
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # what this worker keeps cached is not free to the others on its GPU


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
