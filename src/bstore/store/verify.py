"""Checking a store against its database, and repairing it from an export stream.

:func:`verify_store` compares what is on disk with what the database recorded:

- every valid path's directory exists (else ``missing``) and, with ``check_contents``,
  its tree matches the manifest recorded at registration entry by entry (``modified``
  with expected and actual blake3, ``added``, ``removed``, ``type``, ``mode``);
- no reference points at a row that is gone (``dangling-reference``; only possible when
  the database was edited behind the store's back);
- every directory in ``store/`` has a row (else ``unregistered``, a *warning*: that is
  what a crash between rename and commit leaves, and readers ignore it).

The walk does not use :func:`~bstore.store.manifest.scan_tree`: a verified store may
legitimately hold hardlinks across paths (``store optimise``), and a damaged path must
be described, not refused. :func:`repair_from_stream` re-imports damaged paths from an
export stream, verified in full before anything is swapped in (``LocalStore.replace_path``
swaps atomically).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import BinaryIO, Protocol

import blake3

from bstore.errors import BstoreError
from bstore.store.archive_meta import DEFAULT_MAX_BYTES, PathMeta
from bstore.store.atomic import run_on_threads
from bstore.store.local import LocalStore
from bstore.store.manifest import (
    MANIFEST_HEADER,
    EntryType,
    Manifest,
    ManifestEntry,
    hash_file,
)
from bstore.store.paths import StorePath


class ProblemKind(StrEnum):
    """What is wrong (or was done) with a path."""

    MISSING = "missing"
    MODIFIED = "modified"
    ADDED = "added"
    REMOVED = "removed"
    TYPE = "type"
    MODE = "mode"
    BAD_RECORD = "bad-record"
    DANGLING_REFERENCE = "dangling-reference"
    UNREGISTERED = "unregistered"
    REPAIRED = "repaired"
    REPAIR_FAILED = "repair-failed"


#: Kinds that describe a damaged tree of a valid path (what --repair can fix).
DAMAGE = frozenset({ProblemKind.MISSING, ProblemKind.MODIFIED, ProblemKind.ADDED,
                    ProblemKind.REMOVED, ProblemKind.TYPE, ProblemKind.MODE})
#: Kinds that are reported but do not make the store wrong.
_NOT_ERRORS = frozenset({ProblemKind.UNREGISTERED, ProblemKind.REPAIRED})


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``path`` is the full store path, ``entry`` the file inside it."""

    kind: ProblemKind
    path: str
    message: str
    entry: str | None = None

    @property
    def severity(self) -> str:
        """``error`` (exit code 1) or ``warning``/``info``."""
        if self.kind is ProblemKind.REPAIRED:
            return "info"
        return "warning" if self.kind in _NOT_ERRORS else "error"

    def to_dict(self) -> dict[str, str | None]:
        """JSON-ready form."""
        return {"kind": self.kind.value, "severity": self.severity, "path": self.path,
                "entry": self.entry, "message": self.message}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verify (and repair) run."""

    checked: int
    problems: tuple[Problem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    def damaged(self) -> list[str]:
        """Full store paths of valid paths whose trees are damaged."""
        return sorted({p.path for p in self.problems if p.kind in DAMAGE})

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (docs/formats.md §4)."""
        return {"ok": self.ok, "checked": self.checked,
                "problems": [p.to_dict() for p in self.problems]}


