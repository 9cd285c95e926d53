"""The local store: a state root with ``store/``, ``db.sqlite`` and their locks.

:class:`LocalStore` is the one object through which paths enter, are queried and leave
the store. Every path enters the same way (:meth:`LocalStore.register_tree`, or
:meth:`LocalStore.add_path` which stages a copy first)::

    stage under tmp/ → canonical modes → syncfs → [path lock, shared GC lock]
      → rename into store/ → fsync → commit row (refs checked in the same transaction)

so a crash leaves either nothing valid or a complete valid path; a leftover directory in
``store/`` without a row is ignored by readers, replaced by the next add, and reclaimed
by GC. Paths a process relies on are recorded as its temporary GC roots first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bstore.store import atomic
from bstore.store.crash import crash_point
from bstore.store.db import Database, PathInfo, PathNotValidError
from bstore.store.layout import StoreError, StoreLayout, check_root, create_dirs, store_is_empty
from bstore.store.locks import (
    StoreLockedError,
    TempRoots,
    gc_shared,
    held,
    path_lock,
    path_lock_file,
)
from bstore.store.manifest import InvalidTreeError, Manifest, Mcid, scan_tree
from bstore.store.paths import InvalidStorePath, PathKind, StorePath, make_store_path
from bstore.store.shape import check_tree_shape

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "LocalStore",
    "PathInfo",
    "PathNotValidError",
    "StoreError",
    "StoreLockedError",
]

#: How long to wait for a busy database or lock before "store locked" (seconds).
DEFAULT_LOCK_TIMEOUT = 30.0


def lock_timeout_from_env() -> float:
    """``$BSTORE_LOCK_TIMEOUT`` (seconds) or :data:`DEFAULT_LOCK_TIMEOUT`."""
    text = os.environ.get("BSTORE_LOCK_TIMEOUT")
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise StoreError(f"$BSTORE_LOCK_TIMEOUT={text!r} is not a number of seconds") from None
    if value < 0:
        raise StoreError(f"$BSTORE_LOCK_TIMEOUT={text!r} is negative")
    return value


class LocalStore:
    """A store under one state root. Open with :meth:`open`; use as a context manager.

    Attributes: ``root`` (the state root), ``store_dir`` (``root / "store"``),
    ``layout`` (:class:`~bstore.store.layout.StoreLayout`), ``lock_timeout`` (seconds).
    Not thread-safe: one instance per thread.
    """

    def __init__(self, layout: StoreLayout, db: Database, lock_timeout: float) -> None:
        self.layout = layout
        self.root = layout.root
        self.store_dir = layout.store_dir
        self.lock_timeout = lock_timeout
        self.db = db
        self.temp_roots = TempRoots(layout, lock_timeout)

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, *, create: bool = True,
             lock_timeout: float | None = None) -> LocalStore:
        """Open (and with ``create``, initialise) the store at ``root``.

        Refuses a root that is a symlink or group/world-writable, a database that is
        empty, corrupt, foreign or moved, and a missing database next to a non-empty
        ``store/`` (it never creates an empty database over existing paths).
        """
        timeout = lock_timeout_from_env() if lock_timeout is None else lock_timeout
        root = Path(os.path.abspath(root))
        # The store dir's string is part of every digest: resolve the parents (the root
        # itself may not be a symlink) so every spelling of the root gives the same one.
        root = Path(os.path.realpath(root.parent)) / root.name
        check_root(root)
        layout = StoreLayout(root)
        if not layout.db_path.exists():
            # (db checked again: another process may be creating the store right now)
            if not store_is_empty(layout) and not layout.db_path.exists():
                raise StoreError(
                    f"{str(layout.store_dir)!r} holds store paths but the database"
                    f" {str(layout.db_path)!r} is missing",
                    hint="restore db.sqlite from a backup; bstore will not create an empty"
                    " database over an existing store",
                )
            if not create:
                raise StoreError(f"no store at {str(root)!r}",
                                 hint="create one with bstore store add, or check --root")
            create_dirs(layout)
            check_root(root)
            if layout.db_path.exists():
                db = Database.open(layout.db_path, str(layout.store_dir), timeout)
            else:
                db = Database.create(layout.db_path, str(layout.store_dir), timeout)
        else:
            db = Database.open(layout.db_path, str(layout.store_dir), timeout)
            try:
                create_dirs(layout)  # a crash may have left a sub-directory missing
            except StoreError:
                db.close()
                raise
        return cls(layout, db, timeout)

    def close(self) -> None:
        """Drop this process's temporary roots and close the database."""
        self.temp_roots.close()
        self.db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- staging -------------------------------------------------------------------------

    @contextmanager
    def staging_dir(self, label: str) -> Iterator[Path]:
        """A fresh empty directory under ``tmp/`` for building a tree, removed on exit.

        GC leaves it alone while this store is open (its name starts with this process's
        temp-roots token). Pass a tree built in it to :meth:`register_tree` (which moves
        it away; whatever is left is removed on exit).
        """
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:40]
        self.temp_roots.ensure()
        path = self.layout.tmp_dir / f"{self.temp_roots.token}-{safe}-{os.urandom(4).hex()}"
        try:
            path.mkdir(mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot create staging dir {str(path)!r}: {exc.strerror}"
                             ) from exc
        try:
            yield path
        finally:
            atomic.remove_tree(path)

    # -- adding --------------------------------------------------------------------------

    def add_path(self, src: Path, name: str | None = None,
                 progress: atomic.Progress | None = None) -> StorePath:
        """Copy the file or tree ``src`` into the store as a SOURCE path and return it.

        ``name`` defaults to ``src``'s base name. The tree is hashed first: if that
        content is already valid, nothing is written at all; else it is copied (and hashed
        again while copying, so the record matches the bytes written). Hostile trees
        (devices, FIFOs, sockets, escaping symlinks, outside hardlinks, over-long paths) raise
        :class:`~bstore.store.manifest.InvalidTreeError` naming the entry, leaving nothing.
        """
        src = Path(os.path.abspath(src))
        name = self._check_name(src, name)
        # Hash first: a hostile tree is refused, and content already in the store is
        # found, before anything is written (re-adding costs one read, no writes).
        known = scan_tree(src).mcid.rpartition("-")[2]
        sp = make_store_path(PathKind.SOURCE, known, str(self.store_dir), name)
        self.temp_roots.add(sp)
        if self.db.is_valid(sp):
            return sp
        with self.staging_dir("add") as stage:
            staged = stage / "tree"
            # The copy is hashed again as it is written: if the source changed meanwhile,
            # the copy's own manifest (what the store holds) decides the path.
            manifest = atomic.copy_tree(src, staged, progress)
            return self._register(staged, name, manifest, PathKind.SOURCE, None, (), None, (),
                                  canonical=True)

    def add_paths(self, sources: Iterable[tuple[Path, str | None]],
                  progress: atomic.Progress | None = None) -> list[StorePath]:
        """:meth:`add_path` for many ``(src, name)`` pairs with one sync and one database
        transaction (much faster for many small paths); all or nothing."""
        scanned = []
        for src, name in sources:
            src = Path(os.path.abspath(src))
            name = self._check_name(src, name)
            known = scan_tree(src).mcid.rpartition("-")[2]
            scanned.append((src, name, make_store_path(PathKind.SOURCE, known,
                                                       str(self.store_dir), name)))
        self.temp_roots.add_many(sp for _src, _name, sp in scanned)
        result = [sp for _src, _name, sp in scanned]
        items = []
        with self.staging_dir("add-many") as stage:
            for i, (src, name, sp) in enumerate(scanned):
                if self.db.is_valid(sp):
                    continue
                staged = stage / str(i)
                manifest = atomic.copy_tree(src, staged, None)
                hex_digest = manifest.mcid.rpartition("-")[2]
                # The copy's own content decides (see add_path).
                result[i] = make_store_path(PathKind.SOURCE, hex_digest, str(self.store_dir),
                                            name)
                items.append(_Pending(staged, result[i], hex_digest, manifest,
                                      PathKind.SOURCE, (), None, (), True))
                if progress is not None:
                    progress(i + 1, 0)
            self._commit(items)
        return result

    def _check_name(self, src: Path, name: str | None) -> str:
        if name is None:
            name = src.name
            try:
                make_store_path(PathKind.SOURCE, "0" * 64, str(self.store_dir), name)
            except InvalidStorePath as exc:
                raise InvalidStorePath(exc.message, hint=f"pass a valid --name for {str(src)!r}"
                                       ) from exc
        else:
            make_store_path(PathKind.SOURCE, "0" * 64, str(self.store_dir), name)
        if not os.path.lexists(src):
            raise InvalidTreeError(f"cannot add {str(src)!r}: no such file or directory")
        return name

    def hash_path(self, src: Path) -> Mcid:
        """The MCID of ``src`` without adding it."""
        return scan_tree(src).mcid

    def register_tree(self, staged: Path, name: str, *, kind: PathKind,
                      hash_hex: str | None = None, references: Iterable[StorePath] = (),
                      deriver: str | None = None, expected_mcid: Mcid | None = None,
                      signatures: Iterable[str] = (),
                      manifest: Manifest | None = None) -> StorePath:
        """Make the tree ``staged`` (written under ``tmp/``, e.g. in a :meth:`staging_dir`)
        a valid store path and return it.

        Scans it, checks ``expected_mcid`` if given, computes the path (SOURCE: from the
        MCID, ``hash_hex`` must be omitted or equal to the MCID's hex; OUTPUT and
        GENERATION: ``hash_hex`` required, e.g. the derivation hash), canonicalises modes,
        syncs, renames it into ``store/`` and commits its row, references and signatures
        in one transaction (references must be valid, else nothing is registered). If the
        path is valid already, ``staged`` is removed and the existing path returned.
        ``staged`` is consumed either way.

        ``manifest``: the caller vouches for contents it wrote itself under ``tmp/``,
        hashing every file as it wrote it (the binary cache, the mesh, the archive
        importer): the tree is then walked with ``lstat`` only (names, types, sizes,
        executable bits, no missing or extra entries, link targets, hardlinks, escaping
        links; see :mod:`bstore.store.shape`) and file contents are not read again.
        """
        staged = Path(os.path.abspath(staged))
        tmp = str(self.layout.tmp_dir) + os.sep
        if not str(staged).startswith(tmp):
            raise StoreError(f"staged tree {str(staged)!r} is not under {tmp!r}",
                             hint="build it in LocalStore.staging_dir()")
        references = tuple(references)
        try:
            # Links may lead into the paths this one references (a generation's lib/
            # links into app outputs); GC keeps those alive as long as this path.
            link_roots = {str(r) for r in references}
            if manifest is None:
                manifest = scan_tree(staged, allowed_link_roots=link_roots)
            else:
                check_tree_shape(staged, manifest, allowed_link_roots=link_roots)
            mcid = manifest.mcid  # computed once: it hashes the whole manifest
            if expected_mcid is not None and mcid != expected_mcid:
                raise InvalidTreeError(
                    f"staged tree for {name!r} has content id {mcid},"
                    f" expected {expected_mcid}",
                    hint="the source delivered different content than it declared",
                )
            if kind is PathKind.SOURCE:
                mcid_hex = mcid.rpartition("-")[2]
                if hash_hex not in (None, mcid_hex):
                    raise StoreError(f"SOURCE path {name!r}: hash {hash_hex!r} is not the"
                                     f" content's {mcid_hex!r}")
                hash_hex = mcid_hex
            elif hash_hex is None:
                raise StoreError(f"registering {kind.value} path {name!r} needs hash_hex")
            return self._register(staged, name, manifest, kind, hash_hex, tuple(references),
                                  deriver, tuple(signatures), canonical=False)
        finally:
            atomic.remove_tree(staged)

    def _register(self, staged: Path, name: str, manifest: Manifest, kind: PathKind,
                  hash_hex: str | None, references: tuple[StorePath, ...],
                  deriver: str | None, signatures: tuple[str, ...], *,
                  canonical: bool) -> StorePath:
        if hash_hex is None:
            hash_hex = manifest.mcid.rpartition("-")[2]
        sp = make_store_path(kind, hash_hex, str(self.store_dir), name)
        self._commit([_Pending(staged, sp, hash_hex, manifest, kind, references, deriver,
                               signatures, canonical)])
        return sp

    def _commit(self, items: list[_Pending]) -> None:
        """Move staged trees into ``store/`` and register them: one sync, one transaction.

        Items may reference earlier items of the same batch.
        """
        # Roots first: from here on a concurrent GC keeps the paths and their references.
        self.temp_roots.add_many([it.sp for it in items]
                                 + [r for it in items for r in it.references])
        todo = [it for it in items if not self.db.is_valid(it.sp)]
        if not todo:
            return
        with ExitStack() as locks:
            # Sorted, so two batches locking overlapping buckets cannot deadlock.
            for lock_file in sorted({path_lock_file(self.layout, it.sp) for it in todo}):
                locks.enter_context(held(lock_file, exclusive=True, timeout=self.lock_timeout,
                                         what=f"the path lock {str(lock_file)!r}"))
            seen: set[StorePath] = set()
            fresh = []
            for it in todo:  # another process may have registered them while we waited
                if it.sp not in seen and not self.db.is_valid(it.sp):
                    seen.add(it.sp)
                    fresh.append(it)
            if not fresh:
                return
            for it in fresh:
                if not it.canonical:
                    atomic.canonicalise_tree(it.staged)
            crash_point("after-stage")
            atomic.syncfs(self.layout.tmp_dir)
            crash_point("after-fsync")
            batch = {it.sp for it in fresh}
            with gc_shared(self.layout, self.lock_timeout), self.db.write() as conn:
                # Checked before any rename so a bad reference leaves store/ untouched;
                # register() checks again inside this same transaction.
                wanted = {r for it in fresh for r in it.references if r not in batch}
                missing = self.db.missing(conn, wanted)
                if missing:
                    raise PathNotValidError(
                        f"cannot register {', '.join(repr(str(it.sp)) for it in fresh)}:"
                        f" references {', '.join(map(repr, missing))} are not valid",
                        hint="register (or import) the references first",
                    )
                self._move_into_store(fresh)
                crash_point("after-rename")
                for it in fresh:
                    self.db.register(conn, it.sp, it.kind, it.hash_hex, it.manifest,
                                     it.references, it.deriver, it.signatures)
            crash_point("after-commit")

    def _move_into_store(self, items: list[_Pending]) -> None:
        try:
            for it in items:
                target = self.store_dir / str(it.sp)
                if os.path.lexists(target):
                    # Unregistered leftover of a crashed add: we hold its lock.
                    atomic.remove_tree(target)
                os.rename(it.staged, target)
                atomic.finish_root(target, sync=len(items) == 1)
            if len(items) == 1:
                atomic.fsync_path(self.store_dir)
            else:  # one flush of the whole filesystem beats an fsync per path
                atomic.syncfs(self.store_dir)
        except OSError as exc:
            raise StoreError(f"cannot move staged trees into {str(self.store_dir)!r}:"
                             f" {exc.strerror}") from exc

    # -- queries -------------------------------------------------------------------------

    def is_valid(self, sp: StorePath) -> bool:
        """Whether ``sp`` is registered (its tree complete in ``store/``)."""
        return self.db.is_valid(sp)

    def query_info(self, sp: StorePath) -> PathInfo:
        """Metadata of a valid path; :class:`PathNotValidError` otherwise."""
        return self.db.query_info(sp)

    def query_manifest(self, sp: StorePath) -> Manifest:
        """The canonical manifest recorded when ``sp`` was registered (its MCID is the
        path's MCID); what ``store verify`` compares the files against."""
        return self.db.query_manifest(sp)

    def real_path(self, sp: StorePath) -> Path:
        """Where ``sp`` lives on disk (whether or not it is valid)."""
        return self.store_dir / str(sp)

    def full_path(self, sp: StorePath) -> str:
        """``sp`` as a full path string, as printed to users."""
        return f"{self.store_dir}/{sp}"  # not a Path join: called per path of a listing

    def parse_path(self, text: str) -> StorePath:
        """A store path from a full path inside this store (``<store>/<base>[/sub]``), a
        base name ``<digest>-<name>``, or a symlink (e.g. a GC root) pointing into it."""
        prefix = str(self.store_dir) + os.sep
        candidate = text
        if not candidate.startswith(prefix) and "/" in candidate and os.path.islink(candidate):
            candidate = os.path.realpath(candidate)
        if candidate.startswith(prefix):
            return StorePath.parse(candidate[len(prefix):].split("/", 1)[0])
        if "/" in candidate:
            raise InvalidStorePath(
                f"{text!r} is not in the store {str(self.store_dir)!r}",
                hint="give a path under the store dir or a <digest>-<name> base name",
            )
        return StorePath.parse(candidate)

    def closure(self, paths: Iterable[StorePath]) -> list[StorePath]:
        """``paths`` and everything they reference, dependencies before dependents
        (ties broken by base name, so the order is deterministic)."""
        wanted = [str(p) for p in paths]
        for p in wanted:
            if not self.db.is_valid(StorePath.parse(p)):
                raise self.db.not_valid(StorePath.parse(p))
        graph = self.db.reference_graph(wanted)
        return [StorePath.parse(p) for p in topo_order(graph)]

    def referrers(self, sp: StorePath) -> list[StorePath]:
        """Valid paths that reference ``sp`` (sorted; not ``sp`` itself)."""
        return self.db.referrers(sp)

    def valid_paths(self) -> list[StorePath]:
        """All valid paths, sorted by base name."""
        return self.db.valid_paths()

    def add_signatures(self, sp: StorePath, sigs: Iterable[str]) -> None:
        """Record more signatures for the valid path ``sp``."""
        self.db.add_signatures(sp, sigs)

    def add_temp_root(self, sp: StorePath) -> None:
        """Keep ``sp`` (and its closure) from GC until this store is closed."""
        self.temp_roots.add(sp)

    def add_root(self, sp: StorePath, name: str) -> Path:
        """Create (atomically replace) the GC root link ``gcroots/<name>`` → ``sp``."""
        if not self.is_valid(sp):
            raise self.db.not_valid(sp)
        if "/" in name or name.startswith(".") or not name:
            raise StoreError(f"GC root name {name!r} is not a plain file name")
        link = self.layout.gcroots_dir / name
        tmp = link.with_name(f".{name}.tmp-{os.urandom(4).hex()}")
        os.symlink(self.real_path(sp), tmp)
        os.rename(tmp, link)
        atomic.fsync_path(self.layout.gcroots_dir)
        return link

    # -- repair --------------------------------------------------------------------------

    def replace_path(self, sp: StorePath, staged: Path) -> None:
        """Swap a verified copy ``staged`` (under ``tmp/``) in for the damaged valid path
        ``sp`` (``store verify --repair``). ``staged`` must have ``sp``'s recorded MCID;
        the swap is atomic (``renameat2(RENAME_EXCHANGE)``) where the kernel allows.
        ``staged`` is consumed; the database row is unchanged.
        """
        try:
            info = self.query_info(sp)
            manifest = scan_tree(staged, allowed_link_roots={str(r) for r in info.references})
            if manifest.mcid != info.mcid:
                raise InvalidTreeError(
                    f"replacement for {str(sp)!r} has content id {manifest.mcid},"
                    f" the store recorded {info.mcid}",
                    hint="repair from a source that has the right content")
            atomic.canonicalise_tree(staged)
            atomic.syncfs(staged)
            target = self.real_path(sp)
            with path_lock(self.layout, sp, self.lock_timeout), \
                    gc_shared(self.layout, self.lock_timeout):
                if os.path.lexists(target):
                    atomic.make_writable_dir(target)
                    if not atomic.exchange(staged, target):
                        old = staged.with_name(staged.name + ".old")
                        os.rename(target, old)
                        os.rename(staged, target)
                        staged = old
                else:
                    os.rename(staged, target)
                atomic.finish_root(target)
                atomic.fsync_path(self.store_dir)
        finally:
            atomic.remove_tree(staged)


@dataclass(frozen=True, slots=True)
class _Pending:
    """A staged tree about to become a store path."""

    staged: Path
    sp: StorePath
    hash_hex: str
    manifest: Manifest
    kind: PathKind
    references: tuple[StorePath, ...]
    deriver: str | None
    signatures: tuple[str, ...]
    canonical: bool


def topo_order(graph: dict[str, list[str]]) -> list[str]:
    """Nodes of ``graph`` (node → references) with references first, ties by name.

    Self-references are ignored; cycles (impossible for content-addressed paths) raise.
    """
    remaining = {n: {r for r in refs if r != n and r in graph} for n, refs in graph.items()}
    referrers: dict[str, list[str]] = {n: [] for n in graph}
    for n, refs in remaining.items():
        for r in refs:
            referrers[r].append(n)
    import heapq

    ready = [n for n, refs in remaining.items() if not refs]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        n = heapq.heappop(ready)
        out.append(n)
        for m in referrers[n]:
            remaining[m].discard(n)
            if not remaining[m]:
                heapq.heappush(ready, m)
    if len(out) != len(graph):
        raise StoreError("the reference graph has a cycle",
                         hint="the database is inconsistent; run bstore store verify")
    return out
