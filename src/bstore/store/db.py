"""The SQLite database of valid store paths (WAL, synchronous=FULL).

A row in ``paths`` is what makes a store path *valid*: it is written in the same
transaction as the path's references, after the tree is durable in ``store/``. The
canonical manifest recorded at registration is kept too, so verification needs no other
source of truth. ``refs`` rows point at ``paths`` rows with ``ON DELETE RESTRICT``: the
database itself refuses to invalidate a path something valid still references.

Every ``sqlite3`` failure is mapped here: "database is locked" after the busy timeout
becomes :class:`StoreLockedError`, anything else a :class:`StoreError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import blake3

from bstore.store.layout import StoreError
from bstore.store.locks import StoreLockedError
from bstore.store.manifest import MCID_PREFIX, Manifest, Mcid, validate_mcid
from bstore.store.paths import PathKind, StorePath

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE paths (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    hash_hex TEXT NOT NULL,
    mcid TEXT NOT NULL,
    nar_size INTEGER NOT NULL,
    deriver TEXT,
    registration_time INTEGER NOT NULL,
    manifest BLOB NOT NULL
) STRICT;
CREATE TABLE refs (
    referrer INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    reference INTEGER NOT NULL REFERENCES paths(id) ON DELETE RESTRICT,
    PRIMARY KEY (referrer, reference)
) STRICT, WITHOUT ROWID;
CREATE INDEX refs_reference ON refs(reference);
CREATE TABLE signatures (
    path INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    sig TEXT NOT NULL,
    PRIMARY KEY (path, sig)
) STRICT, WITHOUT ROWID;
"""


class PathNotValidError(StoreError):
    """A store path that is not registered (valid) in this store."""


@dataclass(frozen=True, slots=True)
class PathInfo:
    """What the database knows about one valid store path."""

    store_path: StorePath
    mcid: Mcid
    nar_size: int
    references: tuple[StorePath, ...]
    deriver: str | None
    registration_time: int
    signatures: tuple[str, ...]
    kind: PathKind
    #: What the digest was computed over: the MCID's hex for SOURCE paths, the
    #: derivation (or generation) hash otherwise. ``make_store_path(kind, hash_hex,
    #: store_dir, name)`` gives back ``store_path``.
    hash_hex: str

    def __post_init__(self) -> None:
        validate_mcid(self.mcid)
        if self.nar_size < 0:
            raise StoreError(f"path info of {str(self.store_path)!r} has a negative size")
        if list(self.references) != sorted(set(self.references), key=str):
            raise StoreError(f"path info of {str(self.store_path)!r}: references not sorted")

    def to_dict(self, store_dir: Path) -> dict[str, object]:
        """JSON-ready form with full paths."""
        return {
            "path": str(store_dir / str(self.store_path)),
            "mcid": self.mcid,
            "nar_size": self.nar_size,
            "references": [str(store_dir / str(r)) for r in self.references],
            "deriver": self.deriver,
            "registration_time": self.registration_time,
            "signatures": list(self.signatures),
            "kind": self.kind.value,
            "hash": self.hash_hex,
        }


def _locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


