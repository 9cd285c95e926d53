"""Export and import of store paths as one zstd-compressed stream.

``export_paths`` writes the paths (by default with their closure, dependencies first,
ties broken by base name, so the same paths always give the same bytes) through
:class:`~bstore.store.archive_format.StreamWriter`, re-hashing every file on the way so
a damaged path is never exported as if it were good. ``import_stream`` reads a stream
into staging dirs under ``<root>/tmp`` while verifying every file hash, each path's
MCID, NarSize and recomputed store path and that every reference is valid or comes
earlier in the stream — all of it for the whole stream before the first path is
registered. A rejected stream leaves nothing in ``store/`` or ``tmp/``.

The decompressor is bounded twice: the zstd window (``max_window_size``) caps memory,
and ``max_bytes`` caps everything the stream may expand to (a zstd bomb of a few KiB
cannot fill the disk).
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import blake3

from bstore.store.archive_format import (
    ArchiveError,
    StreamWriter,
)
from bstore.store.archive_meta import PathMeta
from bstore.store.manifest import EntryType, Manifest, ManifestEntry
from bstore.store.paths import StorePath

#: zstd level 3: within ~10% of the best ratio of level 19 on BEAM files at a fraction
#: of the CPU; the level is fixed because it is part of the byte-for-byte determinism.
COMPRESSION_LEVEL = 3
#: Largest zstd window we decode (8 MiB, what zstd's own levels up to 19 use at most).
#: Our writer stays far below it; a frame asking for more is refused before allocating.
MAX_WINDOW_SIZE = 1 << 23
#: Default cap on the uncompressed size of a stream we import.
DEFAULT_MAX_BYTES = 64 << 30
_READ_CHUNK = 1 << 20


class ArchiveStore(Protocol):
    """What export/import need from a store (``LocalStore`` provides it)."""

    @property
    def store_dir(self) -> Path: ...


@dataclass(frozen=True, slots=True)
class ImportedPath:
    """One path of an imported stream; ``added`` is False when it was already valid."""

    path: StorePath
    added: bool


@dataclass(frozen=True, slots=True)
class StagedPath:
    """A fully verified path from a stream, staged under ``tree`` (None if skipped)."""

    meta: PathMeta
    manifest: Manifest
    tree: Path | None


def _shown(store_dir: Path, sp: StorePath) -> str:
    return f"{store_dir}/{sp}"


class DiskSink:
    """Writes one tree under ``root`` (which must not exist yet)."""

    def __init__(self, root: Path) -> None:
        self._root = os.fsencode(root)
        self._file: BinaryIO | None = None

    def _abs(self, path: bytes) -> bytes:
        return self._root + b"/" + path if path else self._root

    def directory(self, path: bytes) -> None:
        """Create a directory (parents were created by earlier entries)."""
        with _mapped(path):
            os.mkdir(self._abs(path), 0o755)

    def file(self, path: bytes, executable: bool) -> Callable[[bytes], object]:
        """Create a file exclusively, never through a symlink."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with _mapped(path):
            fd = os.open(self._abs(path), flags, 0o755 if executable else 0o644)
        self._file = os.fdopen(fd, "wb")
        return self._file.write

    def close_file(self) -> None:
        """Close the file written last."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def symlink(self, path: bytes, target: bytes) -> None:
        """Create a symlink."""
        with _mapped(path):
            os.symlink(target, self._abs(path))

    def abort(self) -> None:
        """Close any open file (the staging dir is removed by its owner)."""
        self.close_file()


@contextlib.contextmanager
def _mapped(path: bytes) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        shown = path.decode("utf-8", "backslashreplace") or "."
        raise ArchiveError(f"cannot write entry {shown!r} while staging: {exc.strerror}"
                           ) from exc


# ----------------------------------------------------------------------------- export

def export_order(references: Callable[[StorePath], Iterable[StorePath]],
                 paths: Iterable[StorePath]) -> list[StorePath]:
    """``paths`` sorted dependencies first; among independent paths, by base name.

    Only references inside ``paths`` constrain the order (the caller decides whether
    ``paths`` is a closure). Deterministic: independent of the order of ``paths``.
    """
    wanted = set(paths)
    deps = {p: {r for r in references(p) if r in wanted and r != p} for p in wanted}
    users: dict[StorePath, list[StorePath]] = {p: [] for p in wanted}
    for p, ds in deps.items():
        for d in ds:
            users[d].append(p)
    ready = [(str(p), p) for p, ds in deps.items() if not ds]
    heapq.heapify(ready)
    order: list[StorePath] = []
    while ready:
        _, p = heapq.heappop(ready)
        order.append(p)
        for u in users[p]:
            deps[u].discard(p)
            if not deps[u]:
                heapq.heappush(ready, (str(u), u))
    if len(order) != len(wanted):
        cycle = sorted(str(p) for p in wanted if p not in set(order))
        raise ArchiveError(f"reference cycle between {', '.join(cycle[:5])}")
    return order


def _write_entry(writer: StreamWriter, root: Path, entry: ManifestEntry, where: str) -> None:
    abs_path = os.path.join(os.fsencode(root), entry.path) if entry.path else os.fsencode(root)
    if entry.type is EntryType.DIRECTORY:
        writer.entry(entry)
        return
    try:
        if entry.type is EntryType.SYMLINK:
            target = os.readlink(abs_path)
            got = blake3.blake3(target).hexdigest()
            _check_export_hash(entry, got, where)
            writer.entry(entry, contents=lambda: target)
            return
        hasher = blake3.blake3()
        with open(abs_path, "rb") as handle:

            def chunks(write: Callable[[bytes], object]) -> int:
                total = 0
                while total < entry.size + 1:
                    data = handle.read(min(_READ_CHUNK, entry.size + 1 - total))
                    if not data:
                        break
                    hasher.update(data)
                    write(data[: max(0, entry.size - total)])
                    total += len(data)
                return total

            writer.entry(entry, chunks=chunks)
        _check_export_hash(entry, hasher.hexdigest(), where)
    except OSError as exc:
        raise ArchiveError(
            f"cannot export {where}/{entry.shown}: {exc.strerror}",
            hint="run `bstore store verify --check-contents` and repair the path",
        ) from exc


def _check_export_hash(entry: ManifestEntry, got: str, where: str) -> None:
    if got != entry.blake3_hex:
        raise ArchiveError(
            f"refusing to export {where}/{entry.shown}: expected blake3 {entry.blake3_hex},"
            f" got {got}",
            hint="the store path is damaged; run `bstore store verify --check-contents"
            " --repair --from <good stream>`",
        )


def write_path(writer: StreamWriter, meta: PathMeta, manifest: Manifest, root: Path) -> None:
    """Write one path's record: ``meta``, then ``manifest``'s entries with the contents
    read from the tree at ``root`` (each re-hashed; a mismatch aborts the export)."""
    if manifest.mcid != meta.mcid:
        raise ArchiveError(f"{meta.full_path}: manifest has MCID {manifest.mcid}, the"
                           f" metadata records {meta.mcid}")
    writer.begin_path(meta)
    for entry in manifest.entries:
        _write_entry(writer, root, entry, meta.full_path)
    writer.end_path()
