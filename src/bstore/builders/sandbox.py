"""The hermetic build sandbox: run one build command with nothing it should not have.

Every command is an argv list (never a shell string). The child gets:

- an environment cleared to a whitelist (``PATH`` of the toolchain, ``LANG``/``LC_ALL``
  ``C.UTF-8``, ``TZ=UTC``, ``HOME`` and ``TMPDIR`` as empty dirs under the work dir,
  ``MIX_ENV=prod``, ``HEX_OFFLINE=1``, ``ERL_COMPILER_OPTIONS=[deterministic]``,
  ``SOURCE_DATE_EPOCH=0``), plus the caller's extras; ``TERM`` and everything else unset;
- no network: a fresh network namespace (only a downed loopback) via ``unshare``;
- a read-only view of the whole filesystem except the work dir, in a private mount
  namespace (set up by this module's own child entry point before it execs the build),
  so a write outside the work dir fails with ``EROFS`` instead of landing;
- its own PID namespace where possible, so nothing it starts outlives it;
- stdin from ``/dev/null``, stdout and stderr appended to the log file;
- a wall-clock deadline: on timeout or cancel the whole process group is killed.

What the host allows is detected once per process (:func:`detect_isolation`): as root
plain ``unshare`` works, otherwise a user namespace (``unshare -r``) may; when neither
does, builds still run, without isolation, and a warning is logged once.

Failures become :class:`BuildError` carrying the log path and the last lines of the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bstore.errors import BstoreError

log = logging.getLogger(__name__)

# How much of the log a BuildError carries: enough to show a compiler error with its
# context, small enough for a terminal.
LOG_TAIL_LINES = 40
_LOG_TAIL_BYTES = 16 * 1024

# Exit status of the mount-namespace child when it cannot set the sandbox up; chosen
# outside the range compilers use so it is not mistaken for a build failure.
_SETUP_FAILED = 97

# How long a kill waits for the killed processes to disappear (a loaded machine may
# take a moment to schedule them); after that they are left to the kernel.
_KILL_WAIT = 5.0

# Environment variables a build may see. Everything else in bstore's own environment
# (tokens, SSH agent sockets, proxies, TERM, ERL_FLAGS of the user) is dropped.
BASE_ENV: Mapping[str, str] = {
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "MIX_ENV": "prod",
    "HEX_OFFLINE": "1",
    # Makes every compile:file/2 in the build deterministic (no paths or options in
    # module_info(compile), basenames in -file attributes), whichever tool calls it.
    "ERL_COMPILER_OPTIONS": "[deterministic]",
    # Empty on purpose: no user-level VM flags leak into builds.
    "ERL_FLAGS": "",
    "ERL_AFLAGS": "",
    "ERL_ZFLAGS": "",
    "SOURCE_DATE_EPOCH": "0",
    "REBAR_COLOR": "none",
}
_SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")


class BuildError(BstoreError):
    """A build command failed, timed out or was cancelled.

    ``log_path`` is the full log of the build; ``log_tail`` its last lines (already in
    the message so a user sees the compiler error without opening the file).
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        log_path: Path | None = None,
        log_tail: str = "",
    ) -> None:
        full = message if not log_tail else f"{message}\n--- last lines of the log ---\n{log_tail}"
        super().__init__(full, hint)
        self.log_path = log_path
        self.log_tail = log_tail


@dataclass(frozen=True)
class Isolation:
    """What the sandbox can enforce on this host.

    ``prefix`` is the ``unshare`` argv put before every build command (empty when no
    namespace can be made); ``network`` / ``filesystem`` / ``pids`` say which
    namespaces it gives; ``reason`` explains what is missing, for the warning.
    """

    prefix: tuple[str, ...] = ()
    network: bool = False
    filesystem: bool = False
    pids: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        if (self.network or self.filesystem or self.pids) and not self.prefix:
            raise ValueError("an isolation that isolates needs an unshare prefix")
        if self.filesystem and "--mount" not in self.prefix:
            raise ValueError("filesystem isolation needs a mount namespace (--mount)")

    def to_dict(self) -> dict[str, bool | str]:
        """JSON-ready summary (for ``--json`` output and logs)."""
        return {
            "network": self.network,
            "filesystem": self.filesystem,
            "pids": self.pids,
            "reason": self.reason,
        }


