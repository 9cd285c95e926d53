"""The long-lived host BEAM node of a profile: start, status, stop, logs.

One node per profile lives under ``<state>/nodes/<profile>/`` (directory mode 0700)::

    agent.sock   the bstore_agent control socket (0600; see bstore_agent.erl); when that
                 path exceeds sun_path, /tmp/bstore-<uid>/<hash>/agent.sock (socket_path)
    node.json    pid record: {pid, start_time, socket, node_name, argv, started_at}
    node.log     the node's stdout and stderr (appended)
    lock         flock(2) held while starting or stopping
    erl_crash.dump  the node's crash dump, if it ever writes one (also its cwd)

The node is ``erl -noshell -noinput`` started in its own session, so it outlives the
bstore command that started it and a signal to bstore's process group never reaches it.
A PID alone is not an identity (PIDs are recycled), so the record also keeps the kernel
start time of the process (``/proc/<pid>/stat`` field 22); before any signal the process
is pinned with a pidfd and its start time compared, so bstore never signals a process
that merely inherited the number. Signals go to the node's process group (its pgid is
its pid: it leads its own session), which also reaches its port programs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bstore.activators.agent_client import AgentClient, AgentError, NodeInfo
from bstore.activators.processes import (
    ProcessWatch,
    pinned,
    process_start_time,
    wait_gone,
)
from bstore.activators.processes import is_running as process_running
from bstore.errors import BstoreError
from bstore.store.atomic import replace_file

_PROFILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+(@[A-Za-z0-9._-]+)?$")
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Where sockets go when the node directory is too deep for sun_path (see socket_path).
_SHORT_SOCKET_BASE = Path("/tmp")
_POLL = 0.05


class HostNodeError(BstoreError):
    """The host node could not be started, inspected or stopped (names the profile)."""


@dataclass(frozen=True, slots=True)
class NodePaths:
    """Where a profile's host node keeps its socket, pid record and log."""

    directory: Path
    socket: Path
    record: Path
    log: Path
    lock: Path

    @classmethod
    def for_profile(cls, state_dir: Path, profile: str) -> NodePaths:
        """The paths of ``profile``'s node under ``state_dir`` (the profile name is checked)."""
        if not _PROFILE_RE.match(profile):
            raise HostNodeError(
                f"profile name {profile!r} is not valid",
                hint="use letters, digits, '.', '_' and '-', starting with a letter or digit",
            )
        return cls.in_directory(Path(state_dir) / "nodes" / profile)

    @classmethod
    def in_directory(cls, directory: Path) -> NodePaths:
        """The paths of a node whose files live in ``directory`` (socket: :func:`socket_path`)."""
        return cls(
            directory,
            socket_path(directory),
            directory / "node.json",
            directory / "node.log",
            directory / "lock",
        )

    @property
    def socket_outside(self) -> bool:
        """Whether the socket lives in a short private directory outside :attr:`directory`."""
        return self.socket.parent != self.directory


def socket_path(directory: Path) -> Path:
    """Where the agent socket of the node whose files are in ``directory`` goes.

    ``directory/agent.sock`` when that fits in ``sun_path`` (107 bytes); otherwise
    ``/tmp/bstore-<uid>/<hash of the absolute directory>/agent.sock``. The choice depends
    only on the directory and the uid (not on ``$TMPDIR`` or ``$XDG_RUNTIME_DIR``, which
    differ between a daemon and a shell), so every bstore process of that user finds the
    same socket for the same node. :func:`prepare_socket_directory` makes the short
    directory private and refuses one that another user planted.
    """
    inside = Path(directory) / "agent.sock"
    if len(os.fsencode(str(inside))) <= _MAX_SOCKET_PATH:
        return inside
    digest = hashlib.sha256(os.fsencode(os.path.abspath(directory))).hexdigest()[:24]
    return _SHORT_SOCKET_BASE / f"bstore-{os.getuid()}" / digest / "agent.sock"


