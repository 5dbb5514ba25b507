"""Content hashes of files and data, and a stat cache so that unchanged multi-GB files are not re-read.

BLAKE3 was measured against xxh3-128 and SHA-256 on a 300 MB file on the 2-core development machine
(docs/engine.md): BLAKE3 over a memory map with threads 5.5 GB/s, xxh3-128 5.4 GB/s, SHA-256 1.4 GB/s.
BLAKE3 is as fast here and is a cryptographic hash, which a content-addressed store wants.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import blake3
from filelock import FileLock

_SMALL = 1 << 20  # below this a plain read beats setting up a memory map and threads
_RACY_SECONDS = 2.0  # a file modified this recently may change again within its mtime tick: do not cache


def hash_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of the canonical JSON form (sorted keys, no whitespace) of plain data."""
    return hash_bytes(canonical_json(obj).encode())


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def hash_file(path: Path) -> str:
    size = path.stat().st_size
    if size < _SMALL:
        return hash_bytes(path.read_bytes())
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(path)).hexdigest()


class HashCache:
    """file -> content hash, remembered by (path, size, mtime_ns, inode) in an SQLite file.

    Several processes may share one cache (WAL mode, busy timeout). Without a database path it only
    caches in memory.
    """

    def __init__(self, db_path: Path | None = None):
        self._db = None
        self._memory: dict[tuple, str] = {}
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            # Switching a new database to WAL takes a lock that SQLite's busy timeout does not wait for:
            # two builds opening a fresh store at once saw "database is locked". The file lock serialises it.
            with FileLock(str(db_path) + ".lock"):
                self._db = sqlite3.connect(str(db_path), timeout=60, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, "
                                 "mtime_ns INTEGER, inode INTEGER, hash TEXT)")

    def file_hash(self, path: Path) -> str:
        path = path.resolve()
        st = path.stat()
        stamp = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if stamp in self._memory:
            return self._memory[stamp]
        if self._db is not None:
            row = self._db.execute("SELECT hash FROM hashes WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                                   stamp).fetchone()
            if row:
                self._memory[stamp] = row[0]
                return row[0]
        digest = hash_file(path)
        if time.time() - st.st_mtime_ns / 1e9 > _RACY_SECONDS:
            self._memory[stamp] = digest
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", (*stamp, digest))
        return digest

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def tree_files(root: Path) -> list[Path]:
    """Every regular file below `root`, as relative paths in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            out.append(Path(dirpath, name).relative_to(root))
    return out