NO_ISOLATION = Isolation(reason="isolation disabled")


def read_log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``log_path`` (decoded leniently; "" if unreadable)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _child_argv(writable: Sequence[Path]) -> list[str]:
    """Argv that runs :func:`_child_main` (mount setup, then exec) in a fresh Python.

    The child gets only the few functions it needs as ``-c`` source and starts with
    ``-I -S`` (no site-packages, no bstore import): that is most of the sandbox's cost
    per command, and it is paid by every build step.
    """
    argv = [sys.executable, "-I", "-S", "-c", _child_source()]
    for path in writable:
        argv += ["--rw", str(path)]
    argv.append("--")
    return argv


def _probe(prefix: Sequence[str], filesystem: bool) -> str | None:
    """Run a no-op under ``prefix``; None if it worked, else why not."""
    with tempfile.TemporaryDirectory(prefix="bstore-probe-") as tmp:
        argv = list(prefix)
        if filesystem:
            argv += [*_child_argv([Path(tmp)]), "true"]
        else:
            argv.append("true")
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=20,
                stdin=subprocess.DEVNULL, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if proc.returncode != 0:
            return proc.stderr.strip()[-300:] or f"exit status {proc.returncode}"
    return None


@functools.cache
def detect_isolation() -> Isolation:
    """The strongest isolation this host allows, probed once per process."""
    return probe_isolation(shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin"))


def probe_isolation(unshare: str | None) -> Isolation:
    """The strongest isolation ``unshare`` (a path, or None if absent) gives. Uncached.

    Tries, in order: network + mount + PID namespaces (as root directly, otherwise in a
    user namespace), then network only; logs a warning when builds will not be isolated.
    """
    if unshare is None:
        reason = "unshare (util-linux) is not installed"
        log.warning("builds run WITHOUT network or filesystem isolation: %s", reason)
        return Isolation(reason=reason)
    user_ns = () if os.geteuid() == 0 else ("--map-root-user",)
    full = (unshare, *user_ns, "--net", "--mount", "--pid", "--fork", "--kill-child",
            "--mount-proc", "--")
    why_full = _probe(full, filesystem=True)
    if why_full is None:
        return Isolation(prefix=full, network=True, filesystem=True, pids=True)
    net_only = (unshare, *user_ns, "--net", "--")
    why_net = _probe(net_only, filesystem=False)
    if why_net is None:
        reason = f"no mount/PID namespace ({why_full})"
        log.warning("builds can write outside their work dir: %s", reason)
        return Isolation(prefix=net_only, network=True, reason=reason)
    reason = f"unshare failed: {why_net}"
    log.warning("builds run WITHOUT network or filesystem isolation: %s", reason)
    return Isolation(reason=reason)


def build_env(
    *, home: Path, tmpdir: Path, tool_dirs: Sequence[str], extra: Mapping[str, str]
) -> dict[str, str]:
    """The complete environment of a build: the whitelist plus ``extra``."""
    path: list[str] = []
    for entry in (*tool_dirs, *_SYSTEM_PATH):
        if entry not in path:
            path.append(entry)
    env = dict(BASE_ENV)
    env.update(PATH=":".join(path), HOME=str(home), TMPDIR=str(tmpdir))
    for key, value in extra.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"invalid environment entry {key!r}")
        env[key] = value
    return env


