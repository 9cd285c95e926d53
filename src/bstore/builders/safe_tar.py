"""Safe extraction of untrusted tar archives (plain, gzip, bzip2, xz) into one directory.

Every archive a fetcher meets (hex tarballs, release tarballs) comes from outside and is
hostile until proven otherwise. :func:`extract_archive` writes members itself instead of
trusting :mod:`tarfile`'s extraction, so that:

* names are relative and never climb out (``/etc/x``, ``../x``, ``a/../../x`` rejected);
* nothing is ever written *through* a symlink: every parent directory is checked with
  ``lstat`` and files are opened ``O_CREAT | O_EXCL | O_NOFOLLOW``;
* symlink targets are relative, and their leading ``..`` steps cannot climb above the
  archive root (any ``..`` after a normal component is rejected, because ``x/..`` is
  not lexically ``.`` when ``x`` is itself a symlink);
* hard links may only name an earlier regular file of the same archive (copied, so no
  inode is shared); device nodes and FIFOs are rejected;
* modes are normalised (``0644`` / ``0755`` files, ``0755`` dirs): setuid, setgid and
  sticky bits are dropped, owners and times are not restored;
* the member count, the size of one member and the *uncompressed* size of the whole
  stream are capped while reading, so a compression bomb stops after a bounded output.

On any error the destination is removed again (it must be absent or empty on entry), and
the error names the archive and the member.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from bstore.errors import BstoreError

_CHUNK = 1 << 16


class UnsafeArchiveError(BstoreError):
    """An archive that is malformed, hostile, or over a size cap; nothing was kept."""


@dataclass(frozen=True, slots=True)
class ExtractLimits:
    """Caps applied while extracting one archive.

    ``max_total_size`` bounds the *uncompressed* tar stream (headers included), which is
    what stops a compression bomb, and also the bytes written (hard links are copies);
    ``max_member_size`` bounds one member's content.
    """

    max_members: int = 100_000
    max_member_size: int = 512 * 1024 * 1024
    max_total_size: int = 2 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        for field_name in ("max_members", "max_member_size", "max_total_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"ExtractLimits.{field_name} must be a positive int, not {value!r}"
                )


DEFAULT_LIMITS = ExtractLimits()


@dataclass(frozen=True, slots=True)
class ExtractReport:
    """What one extraction wrote: counts and the relative paths of every entry."""

    members: int
    bytes_written: int
    paths: tuple[str, ...]


class _CappedReader:
    """A read-only stream that fails once more than ``cap`` bytes have come out of it."""

    def __init__(self, raw: BinaryIO, cap: int, label: str) -> None:
        self._raw = raw
        self._cap = cap
        self._label = label
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        # Never ask the decompressor for more than one byte past the cap: a bomb is
        # detected without ever holding its output.
        remaining = self._cap - self.count + 1
        want = remaining if size is None or size < 0 else min(size, remaining)
        data = self._raw.read(want)
        self.count += len(data)
        if self.count > self._cap:
            raise UnsafeArchiveError(
                f"archive {self._label!r} unpacks to more than {self._cap} bytes",
                hint="the archive is too large or a compression bomb; raise the cap only "
                "if the source is trusted",
            )
        return data


def _open_decompressed(raw: BinaryIO) -> BinaryIO:
    """Wrap ``raw`` in the decompressor its magic bytes name (or none for a plain tar)."""
    head = raw.read(6)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb")  # type: ignore[return-value]
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")  # type: ignore[return-value]
    return raw


def _member_parts(name: str, label: str) -> tuple[str, ...]:
    """The normalised path components of a member name; rejects anything that climbs."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"archive {label!r}: member {name!r} has a NUL byte in its name")
    if name.startswith("/"):
        raise UnsafeArchiveError(
            f"archive {label!r}: member {name!r} has an absolute path",
            hint="archives must hold relative paths only",
        )
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(
            f"archive {label!r}: member {name!r} contains '..' and could escape the target",
            hint="archives must not use '..' in member names",
        )
    return parts


