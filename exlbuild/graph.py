"""Rules, nodes, keys: the build graph and why a node is stale.

A node is one artifact. A rule makes it from its inputs (other nodes' artifacts and source files) and its
parameters. The node's key is a hash of the rule's name and version, the parameters that change the
artifact's bytes, the keys of its input nodes and the content hashes of its source files. A node without
a rule is a source: an existing directory used in place (a Hugging Face model), keyed by its files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from exlbuild.errors import ExlbuildError
from exlbuild.hashing import HashCache, hash_json, tree_files

KINDS = ("model", "calibration", "measurement", "allocation", "quantized", "refined", "tuned", "compiled", "report")


@dataclass
class BuildContext:
    """What a rule sees while it runs."""

    out: Path  # fill this directory; it is published atomically when the rule returns
    state: Path  # survives a crash of this rule: checkpoints for resuming (deleted after publishing)
    inputs: dict[str, Path]  # input label -> the input artifact's data directory (or the source directory)
    sources: dict[str, Path]  # source label -> file
    params: dict[str, Any]
    # input label -> the store's manifest of that input artifact (times, metrics, file sizes); none for sources
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)


class Rule:
    """Makes one kind of artifact. Subclasses set `name` and `version` and implement `run`.

    Bump `version` whenever a code change changes the bytes a rule writes: every artifact of the rule
    becomes stale, and `plan` says so.
    """

    name: str = ""
    version: int = 1
    # Whether a build of the same key elsewhere must write the same bytes: `build --frozen` compares such an
    # artifact's files with the lock's. False where the files hold numbers of the machine's float arithmetic or
    # clock (a measurement, an evaluation, build times): what such numbers decide shows in the artifacts made from
    # them, which are compared.
    reproducible: bool = True

    def run(self, ctx: BuildContext) -> dict[str, Any] | None:
        """Write the artifact into ctx.out; return metrics for the manifest (JSON-able)."""
        raise NotImplementedError

    def rehearse(self, node: "Node", ready: dict[str, Path]) -> Callable[[], str | None] | None:
        """Optionally start, in the background, work that readies this process's machine for building `node` (such
        as compiling the kernels it will launch) from the inputs already there (`ready`: input label -> data
        directory), and return what ends it (which returns a line to report where the work failed); None where there
        is nothing to do yet. What it does must not change what any rule writes: the build never waits for it, and
        ends it when the build ends."""
        return None


@dataclass(eq=False)
class Node:
    name: str
    kind: str
    rule: Rule | None = None
    params: dict[str, Any] = field(default_factory=dict)
    deps: dict[str, "Node"] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)
    source_dir: Path | None = None  # for a source node: the directory used in place
    export_dir: Path | None = None  # a copy of the artifact is kept here for users and loaders (not in the key)
    info: dict[str, Any] = field(default_factory=dict)  # shown by status, never part of the key
    # Filled by Graph.resolve:
    key: str = ""
    key_inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown node kind {self.kind!r}")
        if (self.rule is None) == (self.source_dir is None):
            raise ValueError(f"node {self.name}: give either a rule or a source directory")

    @property
    def is_source(self) -> bool:
        return self.rule is None

    @property
    def rule_name(self) -> str:
        return self.rule.name if self.rule else "source"


class Graph:
    """Nodes in topological order (every node after its inputs)."""

    def __init__(self, nodes: Iterable[Node]):
        self.nodes: list[Node] = []
        seen: set[int] = set()

        def visit(node: Node, path: tuple[str, ...]) -> None:
            if id(node) in seen:
                return
            if node.name in path:
                raise ExlbuildError(f"dependency cycle: {' -> '.join(path + (node.name,))}")
            for dep in node.deps.values():
                visit(dep, path + (node.name,))
            seen.add(id(node))
            self.nodes.append(node)

        for n in nodes:
            visit(n, ())
        names = [n.name for n in self.nodes]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ExlbuildError(f"two targets share the name(s) {', '.join(sorted(dupes))}")

    def __getitem__(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        import difflib

        close = difflib.get_close_matches(name, [n.name for n in self.nodes], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ExlbuildError(f"no target named '{name}'; targets: {', '.join(n.name for n in self.nodes)}{hint}")

    def resolve(self, hashes: HashCache) -> None:
        """Compute every node's key, inputs first. Source files are hashed through the stat cache."""
        for node in self.nodes:
            node.key_inputs = key_inputs(node, hashes)
            node.key = hash_json(node.key_inputs)


def key_inputs(node: Node, hashes: HashCache) -> dict[str, Any]:
    if node.is_source:
        assert node.source_dir is not None
        only = node.params.get("files")  # a source may stand for some files of its directory only
        rels = [Path(f) for f in only if (node.source_dir / f).is_file()] if only else source_files(node.source_dir)
        return {"source": {str(rel): hashes.file_hash(node.source_dir / rel) for rel in rels}}
    assert node.rule is not None
    return {
        "rule": node.rule.name,
        "version": node.rule.version,
        "params": node.params,
        "deps": {label: dep.key for label, dep in sorted(node.deps.items())},
        "sources": {label: hashes.file_hash(p) for label, p in sorted(node.sources.items())},
    }


def source_files(directory: Path) -> list[Path]:
    """The files of a source directory that identify it (hidden files and folders are not part of it)."""
    return [rel for rel in tree_files(directory) if not any(part.startswith(".") for part in rel.parts)]


def explain(node: Node, previous: dict[str, Any] | None) -> list[str]:
    """Why `node` differs from the record of its last build (the lock file's entry): one line a change."""
    if previous is None:
        return ["never built"]
    old, new = previous.get("key_inputs", {}), node.key_inputs
    reasons: list[str] = []
    if node.is_source:
        reasons += diff_files("file", old.get("source", {}), new["source"])
        return reasons or (["changed"] if previous.get("key") != node.key else [])
    if old.get("rule") != new["rule"] or old.get("version") != new["version"]:
        reasons.append(f"rule {old.get('rule')} v{old.get('version')} -> {new['rule']} v{new['version']}")
    for path, a, b in _diff_values(old.get("params", {}), new["params"]):
        reasons.append(f"{path}: {_show(a)} -> {_show(b)}")
    old_deps, new_deps = old.get("deps", {}), new["deps"]
    for label in sorted(set(old_deps) | set(new_deps)):
        if old_deps.get(label) != new_deps.get(label):
            reasons.append(f"input '{label}' changed ({_short(old_deps.get(label))} -> {_short(new_deps.get(label))})")
    reasons += diff_files("source", old.get("sources", {}), new["sources"])
    if not reasons and previous.get("key") != node.key:
        reasons.append("key changed")
    return reasons


def diff_files(what: str, old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per file added, removed or changed between two records of content hashes (path -> hash)."""
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(f"{what} {name} added")
        elif name not in new:
            out.append(f"{what} {name} removed")
        elif old[name] != new[name]:
            out.append(f"{what} {name} content changed ({_short(old[name])} -> {_short(new[name])})")
    return out


def _diff_values(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff_values(old.get(k, _MISSING), new.get(k, _MISSING), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [(path, old, new)]


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


_MISSING = _Missing()


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, _Missing) else json.dumps(value, default=str)


def _short(key: str | None) -> str:
    return key[:12] if key else "none"