def _shown(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "."


def _actual_entry(abs_path: bytes, rel: bytes, st: os.stat_result, check_contents: bool
                  ) -> tuple[str, int, str | None]:
    """``(type code, size, blake3 or None)`` of what is on disk; ``?`` for other types."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "d", 0, None
    if stat.S_ISLNK(mode):
        target = os.readlink(abs_path)
        return "l", len(target), blake3.blake3(target).hexdigest()
    if stat.S_ISREG(mode):
        code = "x" if mode & stat.S_IXUSR else "f"
        digest = hash_file(os.fsdecode(abs_path), st.st_size) if check_contents else None
        return code, st.st_size, digest
    return "?", 0, None


def diff_tree(root: os.PathLike[str] | str, manifest: Manifest, shown_path: str,
              check_contents: bool = True) -> list[Problem]:
    """Compare the tree at ``root`` with ``manifest``; one :class:`Problem` per difference.

    Without ``check_contents`` only types, the executable bit and sizes are compared.
    """
    root_b = os.fsencode(root)
    expected = {e.path: e for e in manifest.entries}
    problems: list[Problem] = []
    seen: set[bytes] = set()

    def report(kind: ProblemKind, rel: bytes, message: str) -> None:
        entry = _shown(rel)
        where = f"{shown_path}/{entry}" if rel else shown_path
        problems.append(Problem(kind, shown_path, f"{where}: {message}", entry))

    stack = [b""]
    while stack:
        rel = stack.pop()
        abs_path = root_b + b"/" + rel if rel else root_b
        try:
            st = os.lstat(abs_path)
            actual = _actual_entry(abs_path, rel, st, check_contents)
        except OSError as exc:
            report(ProblemKind.MODIFIED, rel, f"cannot read: {exc.strerror}")
            seen.add(rel)
            continue
        seen.add(rel)
        want = expected.get(rel)
        if want is None:
            report(ProblemKind.ADDED, rel, f"unexpected {_TYPE_NAMES[actual[0]]}")
            continue  # an added directory's contents are not listed one by one
        if not _compare(want, actual, rel, report):
            continue
        if actual[0] == "d":
            try:
                names = os.listdir(abs_path)
            except OSError as exc:
                report(ProblemKind.MODIFIED, rel, f"cannot list: {exc.strerror}")
                continue
            stack.extend(rel + b"/" + n if rel else n for n in names)
    # Entries below one already reported (type changed, or removed) are implied by it.
    cut = {p.entry.encode("utf-8", "surrogateescape") for p in problems
           if p.kind is ProblemKind.TYPE and p.entry is not None}
    for rel in sorted(p for p in expected if p not in seen):
        if _below(rel, cut):
            continue
        report(ProblemKind.REMOVED, rel, f"{_TYPE_NAMES[expected[rel].type.value]} is gone")
        cut.add(rel)
    problems.sort(key=lambda p: (p.entry or "").encode("utf-8", "surrogateescape"))
    return problems


_TYPE_NAMES = {"d": "directory", "f": "file", "x": "executable file", "l": "symlink",
               "?": "special file (device, FIFO or socket)"}


def _compare(want: ManifestEntry, actual: tuple[str, int, str | None], rel: bytes,
             report: _Reporter) -> bool:
    """Report differences of one entry; return whether to descend into it."""
    code, size, digest = actual
    wcode = want.type.value
    if code != wcode:
        if {code, wcode} == {"f", "x"}:
            report(ProblemKind.MODE, rel,
                   f"expected a {_TYPE_NAMES[wcode]}, got a {_TYPE_NAMES[code]}")
        else:
            report(ProblemKind.TYPE, rel,
                   f"expected a {_TYPE_NAMES[wcode]}, got a {_TYPE_NAMES[code]}")
            return False
    if want.type is EntryType.DIRECTORY:
        return True
    if digest is not None and digest != want.blake3_hex:
        report(ProblemKind.MODIFIED, rel, f"expected blake3 {want.blake3_hex}, got {digest}")
    elif size != want.size:
        report(ProblemKind.MODIFIED, rel, f"expected size {want.size}, got {size}")
    return False


class _Reporter(Protocol):
    def __call__(self, kind: ProblemKind, rel: bytes, message: str) -> None: ...


def _below(rel: bytes, cut: set[bytes]) -> bool:
    while rel:
        rel = rel.rpartition(b"/")[0]
        if rel in cut:
            return True
    return False


def verify_store(store: LocalStore, paths: Sequence[StorePath] | None = None, *,
                 check_contents: bool = False) -> VerifyReport:
    """Verify ``paths`` (default: the whole store, including store-wide checks)."""
    whole = paths is None
    targets = store.valid_paths() if paths is None else list(paths)
    problems: list[Problem] = []
    for sp in targets:
        problems.extend(verify_path(store, sp, check_contents=check_contents))
    if whole:
        for base in sorted({b for b, _row in store.db.dangling_references()}):
            problems.append(Problem(
                ProblemKind.DANGLING_REFERENCE, store.full_path(StorePath.parse(base)),
                f"{store.store_dir}/{base}: references a path whose database row is gone"))
        valid = {str(p) for p in targets}
        try:
            names = sorted(os.listdir(store.store_dir))
        except OSError as exc:
            raise BstoreError(f"cannot list {str(store.store_dir)!r}: {exc.strerror}"
                              ) from exc
        for name in names:
            if name not in valid and not name.startswith("."):
                full = f"{store.store_dir}/{name}"
                problems.append(Problem(
                    ProblemKind.UNREGISTERED, full,
                    f"{full}: in the store directory but not in the database (a crash"
                    " leftover or a deleted row; GC reclaims it)"))
    return VerifyReport(len(targets), tuple(problems))


def disk_mcid(root: os.PathLike[str] | str) -> str | None:
    """The MCID of the tree at ``root`` as it is now, or ``None`` if it holds something
    no manifest can (a special file, an unreadable entry).

    The fast path of ``verify --check-contents``: one walk that hashes every file and
    formats the canonical manifest lines without building entry objects; only a path
    whose MCID differs is diffed entry by entry. Unlike ``scan_tree`` it accepts files
    hardlinked across store paths (``store optimise``) and checks no names: the
    recorded manifest already passed those checks, and any change shows in the MCID.
    """
    root_b = os.fsencode(root)
    lines: list[tuple[bytes, bytes]] = []
    files: list[tuple[bytes, bytes, os.stat_result]] = []
    try:
        st = os.lstat(root_b)
        if not stat.S_ISDIR(st.st_mode):
            files.append((root_b, b"", st))
        else:
            lines.append((b"", b"d 0 - 0:\n"))
            stack = [b""]
            while stack:
                rel_dir = stack.pop()
                abs_dir = root_b + b"/" + rel_dir if rel_dir else root_b
                prefix = rel_dir + b"/" if rel_dir else b""
                with os.scandir(abs_dir) as it:
                    for entry in it:
                        rel = prefix + entry.name
                        if entry.is_dir(follow_symlinks=False):
                            lines.append((rel, b"d 0 - %d:%s\n" % (len(rel), rel)))
                            stack.append(rel)
                        else:
                            files.append((entry.path, rel, entry.stat(follow_symlinks=False)))
        if not _hash_lines(files, lines):
            return None
    except (OSError, _NotInManifest):
        return None
    lines.sort()
    hasher = blake3.blake3(MANIFEST_HEADER)
    for _rel, line in lines:
        hasher.update(line)
    return "mcid1-manifest-blake3-" + str(hasher.hexdigest())


class _NotInManifest(Exception):
    pass


#: Threads hashing a tree's files in :func:`disk_mcid`: reading and hashing release the
#: GIL, and two threads hash the OTP tree ~20% faster than one (more gain nothing on a
#: two-core machine).
_HASH_THREADS = 2


def _hash_lines(files: list[tuple[bytes, bytes, os.stat_result]],
                lines: list[tuple[bytes, bytes]]) -> bool:
    """Append the manifest lines of ``files`` (absolute, relative, lstat) to ``lines``;
    False if one cannot be read or is not a file or symlink."""
    workers = max(1, min(_HASH_THREADS, os.cpu_count() or 1, len(files) // 64))
    shares: list[list[tuple[bytes, bytes]]] = [[] for _ in range(workers)]
    failed = threading.Event()

    def work(i: int) -> None:
        out = shares[i]
        try:
            for abs_path, rel, st in files[i::workers]:
                if failed.is_set():
                    return
                out.append((rel, _line(abs_path, rel, st)))
        except (OSError, _NotInManifest):
            failed.set()

    run_on_threads(work, workers)
    if failed.is_set():
        return False
    for share in shares:
        lines.extend(share)
    return True


def _line(abs_path: bytes, rel: bytes, st: os.stat_result) -> bytes:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        size = st.st_size
        if size >= 1 << 20:
            digest = hash_file(os.fsdecode(abs_path), size)
        else:
            fd = os.open(abs_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                # One byte more than lstat said: a file growing under us shows as changed.
                data = os.read(fd, size + 1)
            finally:
                os.close(fd)
            digest = blake3.blake3(data).hexdigest()
            size = len(data)
        code = b"x" if mode & stat.S_IXUSR else b"f"
    elif stat.S_ISLNK(mode):
        target = os.readlink(abs_path)
        digest = blake3.blake3(target).hexdigest()
        size = len(target)
        code = b"l"
    else:
        raise _NotInManifest
    return b"%s %d %s %d:%s\n" % (code, size, digest.encode(), len(rel), rel)


def verify_path(store: LocalStore, sp: StorePath, *, check_contents: bool) -> list[Problem]:
    """The problems of one path (which must be valid)."""
    full = store.full_path(sp)
    if not store.is_valid(sp):
        return [Problem(ProblemKind.MISSING, full, f"{full}: not a valid path")]
    real = store.real_path(sp)
    if not os.path.lexists(real):
        return [Problem(ProblemKind.MISSING, full, f"{full}: registered but its directory"
                        " is gone")]
    if not check_contents:
        return []  # existence only, like nix-store --verify: no manifest is parsed
    try:
        recorded = store.query_info(sp).mcid
        if disk_mcid(real) == recorded:
            return []
        manifest = store.query_manifest(sp)
    except BstoreError as exc:
        return [Problem(ProblemKind.BAD_RECORD, full, f"{full}: {exc.message}")]
    problems = diff_tree(real, manifest, full, check_contents=True)
    if not problems and manifest.mcid != recorded:
        problems.append(Problem(ProblemKind.BAD_RECORD, full, f"{full}: the database records"
                                f" MCID {recorded} but its manifest has {manifest.mcid}"))
    return problems


def repair_from_stream(store: LocalStore, report: VerifyReport, raw: BinaryIO, *,
                       source: str, max_bytes: int = DEFAULT_MAX_BYTES,
                       paths: Sequence[StorePath] | None = None) -> VerifyReport:
    """Replace the damaged paths of ``report`` (and re-register unregistered dirs) with
    their copies from the export stream ``raw``; return the report after repair
    (``paths`` as given to :func:`verify_store`, re-verified afterwards).

    The whole stream is verified before the first path is touched. Each damaged path
    is then swapped atomically; paths the stream lacks stay reported as errors.
    """
    damaged = {store.parse_path(p) for p in report.damaged()}
    unregistered = {store.parse_path(p.path) for p in report.problems
                    if p.kind is ProblemKind.UNREGISTERED}
    dangling = {store.parse_path(p.path) for p in report.problems
                if p.kind is ProblemKind.DANGLING_REFERENCE}

    def select(meta: PathMeta) -> bool:
        return meta.path in damaged or meta.path in unregistered

    # Imported here: only --repair reads a stream; plain verify skips the import.
    from bstore.store.archive import stage_stream

    done: list[Problem] = []
    fixed: set[StorePath] = set()
    with contextlib.ExitStack() as stack:
        staged = stage_stream(store, raw, stack, source=source, max_bytes=max_bytes,
                              select=select)
        for item in staged:
            if item.tree is None:
                continue
            meta = item.meta
            if meta.path in damaged:
                store.replace_path(meta.path, item.tree)
                what = "replaced with the verified copy from"
            else:
                store.register_tree(
                    item.tree, meta.path.name, kind=meta.kind, hash_hex=meta.hash_hex,
                    references=meta.references,
                    deriver=meta.deriver,
                    expected_mcid=meta.mcid, signatures=meta.signatures)
                what = "re-registered from"
            fixed.add(meta.path)
            done.append(Problem(ProblemKind.REPAIRED, store.full_path(meta.path),
                                f"{store.full_path(meta.path)}: {what} {source}"))
        for item in staged:
            if item.meta.path in dangling and _relink(store, item.meta):
                done.append(Problem(
                    ProblemKind.REPAIRED, store.full_path(item.meta.path),
                    f"{store.full_path(item.meta.path)}: references restored from {source}"))
    for sp in sorted(damaged - fixed, key=str):
        done.append(Problem(ProblemKind.REPAIR_FAILED, store.full_path(sp),
                            f"{store.full_path(sp)}: not in {source}, cannot repair"))
    after = verify_store(store, paths, check_contents=True)
    return VerifyReport(after.checked, tuple(done) + after.problems)


def _relink(store: LocalStore, meta: PathMeta) -> bool:
    """Point a referrer's dangling reference rows at the paths its stream metadata names
    (only when the stream describes the same content and all of them are valid)."""
    if store.query_info(meta.path).mcid != meta.mcid:
        return False
    if not all(r == meta.path or store.is_valid(r) for r in meta.references):
        return False
    store.db.relink_references(meta.path, meta.references)
    return True
