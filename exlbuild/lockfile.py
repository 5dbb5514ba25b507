"""exlbuild.lock: beside the recipe, the record of its last build.

One file per folder, with one section per recipe file in it:

    {"format": 1, "recipes": {"demo.yaml": {"recipe": {...resolved...}, "overrides": [...],
                                            "targets": {name: {"kind", "key", "rule", "key_inputs",
                                                               "files": {path: hash}, "out_dir"}}}}}

`out_dir` is relative to the lock's folder where it lies inside it (the exported directories, a store beside the
recipe), so that a committed lock means the same places in every clone.
`key_inputs` is what the key was computed from, so that `plan` can say which parameter or input changed;
`files` are the content hashes of the artifact's files (or of a source directory's files), which `verify`
checks. Commit it for reproducible releases: `build --frozen` builds only what has the lock's keys, and fails when
what it built differs from the lock's files (`differences`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exlbuild.errors import ExlbuildError
from exlbuild.graph import Graph, Node, diff_files
from exlbuild.hashing import hash_bytes
from exlbuild.recipe import LoadedRecipe
from exlbuild.store import Store, write_atomic

FORMAT = 1


def read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"format": FORMAT, "recipes": {}}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ExlbuildError(f"{path}: not a valid lock file ({e}); delete it to start afresh") from None
    if data.get("format") != FORMAT or not isinstance(data.get("recipes"), dict):
        raise ExlbuildError(f"{path}: unknown lock file format {data.get('format')!r} (this exlbuild writes {FORMAT})")
    return data


def section(recipe: LoadedRecipe) -> dict[str, Any] | None:
    return read(recipe.lock_path)["recipes"].get(recipe.path.name)


def previous_targets(recipe: LoadedRecipe) -> dict[str, Any]:
    s = section(recipe)
    return s["targets"] if s else {}


def artifact_files(node: Node, store: Store) -> dict[str, str] | None:
    """The content hashes of a node's files (path -> hash) as the store has them now (a source's: its own), or None
    if its artifact is missing."""
    if node.is_source:
        return dict(node.key_inputs["source"])
    if store.has(node.rule_name, node.key):
        return {p: f["hash"] for p, f in store.manifest(node.rule_name, node.key)["files"].items()}
    return None


def entry(node: Node, store: Store, base: Path) -> dict[str, Any] | None:
    """The lock entry of a node as it stands in the store now, or None if its artifact is missing. Its out_dir is
    relative to `base` (the lock's folder) where it lies inside it, so that a lock committed with the recipe names
    the same places in every clone."""
    files = artifact_files(node, store)
    if files is None:
        return None
    where = out_dir(node, store).resolve()
    base = base.resolve()
    relative = where.relative_to(base) if where.is_relative_to(base) else where
    return {"kind": node.kind, "key": node.key, "rule": node.rule_name, "key_inputs": node.key_inputs,
            "files": files, "out_dir": str(relative)}


def locked_out_dir(entry: dict[str, Any], lock_path: Path) -> Path:
    """Where a lock entry's out_dir is: relative to the lock's folder, unless the lock names it absolutely (a place
    outside that folder, or any place in a lock of an earlier exlbuild)."""
    return lock_path.parent / entry["out_dir"]


def differences(graph: Graph, store: Store, locked: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The artifacts in the store of the graph's targets against the lock's record of them (`locked`: its targets, with
    the same keys): one line per file that differs, is missing or was not in the lock, and the names of the targets
    not compared because their rule does not write reproducible bytes (Rule.reproducible). Sources are not compared:
    their keys are their files' hashes."""
    problems: list[str] = []
    not_compared: list[str] = []
    for node in graph.nodes:
        if node.is_source:
            continue
        if not node.rule.reproducible:
            not_compared.append(node.name)
            continue
        made = artifact_files(node, store) or {}
        problems += [f"{node.name}: {line}" for line in diff_files("file", locked[node.name]["files"], made)]
    return problems, not_compared


def out_dir(node: Node, store: Store) -> Path:
    """Where a user or a loader finds the target's result."""
    return node.source_dir or node.export_dir or store.data_dir(node.rule_name, node.key)


def new_section(recipe: LoadedRecipe, graph: Graph, store: Store) -> dict[str, Any]:
    """The section as the store stands: current entries, and old entries for targets not (re)built."""
    old = previous_targets(recipe)
    targets = {}
    for node in graph.nodes:
        e = entry(node, store, recipe.lock_path.parent)
        if e is None and node.name in old:
            e = old[node.name]
        if e is not None:
            targets[node.name] = e
    return {"recipe": recipe.resolved, "overrides": recipe.overrides, "targets": targets}


def write(recipe: LoadedRecipe, graph: Graph, store: Store) -> None:
    path = recipe.lock_path
    with store.lock("lockfile-" + hash_bytes(str(path).encode())[:16]):
        data = read(path)
        data["recipes"][recipe.path.name] = new_section(recipe, graph, store)
        data["recipes"] = dict(sorted(data["recipes"].items()))
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    store.register_lockfile(path)
