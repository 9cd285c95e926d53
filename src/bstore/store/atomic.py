"""Filesystem primitives for writing into the store: copy-and-hash, canonical modes,
durability (``syncfs``), and removal of read-only trees.

Nothing else writes store trees. The copier reads each source file exactly once: the same
buffer is hashed and written, so the manifest describes the bytes that were written (a
source changing underneath cannot make the copy and its recorded hash disagree), and the
copy is created directly with its canonical mode.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import blake3

from bstore.store.layout import StoreError
from bstore.store.manifest import (
    EntryType,
    InvalidTreeError,
    Manifest,
    ManifestEntry,
    symlink_escapes,
    tree_os_error,
    validate_entry_path,
)

#: Canonical timestamp of everything in the store (1 s after the epoch, like Nix).
CANONICAL_MTIME_NS = 1_000_000_000
_TIMES = (CANONICAL_MTIME_NS, CANONICAL_MTIME_NS)
#: Files up to this size are read in one ``read``; bigger ones stream in chunks of it.
_CHUNK = 1 << 20
#: blake3 multithreading pays off only for big files (thread start-up dominates below).
_THREADED_HASH_MIN = 1 << 27

_T = TypeVar("_T")

Progress = Callable[[int, int], None]
"""Progress callback: ``(files_done, bytes_done)``."""

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        # The symbols already loaded into this process (libc among them): no
        # find_library, which runs ldconfig in a subprocess (and imports subprocess).
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - every Linux Python is linked to a libc
            return None
    return _libc


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (one ``syncfs(2)``; ``sync`` fallback).

    For a tree of thousands of files this is far cheaper than fsyncing each file and
    directory, and it covers every write made so far on that filesystem.
    """
    libc = _load_libc()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc is not None and hasattr(libc, "syncfs"):
            if libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StoreError(f"syncfs of {str(path)!r} failed: {os.strerror(err)}")
        else:  # pragma: no cover - every Linux libc has syncfs
            os.sync()
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync one file or directory (e.g. a directory after a rename in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = False
                 ) -> None:
    """Replace ``path`` by a file holding ``data``, durably and atomically: a temp file
    next to it, fsynced, renamed over it (and with ``sync_dir`` the directory fsynced, so
    the rename survives a power loss too)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_path(path.parent)


def write_new_file(path: str | bytes, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (it must not exist, not even as a symlink) and write
    all of ``data`` (no fsync: callers sync the tree or rename a temp file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _umask() -> int:
    # os.umask can only be read by setting it; this happens once per process.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def remove_tree(path: Path | bytes, *, count: bool = False) -> int:
    """Remove a file or tree (see :func:`_remove_tree`); errors become :class:`StoreError`."""
    try:
        return _remove_tree(path, count=count)
    except OSError as exc:
        raise StoreError(f"cannot remove {os.fsdecode(path)!r}: {exc.strerror}"
                         f" ({_filename(exc)})",
                         hint="check permissions and free space; the next store gc"
                         " retries") from exc


def _remove_tree(path: Path | bytes, *, count: bool = False) -> int:
    """Remove a file or tree, even read-only (0555) and arbitrarily deep; return the bytes
    freed (allocated blocks of files whose last link went) when ``count`` is set.

    Walks with directory file descriptors (``dir_fd``, ``..``), holding one descriptor at
    a time and no recursion, so a 100k-deep hostile tree neither exceeds ``PATH_MAX`` nor
    the stack nor the descriptor limit. Nobody else may move directories of the tree
    meanwhile (true for ``tmp/`` staging dirs and store paths under their locks).
    """
    top = os.fsencode(path)
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(top)
        return st.st_blocks * 512 if count and st.st_nlink == 1 else 0
    freed = 0

    def clear(fd: int) -> list[str]:
        # Unlink the non-directories of the dir open at fd; return its sub-directories.
        nonlocal freed
        os.fchmod(fd, 0o700)
        subdirs = []
        with os.scandir(fd) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                    continue
                if count:
                    est = entry.stat(follow_symlinks=False)
                    if est.st_nlink == 1:
                        freed += est.st_blocks * 512
                os.unlink(entry.name, dir_fd=fd)
        return subdirs

    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(top, flags)
    try:
        stack: list[tuple[str | None, list[str]]] = [(None, clear(fd))]
        while stack:
            name, pending = stack[-1]
            if pending:
                sub = pending.pop()
                child = os.open(sub, flags, dir_fd=fd)
                os.close(fd)
                fd = child
                stack.append((sub, clear(fd)))
                continue
            stack.pop()
            if name is not None:
                parent = os.open("..", flags, dir_fd=fd)
                os.close(fd)
                fd = parent
                os.rmdir(name, dir_fd=fd)
                if count:
                    freed += 4096
    finally:
        os.close(fd)
    os.rmdir(top)
    return freed + (4096 if count else 0)


def _describe(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "of an unknown type"


def _show(rel: bytes) -> str:
    return rel.decode("utf-8", "backslashreplace") or "."


def _copy_file(src: bytes, dst: bytes, st: os.stat_result, rel: bytes, shown_root: str,
               executable: bool) -> tuple[int, str]:
    """Copy one regular file, hashing the written bytes; return (size, blake3 hex)."""
    try:
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidTreeError(f"{shown_root}: cannot read {_show(rel)!r}: {exc.strerror}"
                               ) from exc
    try:
        fst = os.fstat(sfd)
        if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
            raise InvalidTreeError(f"{shown_root}: {_show(rel)!r} changed while being added",
                                   hint="retry when nothing is writing to the tree")
        mode = 0o555 if executable else 0o444
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            if fst.st_size < _CHUNK:
                data = os.read(sfd, _CHUNK)
                size = len(data)
                digest = blake3.blake3(data).hexdigest()
                if data:
                    written = os.write(dfd, data)
                    while written < size:
                        written += os.write(dfd, memoryview(data)[written:])
            else:
                threads = blake3.blake3.AUTO if fst.st_size >= _THREADED_HASH_MIN else 1
                hasher = blake3.blake3(max_threads=threads)
                buf = bytearray(_CHUNK * 8)
                view = memoryview(buf)
                size = 0
                while True:
                    n = os.readv(sfd, [buf])
                    if not n:
                        break
                    chunk = view[:n]
                    hasher.update(chunk)
                    written = 0
                    while written < n:
                        written += os.write(dfd, chunk[written:])
                    size += n
                digest = hasher.hexdigest()
            if _UMASK & mode:
                os.fchmod(dfd, mode)
            os.utime(dfd, ns=_TIMES)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return size, str(digest)


def copy_tree(src: Path, dst: Path, progress: Progress | None = None) -> Manifest:
    """Copy the file or tree ``src`` to the new path ``dst`` in canonical form.

    Files get 0444/0555, symlinks and files mtime 1, sub-directories 0555 and mtime 1;
    the top directory stays writable (it must be, to be renamed into ``store/``; see
    :func:`finish_root`). Rejects what :func:`~bstore.store.manifest.scan_tree` rejects,
    naming the entry. On error, ``dst`` may be partly written: the caller removes it.
    """
    src_b = os.fsencode(src)
    dst_b = os.fsencode(dst)
    shown_root = os.fsdecode(src_b)
    try:
        st = os.lstat(src_b)
    except OSError as exc:
        raise InvalidTreeError(f"cannot read {shown_root!r}: {exc.strerror}",
                               hint="check the path") from exc
    entries: list[ManifestEntry] = []
    links: dict[tuple[int, int], list[int]] = {}
    # The walk only reads and checks: a hostile tree is refused before anything is
    # written. Creating entries is then done on several threads (see _parallel).
    dirs: list[tuple[bytes, bytes]] = []  # (relative path, absolute destination)
    files: list[tuple[bytes, bytes, bytes, os.stat_result]] = []
    symlinks: list[tuple[bytes, bytes, bytes]] = []  # (relative, target, destination)
    total = 0
    # (relative path, absolute source, absolute destination, lstat)
    todo: list[tuple[bytes, bytes, bytes, os.stat_result]] = [(b"", src_b, dst_b, st)]
    while todo:
        rel, s_abs, d_abs, est = todo.pop()
        try:
            mode = est.st_mode
            if stat.S_ISREG(mode):
                if est.st_nlink > 1:
                    links.setdefault((est.st_dev, est.st_ino), [est.st_nlink, 0])[1] += 1
                files.append((rel, s_abs, d_abs, est))
            elif stat.S_ISDIR(mode):
                dirs.append((rel, d_abs))
                entries.append(ManifestEntry(rel, EntryType.DIRECTORY, 0, None))
                with os.scandir(s_abs) as it:
                    children = [(e.name, e.stat(follow_symlinks=False)) for e in it]
                for name, cst in children:
                    child = rel + b"/" + name if rel else name
                    validate_entry_path(child)
                    todo.append((child, s_abs + b"/" + name, d_abs + b"/" + name, cst))
            elif stat.S_ISLNK(mode):
                target = os.readlink(s_abs)
                if symlink_escapes(rel, target):
                    raise InvalidTreeError(
                        f"{shown_root}: symlink {_show(rel)!r} -> "
                        f"{target.decode('utf-8', 'backslashreplace')!r}"
                        " points outside the tree",
                        hint="store paths may only contain links that stay inside them",
                    )
                symlinks.append((rel, target, d_abs))
                entries.append(ManifestEntry(rel, EntryType.SYMLINK, len(target),
                                             blake3.blake3(target).hexdigest()))
                total += len(target)
            else:
                raise InvalidTreeError(
                    f"{shown_root}: {_show(rel)!r} is {_describe(mode)}",
                    hint="store paths hold only directories, regular files and symlinks",
                )
        except OSError as exc:
            raise tree_os_error(exc, shown_root, rel) from exc
    for nlink, seen in links.values():
        if seen < nlink:
            raise InvalidTreeError(
                f"{shown_root}: a file in the tree is hardlinked from outside it"
                f" ({nlink} links, {seen} inside)",
                hint="copy the file (cp without -l) before adding the tree",
            )
    _make_dirs(dirs, shown_root)
    for rel, target, d_abs in symlinks:
        try:
            os.symlink(target, d_abs)
            os.utime(d_abs, ns=_TIMES, follow_symlinks=False)
        except OSError as exc:
            raise tree_os_error(exc, shown_root, rel) from exc
    total += _copy_files(files, shown_root, entries, progress)
    # Directories last: creating entries in them changed their mtime.
    for rel, d_abs in dirs:
        if rel:
            os.chmod(d_abs, 0o555)
            os.utime(d_abs, ns=_TIMES)
    if progress is not None:
        progress(len(files), total)
    entries.sort(key=lambda e: e.path)
    return Manifest(tuple(entries))


#: Threads creating a tree's entries (see _parallel).
_COPY_THREADS = 4


def _parallel(fn: Callable[[_T], None], items: list[_T], shown_root: str,
              rel_of: Callable[[_T], bytes], min_share: int) -> None:
    """Run ``fn`` over ``items`` on up to :data:`_COPY_THREADS` threads.

    Creating a file or directory is the expensive part of a copy on a journaling
    filesystem (each create waits on the directory and inode allocation: 0.1-1.7 ms on
    a loaded VM's ext4, far more than copying a small file's bytes), and it runs with
    the GIL released, so a few threads overlap it (the OTP tree adds ~2.5x faster).
    Each thread takes an interleaved share (no per-item futures); the first error stops
    all threads and is raised here, an ``OSError`` as the tree error naming its entry.
    """
    workers = max(1, min(_COPY_THREADS, len(items) // min_share))
    errors: list[BaseException] = []
    failed = threading.Event()

    def work(i: int) -> None:
        for item in items[i::workers]:
            if failed.is_set():
                return
            try:
                fn(item)
            except OSError as exc:
                wrapped = tree_os_error(exc, shown_root, rel_of(item))
                wrapped.__cause__ = exc
                errors.append(wrapped)
                failed.set()
            except BaseException as exc:  # raised again by the calling thread below
                errors.append(exc)
                failed.set()

    run_on_threads(work, workers)
    if errors:
        raise errors[0]


def run_on_threads(work: Callable[[int], None], workers: int) -> None:
    """Run ``work(0)`` … ``work(workers - 1)`` at once: worker 0 in the calling thread,
    the others on threads of their own; return when all are done. ``work`` catches its
    own errors (each caller reports them its way)."""
    threads = [threading.Thread(target=work, args=(i,), daemon=True)
               for i in range(1, workers)]
    for t in threads:
        t.start()
    work(0)
    for t in threads:
        t.join()


def _make_dirs(dirs: list[tuple[bytes, bytes]], shown_root: str) -> None:
    """Create ``dirs`` (relative path, absolute destination) mode 0755, parents first:
    one depth at a time, each depth on several threads."""
    by_depth: dict[int, list[tuple[bytes, bytes]]] = {}
    for rel, d_abs in dirs:
        by_depth.setdefault(rel.count(b"/") + 1 if rel else 0, []).append((rel, d_abs))

    def make(item: tuple[bytes, bytes]) -> None:
        os.mkdir(item[1], 0o755)
        if _UMASK & 0o700:
            os.chmod(item[1], 0o755)

    for depth in sorted(by_depth):
        _parallel(make, by_depth[depth], shown_root, lambda item: item[0], 8)


def _copy_files(files: list[tuple[bytes, bytes, bytes, os.stat_result]], shown_root: str,
                entries: list[ManifestEntry], progress: Progress | None) -> int:
    """Copy ``files`` (relative, source, destination, lstat) with :func:`_copy_file` on
    several threads (see :func:`_parallel`), append their manifest entries to
    ``entries`` and return their total size. Progress is reported from the calling
    thread only (callbacks print)."""
    out: list[ManifestEntry] = []
    caller = threading.get_ident()
    counted = [0, 0]

    def copy(item: tuple[bytes, bytes, bytes, os.stat_result]) -> None:
        rel, s_abs, d_abs, est = item
        executable = bool(est.st_mode & stat.S_IXUSR)
        size, digest = _copy_file(s_abs, d_abs, est, rel, shown_root, executable)
        # list.append is atomic under the GIL; the counters are only for progress.
        out.append(ManifestEntry(
            rel, EntryType.EXECUTABLE if executable else EntryType.FILE, size, digest))
        counted[0] += 1
        counted[1] += size
        if progress is not None and counted[0] % 64 == 0 \
                and threading.get_ident() == caller:
            progress(counted[0], counted[1])

    _parallel(copy, files, shown_root, lambda item: item[0], 32)
    entries.extend(out)
    return sum(e.size for e in out)


def canonicalise_tree(top: Path) -> None:
    """See :func:`_canonicalise_tree`; filesystem errors become :class:`StoreError`."""
    try:
        _canonicalise_tree(top)
    except OSError as exc:
        raise StoreError(f"cannot canonicalise staged tree {str(top)!r}: {exc.strerror}"
                         f" ({_filename(exc)})") from exc


def _filename(exc: OSError) -> str:
    name = exc.filename
    return os.fsdecode(name) if isinstance(name, str | bytes) else "an entry in it"


def _canonicalise_tree(top: Path) -> None:
    """Give a staged tree canonical modes, mtime 1 and no xattrs (top dir left writable).

    Used on trees others staged (imports, builds). Hardlinks inside the tree are fine:
    each inode just gets the same treatment twice.
    """
    top_b = os.fsencode(top)
    stack = [top_b]
    dirs: list[bytes] = []
    while stack:
        current = stack.pop()
        st = os.lstat(current)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            os.utime(current, ns=_TIMES, follow_symlinks=False)
            continue
        _strip_xattrs(current)
        if stat.S_ISDIR(mode):
            os.chmod(current, 0o755)
            dirs.append(current)
            with os.scandir(current) as it:
                stack.extend(e.path for e in it)
        elif stat.S_ISREG(mode):
            os.chmod(current, 0o555 if mode & stat.S_IXUSR else 0o444)
            os.utime(current, ns=_TIMES)
        else:
            raise InvalidTreeError(f"{os.fsdecode(current)!r} is {_describe(mode)}")
    for d in reversed(dirs):
        if d != top_b:
            os.chmod(d, 0o555)
        os.utime(d, ns=_TIMES)


def _strip_xattrs(path: bytes) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        os.removexattr(path, name, follow_symlinks=False)


def finish_root(path: Path, *, sync: bool = True) -> None:
    """After the rename into ``store/``: make the top dir read-only, mtime 1, and (with
    ``sync``) durable — else the caller syncs the filesystem afterwards."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o555)
        os.utime(path, ns=_TIMES)
        if sync:
            fsync_path(path)


def make_writable_dir(path: Path) -> None:
    """Let a store directory be renamed (moving a directory rewrites its ``..`` entry)."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o755)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); ``False`` if unsupported."""
    libc = _load_libc()
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))
