"""The reconcile lock: one pass or manual operation per profile at a time.

A thread lock per gitops directory (two :class:`~bstore.gitops.reconciler.Reconciler`
objects of one process share it) plus ``flock`` on ``<gitops dir>/reconcile.lock``
(other processes: the CLI beside the daemon). A second caller waits, or with
``wait=False`` gets :class:`ReconcileBusy` at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bstore.errors import BstoreError

LOCK_FILE = "reconcile.lock"

_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class ReconcileError(BstoreError):
    """A manual operation or pass that cannot be done."""


class ReconcileBusy(ReconcileError):
    """Another pass or manual operation holds the lock."""


def _busy(gitops_dir: Path, profile: str) -> ReconcileBusy:
    return ReconcileBusy(
        f"reconcile already running for profile {profile!r} ({gitops_dir / LOCK_FILE})",
        hint="wait for it to finish; bstore status shows its result")


@contextmanager
def reconcile_lock(gitops_dir: Path, profile: str, *, wait: bool = True) -> Iterator[None]:
    """Hold the reconcile lock of the profile whose state is in ``gitops_dir``."""
    gitops_dir.mkdir(parents=True, exist_ok=True)
    key = gitops_dir.resolve()
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(key, threading.Lock())
    if not tlock.acquire(blocking=wait):
        raise _busy(gitops_dir, profile)
    try:
        fd = os.open(gitops_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise _busy(gitops_dir, profile) from exc
                raise ReconcileError(f"cannot lock {gitops_dir / LOCK_FILE}:"
                                     f" {exc.strerror}") from exc
            yield
        finally:
            os.close(fd)  # closing drops the flock
    finally:
        tlock.release()
