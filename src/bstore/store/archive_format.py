"""The export stream's framing (uncompressed): writing and strictly reading it.

Layout (docs/formats.md, "Export stream")::

    bstore-export-1\\n
    path <n>:<n bytes of path metadata>\\n           one record per store path ...
    <manifest entry line>                              ... then its canonical manifest
    <size bytes of contents>\\n                         lines, each file's contents (or
    ...                                                 link target) right after its line
    end\\n
    ...
    done <number of paths>\\n

The manifest lines are exactly :meth:`ManifestEntry.to_bytes`, in manifest order, so
the reader rebuilds the manifest while it streams and checks the MCID at ``end``.
Nothing here touches the disk: contents go to a :class:`TreeSink` the caller supplies,
after their entry is validated and while their blake3 is computed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import BinaryIO, Protocol

import blake3

from bstore.store.archive_meta import MAX_META_BYTES, PathMeta
from bstore.store.layout import StoreError
from bstore.store.manifest import (
    MANIFEST_HEADER,
    MAX_PATH_BYTES,
    EntryType,
    InvalidTreeError,
    Manifest,
    ManifestEntry,
)
from bstore.store.symlinks import find_escaping_link, symlink_escapes

STREAM_HEADER = b"bstore-export-1\n"
_END = b"end\n"
_CHUNK = 1 << 20
#: Entry header lines are ``<t> <size> <64 hex|-> <len>:`` — 100 bytes is plenty, so a
#: stream without newlines cannot make us buffer without bound.
_MAX_HEADER = 120
_ENTRY_RE = re.compile(rb"([a-z]) (0|[1-9][0-9]{0,19}) ([0-9a-f]{64}|-) (0|[1-9][0-9]{0,5}):")
_PATH_RE = re.compile(rb"path (0|[1-9][0-9]{0,7}):")
_DONE_RE = re.compile(rb"done (0|[1-9][0-9]{0,9})\n")


class ArchiveError(StoreError):
    """A malformed, lying or oversized export stream."""


class Readable(Protocol):
    """Anything with ``read(n)`` (a file, a zstd reader)."""

    def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end."""


class TreeSink(Protocol):
    """Where a reader puts one path's tree; entries arrive in manifest order."""

    def directory(self, path: bytes) -> None:
        """Create the directory ``path`` (``b""`` is the root)."""

    def file(self, path: bytes, executable: bool) -> Callable[[bytes], object]:
        """Create a regular file; return the function that appends bytes to it."""

    def close_file(self) -> None:
        """The file opened last is complete."""

    def symlink(self, path: bytes, target: bytes) -> None:
        """Create a symlink ``path`` -> ``target`` (already checked to stay inside)."""


class NullSink:
    """A sink that keeps nothing (for records the receiver already has)."""

    def directory(self, path: bytes) -> None:
        """Ignore a directory."""

    def file(self, path: bytes, executable: bool) -> Callable[[bytes], object]:
        """Discard a file's contents."""
        return len

    def close_file(self) -> None:
        """Nothing to close."""

    def symlink(self, path: bytes, target: bytes) -> None:
        """Ignore a symlink."""


class StreamWriter:
    """Writes the uncompressed stream to ``out`` (usually a zstd stream writer)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._count = 0
        out.write(STREAM_HEADER)

    def begin_path(self, meta: PathMeta) -> None:
        """Start one path's record; its entries follow with :meth:`entry`."""
        block = meta.to_bytes()
        self._out.write(b"path %d:" % len(block) + block + b"\n")
        self._count += 1

    def entry(self, entry: ManifestEntry, contents: Callable[[], bytes] | None = None,
              chunks: Callable[[Callable[[bytes], object]], int] | None = None) -> None:
        """Write one manifest entry and, for files and links, its contents.

        Contents come either whole from ``contents()`` or through ``chunks(write)``,
        which must write exactly ``entry.size`` bytes and return how many it wrote.
        """
        self._out.write(entry.to_bytes())
        if entry.type is EntryType.DIRECTORY:
            return
        if chunks is not None:
            written = chunks(self._out.write)
        else:
            assert contents is not None, "file entries need contents"
            data = contents()
            self._out.write(data)
            written = len(data)
        if written != entry.size:
            raise ArchiveError(
                f"entry {entry.shown!r} changed while it was exported"
                f" ({written} bytes, manifest says {entry.size})",
                hint="run `bstore store verify --check-contents` on the path",
            )
        self._out.write(b"\n")

    def end_path(self) -> None:
        """Finish the current path's record."""
        self._out.write(_END)

    def finish(self) -> None:
        """Write the trailer (the number of paths, so truncation at a record is caught)."""
        self._out.write(b"done %d\n" % self._count)


