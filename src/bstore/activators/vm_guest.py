"""One guest VM of the ``vm`` activator as files and as a process: its directory
(``<root>/nodes/<profile>/vms/<app>/``, laid out in :mod:`.vm`), its supervision state
(``vm.json``), the node control it shares with the host node, and what its log and crash
dump say about how it ended."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bstore.activators.agent_client import AgentClient
from bstore.activators.cgroups import Cgroup, CgroupError
from bstore.activators.hostnode import HostNode, NodePaths
from bstore.errors import BstoreError
from bstore.generations.manifest import AppEntry, parse_manifest
from bstore.store.atomic import replace_file

_SLOGAN_RE = re.compile(rb"^Slogan: (.*)$", re.MULTILINE)
# What HostNode writes to the log before each start.
_START_MARK = b"--- bstore: starting "


@dataclass
class VmState:
    """Supervision state of one VM (``vm.json``)."""

    desired: bool = True
    crashes: list[float] = field(default_factory=list)
    failed: str | None = None
    restart_at: float | None = None
    last_exit: str | None = None
    oom_baseline: int = 0
    connected: bool | None = None

    @classmethod
    def read(cls, path: Path) -> VmState:
        """The state in ``path`` (defaults when missing or unreadable)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(bool(raw["desired"]), [float(t) for t in raw["crashes"]],
                       raw.get("failed"), raw.get("restart_at"), raw.get("last_exit"),
                       int(raw.get("oom_baseline", 0)), raw.get("connected"))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def write(self, path: Path) -> None:
        """Save atomically."""
        data = json.dumps({"desired": self.desired, "crashes": self.crashes,
                           "failed": self.failed, "restart_at": self.restart_at,
                           "last_exit": self.last_exit, "oom_baseline": self.oom_baseline,
                           "connected": self.connected}, indent=1).encode("utf-8")
        replace_file(path, data)


class GuestNode(HostNode):
    """A HostNode whose files live in a VM's directory; remembers the ``Popen`` it spawned
    (for the exit status) and moves the VM into its cgroup right after the spawn."""

    def __init__(self, directory: Path, label: str, cgroup: Cgroup | None) -> None:
        # The files live in the VM's directory, not in <state>/nodes/<profile>.
        super().__init__(directory, label, paths=NodePaths.in_directory(directory))
        self.cgroup = cgroup
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str],
               env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = super()._spawn(argv, env)
        self.proc = proc
        if self.cgroup is not None:
            try:
                self.cgroup.add_pid(proc.pid)
            except CgroupError:
                # A VM that cannot be limited must not run unlimited.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        return proc


@dataclass
class Guest:
    """One app's VM: its directory, node control, and the files in it."""

    app: str
    directory: Path
    node: GuestNode

    @property
    def state_file(self) -> Path:
        """``vm.json``."""
        return self.directory / "vm.json"

    @property
    def app_file(self) -> Path:
        """``app.json``: the one-app manifest the VM is started from."""
        return self.directory / "app.json"

    def exited_within(self, timeout: float) -> bool:
        """Whether the VM process is gone, or goes within ``timeout`` seconds."""
        proc = self.node.proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def running(self) -> bool:
        """Whether the recorded VM process is alive."""
        proc = self.node.proc
        if proc is not None:
            # Our own child: Popen reaps it and keeps the exit status (the generic check
            # would reap it too and lose the status). Unreaped, its pid cannot be reused.
            return proc.poll() is None
        return self.node.status(timeout=5.0).running

    def client(self, timeout: float = 30.0) -> AgentClient:
        """A client for the VM's agent."""
        return self.node.client(timeout)


def read_entry(guest: Guest) -> AppEntry | None:
    """The app the guest VM is (re)started as (its ``app.json``), None if unreadable."""
    try:
        manifest = parse_manifest(guest.app_file.read_bytes(), str(guest.app_file))
    except (OSError, BstoreError):
        return None
    return manifest.apps.get(guest.app)


def last_run_log(log: Path, max_bytes: int = 256 * 1024) -> bytes:
    """The log of the VM's last run (from the last start marker)."""
    try:
        with log.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return b""
    mark = data.rfind(_START_MARK)
    return data[mark:] if mark >= 0 else data


def slogan(dump: Path) -> str | None:
    """The slogan of a crash dump (why the VM died), if there is one."""
    try:
        with dump.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    m = _SLOGAN_RE.search(head)
    return m.group(1).decode("utf-8", "replace")[:300] if m else None

