"""File locks: the GC lock, per-path locks, and per-process temporary roots.

All locks are ``flock(2)`` locks, which the kernel drops when the holder dies — so a
killed process never leaves a lock held, and a temp-roots file whose lock can be taken
belongs to a dead process (it is *stale*).

Protocol (see also :mod:`bstore.store.gc`):

* GC holds ``locks/gc.lock`` exclusively for its whole run.
* Anyone about to rely on a path (record a temp root, rename a path into ``store/``,
  commit a registration) holds ``gc.lock`` shared for that short step. So GC's view of
  roots and valid paths cannot change under it, and a path registered after GC read the
  roots is registered after GC finished.
* ``locks/paths/<bucket>.lock`` serialises writers of one store path (two processes adding
  the same content: one writes, the other waits and then finds it valid). Buckets (the
  first two digest characters, 1,024 files at most) keep lock files from accumulating.
* ``locks/temproots/<token>`` is held exclusively by its process for the store's lifetime
  and lists, one per line, the store paths that process relies on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from bstore.store.layout import StoreError, StoreLayout
from bstore.store.paths import StorePath

_POLL_SECONDS = 0.01


class StoreLockedError(StoreError):
    """The database or a store lock stayed busy beyond the retry bound."""


def _flock_bounded(fd: int, operation: int, timeout: float, what: str) -> None:
    """Take ``flock(fd, operation)``, polling until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"cannot lock {what}: {exc.strerror}") from exc
        if time.monotonic() >= deadline:
            raise StoreLockedError(
                f"store locked: {what} is still held after {timeout:g} s",
                hint="another bstore process (a GC or an add) is using the store;"
                " retry when it finishes, or raise $BSTORE_LOCK_TIMEOUT",
            )
        time.sleep(_POLL_SECONDS)


def try_flock(fd: int, operation: int) -> bool:
    """Take a lock without waiting; ``False`` when someone else holds it."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


@contextmanager
def held(path: Path, *, exclusive: bool, timeout: float, what: str) -> Iterator[None]:
    """Hold a flock on ``path`` (created if missing) for the ``with`` block."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot open lock file {str(path)!r}: {exc.strerror}") from exc
    try:
        _flock_bounded(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout, what)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def path_lock_file(layout: StoreLayout, sp: StorePath) -> Path:
    """The lock bucket file of a store path."""
    return layout.path_locks_dir / f"{sp.digest[:2]}.lock"


@contextmanager
def path_lock(layout: StoreLayout, sp: StorePath, timeout: float) -> Iterator[None]:
    """Exclusive lock for writing (or replacing) the store path ``sp``."""
    with held(path_lock_file(layout, sp), exclusive=True, timeout=timeout,
              what=f"the lock of store path {str(sp)!r}"):
        yield


@contextmanager
def gc_shared(layout: StoreLayout, timeout: float) -> Iterator[None]:
    """Shared GC lock: GC cannot run while this is held."""
    with held(layout.gc_lock, exclusive=False, timeout=timeout,
              what=f"the GC lock {str(layout.gc_lock)!r}"):
        yield


@contextmanager
def gc_exclusive(layout: StoreLayout, timeout: float) -> Iterator[None]:
    """Exclusive GC lock: nobody records roots or registers paths while this is held."""
    with held(layout.gc_lock, exclusive=True, timeout=timeout,
              what=f"the GC lock {str(layout.gc_lock)!r}"):
        yield


class TempRoots:
    """This process's temporary GC roots: a lock-protected file under ``locks/temproots``.

    The file is created lazily (under the shared GC lock, so GC never sees it unlocked)
    and locked exclusively until :meth:`close`; its ``token`` also prefixes every staging
    dir the process creates, so GC can tell live staging dirs from leftovers.
    """

    def __init__(self, layout: StoreLayout, timeout: float) -> None:
        self._layout = layout
        self._timeout = timeout
        self._fd: int | None = None
        self._roots: set[str] = set()
        self.token = f"{os.getpid()}-{os.urandom(6).hex()}"

    @property
    def file(self) -> Path:
        """This process's temp-roots file."""
        return self._layout.temproots_dir / self.token

    def _open_locked(self) -> int:
        # Caller holds the shared GC lock: GC cannot look at the file before it is locked.
        if self._fd is None:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # new file, nobody else can hold it
            self._fd = fd
        return self._fd

    def ensure(self) -> None:
        """Create and lock the file (before creating a staging dir named by the token)."""
        if self._fd is None:
            with gc_shared(self._layout, self._timeout):
                self._open_locked()

    def add(self, sp: StorePath) -> None:
        """Protect ``sp`` from GC until this store is closed (or the process dies)."""
        base = str(sp)
        if base in self._roots:
            return
        with gc_shared(self._layout, self._timeout):
            fd = self._open_locked()
            os.write(fd, f"{base}\n".encode())
        self._roots.add(base)

    def add_many(self, paths: Iterable[StorePath]) -> None:
        """:meth:`add` for many paths with one lock and one write."""
        new = sorted({str(p) for p in paths} - self._roots)
        if not new:
            return
        with gc_shared(self._layout, self._timeout):
            fd = self._open_locked()
            os.write(fd, "".join(f"{b}\n" for b in new).encode())
        self._roots.update(new)

    def close(self) -> None:
        """Drop the roots: unlink the file while still holding its lock, then release."""
        if self._fd is not None:
            with suppress(FileNotFoundError):
                self.file.unlink()
            os.close(self._fd)
            self._fd = None
            self._roots.clear()


def read_temp_roots(layout: StoreLayout) -> tuple[set[str], set[str], int]:
    """Live roots, live owner tokens, and the number of stale files removed.

    Call only while holding the exclusive GC lock (no process is appending then). A file
    whose lock can be taken belongs to a dead process: it is removed.
    """
    roots: set[str] = set()
    live: set[str] = set()
    stale = 0
    try:
        names = os.listdir(layout.temproots_dir)
    except FileNotFoundError:
        return roots, live, stale
    for name in names:
        path = layout.temproots_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if try_flock(fd, fcntl.LOCK_EX):
                path.unlink(missing_ok=True)
                stale += 1
                continue
            live.add(name)
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read()
            roots.update(line.decode("utf-8", "replace") for line in data.split(b"\n") if line)
        finally:
            os.close(fd)
    return roots, live, stale
