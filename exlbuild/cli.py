"""exlbuild's command line: build (default), plan, status, graph, verify, clean, gc, eval."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from exlbuild import __version__
from exlbuild.errors import ExlbuildError
from exlbuild.host import reuse_freed_memory

COMMANDS = ("build", "plan", "status", "graph", "verify", "clean", "gc", "eval")


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `exlbuild RECIPE …` is `exlbuild build RECIPE …`, options before the recipe too (`exlbuild -j 2 r.yaml`).
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] not in COMMANDS and not {"-h", "--help", "--version"} & set(argv[:first]):
        argv.insert(0, "build")
    parser = _parser()
    # Options may come after the overrides (`exlbuild r.yaml a=1 --frozen`): argparse stops filling a
    # positional list at the first option, so the words after it are collected here.
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    words = next((n for n in ("overrides", "targets") if hasattr(args, n)), None)
    if any(a.startswith("-") for a in extra) or (extra and words is None):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if words:
        getattr(args, words).extend(extra)
    try:
        return args.func(args)
    except ExlbuildError as e:
        _err(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exlbuild", description="Make for quantizing language models into the "
                                "ExLlama formats. `exlbuild RECIPE.yaml [key=value ...]` builds a recipe.")
    p.add_argument("--version", action="version", version=f"exlbuild {__version__}")
    sub = p.add_subparsers(dest="command")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str, recipe: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        c.add_argument("-q", "--quiet", action="store_true", help="print errors only")
        c.add_argument("-v", "--verbose", action="store_true", help="print more (tracebacks of failed rules)")
        if recipe:
            c.add_argument("recipe", type=Path, help="the recipe YAML file")
            c.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. calibration.rows=64 sweep.bits=[3,4]")
        return c

    b = command("build", _build, "build every stale target of a recipe (the default command)")
    b.add_argument("--frozen", action="store_true",
                   help="never change exlbuild.lock: fail if the recipe or a key differs from it, build what the store "
                        "lacks, then fail if what was built differs from the lock's files")
    b.add_argument("-j", "--jobs", type=_positive, default=1, metavar="N",
                   help="build up to N targets at once, each in a worker process (on a host with several GPUs, "
                        "worker k uses GPU k modulo their count); default 1")
    command("plan", _plan, "say which targets would be built, and why, without building")
    s = command("status", _status, "list the targets and their states")
    s.add_argument("--json", action="store_true", help="print JSON")
    g = command("graph", _graph, "print the dependency graph of a recipe")
    g.add_argument("--dot", action="store_true", help="print Graphviz dot")
    command("verify", _verify, "re-hash the outputs and inputs recorded in exlbuild.lock and name any difference")
    c = command("clean", _clean, "remove built artifacts of a recipe (all, or the named targets) from the store",
                recipe=False)
    c.add_argument("recipe", type=Path)
    c.add_argument("targets", nargs="*", help="target names (default: every target) and overrides (key=value)")
    command("gc", _gc, "remove artifacts of the recipe's store that no lock file references")
    e = command("eval", _eval, "perplexity of a model directory on a text", recipe=False)
    e.add_argument("model_dir", type=Path)
    e.add_argument("--text", type=Path, required=True, help="a .txt file, or a .parquet file with a text column")
    e.add_argument("--text-column", default="text")
    e.add_argument("--window", type=int, default=1024, help="tokens per window (non-overlapping)")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--json", action="store_true", help='print {"perplexity": ..., "tokens": ...}')
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the forward runs (auto: the GPU if there is one, as builds do)")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


# ----------------------------------------------------------------------------------------------------
# Loading a recipe into a resolved graph

class Session:
    """A recipe, its graph with keys resolved, and its store."""

    def __init__(self, recipe_path: Path, overrides: list[str]):
        from exlbuild import lockfile, recipe
        from exlbuild.rules import recipe_graph
        from exlbuild.store import Store

        self.recipe = recipe.load(recipe_path, overrides)
        self.store = Store(self.recipe.store_path)
        self.graph = recipe_graph(self.recipe, self.store.hashes)
        self.graph.resolve(self.store.hashes)
        self.previous = lockfile.previous_targets(self.recipe)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _session(args: argparse.Namespace) -> Session:
    return Session(args.recipe, args.overrides)


# ----------------------------------------------------------------------------------------------------
# Commands

def _build(args: argparse.Namespace) -> int:
    from exlbuild import lockfile, progress, runner

    with _session(args) as s:
        if args.frozen:
            _frozen_keys(s)
        say = (lambda m: None) if args.quiet else _err
        try:
            with progress.display(enabled=not args.quiet and sys.stderr.isatty()):
                outcomes = runner.build(s.graph, s.store, s.previous, say, jobs=args.jobs)
        except runner.BuildFailed as failed:
            if not args.frozen:
                lockfile.write(s.recipe, s.graph, s.store)
            if not args.quiet:
                _summary(failed.outcomes)
            cause = failed.cause
            if isinstance(cause, (ExlbuildError, KeyboardInterrupt)):  # main() reports these
                raise cause
            if args.verbose:
                traceback.print_exception(cause)
            _err(f"error: {failed.outcomes[-1].node.name} failed: {type(cause).__name__}: {cause}"
                 + ("" if args.verbose else " (-v shows the traceback)"))
            return 1
        if not args.frozen:
            lockfile.write(s.recipe, s.graph, s.store)
        if not args.quiet:
            _summary(outcomes)
            _print_report(s)
        if args.frozen:
            _frozen_files(s, outcomes, args.quiet)
        return 0


def _frozen_keys(s: Session) -> None:
    """Before a --frozen build: the recipe and every target's key must be the lock's (else nothing is built)."""
    from exlbuild import graph, lockfile

    old = lockfile.section(s.recipe)
    if old is None:
        raise ExlbuildError(f"--frozen: {s.recipe.lock_path} has no entry for {s.recipe.path.name}; build without "
                            "--frozen once and commit the lock file")
    problems = []
    if old["recipe"] != s.recipe.resolved:
        problems.append("the resolved recipe differs from the locked one")
    for node in s.graph.nodes:
        prev = s.previous.get(node.name)
        if prev is None or prev["key"] != node.key:
            problems.append(f"{node.name}: {'; '.join(graph.explain(node, prev))}")
    removed = set(s.previous) - {n.name for n in s.graph.nodes}
    problems += [f"{name}: no longer a target" for name in sorted(removed)]
    if problems:
        raise ExlbuildError("--frozen: the build would change exlbuild.lock:\n  " + "\n  ".join(problems))


def _frozen_files(s: Session, outcomes: list[Any], quiet: bool) -> None:
    """After a --frozen build: what it built must have the lock's bytes (the lock is never rewritten)."""
    from exlbuild import lockfile, runner

    problems, not_compared = lockfile.differences(s.graph, s.store, s.previous)
    if problems:
        raise ExlbuildError("--frozen: the build differs from exlbuild.lock (lock -> built; the lock is left as it "
                            "was):\n  " + "\n  ".join(problems))
    built = sum(o.state in (runner.BUILT, runner.REUSED) for o in outcomes)
    done = f"built {built} target{'s' * (built != 1)}" if built else "everything was up to date"
    aside = f" (not compared: {', '.join(not_compared)}, whose numbers are the machine's)" if not_compared else ""
    if not quiet:
        _err(f"frozen: {done}; every artifact matches exlbuild.lock{aside}")


