"""OS processes named by pid *and* kernel start time, so a recycled pid is never mistaken
for the process bstore started (a host node, a guest VM): liveness, reaping, pinning a
pid with a pidfd while it is signalled, and waiting for a process to be gone entirely."""

from __future__ import annotations

import contextlib
import os
import select
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class Identified(Protocol):
    """A process as bstore recorded it (a node record has these)."""

    @property
    def pid(self) -> int:
        """Its pid."""

    @property
    def start_time(self) -> int:
        """Its kernel start time (clock ticks since boot)."""


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid``, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    return fields[0].decode("ascii", "replace"), int(fields[19])


def process_start_time(pid: int) -> int | None:
    """The kernel start time (clock ticks since boot) of ``pid``, None if it is gone or a zombie."""
    stat = proc_stat(pid)
    return None if stat is None or stat[0] == "Z" else stat[1]


@contextlib.contextmanager
def pinned(record: Identified) -> Iterator[int | None]:
    """A pidfd for the recorded process if it is still that process, else None.

    While the pidfd is open the kernel cannot hand the pid (and so the pgid) to a new
    process, so a check made here stays true until the signal is sent.
    """
    try:
        fd = os.pidfd_open(record.pid)
    except OSError:
        yield None
        return
    try:
        yield fd if process_start_time(record.pid) == record.start_time else None
    finally:
        os.close(fd)


def pidfd_of(record: Identified) -> int | None:
    """A pidfd for the recorded process, exiting or not (its main thread may already be a
    zombie); None when it is gone or the pid now names another process."""
    try:
        fd = os.pidfd_open(record.pid)
    except OSError:
        return None
    stat = proc_stat(record.pid)
    if stat is None or stat[1] != record.start_time:
        os.close(fd)
        return None
    return fd


def reap(record: Identified) -> None:
    # A node started by this very process becomes our zombie when it dies. Reap only
    # that zombie: waiting on a recycled pid could steal another child's exit status.
    if proc_stat(record.pid) == ("Z", record.start_time):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(record.pid, os.WNOHANG)


def is_running(record: Identified) -> bool:
    reap(record)
    return process_start_time(record.pid) == record.start_time


class ProcessWatch:
    """A pidfd on a recorded node process, opened once and checked against the record's
    start time then: while it is open the kernel cannot reuse the pid, so whether the
    process still runs is one poll of the pidfd instead of a read of ``/proc`` (which for
    a VM with dozens of threads costs tens of microseconds, on every action)."""

    def __init__(self) -> None:
        self._record: Identified | None = None
        self._fd: int | None = None
        #: Closes the pidfd exactly once: when forgotten, or with the watch.
        self._closer: weakref.finalize[[int], ProcessWatch] | None = None

    def _forget(self) -> None:
        if self._closer is not None:
            self._closer()
        self._record, self._fd, self._closer = None, None, None

    def alive(self, record: Identified) -> bool:
        """Whether the process ``record`` names runs (reaping it if it is our zombie)."""
        if record != self._record or self._fd is None:
            self._forget()
            try:
                fd = os.pidfd_open(record.pid)
            except OSError:
                return is_running(record)  # gone, or no pidfds here
            if not is_running(record):
                os.close(fd)
                return False
            self._record, self._fd = record, fd
            self._closer = weakref.finalize(self, os.close, fd)
        readable, _, _ = select.select([self._fd], [], [], 0)
        if readable:  # it exited
            self._forget()
            reap(record)
            return False
        return True


def wait_gone(record: Identified, timeout: float) -> bool:
    """Wait until the recorded process has exited completely, every thread of it; whether
    it has within ``timeout`` seconds.

    Not "until /proc says zombie": a BEAM's main thread ends first and makes the process
    look like a zombie while its other threads still tear down, and waitpid does not
    report it yet. A pidfd becomes readable only when the whole thread group has exited.
    """
    fd = pidfd_of(record)
    if fd is None:
        reap(record)
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if ready:
        reap(record)
    return bool(ready)
