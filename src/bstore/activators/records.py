"""What bstore started in a node: ``<node dir>/apps.sqlite``, one row per app.

The embedded activator consults these records on every action (which build of an app the
host node runs, to stop it and to load only the modules that changed) and updates one row
per app it starts, restarts or stops. They are a small SQLite database rather than a JSON
file replaced by ``rename``: replacing a file makes ext4 write its data out at once
(``auto_da_alloc``), a cost every switch would pay, while a row update appends a page to
the write-ahead log. Another bstore process (the daemon and a ``bstore status``) sees the
changes through SQLite's own locking.

Durability: ``synchronous=NORMAL`` (no fsync per update). The records describe processes,
and the power loss that could undo an update ends those processes too; the node boots
from its profile's generation and records what it starts again.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bstore.errors import BstoreError
from bstore.specs.model import Isolation

#: The records of nodes started by bstore before this database existed.
LEGACY_FILE = "apps.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    output TEXT NOT NULL,
    isolation TEXT NOT NULL
)
"""


class RecordsError(BstoreError):
    """The records of a node cannot be read or written."""


_HINT = ("check the node directory's permissions and free space; a damaged file can be"
         " removed once the node is stopped (bstore node stop): the next start records its"
         " apps again")


@dataclass(frozen=True)
class ManagedApp:
    """What bstore started in a node: enough to stop it and to report drift."""

    name: str
    version: str
    output: str
    isolation: Isolation


class ManagedRecords:
    """The records of one node, in ``path`` (created on first use, with the directory).

    Reads are served from memory until another connection commits (SQLite's
    ``data_version`` says so); safe to share between threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, ManagedApp] | None = None
        self._seen_version = -1

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise RecordsError(f"cannot open the node records {self.path}: {exc}",
                                   hint=_HINT) from exc
            self._conn = conn
            self._import_legacy(conn)
        return self._conn

    def _import_legacy(self, conn: sqlite3.Connection) -> None:
        """Take over the ``apps.json`` of a node started by an older bstore (once)."""
        legacy = self.path.with_name(LEGACY_FILE)
        try:
            raw = json.loads(legacy.read_text(encoding="utf-8"))
            apps = [ManagedApp(n, str(d["version"]), str(d["output"]),
                               Isolation(d["isolation"])) for n, d in raw.items()]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            apps = []  # unreadable: as before, it records nothing
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR IGNORE INTO apps VALUES (?, ?, ?, ?)",
                             [(a.name, a.version, a.output, a.isolation.value)
                              for a in apps])
        with contextlib.suppress(FileNotFoundError):
            legacy.unlink()

    def read(self) -> dict[str, ManagedApp]:
        """Every recorded app (a fresh dict the caller may change)."""
        with self._lock:
            try:
                conn = self._db()
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if self._cache is None or version != self._seen_version:
                    rows = conn.execute("SELECT name, version, output, isolation FROM apps")
                    self._cache = {n: ManagedApp(n, v, o, Isolation(i))
                                   for n, v, o, i in rows}
                    self._seen_version = version
            except sqlite3.Error as exc:
                raise RecordsError(f"cannot read the node records {self.path}: {exc}",
                                   hint=_HINT) from exc
            except ValueError as exc:  # an isolation this version does not know
                raise RecordsError(f"node records {self.path} hold {exc}",
                                   hint="they were written by a newer bstore") from exc
            return dict(self._cache)

    def get(self, app: str) -> ManagedApp | None:
        """One app's record, if any."""
        return self.read().get(app)

    def write(self, apps: Mapping[str, ManagedApp]) -> None:
        """Record exactly ``apps``."""
        self._change(None, apps)

    def update(self, app: str, record: ManagedApp | None) -> None:
        """Record (or, with None, forget) one app, keeping the others."""
        current = self.read().get(app)
        if current == record:
            return
        self._change(app, {} if record is None else {app: record})

    def _change(self, only: str | None, apps: Mapping[str, ManagedApp]) -> None:
        """Replace the row of ``only`` (every row when None) with ``apps``."""
        with self._lock:
            try:
                conn = self._db()
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    if only is None:
                        conn.execute("DELETE FROM apps")
                    else:
                        conn.execute("DELETE FROM apps WHERE name = ?", (only,))
                    conn.executemany("INSERT INTO apps VALUES (?, ?, ?, ?)",
                                     [(a.name, a.version, a.output, a.isolation.value)
                                      for a in apps.values()])
            except sqlite3.Error as exc:
                raise RecordsError(f"cannot write the node records {self.path}: {exc}",
                                   hint=_HINT) from exc
            # Our own commits leave data_version as it is: keep the cache in step.
            if self._cache is not None:
                if only is None:
                    self._cache = dict(apps)
                else:
                    self._cache.pop(only, None)
                    self._cache.update(apps)

    def close(self) -> None:
        """Close the database connection (reopened on the next use)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._cache = None