def _private_dir(path: Path) -> None:
    # mkdir does not follow a planted symlink at ``path``; lstat then proves that what is
    # there is a real directory of ours, and chmod drops any group/other bits.
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise HostNodeError(
            f"socket directory {path} is not a directory (a symlink or a file is there)",
            hint="remove it; bstore creates it itself",
        )
    if info.st_uid != os.getuid():
        raise HostNodeError(
            f"socket directory {path} belongs to uid {info.st_uid}, not to us",
            hint="remove it (another user created it) or use a shorter --root",
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def prepare_socket_directory(paths: NodePaths) -> None:
    """Create the short private directory of an outside socket (0700, ours, no symlink)."""
    if not paths.socket_outside:
        return
    try:
        _private_dir(paths.socket.parent.parent)
        _private_dir(paths.socket.parent)
    except OSError as exc:
        raise HostNodeError(
            f"cannot prepare socket directory {paths.socket.parent} for node directory "
            f"{paths.directory}: {exc}"
        ) from exc


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What bstore remembers about a node it started (``node.json``)."""

    pid: int
    start_time: int
    socket: str
    node_name: str | None
    argv: tuple[str, ...]
    started_at: float

    def __post_init__(self) -> None:
        if self.pid <= 1 or self.start_time < 0:
            raise HostNodeError(f"node record has pid {self.pid}, start time {self.start_time}")


@dataclass(frozen=True, slots=True)
class HostNodeStatus:
    """The state of a profile's host node.

    ``running``: the recorded process is alive (same pid *and* start time);
    ``agent_ok``: its agent answered; ``info``: its ``node_info``; ``problem`` says why
    a running node is not fully healthy (None when it is, or when it is just stopped).
    """

    profile: str
    running: bool
    agent_ok: bool
    pid: int | None
    info: NodeInfo | None
    socket: Path
    log: Path
    problem: str | None = None


class HostNode:
    """Control of the host node of ``profile`` under ``state_dir`` (no process is kept)."""

    def __init__(self, state_dir: Path, profile: str, *, erl: str = "erl",
                 paths: NodePaths | None = None) -> None:
        self.profile = profile
        self.paths = paths if paths is not None else NodePaths.for_profile(state_dir, profile)
        self.erl = erl
        #: Called after :meth:`stop` found the node gone (e.g. to drop its GC roots).
        self.on_stopped: list[Callable[[], None]] = []
        #: The last record read, with the bytes it was parsed from (a file's identity by
        #: inode, size and mtime is not enough: a rewrite within one clock tick of the
        #: filesystem can reuse all three).
        self._record_seen: tuple[bytes, NodeRecord] | None = None
        self._watch = ProcessWatch()

    # ------------------------------------------------------------ files

    def _prepare_directory(self) -> None:
        directory = self.paths.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.lstat()
            if info.st_uid != os.getuid():
                raise HostNodeError(
                    f"node directory {directory} belongs to uid {info.st_uid}, not to us",
                    hint="remove it or fix its owner",
                )
            # The agent refuses a socket directory others can enter (see bstore_agent.erl).
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise HostNodeError(f"cannot prepare node directory {directory}: {exc}") from exc
        prepare_socket_directory(self.paths)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._prepare_directory()
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read_record(self) -> NodeRecord | None:
        """The pid record, or None when there is none (a corrupt one is an error)."""
        try:
            raw = self.paths.record.read_bytes()
            if self._record_seen is not None and self._record_seen[0] == raw:
                return self._record_seen[1]
            data = json.loads(raw.decode("utf-8"))
            record = NodeRecord(
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                socket=str(data["socket"]),
                node_name=None if data.get("node_name") is None else str(data["node_name"]),
                argv=tuple(str(a) for a in data.get("argv", [])),
                started_at=float(data.get("started_at", 0.0)),
            )
            self._record_seen = (raw, record)
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HostNodeError(
                f"node record {self.paths.record} is unreadable: {exc}",
                hint="stop the node by hand if it runs, then delete the file",
            ) from exc

    def _write_record(self, record: NodeRecord) -> None:
        replace_file(self.paths.record, json.dumps(asdict(record), indent=1).encode("utf-8"),
                     sync_dir=True)

    def _clear_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.paths.record.unlink()

    def client(self, timeout: float = 30.0) -> AgentClient:
        """A (not yet connected) client for this node's agent."""
        return AgentClient(self.paths.socket, timeout)

    def read_log(self, max_bytes: int = 64 * 1024) -> str:
        """The last ``max_bytes`` of the node's log ("" when there is none)."""
        try:
            with self.paths.log.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - max_bytes))
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------ start

    def start(
        self,
        agent_ebin: Path,
        code_paths: Sequence[Path] = (),
        *,
        node_name: str | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> HostNodeStatus:
        """Start the node with the agent and ``code_paths`` on ``-pa``; wait for ``ping``.

        ``node_name`` (``name`` or ``name@host``) turns on distribution on loopback; the
        control channel needs none. ``env`` replaces the node's environment (default:
        bstore's own), e.g. a private ``HOME`` holding the cookie. Raises
        :class:`HostNodeError` if the node already runs or does not answer within
        ``timeout`` (it is then killed, log quoted).
        """
        if node_name is not None and not _NODE_NAME_RE.match(node_name):
            raise HostNodeError(f"node name {node_name!r} is not valid for profile {self.profile}")
        socket_path = str(self.paths.socket)
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            raise HostNodeError(
                f"control socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes",
                hint="use a shorter state directory (--root)",
            )
        dirs = [Path(agent_ebin), *(Path(p) for p in code_paths)]
        for d in dirs:
            if not d.is_absolute() or not d.is_dir():
                raise HostNodeError(f"code path {d} is not an absolute directory")
        exe = shutil.which(self.erl)
        if exe is None:
            raise HostNodeError(f"cannot start node {self.profile}: {self.erl!r} not found")
        with self._locked():
            old = self.read_record()
            if old is not None and process_running(old):
                raise HostNodeError(
                    f"host node of profile {self.profile} already runs (pid {old.pid})",
                    hint="bstore node stop, or bstore node status",
                )
            self._clear_record()
            argv = [exe, "-noshell", "-noinput"]
            for d in dirs:
                argv += ["-pa", str(d)]
            if node_name is not None:
                flag = "-name" if "@" in node_name else "-sname"
                argv += [flag, node_name, "-kernel", "inet_dist_use_interface", "{127,0,0,1}"]
            argv += [*extra_args, "-bstore_agent_socket", socket_path]
            argv += ["-eval", "bstore_agent:start()"]
            proc = self._spawn(argv, env)
            start_time = process_start_time(proc.pid)
            if start_time is None:
                raise HostNodeError(
                    f"host node of profile {self.profile} exited at once; log {self.paths.log}:"
                    f"\n{self.read_log(4000)}"
                )
            record = NodeRecord(
                proc.pid, start_time, socket_path, node_name, tuple(argv), time.time()
            )
            self._write_record(record)
            self._wait_for_agent(proc, record, timeout)
        return self.status()

    def _spawn(
        self, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        try:
            log_fd = os.open(
                self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise HostNodeError(f"cannot open node log {self.paths.log}: {exc}") from exc
        try:
            os.write(log_fd, f"--- bstore: starting {' '.join(argv)}\n".encode())
            # A crash dump belongs next to the node's log, whatever ERL_CRASH_DUMP bstore's
            # own environment carries (a relative or shared one would land elsewhere).
            node_env = dict(os.environ if env is None else env)
            node_env["ERL_CRASH_DUMP"] = str(self.paths.directory.absolute() / "erl_crash.dump")
            # Its own session: no terminal, no signals aimed at bstore's process group,
            # and it keeps running when bstore exits.
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=self.paths.directory,
                env=node_env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise HostNodeError(
                f"cannot start {argv[0]} for profile {self.profile}: {exc}"
            ) from exc
        finally:
            os.close(log_fd)

    def _wait_for_agent(
        self, proc: subprocess.Popen[bytes], record: NodeRecord, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        last: str = "no answer yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._clear_record()
                raise HostNodeError(
                    f"host node of profile {self.profile} exited with status {proc.returncode} "
                    f"before its agent answered; log {self.paths.log}:\n{self.read_log(4000)}"
                )
            if self.paths.socket.exists():
                try:
                    with AgentClient(self.paths.socket, timeout=2.0) as client:
                        client.ping()
                    return
                except AgentError as exc:
                    last = exc.message
            time.sleep(_POLL)
        self._signal_group(record, signal.SIGKILL)
        wait_gone(record, 5.0)
        self._clear_record()
        raise HostNodeError(
            f"host node of profile {self.profile} did not answer within {timeout} s ({last}); "
            f"killed it. Log {self.paths.log}:\n{self.read_log(4000)}"
        )

    # ------------------------------------------------------------ status

    def is_running(self) -> bool:
        """Whether the recorded node process is alive (no question to its agent)."""
        record = self.read_record()
        return record is not None and self._watch.alive(record)

    def status(self, timeout: float = 5.0) -> HostNodeStatus:
        """Whether the node runs, whether its agent answers, and its ``node_info``."""
        record = self.read_record()
        profile, sock, log = self.profile, self.paths.socket, self.paths.log
        if record is None or not process_running(record):
            problem = None if record is None else "recorded process is gone (stale record)"
            return HostNodeStatus(
                running=False,
                agent_ok=False,
                pid=None,
                info=None,
                problem=problem,
                profile=profile,
                socket=sock,
                log=log,
            )
        try:
            with AgentClient(self.paths.socket, timeout) as client:
                info = client.node_info()
        except AgentError as exc:
            return HostNodeStatus(
                running=True,
                agent_ok=False,
                pid=record.pid,
                info=None,
                problem=exc.message,
                profile=profile,
                socket=sock,
                log=log,
            )
        problem = None
        if info.os_pid != record.pid:
            problem = f"agent reports OS pid {info.os_pid}, record says {record.pid}"
        return HostNodeStatus(
            running=True,
            agent_ok=True,
            pid=record.pid,
            info=info,
            problem=problem,
            profile=profile,
            socket=sock,
            log=log,
        )

    # ------------------------------------------------------------ stop

    def stop(self, *, graceful_timeout: float = 15.0, term_timeout: float = 5.0) -> str:
        """Stop the node: ``init:stop()`` via the agent, then SIGTERM, then SIGKILL.

        Returns how it ended: ``"not_running"``, ``"graceful"``, ``"terminated"`` or
        ``"killed"``. Signals go to the node's process group only after its identity
        (pid and start time, pinned by a pidfd) is confirmed.
        """
        with self._locked():
            record = self.read_record()
            if record is None or not process_running(record):
                self._clear_record()
                self._run_stopped_hooks()
                return "not_running"
            ask_timeout = min(5.0, graceful_timeout)
            with contextlib.suppress(AgentError), self.client(ask_timeout) as client:
                client.stop_node()
                if wait_gone(record, graceful_timeout):
                    return self._stopped(record, "graceful")
            for sig, wait, outcome in (
                (signal.SIGTERM, term_timeout, "terminated"),
                (signal.SIGKILL, 10.0, "killed"),
            ):
                if not self._signal_group(record, sig):
                    return self._stopped(record, outcome)
                if wait_gone(record, wait):
                    return self._stopped(record, outcome)
            raise HostNodeError(
                f"host node of profile {self.profile} (pid {record.pid}) survived SIGKILL"
            )

    def _stopped(self, record: NodeRecord, outcome: str) -> str:
        self._clear_record()
        # The agent leaves its socket behind when the node is killed.
        with contextlib.suppress(FileNotFoundError):
            if not process_running(record):
                self.paths.socket.unlink()
        if self.paths.socket_outside:
            # The short directory is only the socket's; a leftover of it would pile up in /tmp.
            with contextlib.suppress(OSError):
                self.paths.socket.parent.rmdir()
        self._run_stopped_hooks()
        return outcome

    def _run_stopped_hooks(self) -> None:
        for hook in self.on_stopped:
            hook()

    def _signal_group(self, record: NodeRecord, sig: signal.Signals) -> bool:
        """Signal the node's process group if the leader is still the recorded process."""
        with pinned(record) as fd:
            if fd is None:
                return False
            try:
                os.killpg(record.pid, sig)
            except ProcessLookupError:
                return False
            except OSError as exc:
                raise HostNodeError(
                    f"cannot signal host node of profile {self.profile} (pid {record.pid}): {exc}"
                ) from exc
            return True