class LimitedInput:
    """A buffered reader over the uncompressed stream with a hard cap on bytes read.

    The cap bounds what a hostile (e.g. zstd-bomb) stream can make us read and write,
    whatever its framing claims.
    """

    def __init__(self, raw: Readable, source: str, max_bytes: int) -> None:
        self._raw = raw
        self.source = source
        self._max = max_bytes
        # Unconsumed bytes are _buf[_off:]; an offset instead of re-slicing keeps many
        # small entries from copying the whole buffer each time.
        self._buf = b""
        self._off = 0
        self.position = 0  # bytes consumed by the parser

    def _available(self) -> int:
        return len(self._buf) - self._off

    def _fill(self, want: int) -> bool:
        while self._available() < want:
            chunk = self._raw.read(max(_CHUNK, want - self._available()))
            if not chunk:
                return False
            self._buf = self._buf[self._off:] + chunk
            self._off = 0
        return True

    def _consume(self, n: int) -> bytes:
        if self.position + n > self._max:
            raise ArchiveError(
                f"{self.source}: stream expands beyond the limit of {self._max} bytes",
                hint="raise the limit (--max-size) only for streams you trust",
            )
        data = self._buf[self._off : self._off + n]
        self._off += n
        self.position += n
        return data

    def read_until(self, stop: bytes, limit: int, what: str) -> bytes:
        """Read up to and including ``stop`` (at most ``limit`` bytes)."""
        while True:
            idx = self._buf.find(stop, self._off, self._off + limit)
            if idx >= 0:
                return self._consume(idx - self._off + len(stop))
            if self._available() >= limit:
                raise ArchiveError(
                    f"{self.source}: {what} at byte {self.position} is malformed:"
                    f" {self._buf[self._off : self._off + 60]!r}"
                )
            if not self._fill(self._available() + 1):
                raise self.truncated(what)

    def read_exact(self, n: int, what: str) -> bytes:
        """Read exactly ``n`` bytes (``n`` already bounded by the caller)."""
        if n > self._max - self.position:
            self._consume(n)  # raises the limit error before buffering anything
        if not self._fill(n):
            raise self.truncated(what, self._available(), n)
        return self._consume(n)

    def stream_exact(self, n: int, what: str, write: Callable[[bytes], object]) -> None:
        """Pass exactly ``n`` bytes to ``write`` in bounded chunks."""
        if n > self._max - self.position:
            self._consume(n)
        left = n
        while left:
            if not self._available() and not self._fill(1):
                raise self.truncated(what, n - left, n)
            data = self._consume(min(left, self._available()))
            write(data)
            left -= len(data)

    def peek(self, n: int) -> bytes:
        """Up to ``n`` upcoming bytes, without consuming them."""
        self._fill(n)
        return self._buf[self._off : self._off + n]

    def at_eof(self) -> bool:
        """Whether nothing follows."""
        return not self._available() and not self._fill(1)

    def truncated(self, what: str, got: int | None = None, want: int | None = None
                  ) -> ArchiveError:
        """The error for a stream that ends early."""
        detail = "" if got is None else f" ({want} bytes declared, only {got} present)"
        return ArchiveError(
            f"{self.source}: stream ends in the middle of {what}{detail}",
            hint="the stream is truncated or its sizes lie; export it again",
        )