def _plan(args: argparse.Namespace) -> int:
    from exlbuild import runner

    with _session(args) as s:
        stale = [st for st in runner.status(s.graph, s.store, s.previous) if st.state == runner.STALE]
        if not stale:
            print("nothing to do: every target is up to date")
        for st in stale:
            print(f"build {st.node.name} ({st.node.kind}, key {st.node.key[:12]})")
            for reason in st.reasons:
                print(f"    because {reason}")
        return 0


def _status(args: argparse.Namespace) -> int:
    from exlbuild import lockfile, runner

    with _session(args) as s:
        rows = []
        for st in runner.status(s.graph, s.store, s.previous):
            n = st.node
            row: dict[str, Any] = {"name": n.name, "kind": n.kind, "state": st.state, "key": n.key,
                                   "out_dir": str(lockfile.out_dir(n, s.store)), "rule": n.rule_name}
            row.update(n.info)
            if st.reasons:
                row["why"] = st.reasons
            rows.append(row)
        if args.json:
            print(json.dumps({"recipe": str(s.recipe.path), "targets": rows}, indent=2))
            return 0
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            where = "; ".join(r.get("why", [])) or r["out_dir"]
            print(f"{r['name']:{width}}  {r['kind']:11}  {r['state']:10}  {r['key'][:12]}  {where}")
        return 0


