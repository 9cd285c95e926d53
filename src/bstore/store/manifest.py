"""Tree manifests and the content identity (MCID) of a tree.

The manifest of a tree lists every entry, sorted by path bytes, with its type, size and
the blake3 of its contents (or of its link target). Its canonical byte form is::

    bstore-manifest-1\\n
    <type> <size> <blake3-hex or -> <path-length>:<path-bytes>\\n      (one per entry)

``type`` is ``d`` (directory), ``f`` (file), ``x`` (executable file) or ``l`` (symlink).
Paths are relative, ``/``-separated, and the root is the empty path; a directory's
hash field is ``-`` and its size ``0``. The path is length-prefixed so any byte but
``/`` and NUL may appear in a name without escaping. The MCID is
``mcid1-manifest-blake3-<blake3 hex of those bytes>``; two trees with one MCID are
byte-identical (modes beyond the executable bit, owners, times and hardlink layout are
not content). docs/formats.md documents this with golden vectors.

Everything here but :func:`scan_tree` and :func:`hash_file` is pure.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NewType

import blake3

from bstore.errors import BstoreError

# Re-exported: callers met symlink_escapes here first.
from bstore.store.symlinks import find_escaping_link
from bstore.store.symlinks import symlink_escapes as symlink_escapes

MANIFEST_HEADER = b"bstore-manifest-1\n"
MCID_PREFIX = "mcid1-manifest-blake3-"
Mcid = NewType("Mcid", str)
_MCID_RE = re.compile(r"mcid1-manifest-blake3-[0-9a-f]{64}")
_HEX64_RE = re.compile(rb"[0-9a-f]{64}")

#: Longest relative path we accept (Linux PATH_MAX); deeper trees are refused,
#: not walked, so a hostile 100k-deep tree cannot exhaust memory or the stack.
MAX_PATH_BYTES = 4096
#: Longest single name (Linux NAME_MAX).
MAX_NAME_BYTES = 255
#: Files at least this big are hashed through mmap, which lets blake3 use SIMD over the
#: whole file without Python-level read loops; small files are cheaper to read().
_MMAP_THRESHOLD = 1 << 20
_READ_CHUNK = 1 << 20


class InvalidTreeError(BstoreError):
    """A tree (or manifest) that cannot be stored: bad names, types or links."""


class EntryType(StrEnum):
    """Kinds of tree entries a store path may contain."""

    DIRECTORY = "d"
    FILE = "f"
    EXECUTABLE = "x"
    SYMLINK = "l"


def validate_mcid(text: str) -> Mcid:
    """Return ``text`` as an :data:`Mcid` if it has the ``mcid1-manifest-blake3-`` form."""
    if not _MCID_RE.fullmatch(text):
        raise BstoreError(
            f"{text!r} is not a content id",
            hint="expected mcid1-manifest-blake3- followed by 64 lowercase hex digits",
        )
    return Mcid(text)


#: Fast accept of the common case (checked on every entry of every tree scanned); the
#: slow path below only runs to explain a rejection.
_PATH_OK = re.compile(rb"(?:[^/\x00]{1,%d}/)*[^/\x00]{1,%d}" % (MAX_NAME_BYTES, MAX_NAME_BYTES))
_DOT_PART = re.compile(rb"(?:^|/)\.\.?(?:/|$)")


def validate_entry_path(path: bytes) -> bytes:
    """Check a relative entry path: no empty, ``.``/``..`` or over-long components, no NUL."""
    if path == b"" or (len(path) <= MAX_PATH_BYTES and _PATH_OK.fullmatch(path)
                       and not _DOT_PART.search(path)):
        return path
    shown = path[:80].decode("utf-8", "backslashreplace")
    if len(path) > MAX_PATH_BYTES:
        raise InvalidTreeError(f"entry path {shown!r}... is longer than {MAX_PATH_BYTES} bytes")
    if b"\0" in path:
        raise InvalidTreeError(f"entry path {shown!r} contains a NUL byte")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise InvalidTreeError(
                f"entry path {shown!r} has an empty, '.' or '..' component",
                hint="entry paths are relative, '/'-separated, without . or ..",
            )
        if len(part) > MAX_NAME_BYTES:
            raise InvalidTreeError(
                f"entry path {shown!r} has a name longer than {MAX_NAME_BYTES} bytes"
            )
    return path


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One entry of a manifest. ``blake3_hex`` is ``None`` exactly for directories."""

    path: bytes
    type: EntryType
    size: int
    blake3_hex: str | None

    def __post_init__(self) -> None:
        validate_entry_path(self.path)
        if self.type is EntryType.DIRECTORY:
            if self.size != 0 or self.blake3_hex is not None:
                raise InvalidTreeError(f"directory entry {self.shown!r} has a size or hash")
        elif self.blake3_hex is None or not _HEX64_RE.fullmatch(self.blake3_hex.encode()):
            raise InvalidTreeError(f"entry {self.shown!r} has no valid blake3 hash")
        if self.size < 0:
            raise InvalidTreeError(f"entry {self.shown!r} has a negative size")

    @property
    def shown(self) -> str:
        """The path for messages (undecodable bytes escaped)."""
        return self.path.decode("utf-8", "backslashreplace") or "."

    def to_bytes(self) -> bytes:
        """The canonical manifest line of this entry."""
        return (
            f"{self.type.value} {self.size} {self.blake3_hex or '-'} {len(self.path)}:".encode()
            + self.path
            + b"\n"
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """A whole tree's manifest: entries strictly sorted by path bytes, root first."""

    entries: tuple[ManifestEntry, ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise InvalidTreeError("a manifest needs at least a root entry")
        if self.entries[0].path != b"":
            raise InvalidTreeError("the first manifest entry must be the root (empty path)")
        root_is_dir = self.entries[0].type is EntryType.DIRECTORY
        if not root_is_dir and len(self.entries) > 1:
            raise InvalidTreeError("a manifest whose root is not a directory has other entries")
        previous = b""
        directories = {b""}
        for entry in self.entries[1:]:
            if entry.path <= previous:
                kind = "duplicate" if entry.path == previous else "unsorted"
                raise InvalidTreeError(f"{kind} manifest entry {entry.shown!r}")
            parent = entry.path.rpartition(b"/")[0]
            if parent not in directories:
                raise InvalidTreeError(
                    f"manifest entry {entry.shown!r} has no parent directory entry"
                )
            if entry.type is EntryType.DIRECTORY:
                directories.add(entry.path)
            previous = entry.path

    def to_bytes(self) -> bytes:
        """The canonical byte form (what the MCID hashes)."""
        return MANIFEST_HEADER + b"".join(e.to_bytes() for e in self.entries)

    @property
    def mcid(self) -> Mcid:
        """The content id of the tree this manifest describes."""
        return Mcid(MCID_PREFIX + blake3.blake3(self.to_bytes()).hexdigest())

    @property
    def nar_size(self) -> int:
        """Total bytes of file contents and link targets."""
        return sum(e.size for e in self.entries)

    def files(self) -> Iterator[ManifestEntry]:
        """Entries that carry contents (files, executables, symlinks)."""
        return (e for e in self.entries if e.type is not EntryType.DIRECTORY)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest") -> Manifest:
        """Parse the canonical form strictly; errors name ``source`` and the line."""
        if not data.startswith(MANIFEST_HEADER):
            raise InvalidTreeError(f"{source}: missing header {MANIFEST_HEADER!r}")
        pos = len(MANIFEST_HEADER)
        entries: list[ManifestEntry] = []
        line = 1
        while pos < len(data):
            line += 1
            entry, pos = parse_entry_line(data, pos, f"{source}:{line}")
            entries.append(entry)
        return cls(tuple(entries))


def parse_entry_line(data: bytes, pos: int, where: str) -> tuple[ManifestEntry, int]:
    """Parse one canonical entry line of ``data`` at ``pos``; return it and the next pos."""
    colon = data.find(b":", pos, pos + 100)
    if colon < 0:
        raise InvalidTreeError(f"{where}: malformed manifest entry header")
    fields = data[pos:colon].split(b" ")
    if len(fields) != 4 or not all(f.isdigit() for f in (fields[1], fields[3])):
        raise InvalidTreeError(f"{where}: malformed manifest entry header {data[pos:colon]!r}")
    type_code, size, digest, path_len = fields[0], int(fields[1]), fields[2], int(fields[3])
    if path_len > MAX_PATH_BYTES:
        raise InvalidTreeError(f"{where}: entry path longer than {MAX_PATH_BYTES} bytes")
    start = colon + 1
    end = start + path_len
    if end >= len(data) + 1 or data[end : end + 1] != b"\n":
        raise InvalidTreeError(f"{where}: entry path length does not match the line")
    try:
        entry_type = EntryType(type_code.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise InvalidTreeError(
            f"{where}: unknown entry type {type_code!r}",
            hint="only d, f, x and l entries exist; hardlinks and devices are not stored",
        ) from None
    entry = ManifestEntry(
        path=data[start:end],
        type=entry_type,
        size=size,
        blake3_hex=None if digest == b"-" else digest.decode("ascii", "replace"),
    )
    return entry, end + 1


def hash_file(path: str | os.PathLike[str], size: int | None = None) -> str:
    """blake3 hex of a regular file's contents."""
    if size is None:
        size = os.stat(path).st_size
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= 1 << 27 else 1)
    if size >= _MMAP_THRESHOLD:
        hasher.update_mmap(path)
    else:
        # os-level read: a BufferedReader per small file costs more than the hashing.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, _READ_CHUNK):
                hasher.update(chunk)
        finally:
            os.close(fd)
    return str(hasher.hexdigest())


def escaping_link_error(shown_root: str, rel: bytes, target: bytes, why: str) -> InvalidTreeError:
    """The error for a symlink that does not stay inside its tree."""
    return InvalidTreeError(
        f"{shown_root}: symlink {rel.decode('utf-8', 'backslashreplace') or '.'!r} -> "
        f"{target.decode('utf-8', 'backslashreplace')!r} {why}",
        hint="store paths may only contain links that stay inside them",
    )


def _entry_for(
    abs_path: bytes,
    rel: bytes,
    st: os.stat_result,
    shown_root: str,
    links: dict[bytes, bytes],
    allowed_roots: Collection[bytes] = (),
) -> ManifestEntry:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return ManifestEntry(rel, EntryType.DIRECTORY, 0, None)
    if stat.S_ISLNK(mode):
        target = os.readlink(abs_path)
        if symlink_escapes(rel, target, allowed_roots):
            raise escaping_link_error(shown_root, rel, target, "points outside the tree")
        links[rel] = target
        return ManifestEntry(rel, EntryType.SYMLINK, len(target), blake3.blake3(target).hexdigest())
    if stat.S_ISREG(mode):
        kind = EntryType.EXECUTABLE if mode & stat.S_IXUSR else EntryType.FILE
        digest = hash_file(abs_path.decode("utf-8", "surrogateescape"), st.st_size)
        return ManifestEntry(rel, kind, st.st_size, digest)
    what = (
        "a FIFO" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "of an unknown type"
    )
    raise InvalidTreeError(
        f"{shown_root}: {rel.decode('utf-8', 'backslashreplace') or '.'!r} is {what}",
        hint="store paths hold only directories, regular files and symlinks",
    )


def tree_os_error(exc: OSError, shown_root: str, rel: bytes) -> InvalidTreeError:
    """The error for an ``OSError`` met at entry ``rel`` of the tree ``shown_root``."""
    shown = rel.decode("utf-8", "backslashreplace") or "."
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidTreeError(
            f"{shown_root}: entry path {shown[:120]!r}... is too long"
            f" ({len(rel)} bytes, nested {rel.count(b'/') + 1} deep)",
            hint=f"store paths hold entry paths of at most {MAX_PATH_BYTES} bytes;"
            " flatten the tree",
        )
    return InvalidTreeError(f"{shown_root}: cannot read {shown[:200]!r}: {exc.strerror}",
                            hint="check the tree's permissions")


def scan_tree(
    root: str | os.PathLike[str],
    *,
    outside_links_ok: bool = False,
    allowed_link_roots: Collection[str] = (),
) -> Manifest:
    """Walk ``root`` (without following symlinks) and build its manifest.

    Pass ``outside_links_ok=True`` to scan a path already in the store: after
    ``store optimise`` its files share inodes with other store paths by design.
    ``allowed_link_roots`` are base names of store paths this tree's symlinks may lead
    into (``../<base>/...`` from the root): the paths it references.

    Rejects devices, FIFOs, sockets, symlinks leaving the tree, invalid or over-long
    names, and files hardlinked from outside the tree (their contents could change
    through the other link while we copy them). Iterative, so depth is bounded only by
    :data:`MAX_PATH_BYTES`.
    """
    root_b = os.fsencode(Path(root))
    shown_root = os.fsdecode(root_b)
    try:
        st = os.lstat(root_b)
    except OSError as exc:
        raise InvalidTreeError(f"cannot read {shown_root!r}: {exc.strerror}") from exc
    links: dict[bytes, bytes] = {}
    allowed = frozenset(os.fsencode(r) for r in allowed_link_roots)
    entries = [_entry_for(root_b, b"", st, shown_root, links, allowed)]
    link_counts: dict[tuple[int, int], list[int]] = {}
    _note_links(link_counts, st)
    if entries[0].type is EntryType.DIRECTORY:
        stack: list[bytes] = [b""]
        while stack:
            rel_dir = stack.pop()
            abs_dir = root_b + b"/" + rel_dir if rel_dir else root_b
            try:
                with os.scandir(abs_dir) as it:
                    children = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
            except OSError as exc:
                raise tree_os_error(exc, shown_root, rel_dir) from exc
            for name, child_st in children:
                rel = rel_dir + b"/" + name if rel_dir else name
                try:
                    entry = _entry_for(abs_dir + b"/" + name, validate_entry_path(rel),
                                       child_st, shown_root, links, allowed)
                except OSError as exc:
                    raise tree_os_error(exc, shown_root, rel) from exc
                entries.append(entry)
                _note_links(link_counts, child_st)
                if entry.type is EntryType.DIRECTORY:
                    stack.append(rel)
    for (_dev, _ino), (nlink, seen) in link_counts.items():
        if seen < nlink and not outside_links_ok:
            raise InvalidTreeError(
                f"{shown_root}: a file in the tree is hardlinked from outside it"
                f" ({nlink} links, {seen} inside)",
                hint="copy the file (cp without -l) before adding the tree",
            )
    escaping = find_escaping_link(links, allowed)
    if escaping is not None:
        raise escaping_link_error(shown_root, *escaping)
    entries.sort(key=lambda e: e.path)
    return Manifest(tuple(entries))


def _note_links(counts: dict[tuple[int, int], list[int]], st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        counts.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0])[1] += 1


def compute_mcid(root: str | os.PathLike[str]) -> Mcid:
    """The MCID of the tree (or single file) at ``root``."""
    return scan_tree(root).mcid