class StreamReader:
    """Strict reader: every check of docs/formats.md happens before a byte reaches a sink."""

    def __init__(self, inp: LimitedInput) -> None:
        self._in = inp
        self._links: dict[bytes, bytes] = {}
        self._allowed_roots: frozenset[bytes] = frozenset()
        self._count = 0
        header = inp.read_until(b"\n", 64, "the stream header")
        if header != STREAM_HEADER:
            raise ArchiveError(
                f"{inp.source}: not a bstore export stream (header {header[:40]!r},"
                f" expected {STREAM_HEADER!r})",
                hint="streams come from `bstore store export`; other versions are refused",
            )

    def next_path(self) -> PathMeta | None:
        """The next record's metadata, or ``None`` after a valid trailer."""
        src = self._in.source
        if self._in.peek(5) == b"done ":
            trailer = self._in.read_until(b"\n", 20, "the trailer")
            match = _DONE_RE.fullmatch(trailer)
            if not match or int(match.group(1)) != self._count:
                raise ArchiveError(f"{src}: bad trailer {trailer!r} after {self._count} paths")
            if not self._in.at_eof():
                raise ArchiveError(f"{src}: data after the end of the stream")
            return None
        head = self._in.read_until(b":", 20, "a path record")
        match = _PATH_RE.fullmatch(head)
        if not match or int(match.group(1)) > MAX_META_BYTES:
            raise ArchiveError(f"{src}: expected a path record at byte"
                               f" {self._in.position - len(head)}, got {head[:40]!r}")
        block = self._in.read_exact(int(match.group(1)), "path metadata")
        if self._in.read_exact(1, "path metadata") != b"\n":
            raise ArchiveError(f"{src}: path metadata is not followed by a newline")
        self._count += 1
        return PathMeta.from_bytes(block, f"{src}: path record {self._count}")

    def read_tree(self, meta: PathMeta, sink: TreeSink) -> Manifest:
        """Read ``meta``'s entries into ``sink``, verifying names, order, sizes, hashes,
        the NarSize and the MCID; return the rebuilt manifest."""
        where = f"{self._in.source}: {meta.full_path}"
        entries: list[ManifestEntry] = []
        directories: set[bytes] = set()
        manifest_hash = blake3.blake3(MANIFEST_HEADER)
        total = 0
        # Links may lead into referenced paths; chains are resolved once all are read.
        self._links = {}
        self._allowed_roots = frozenset(str(r).encode() for r in meta.references)
        while True:
            if self._in.peek(len(_END)) == _END:
                self._in.read_exact(len(_END), "an end marker")
                break
            line = self._in.read_until(b":", _MAX_HEADER, f"an entry of {meta.full_path}")
            entry = self._parse_entry(line, where, entries, directories)
            if entry.type is EntryType.DIRECTORY:
                sink.directory(entry.path)
                directories.add(entry.path)
            else:
                self._read_contents(entry, where, sink)
            total += entry.size
            entries.append(entry)
            manifest_hash.update(entry.to_bytes())
        if not entries:
            raise ArchiveError(f"{where}: the record has no entries")
        escaping = find_escaping_link(self._links, self._allowed_roots)
        if escaping is not None:
            link, target, why = escaping
            raise ArchiveError(
                f"{where}: symlink {link.decode('utf-8', 'backslashreplace')!r} -> "
                f"{target.decode('utf-8', 'backslashreplace')!r} {why}",
                hint="store paths may only contain links that stay inside them",
            )
        manifest = Manifest(tuple(entries))
        mcid = "mcid1-manifest-blake3-" + manifest_hash.hexdigest()
        if mcid != meta.mcid:
            raise ArchiveError(
                f"{where}: contents have MCID {mcid}, the metadata records {meta.mcid}",
                hint="the stream was altered; export the path again from a good store",
            )
        if total != meta.nar_size:
            raise ArchiveError(f"{where}: contents are {total} bytes, NarSize says"
                               f" {meta.nar_size}")
        return manifest

    def _parse_entry(self, line: bytes, where: str, entries: list[ManifestEntry],
                     directories: set[bytes]) -> ManifestEntry:
        match = _ENTRY_RE.fullmatch(line)
        if not match:
            raise ArchiveError(f"{where}: malformed entry header {line[:80]!r}"
                               f" after {self._last(entries)!r}")
        code, size_text, digest, length = match.groups()
        if int(length) > MAX_PATH_BYTES:
            raise ArchiveError(
                f"{where}: entry after {self._last(entries)!r} has a path of {int(length)}"
                f" bytes, more than {MAX_PATH_BYTES} (too deep or too long)"
            )
        raw = self._in.read_exact(int(length) + 1, "an entry path")
        path, newline = raw[:-1], raw[-1:]
        shown = path.decode("utf-8", "backslashreplace") or "."
        if newline != b"\n":
            raise ArchiveError(f"{where}: entry {shown!r}: path length does not match")
        try:
            entry_type = EntryType(code.decode())
        except ValueError:
            raise ArchiveError(
                f"{where}: entry {shown!r} has unsupported type {code.decode()!r}",
                hint="only d, f, x and l entries exist; hardlinks, devices, FIFOs and"
                " sockets are never stored",
            ) from None
        try:
            entry = ManifestEntry(path, entry_type, int(size_text),
                                  None if digest == b"-" else digest.decode())
        except InvalidTreeError as exc:
            raise ArchiveError(f"{where}: {exc.message}", hint=exc.hint) from exc
        self._check_place(entry, where, entries, directories)
        return entry

    @staticmethod
    def _last(entries: list[ManifestEntry]) -> str:
        return entries[-1].shown if entries else "(start)"

    @staticmethod
    def _check_place(entry: ManifestEntry, where: str, entries: list[ManifestEntry],
                     directories: set[bytes]) -> None:
        shown = entry.shown
        if not entries:
            if entry.path != b"":
                raise ArchiveError(f"{where}: first entry {shown!r} is not the root")
            if entry.type is EntryType.SYMLINK:
                # A root link is resolved from the store dir, so any target leaves the path.
                raise ArchiveError(f"{where}: the root entry is a symlink, which points"
                                   " outside the path")
            return
        previous = entries[-1].path
        if entry.path <= previous:
            kind = "duplicate" if entry.path == previous else "unsorted"
            raise ArchiveError(f"{where}: {kind} entry {shown!r} (after {entries[-1].shown!r})",
                               hint="entries must be strictly sorted by path bytes")
        parent = entry.path.rpartition(b"/")[0]
        if parent and parent not in directories:
            raise ArchiveError(f"{where}: entry {shown!r} is not inside a directory entry")
        if not parent and entries[0].type is not EntryType.DIRECTORY:
            raise ArchiveError(f"{where}: entry {shown!r} follows a root that is not a"
                               " directory")

    def _read_contents(self, entry: ManifestEntry, where: str, sink: TreeSink) -> None:
        shown = entry.shown
        what = f"the contents of {shown!r}"
        if entry.type is EntryType.SYMLINK:
            if entry.size > MAX_PATH_BYTES:
                raise ArchiveError(f"{where}: symlink {shown!r} has a {entry.size}-byte target")
            target = self._in.read_exact(entry.size, what)
            digest = blake3.blake3(target).hexdigest()
            self._links[entry.path] = target
            if symlink_escapes(entry.path, target, self._allowed_roots):
                raise ArchiveError(
                    f"{where}: symlink {shown!r} -> "
                    f"{target.decode('utf-8', 'backslashreplace')!r} points outside the path",
                    hint="store paths may only contain links that stay inside them",
                )
        else:
            hasher = blake3.blake3()
            write = sink.file(entry.path, entry.type is EntryType.EXECUTABLE)

            def both(data: bytes) -> None:
                hasher.update(data)
                write(data)

            self._in.stream_exact(entry.size, what, both)
            sink.close_file()
            digest = hasher.hexdigest()
        if digest != entry.blake3_hex:
            raise ArchiveError(
                f"{where}: {shown!r}: expected blake3 {entry.blake3_hex}, got {digest}",
                hint="the stream was altered or a declared size is wrong",
            )
        if self._in.read_exact(1, what) != b"\n":
            raise ArchiveError(f"{where}: {shown!r}: contents are longer than the declared"
                               f" {entry.size} bytes")
        if entry.type is EntryType.SYMLINK:
            sink.symlink(entry.path, target)