def _graph(args: argparse.Namespace) -> int:
    with _session(args) as s:
        nodes = s.graph.nodes
        if args.dot:
            print("digraph exlbuild {\n  rankdir=LR;")
            for n in nodes:
                shape = "folder" if n.is_source else "box"
                print(f'  "{n.name}" [shape={shape}, label="{n.name}\\n{n.kind} ({n.rule_name})"];')
            for n in nodes:
                for label, dep in n.deps.items():
                    print(f'  "{dep.name}" -> "{n.name}" [label="{label}"];')
            print("}")
            return 0
        for n in nodes:
            print(f"{n.name}  [{n.kind}, {n.rule_name}, {n.key[:12]}]")
            for label, dep in n.deps.items():
                print(f"    <- {dep.name}" + (f" (as {label})" if label != dep.name else ""))
            for label, path in n.sources.items():
                print(f"    <- file {path}" + (f" (as {label})" if label != path.name else ""))
            if n.source_dir is not None:
                print(f"    <- directory {n.source_dir}")
        return 0


def _verify(args: argparse.Namespace) -> int:
    from exlbuild import lockfile

    with _session(args) as s:
        section = lockfile.section(s.recipe)
        if section is None:
            raise ExlbuildError(f"{s.recipe.lock_path} has no entry for {s.recipe.path.name}: build it first")
        problems = []
        current = {n.name: n for n in s.graph.nodes}
        checked = 0
        for name, entry in sorted(section["targets"].items()):
            node = current.get(name)
            if node is None:
                problems.append(f"{name}: in the lock file but no longer a target of the recipe")
                continue
            if node.key != entry["key"]:
                problems.append(f"{name}: the recipe now gives key {node.key[:12]}, the lock has {entry['key'][:12]}")
            where = lockfile.locked_out_dir(entry, s.recipe.lock_path)
            if node.is_source:
                roots = [where]
            else:  # the store's copy, and the exported one where there is one
                roots = list(dict.fromkeys([s.store.data_dir(entry["rule"], entry["key"]).resolve(), where.resolve()]))
            for root in roots:
                checked += _verify_tree(name, node, root, entry["files"], problems)
        if problems:
            print("verify failed:\n  " + "\n  ".join(problems))
            return 1
        if not args.quiet:
            print(f"verify: OK ({len(section['targets'])} targets, {checked} files match {s.recipe.lock_path.name})")
        return 0


def _verify_tree(name: str, node: Any, root: Path, files: dict[str, str], problems: list[str]) -> int:
    """Re-hash the files of one directory against the lock; returns how many files were checked."""
    from exlbuild.hashing import hash_file

    if not root.is_dir():
        problems.append(f"{name}: {root} is missing")
        return 0
    on_disk = set(str(p) for p in _files_of(node, root))
    for rel, digest in sorted(files.items()):
        p = root / rel
        if rel not in on_disk or not p.is_file():
            problems.append(f"{name}: {root / rel} is missing")
        elif hash_file(p) != digest:
            problems.append(f"{name}: {root / rel} differs from the lock (content hash {digest[:12]} expected)")
    problems.extend(f"{name}: {root / rel} is not in the lock" for rel in sorted(on_disk - set(files)))
    return len(files)