@dataclass
class Sandbox:
    """Runs the commands of one build under one deadline, all logging to one file.

    ``work_dir`` is the only place the commands may write; ``home`` and ``tmp`` are
    created inside it. ``timeout`` (seconds) covers every command run through this
    sandbox together. Setting ``cancel`` kills the running command.
    """

    work_dir: Path
    log_path: Path
    timeout: float
    tool_dirs: Sequence[str] = ()
    isolation: Isolation | None = None
    cancel: threading.Event | None = None
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"build timeout must be positive, got {self.timeout!r}")
        self.work_dir = Path(os.path.abspath(self.work_dir))
        self.deadline = time.monotonic() + self.timeout
        if self.isolation is None:
            self.isolation = detect_isolation()

    @property
    def home(self) -> Path:
        """The build's ``HOME``: empty when the build starts."""
        return self.work_dir / "home"

    @property
    def tmp(self) -> Path:
        """The build's ``TMPDIR``."""
        return self.work_dir / "tmp"

    def _fail(self, message: str, hint: str | None = None) -> BuildError:
        return BuildError(
            message, hint, log_path=self.log_path, log_tail=read_log_tail(self.log_path)
        )

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        step: str = "build",
    ) -> None:
        """Run ``argv`` in ``cwd`` inside the sandbox; raise :class:`BuildError` on failure.

        ``env`` adds to the whitelisted environment. ``step`` names the command in
        messages and in the log (e.g. ``"rebar3 bare compile"``).
        """
        if not argv or any(not isinstance(a, str) or "\0" in a for a in argv):
            raise BuildError(f"invalid build command {list(argv)!r} for step {step!r}")
        isolation = self.isolation or NO_ISOLATION
        self.home.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        full_env = build_env(
            home=self.home, tmpdir=self.tmp, tool_dirs=self.tool_dirs, extra=env or {}
        )
        full_argv = list(isolation.prefix)
        if isolation.filesystem:
            full_argv += _child_argv([self.work_dir])
        full_argv += list(argv)
        remaining = self.deadline - time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"==> {step}: {list(argv)!r} in {str(cwd)!r}\n".encode())
            logf.flush()
            if remaining <= 0:
                raise self._fail(
                    f"build timed out after {self.timeout:g}s before step {step!r}",
                    hint="raise the build timeout or look at the log for a hung step",
                )
            try:
                proc = subprocess.Popen(
                    full_argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                raise self._fail(f"cannot start step {step!r} ({argv[0]!r}): {exc}") from exc
            status = self._wait(proc, step)
        if (status == _SETUP_FAILED and isolation.filesystem
                and "bstore sandbox:" in read_log_tail(self.log_path)):
            raise self._fail(
                f"the build sandbox could not be set up for step {step!r}",
                hint="see the 'bstore sandbox:' line in the log; the host's mounts changed "
                "since isolation was probed",
            )
        if status != 0:
            raise self._fail(
                f"build step {step!r} failed with exit status {status}",
                hint=f"see the full log at {str(self.log_path)!r}",
            )

    def _wait(self, proc: subprocess.Popen[bytes], step: str) -> int:
        """Block until ``proc`` exits; a watcher thread kills it at the deadline or on
        cancel. (``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, which every
        build step would pay; a blocking wait returns the moment the build ends.)"""
        done = threading.Event()
        why: list[str] = []

        def watch() -> None:
            while True:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    why.append("timeout")
                    break
                # Without a cancel flag, sleep until done or the deadline in one wait.
                step_wait = remaining if self.cancel is None else min(remaining, 0.1)
                if done.wait(step_wait):
                    return
                if self.cancel is not None and self.cancel.is_set():
                    why.append("cancel")
                    break
            _kill_group(proc, reap=False)

        watcher = threading.Thread(target=watch, name=f"bstore-build-watch-{proc.pid}",
                                   daemon=True)
        watcher.start()
        try:
            status = proc.wait()
        except BaseException:
            # KeyboardInterrupt or any error while waiting: never leave the build running.
            _kill_group(proc)
            raise
        finally:
            done.set()
            watcher.join()
        if why == ["timeout"]:
            raise self._fail(
                f"build step {step!r} timed out after {self.timeout:g}s and was killed",
                hint="raise the build timeout or look at the log for a hung step",
            )
        if why == ["cancel"]:
            raise self._fail(f"build step {step!r} was cancelled and killed")
        return status


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def _descendants(root: int) -> set[int]:
    """Pids of every live process below ``root`` (from ``/proc``; best effort)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and ')': parse after the last ')'.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_group(proc: subprocess.Popen[bytes], *, reap: bool = True) -> None:
    """SIGKILL the build: its process group, and every descendant that left the group
    (the BEAM starts port programs in their own session, so killpg alone misses them;
    inside a PID namespace the kernel does this for us)."""
    killed: set[int] = set()
    # A few passes: a process may fork between the scan and the kill.
    for _ in range(3):
        pids = _descendants(proc.pid) - killed
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    # SIGKILL is asynchronous: wait (briefly) until the processes are really gone, so
    # that when BuildError is raised nothing of the build is still running.
    deadline = time.monotonic() + _KILL_WAIT
    while killed and time.monotonic() < deadline:
        killed = {pid for pid in killed if _running(pid)}
        if killed:
            time.sleep(0.01)
    if reap:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# --- inside the namespaces: make the filesystem read-only, then exec the build ------

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_RELATIME = 1 << 21
_MS_STRICTATIME = 1 << 24
# Flags of a mount that must be kept when remounting it (inside a user namespace the
# kernel refuses a remount that would drop them).
_KEEP_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": _MS_STRICTATIME,
}
# Kernel pseudo-filesystems: remounting these is refused or pointless.
_SKIP_PREFIXES = ("/proc", "/sys")


@functools.cache
def _child_source() -> str:
    """Python source of the namespace child: its constants and functions, then a call."""
    names = sorted(n for n in globals() if n.startswith("_MS_"))
    names += ["_KEEP_FLAGS", "_SKIP_PREFIXES", "_SETUP_FAILED"]
    lines = ["from __future__ import annotations", "import ctypes, os, re, sys"]
    lines += [f"{name} = {globals()[name]!r}" for name in names]
    lines += [inspect.getsource(fn) for fn in (_mountinfo, _under, _child_main)]
    lines.append("_child_main(sys.argv[1:])")
    return "\n".join(lines)


def _mountinfo() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of every mount, in mount order."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            # Mount points escape spaces etc. as octal (\040); decode them.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            mounts.append((point, set(fields[5].split(","))))
    return mounts


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _child_main(args: list[str]) -> None:
    """Entry point run inside fresh mount/net namespaces, before the build: make every
    mount read-only except the ``--rw`` dirs, then exec the build command."""
    writable: list[str] = []
    while args and args[0] == "--rw":
        writable.append(os.path.realpath(args[1]))
        args = args[2:]
    if not args or args[0] != "--":
        sys.stderr.write("bstore sandbox: usage: --rw DIR ... -- ARGV\n")
        os._exit(_SETUP_FAILED)
    argv = args[1:]
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str | None, target: str, flags: int) -> None:
        src = source.encode() if source is not None else None
        if libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target!r}: {os.strerror(err)}")

    try:
        # Private first, so nothing below propagates back to the host's mounts.
        mount(None, "/", _MS_REC | _MS_PRIVATE)
        for path in writable:
            mount(path, path, _MS_BIND | _MS_REC)
        for point, opts in _mountinfo():
            if any(_under(point, p) for p in _SKIP_PREFIXES):
                continue
            if any(_under(point, w) for w in writable) or "ro" in opts:
                continue
            keep = 0
            for name, flag in _KEEP_FLAGS.items():
                if name in opts:
                    keep |= flag
            mount(None, point, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)
        # The inherited cwd still points into the mount that was there before the
        # writable bind mounts: re-enter it by path so relative writes land in them.
        os.chdir(os.getcwd())
    except OSError as exc:
        sys.stderr.write(f"bstore sandbox: {exc}\n")
        os._exit(_SETUP_FAILED)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"bstore sandbox: cannot run {argv[0]!r}: {exc}\n")
        os._exit(127)