class Database:
    """One connection to ``db.sqlite``. Open with :meth:`open` or :meth:`create`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, timeout: float) -> None:
        self.path = path
        self._conn = conn
        self._timeout = timeout

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def _connect(cls, path: Path, timeout: float, hint: str) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = ON")
            # FULL: a committed registration survives power loss, not just a crash.
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                raise StoreLockedError(f"store locked: database {str(path)!r} is busy") from exc
            raise StoreError(f"cannot open database {str(path)!r}: {exc}", hint=hint) from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"database {str(path)!r} is corrupt ({exc})", hint=hint) from exc
        return conn

    @classmethod
    def create(cls, path: Path, store_dir: str, timeout: float) -> Database:
        """Create a fresh database atomically (built aside, then linked into place); if
        another process won the race, open its database instead."""
        tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
            conn.executemany("INSERT INTO meta VALUES (?, ?)",
                             [("schema", SCHEMA_VERSION), ("store_dir", store_dir)])
            conn.close()  # checkpoints the WAL into the main file
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # link, not rename: when two processes create the store at once, the
            # second must open the first one's database, not replace it under it.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            os.unlink(tmp)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot create database {str(path)!r}: {exc}") from exc
        return cls.open(path, store_dir, timeout)

    @classmethod
    def open(cls, path: Path, store_dir: str, timeout: float) -> Database:
        """Open an existing database; refuse an empty, foreign, moved or corrupt one."""
        hint = (f"restore {str(path)!r} from a backup; if the store is disposable, delete"
                f" {str(path.parent)!r} and start again")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read database {str(path)!r}: {exc.strerror}") from exc
        if size == 0:
            raise StoreError(f"database {str(path)!r} is empty", hint=hint)
        conn = cls._connect(path, timeout, hint)
        try:
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            conn.execute("SELECT count(*) FROM paths").fetchone()
        except sqlite3.OperationalError as exc:
            conn.close()
            if _locked(exc):
                raise StoreLockedError(f"store locked: database {str(path)!r} is busy") from exc
            raise StoreError(f"database {str(path)!r} is not a bstore database ({exc})",
                             hint=hint) from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"database {str(path)!r} is corrupt ({exc})", hint=hint) from exc
        if rows.get("schema") != SCHEMA_VERSION:
            conn.close()
            raise StoreError(
                f"database {str(path)!r} has schema {rows.get('schema')!r},"
                f" this bstore reads {SCHEMA_VERSION!r}", hint="use a matching bstore version")
        if rows.get("store_dir") != store_dir:
            conn.close()
            raise StoreError(
                f"database {str(path)!r} belongs to store dir {rows.get('store_dir')!r},"
                f" not {store_dir!r}",
                hint="store path digests include the store dir: move the root back to"
                " where it was created",
            )
        return cls(path, conn, timeout)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed when the block succeeds.

        Busy waits are bounded by the connection's timeout; then "store locked".
        """
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                raise StoreLockedError(
                    f"store locked: database {str(self.path)!r} is still busy after"
                    f" {self._timeout:g} s",
                    hint="another bstore process holds it; retry, or raise"
                    " $BSTORE_LOCK_TIMEOUT",
                ) from exc
            raise StoreError(f"database {str(self.path)!r}: {exc}") from exc
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._commit()

    def _commit(self) -> None:
        from bstore.store.crash import crash_point

        crash_point("before-commit")
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._conn.execute("ROLLBACK")
            raise StoreError(f"database {str(self.path)!r}: commit failed: {exc}") from exc

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                raise StoreLockedError(f"store locked: database {str(self.path)!r} is busy"
                                       ) from exc
            raise StoreError(f"database {str(self.path)!r}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"database {str(self.path)!r} is corrupt: {exc}") from exc

    # -- reads ---------------------------------------------------------------------------

    def is_valid(self, sp: StorePath) -> bool:
        """Whether ``sp`` has a row."""
        return bool(self._query("SELECT 1 FROM paths WHERE path = ?", (str(sp),)))

    def valid_paths(self) -> list[StorePath]:
        """All valid paths, sorted by base name."""
        return [StorePath.parse(str(r[0])) for r in
                self._query("SELECT path FROM paths ORDER BY path")]

    def query_info(self, sp: StorePath) -> PathInfo:
        """The :class:`PathInfo` of ``sp``; :class:`PathNotValidError` if it has no row."""
        rows = self._query(
            "SELECT id, kind, mcid, nar_size, deriver, registration_time, hash_hex FROM paths"
            " WHERE path = ?", (str(sp),))
        if not rows:
            raise self.not_valid(sp)
        pid, kind, mcid, nar_size, deriver, reg_time, hash_hex = rows[0]
        refs = sorted(str(r[0]) for r in self._query(
            "SELECT p.path FROM refs JOIN paths p ON p.id = refs.reference"
            " WHERE refs.referrer = ?", (pid,)))
        sigs = sorted(str(r[0]) for r in
                      self._query("SELECT sig FROM signatures WHERE path = ?", (pid,)))
        return PathInfo(
            store_path=sp, mcid=Mcid(str(mcid)), nar_size=int(str(nar_size)),
            references=tuple(StorePath.parse(r) for r in refs),
            deriver=None if deriver is None else str(deriver),
            registration_time=int(str(reg_time)), signatures=tuple(sigs),
            kind=PathKind(str(kind)), hash_hex=str(hash_hex),
        )

    def query_manifest(self, sp: StorePath) -> Manifest:
        """The manifest recorded when ``sp`` was registered."""
        rows = self._query("SELECT manifest FROM paths WHERE path = ?", (str(sp),))
        if not rows:
            raise self.not_valid(sp)
        data = rows[0][0]
        assert isinstance(data, bytes)
        return Manifest.from_bytes(data, source=f"{self.path}: manifest of {sp}")

    def referrers(self, sp: StorePath) -> list[StorePath]:
        """Valid paths that reference ``sp`` (sorted; ``sp`` itself excluded)."""
        if not self.is_valid(sp):
            raise self.not_valid(sp)
        rows = self._query(
            "SELECT r.path FROM refs JOIN paths p ON p.id = refs.reference"
            " JOIN paths r ON r.id = refs.referrer WHERE p.path = ? AND r.id != p.id"
            " ORDER BY r.path", (str(sp),))
        return [StorePath.parse(str(r[0])) for r in rows]

    def reference_graph(self, roots: Iterable[str] | None = None) -> dict[str, list[str]]:
        """``{path: [references]}`` over the closure of ``roots`` (all paths if ``None``)."""
        if roots is None:
            rows = self._query(
                "SELECT p.path, r.path FROM paths p LEFT JOIN refs ON refs.referrer = p.id"
                " LEFT JOIN paths r ON r.id = refs.reference")
        else:
            self._conn.execute("CREATE TEMP TABLE IF NOT EXISTS q_roots (path TEXT)")
            self._conn.execute("DELETE FROM q_roots")
            self._conn.executemany("INSERT INTO q_roots VALUES (?)", [(r,) for r in roots])
            rows = self._query(
                "WITH RECURSIVE c(id) AS ("
                " SELECT p.id FROM paths p JOIN q_roots q ON q.path = p.path"
                " UNION SELECT refs.reference FROM refs JOIN c ON refs.referrer = c.id)"
                " SELECT p.path, r.path FROM c JOIN paths p ON p.id = c.id"
                " LEFT JOIN refs ON refs.referrer = p.id"
                " LEFT JOIN paths r ON r.id = refs.reference")
        graph: dict[str, list[str]] = {}
        for path, ref in rows:
            refs = graph.setdefault(str(path), [])
            if ref is not None:
                refs.append(str(ref))
        return graph

    def sizes(self) -> dict[str, int]:
        """``{path: nar_size}`` of every valid path."""
        return {str(p): int(str(s)) for p, s in self._query("SELECT path, nar_size FROM paths")}

    def not_valid(self, sp: StorePath) -> PathNotValidError:
        """The error for a path without a row."""
        return PathNotValidError(
            f"{str(sp)!r} is not a valid path in the store of {str(self.path)!r}",
            hint="add it first (bstore store add) or check the name with"
            " bstore store info",
        )

    # -- writes --------------------------------------------------------------------------

    def missing(self, conn: sqlite3.Connection, paths: Iterable[StorePath]) -> list[str]:
        """Which of ``paths`` have no row (inside a transaction)."""
        out = []
        for p in paths:
            if conn.execute("SELECT 1 FROM paths WHERE path = ?", (str(p),)).fetchone() is None:
                out.append(str(p))
        return sorted(out)

    def register(self, conn: sqlite3.Connection, sp: StorePath, kind: PathKind,
                 hash_hex: str, manifest: Manifest, references: Sequence[StorePath],
                 deriver: str | None, signatures: Iterable[str]) -> None:
        """Insert ``sp`` with its references and signatures (inside a transaction).

        References other than ``sp`` itself must be valid already, else nothing is
        written and :class:`PathNotValidError` names them.
        """
        others = [r for r in references if r != sp]
        missing = self.missing(conn, others)
        if missing:
            raise PathNotValidError(
                f"cannot register {str(sp)!r}: its references {', '.join(map(repr, missing))}"
                " are not valid",
                hint="register (or import) the references first",
            )
        data = manifest.to_bytes()  # once: the MCID is the hash of these same bytes
        cur = conn.execute(
            "INSERT INTO paths (path, kind, hash_hex, mcid, nar_size, deriver,"
            " registration_time, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (str(sp), kind.value, hash_hex, MCID_PREFIX + blake3.blake3(data).hexdigest(),
             manifest.nar_size, deriver, int(time.time()), data))
        pid = cur.lastrowid
        conn.executemany(
            "INSERT OR IGNORE INTO refs (referrer, reference)"
            " SELECT ?, id FROM paths WHERE path = ?",
            [(pid, str(r)) for r in set(references)])
        conn.executemany("INSERT OR IGNORE INTO signatures (path, sig) VALUES (?, ?)",
                         [(pid, s) for s in signatures])

    def add_signatures(self, sp: StorePath, sigs: Iterable[str]) -> None:
        """Record more signatures for ``sp``."""
        with self.write() as conn:
            row = conn.execute("SELECT id FROM paths WHERE path = ?", (str(sp),)).fetchone()
            if row is None:
                raise self.not_valid(sp)
            conn.executemany("INSERT OR IGNORE INTO signatures (path, sig) VALUES (?, ?)",
                             [(row[0], s) for s in sigs])

    def dangling_references(self) -> list[tuple[str, int]]:
        """``(referrer base name, missing row id)`` for ``refs`` rows whose target row is
        gone (only possible when the database was edited behind the store's back)."""
        return [(str(p), int(str(r))) for p, r in self._query(
            "SELECT p.path, refs.reference FROM refs JOIN paths p ON p.id = refs.referrer"
            " WHERE refs.reference NOT IN (SELECT id FROM paths) ORDER BY p.path")]

    def relink_references(self, sp: StorePath, references: Iterable[StorePath]) -> None:
        """Drop ``sp``'s dangling ``refs`` rows and (re)link it to ``references`` (which
        must be valid), in one transaction — for repairing a re-registered reference."""
        refs = set(references)
        with self.write() as conn:
            row = conn.execute("SELECT id FROM paths WHERE path = ?", (str(sp),)).fetchone()
            if row is None:
                raise self.not_valid(sp)
            missing = self.missing(conn, [r for r in refs if r != sp])
            if missing:
                raise PathNotValidError(
                    f"cannot relink {str(sp)!r}: references {', '.join(map(repr, missing))}"
                    " are not valid", hint="import the references first")
            conn.execute("DELETE FROM refs WHERE referrer = ? AND reference NOT IN"
                         " (SELECT id FROM paths)", (row[0],))
            conn.executemany("INSERT OR IGNORE INTO refs (referrer, reference)"
                             " SELECT ?, id FROM paths WHERE path = ?",
                             [(row[0], str(r)) for r in refs])

    def invalidate(self, conn: sqlite3.Connection, paths: Sequence[str]) -> None:
        """Delete the rows of ``paths`` (inside a transaction; referrers must go first or
        in the same call — the RESTRICT foreign key refuses anything else)."""
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS q_dead (path TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM q_dead")
        conn.executemany("INSERT INTO q_dead VALUES (?)", [(p,) for p in paths])
        conn.execute("DELETE FROM refs WHERE referrer IN"
                     " (SELECT id FROM paths WHERE path IN (SELECT path FROM q_dead))")
        try:
            conn.execute("DELETE FROM paths WHERE path IN (SELECT path FROM q_dead)")
        except sqlite3.IntegrityError as exc:
            raise StoreError(
                f"refusing to invalidate {len(paths)} path(s): a valid path still"
                " references one of them", hint="this is a bug in the caller") from exc