def _files_of(node: Any, root: Path) -> list[Path]:
    from exlbuild.graph import source_files
    from exlbuild.hashing import tree_files

    if node.is_source:
        only = node.params.get("files")
        return [Path(f) for f in only if (root / f).is_file()] if only else source_files(root)
    return tree_files(root)


def _clean(args: argparse.Namespace) -> int:
    targets = [t for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t]
    with Session(args.recipe, overrides) as s:
        nodes = [s.graph[t] for t in targets] if targets else s.graph.nodes
        freed = 0
        for n in nodes:
            if n.is_source:
                continue
            with s.store.lock(n.key, on_wait=lambda who: _err(f"waiting for {n.name}: {who} is building it")):
                size = s.store.remove(n.rule_name, n.key)
            if size and not args.quiet:
                print(f"removed {n.name} ({n.key[:12]}, {_human(size)})")
            freed += size
        if not args.quiet:
            print(f"freed {_human(freed)}")
        return 0


def _gc(args: argparse.Namespace) -> int:
    from exlbuild import lockfile

    with _session(args) as s:
        keep = set()
        for path in s.store.lockfiles():
            p = Path(path)
            if p.is_file():
                for section in lockfile.read(p)["recipes"].values():
                    keep |= {t["key"] for t in section["targets"].values()}
        freed, removed = 0, 0
        for rule, key, _ in list(s.store.artifacts()):
            if key not in keep:
                with s.store.lock(key):
                    freed += s.store.remove(rule, key)
                removed += 1
        if not args.quiet:
            print(f"gc: removed {removed} artifacts, freed {_human(freed)}; kept {len(keep)} referenced by lock files")
        return 0


def _eval(args: argparse.Namespace) -> int:
    from exlbuild import progress
    from exlbuild.eval import evaluate
    from exlbuild.rules.exl2 import compute_device

    device = compute_device() if args.device == "auto" else args.device
    if device == "cuda" and compute_device() != "cuda":
        raise ExlbuildError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if not args.model_dir.is_dir():
        raise ExlbuildError(f"model directory not found: {args.model_dir}")
    if not args.text.is_file():
        raise ExlbuildError(f"text file not found: {args.text}")
    with progress.display(enabled=not args.quiet and not args.json and sys.stderr.isatty()):
        result = evaluate(args.model_dir, args.text, window=args.window, max_windows=args.max_windows,
                          text_column=args.text_column, device=device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")
    return 0


# ----------------------------------------------------------------------------------------------------
# Output

def _summary(outcomes: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table()
    width = max([len(o.node.name) for o in outcomes] + [6])
    for col, justify in (("target", "left"), ("kind", "left"), ("state", "left"), ("key", "left"),
                         ("time", "right"), ("size", "right")):
        t.add_column(col, justify=justify, no_wrap=True, min_width=width if col == "target" else None)
    for o in outcomes:
        t.add_row(o.node.name, o.node.kind, o.state, o.node.key[:12], f"{o.seconds:.1f} s" if o.seconds else "",
                  _human(o.size) if o.size else "")
    # Piped output has no terminal width: never cut names or keys there.
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def _print_report(s: Session) -> None:
    from exlbuild.rules.report import REPORT_MD

    for node in s.graph.nodes:
        if node.rule is not None and node.rule.name == "report":
            report_dir = s.store.data_dir(node.rule_name, node.key)
            print(f"\nReport ({report_dir}):\n")
            print((report_dir / REPORT_MD).read_text())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