def _check_symlink_target(parts: tuple[str, ...], target: str, name: str, label: str) -> None:
    """Reject a symlink whose target is absolute or could resolve outside the root."""
    if not target or target.startswith("/") or "\x00" in target:
        raise UnsafeArchiveError(
            f"archive {label!r}: symlink {name!r} -> {target!r} points outside the archive",
            hint="only relative symlinks inside the archive are allowed",
        )
    steps = [p for p in target.split("/") if p not in ("", ".")]
    climbs = 0
    while climbs < len(steps) and steps[climbs] == "..":
        climbs += 1
    # ``..`` after a normal component is refused: ``x/..`` is not ``.`` when x is a link.
    if ".." in steps[climbs:] or climbs > len(parts) - 1:
        raise UnsafeArchiveError(
            f"archive {label!r}: symlink {name!r} -> {target!r} points outside the archive",
            hint="only relative symlinks inside the archive are allowed",
        )


def _ensure_parents(root: Path, parts: tuple[str, ...], name: str, label: str) -> Path:
    """Create the parent directories of ``parts`` under ``root``, never via a symlink."""
    current = root
    for depth, part in enumerate(parts[:-1], start=1):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            current.mkdir(0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeArchiveError(
                f"archive {label!r}: member {name!r} would be written through the symlink "
                f"{'/'.join(parts[:depth])!r}",
                hint="archives that write through their own symlinks are refused",
            )
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeArchiveError(
                f"archive {label!r}: member {name!r} needs a directory where a file already is"
            )
    return current / parts[-1]


def _clear_slot(path: Path, name: str, label: str, *, is_dir: bool) -> None:
    """Make room for a member at ``path``: later members replace earlier non-directories."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if is_dir:
            return
        raise UnsafeArchiveError(
            f"archive {label!r}: member {name!r} would replace a directory of the same name"
        )
    path.unlink()


def _write_stream(src: IO[bytes], path: Path, mode: int, size: int, name: str, label: str) -> int:
    """Copy exactly ``size`` bytes into a new file at ``path`` (never following a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while written < size:
            chunk = src.read(min(_CHUNK, size - written))
            if not chunk:
                raise UnsafeArchiveError(
                    f"archive {label!r}: member {name!r} is truncated ({written} of {size} bytes)"
                )
            out.write(chunk)
            written += len(chunk)
    path.chmod(mode)
    return written


def _file_mode(mode: int) -> int:
    # Only the executable bit survives: setuid/setgid/sticky and odd permissions are
    # normalised away rather than refused, as the store normalises modes anyway.
    return 0o755 if mode & 0o111 else 0o644


def _iter_members(tar: tarfile.TarFile, label: str) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as exc:
            raise UnsafeArchiveError(f"archive {label!r} is not a valid tar stream: {exc}") from exc
        if member is None:
            return
        yield member


def extract_fileobj(
    fileobj: BinaryIO, dest: Path, *, label: str, limits: ExtractLimits = DEFAULT_LIMITS
) -> ExtractReport:
    """Extract the (possibly compressed) tar stream in ``fileobj`` into ``dest``.

    ``dest`` must not exist or be an empty directory; on failure it is removed again.
    ``label`` names the archive in errors (a URL, a file name or ``outer!inner``).
    """
    created = not dest.exists() and not dest.is_symlink()
    if not created and not dest.is_dir():
        raise UnsafeArchiveError(
            f"cannot extract {label!r}: target {str(dest)!r} is not a directory"
        )
    if not created and any(dest.iterdir()):
        raise UnsafeArchiveError(
            f"cannot extract {label!r}: target directory {str(dest)!r} is not empty"
        )
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _extract(fileobj, dest, label, limits)
    except BaseException:
        _clean(dest, remove_self=created)
        raise


def extract_archive(
    archive: Path, dest: Path, *, label: str | None = None, limits: ExtractLimits = DEFAULT_LIMITS
) -> ExtractReport:
    """Extract the tar archive file ``archive`` into ``dest`` (see :func:`extract_fileobj`)."""
    name = label if label is not None else str(archive)
    try:
        raw = open(archive, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise UnsafeArchiveError(f"cannot open archive {name!r}: {exc.strerror}") from exc
    with raw:
        return extract_fileobj(raw, dest, label=name, limits=limits)


def extract_bytes(
    data: bytes, dest: Path, *, label: str, limits: ExtractLimits = DEFAULT_LIMITS
) -> ExtractReport:
    """Extract an in-memory tar archive (see :func:`extract_fileobj`)."""
    return extract_fileobj(io.BytesIO(data), dest, label=label, limits=limits)


def _clean(dest: Path, *, remove_self: bool) -> None:
    """Remove what a failed extraction left (symlinks are removed, never followed)."""
    if remove_self:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def _extract(fileobj: BinaryIO, dest: Path, label: str, limits: ExtractLimits) -> ExtractReport:
    capped = _CappedReader(_open_decompressed(fileobj), limits.max_total_size, label)
    regular: dict[tuple[str, ...], Path] = {}
    paths: list[str] = []
    members = 0
    written = 0
    try:
        tar = tarfile.open(fileobj=capped, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"archive {label!r} is not a tar archive: {exc}") from exc
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise UnsafeArchiveError(f"archive {label!r} cannot be decompressed: {exc}") from exc
    try:
        with tar:
            for member in _iter_members(tar, label):
                members += 1
                if members > limits.max_members:
                    raise UnsafeArchiveError(
                        f"archive {label!r} has more than {limits.max_members} members",
                        hint="the archive is too large; raise the cap only for a trusted source",
                    )
                written += _extract_member(tar, member, dest, label, limits, regular, paths)
                # Hard-link copies and sparse members write more than the stream holds.
                if written > limits.max_total_size:
                    raise UnsafeArchiveError(
                        f"archive {label!r} writes more than {limits.max_total_size} bytes "
                        f"(at member {member.name!r})",
                        hint="the archive is too large or a hard-link bomb; raise the cap only "
                        "if the source is trusted",
                    )
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise UnsafeArchiveError(f"archive {label!r} cannot be read: {exc}") from exc
    return ExtractReport(members=members, bytes_written=written, paths=tuple(paths))


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    dest: Path,
    label: str,
    limits: ExtractLimits,
    regular: dict[tuple[str, ...], Path],
    paths: list[str],
) -> int:
    """Write one member; returns the number of content bytes written."""
    name = member.name
    parts = _member_parts(name, label)
    if not parts:
        # The archive root itself ("./"): nothing to create.
        if member.isdir():
            return 0
        raise UnsafeArchiveError(f"archive {label!r}: member {name!r} has an empty name")
    if member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeArchiveError(
            f"archive {label!r}: member {name!r} is a device or FIFO",
            hint="archives may hold only files, directories and symlinks",
        )
    rel = "/".join(parts)
    if member.isdir():
        target = _ensure_parents(dest, parts, name, label)
        _clear_slot(target, name, label, is_dir=True)
        if not target.exists():
            target.mkdir(0o755)
        target.chmod(0o755)
        paths.append(rel)
        return 0
    if member.issym():
        _check_symlink_target(parts, member.linkname, name, label)
        target = _ensure_parents(dest, parts, name, label)
        _clear_slot(target, name, label, is_dir=False)
        target.symlink_to(member.linkname)
        regular.pop(parts, None)
        paths.append(rel)
        return 0
    if member.islnk():
        link_parts = _member_parts(member.linkname, label)
        source = regular.get(link_parts)
        if source is None:
            raise UnsafeArchiveError(
                f"archive {label!r}: hard link {name!r} -> {member.linkname!r} does not name "
                "an earlier regular file of the archive",
                hint="hard links may only point at files stored earlier in the same archive",
            )
        target = _ensure_parents(dest, parts, name, label)
        _clear_slot(target, name, label, is_dir=False)
        st = os.lstat(source)
        with open(source, "rb") as linked:
            count = _write_stream(linked, target, _file_mode(st.st_mode), st.st_size, name, label)
        regular[parts] = target
        paths.append(rel)
        return count
    if not member.isreg():
        raise UnsafeArchiveError(
            f"archive {label!r}: member {name!r} has an unsupported type {member.type!r}"
        )
    if member.size > limits.max_member_size:
        raise UnsafeArchiveError(
            f"archive {label!r}: member {name!r} is {member.size} bytes, over the "
            f"{limits.max_member_size}-byte cap",
            hint="raise the member size cap only for a trusted source",
        )
    target = _ensure_parents(dest, parts, name, label)
    _clear_slot(target, name, label, is_dir=False)
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - isreg() members always have a stream
        raise UnsafeArchiveError(f"archive {label!r}: member {name!r} has no data")
    count = _write_stream(src, target, _file_mode(member.mode), member.size, name, label)
    regular[parts] = target
    paths.append(rel)
    return count
