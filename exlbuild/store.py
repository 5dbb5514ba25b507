"""The content-addressed store: where artifacts are built, published, locked, found and collected.

    <root>/layout.json             {"version": 2}: how this store is laid out (see LAYOUT)
    <root>/store/<rule>/<key>/     published artifact: manifest.json, and data/ (the rule's files, read-only)
    <root>/work/<rule>/<key>/      out/ (the artifact being written, same shape) and state/ (checkpoints that
                                   survive a crash)
    <root>/locks/<key>.lock        one lock per artifact
    <root>/hashes.sqlite           the stat cache of content hashes
    <root>/lockfiles.json          the lock files that reference this store (for gc)
    <root>/exports.json            the directories artifacts were exported to, with their file stats

The rule's files live in data/, apart from the store's manifest, so that a consumer can use the directory as
it is (a Hugging Face model directory holds only the model's files). Publishing is a rename of a fully written
and fsynced artifact directory, so a reader sees a whole artifact or none. Locks are advisory fcntl locks
(the filelock package): the kernel drops them when their process dies, so a lock left by a killed build never
blocks; the owner file only names who is building.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from exlbuild.errors import ExlbuildError
from exlbuild.hashing import HashCache, hash_file, tree_files

MANIFEST = "manifest.json"
DATA = "data"
LAYOUT_FILE = "layout.json"
# 1: the rule's files beside manifest.json in store/<rule>/<key>/ (stores without a layout file).
# 2: the rule's files in store/<rule>/<key>/data/.
LAYOUT = 2


class Store:
    def __init__(self, root: Path):
        self.root = root
        try:
            for sub in ("store", "work", "locks"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExlbuildError(f"cannot create the store at {root}: {e.strerror}") from None
        self._check_layout()
        self.hashes = HashCache(root / "hashes.sqlite")

    def _check_layout(self) -> None:
        """Refuse a store of another layout, whose artifacts this code would misread; mark a new one."""
        path = self.root / LAYOUT_FILE
        if path.is_file():
            found = _read_layout(path)
        elif any((self.root / "store").glob("*/*")):
            found = 1  # artifacts published before the layout was recorded
        else:
            write_atomic(path, json.dumps({"version": LAYOUT}) + "\n")
            return
        if found < LAYOUT:
            raise ExlbuildError(f"the store {self.root} was written by an earlier exlbuild (store layout {found}, this "
                                f"one reads layout {LAYOUT}); delete {self.root / 'store'} and build again")
        if found > LAYOUT:
            raise ExlbuildError(f"the store {self.root} was written by a newer exlbuild (store layout {found}, this "
                                f"one reads layout {LAYOUT}); upgrade exlbuild or set another store.path")

    # -- where things are ------------------------------------------------------------------------------
    def artifact_dir(self, rule: str, key: str) -> Path:
        """The whole artifact: its manifest and its data directory."""
        return self.root / "store" / rule / key

    def data_dir(self, rule: str, key: str) -> Path:
        """The rule's files of an artifact: what consumers read and exports hold."""
        return self.artifact_dir(rule, key) / DATA

    def work_dir(self, rule: str, key: str) -> Path:
        return self.root / "work" / rule / key

    def has(self, rule: str, key: str) -> bool:
        return (self.artifact_dir(rule, key) / MANIFEST).is_file()

    def manifest(self, rule: str, key: str) -> dict[str, Any]:
        return json.loads((self.artifact_dir(rule, key) / MANIFEST).read_text())

    def artifacts(self) -> Iterator[tuple[str, str, Path]]:
        """Every published artifact as (rule, key, directory)."""
        base = self.root / "store"
        for rule_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for art in sorted(p for p in rule_dir.iterdir() if p.is_dir()):
                yield rule_dir.name, art.name, art

    # -- locking ---------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the lock `name` (an artifact key, or another store-wide name) for the block."""
        from filelock import FileLock, Timeout

        path = self.root / "locks" / f"{name}.lock"
        owner = path.with_suffix(".owner")
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait(_read_owner(owner))
            lock.acquire()
        try:
            owner.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}))
            yield
        finally:
            owner.unlink(missing_ok=True)
            lock.release()

    # -- building and publishing -------------------------------------------------------------------------
    def begin(self, rule: str, key: str) -> tuple[Path, Path]:
        """A fresh data directory for the rule to fill and its kept state/ directory (call under its lock)."""
        work = self.work_dir(rule, key)
        out, state = work / "out", work / "state"
        if out.exists():
            _remove_tree(out)  # a crashed attempt's partial output: never published, never reused
        (out / DATA).mkdir(parents=True)
        state.mkdir(parents=True, exist_ok=True)
        return out / DATA, state

    def publish(self, rule: str, key: str, manifest: dict[str, Any]) -> Path:
        """Hash the files the rule wrote, write the manifest beside them, make everything durable, rename the
        artifact into the store; returns its data directory."""
        out = self.work_dir(rule, key) / "out"
        data = out / DATA
        files = {str(rel): {"size": (data / rel).stat().st_size, "hash": hash_file(data / rel)}
                 for rel in tree_files(data)}
        manifest = {**manifest, "files": files}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync_tree(out)
        final = self.artifact_dir(rule, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(out, final)
        _fsync_dir(final.parent)
        _make_read_only(final)
        _remove_tree(self.work_dir(rule, key))
        return final / DATA

    # -- exporting ------------------------------------------------------------------------------------
    def export(self, rule: str, key: str, target: Path) -> bool:
        """Make `target` hold the artifact's data files; False if it already did.

        Files are hard links into the store where the file system allows (no copy of a multi-GB model),
        else copies. A record of what was exported (file stats) makes the check cheap; anything else in
        the way is replaced whole: the new directory is assembled beside it and swapped in.
        """
        src = self.data_dir(rule, key)
        files = tree_files(src)
        records = self._exports()
        if records.get(str(target)) == {"key": key, "files": _stats(target, files)} and target.is_dir():
            return False
        staging = target.with_name(f".{target.name}.exlbuild-{os.getpid()}")
        if staging.exists():
            _remove_tree(staging)
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src / rel, staging / rel)
            except OSError:
                shutil.copy2(src / rel, staging / rel)
        old = target.with_name(f".{target.name}.exlbuild-old-{os.getpid()}")
        if target.exists():
            os.rename(target, old)
        os.rename(staging, target)
        if old.exists():
            _remove_tree(old)
        with self.lock("exports"):
            records = self._exports()
            records[str(target)] = {"key": key, "files": _stats(target, files)}
            write_atomic(self.root / "exports.json", json.dumps(records, indent=2, sort_keys=True) + "\n")
        return True

    def _exports(self) -> dict[str, Any]:
        p = self.root / "exports.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    # -- removing --------------------------------------------------------------------------------------
    def remove(self, rule: str, key: str) -> int:
        """Delete an artifact and its work directory; returns the bytes freed."""
        freed = 0
        for d in (self.artifact_dir(rule, key), self.work_dir(rule, key)):
            if d.exists():
                freed += tree_size(d)
                _remove_tree(d)
        return freed

    # -- lock files that reference this store ----------------------------------------------------------
    def register_lockfile(self, lock_path: Path) -> None:
        with self.lock("lockfiles"):
            paths = set(self.lockfiles())
            paths.add(str(lock_path.resolve()))
            write_atomic(self.root / "lockfiles.json", json.dumps(sorted(paths), indent=2) + "\n")

    def lockfiles(self) -> list[str]:
        p = self.root / "lockfiles.json"
        return json.loads(p.read_text()) if p.is_file() else []

    def close(self) -> None:
        self.hashes.close()


def _stats(root: Path, files: list[Path]) -> dict[str, list[int]] | None:
    try:
        return {str(rel): [(st := (root / rel).stat()).st_size, st.st_mtime_ns, st.st_ino] for rel in files}
    except OSError:
        return None


def _read_layout(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ExlbuildError(f"{path}: unreadable store layout file; delete the store {path.parent} and build "
                            "again") from None


def _read_owner(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text())
        return f"process {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def tree_size(root: Path) -> int:
    return sum((root / rel).stat().st_size for rel in tree_files(root)) if root.is_dir() else 0


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_read_only(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _remove_tree(root: Path) -> None:
    # Only files are made read-only when published, so their directories still allow unlinking them.
    shutil.rmtree(root)


def write_atomic(path: Path, text: str) -> None:
    """Replace a file with new content in one step (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
