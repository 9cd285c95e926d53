"""A failed first generation: current, but not to be run.

A profile's first generation that fails to activate has nothing to be switched back to,
so its link stays current (to be inspected, fixed by the next one, or deleted) while the
activator stops everything the attempt started. Whatever later brings apps back in "the
current generation" — a reconcile pass healing drift, the supervision round rebooting a
dead host node — must treat that generation as empty, or it would restart (and, for a
crash-looping app, keep restarting) exactly what the rollback stopped.

The mark is ``<root>/profiles/<profile>.failed`` holding the generation's number; it
counts only while that number is the current one, so a later successful switch (which
also clears it) or a manual ``rollback`` needs no extra bookkeeping.
"""

from __future__ import annotations

import contextlib
import os

from bstore.errors import BstoreError
from bstore.generations.profiles import Profile
from bstore.store import atomic


class FailedMarkError(BstoreError):
    """The failed-first-generation mark of a profile could not be written."""


def _path(profile: Profile) -> str:
    return str(profile.dir / f"{profile.name}.failed")


def failed_number(profile: Profile) -> int | None:
    """The failed first generation's number when it is still ``profile``'s current one."""
    try:
        with open(_path(profile), encoding="ascii") as fh:
            number = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return number if number == profile.current_number() else None


def mark_failed(profile: Profile, number: int) -> None:
    """Record that generation ``number`` (current, the first) failed and must not run."""
    path = _path(profile)
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{number}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        atomic.fsync_path(profile.dir)
    except OSError as exc:
        raise FailedMarkError(
            f"cannot mark generation {number} of profile {profile.name!r} as failed"
            f" ({path}): {exc.strerror}",
            hint="check the state root's permissions; until then a heal may restart it") \
            from exc


def clear_failed(profile: Profile) -> None:
    """Drop the mark (a generation activated successfully)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(profile))
