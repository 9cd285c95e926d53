"""cgroup v2 memory limits for guest VMs, where the machine lets bstore use them.

A VM with a ``memory_limit`` gets its own cgroup ``<base>/bstore/<name>`` with
``memory.max`` set (and ``memory.swap.max`` = 0 when swap accounting exists, so the
limit is not dodged by swapping); its pid is moved in right after it is spawned. The
kernel's OOM killer then ends the VM when it goes over, and ``memory.events``'s
``oom_kill`` counter tells bstore that this is why it died.

``base`` is the cgroup bstore itself runs in (``/proc/self/cgroup``'s ``0::`` line) on
the cgroup2 mount, or one given explicitly (a delegated subtree, e.g. from systemd's
``Delegate=yes``). Usable only when it is writable and offers the ``memory`` controller;
:func:`detect` says why not otherwise, and the caller falls back to the VM's own
allocator limit (``+MMscs``). Nothing here needs more than the files of the cgroup fs,
so tests run it against a plain directory laid out the same way.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bstore.errors import BstoreError

#: The sub-cgroup of the base all of bstore's VM cgroups live under.
BSTORE_GROUP = "bstore"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,200}")


class CgroupError(BstoreError):
    """A cgroup that cannot be created, limited, joined or read (names the path)."""


def cgroup2_mount(mountinfo: str) -> Path | None:
    """The mount point of the cgroup2 hierarchy in ``/proc/self/mountinfo`` text."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split(" ")
            if len(fields) >= 5:
                return Path(fields[4].replace("\\040", " "))
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """This process's cgroup v2 path (``0::<path>``) from ``/proc/self/cgroup`` text."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def _controllers(path: Path, name: str) -> set[str]:
    try:
        return set((path / name).read_text().split())
    except OSError:
        return set()


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}",
                          hint="the cgroup is not delegated to this user; the VM falls back"
                          " to its allocator limit") from exc


@dataclass(frozen=True)
class Cgroup:
    """One VM's cgroup directory."""

    path: Path

    def set_memory_max(self, limit_bytes: int) -> None:
        """Cap the group's memory at ``limit_bytes``; swap too, where accounted."""
        if limit_bytes <= 0:
            raise CgroupError(f"memory limit {limit_bytes} for {self.path} is not positive")
        _write(self.path / "memory.max", str(limit_bytes))
        swap = self.path / "memory.swap.max"
        if swap.exists():
            _write(swap, "0")

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (with its future children) into the group."""
        _write(self.path / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        """The processes in the group."""
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def oom_kills(self) -> int:
        """How many processes of the group the OOM killer has ended (``memory.events``)."""
        try:
            text = (self.path / "memory.events").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the (empty) group; a group that still holds processes stays."""
        try:
            self.path.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                raise CgroupError(f"cannot remove cgroup {self.path}: {exc}") from exc


@dataclass(frozen=True)
class CgroupSupport:
    """Where VM cgroups go (``base``), or why there are none (``reason``)."""

    base: Path | None
    reason: str = ""

    @property
    def usable(self) -> bool:
        """Whether memory limits can use cgroups."""
        return self.base is not None

    def group(self, name: str) -> Cgroup:
        """Create (or reuse) the cgroup ``<base>/bstore/<name>`` with the memory controller."""
        if self.base is None:
            raise CgroupError(f"cgroups are not usable here: {self.reason}")
        if not _NAME_RE.fullmatch(name):
            raise CgroupError(f"cgroup name {name!r} is not valid")
        parent = self.base / BSTORE_GROUP
        if "memory" not in _controllers(self.base, "cgroup.subtree_control"):
            # Fails (EBUSY) when the base itself holds processes: then it must be a
            # delegated subtree given explicitly.
            _write(self.base / "cgroup.subtree_control", "+memory")
        try:
            parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {parent}: {exc.strerror or exc}") from exc
        if "memory" not in _controllers(parent, "cgroup.subtree_control"):
            # bstore's own group holds no processes, so its children may use controllers.
            _write(parent / "cgroup.subtree_control", "+memory")
        path = parent / name
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {path}: {exc.strerror or exc}") from exc
        return Cgroup(path)


def detect(base: Path | None = None, *, proc: Path = Path("/proc/self")) -> CgroupSupport:
    """Whether VM memory limits can use cgroup v2 here, and under which base.

    ``base`` overrides the cgroup bstore runs in (a delegated subtree).
    """
    if base is None:
        try:
            mount = cgroup2_mount((proc / "mountinfo").read_text())
            own = own_cgroup((proc / "cgroup").read_text())
        except OSError as exc:
            return CgroupSupport(None, f"cannot read {proc}: {exc.strerror or exc}")
        if mount is None:
            return CgroupSupport(None, "no cgroup2 file system is mounted")
        if own is None:
            return CgroupSupport(None, "this process is in no cgroup v2 group")
        base = mount / own.lstrip("/")
    if "memory" not in _controllers(base, "cgroup.controllers"):
        return CgroupSupport(None, f"the memory controller is not available in {base}")
    if not os.access(base, os.W_OK):
        return CgroupSupport(None, f"{base} is not writable by this user")
    return CgroupSupport(base)
