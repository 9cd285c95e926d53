"""One process per resource: an exclusive ``flock`` on a file that names the holder.

The kernel drops the lock when the holder dies, so a killed daemon never blocks the next
one; the pid written into the file is only for the message.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from bstore.errors import BstoreError
from bstore.gitops.views import iso


class LockHeld(BstoreError):
    """Another process holds the lock."""


class PidLock:
    """An exclusive flock on ``path`` naming the holder's pid; ``what`` names the resource."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid written by the current holder (``None`` if unreadable)."""
        try:
            return int(json.loads(self.path.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeld` naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BstoreError(f"cannot open lock file {str(self.path)!r}: {exc.strerror}"
                              ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = self.holder()
            raise LockHeld(
                f"another bstore daemon (pid {pid if pid else 'unknown'}) is running for"
                f" {self.what}; lock {str(self.path)!r} is held",
                hint="stop it first (kill -TERM <pid>), or use another --root or profile",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": iso(time.time())}).encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; its content is stale once unlocked)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
