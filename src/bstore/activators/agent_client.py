"""The Python side of the control channel to a running BEAM node's ``bstore_agent``.

One :class:`AgentClient` is one Unix-socket connection. Frames are a 4-byte big-endian
length followed by an External Term Format binary; a request is ``{Id, Op, Args}``, a
reply ``{Id, ok, Result}`` or ``{Id, error, Reason}``. Replies are decoded with the
bounded decoder of :mod:`bstore.activators.etf` because the node is untrusted input.

The agent decodes requests with ``binary_to_term(B, [safe])``, which refuses atoms the
node has never seen. The typed methods therefore send the atom names they carry through
the agent's ``intern`` operation when the node could not decode the request (then send it
again); :meth:`AgentClient.call` sends exactly what it is given (a request naming an
unknown atom comes back as a ``bad_frame`` error).

Errors::

    AgentError                  (names the socket and the operation)
    ├── AgentUnavailable          cannot connect, connection lost, timed out
    ├── AgentProtocolError        a reply that is not a valid, matching frame
    └── AgentOpError              the agent answered {error, Reason}; .reason is the term
        └── LingeringProcessesError  a soft purge found processes in old code (.pids)
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from bstore.activators.etf import (
    AnyTerm,
    EtfError,
    Pid,
    VmTerm,
    decode,
    encode,
    format_term,
)
from bstore.errors import BstoreError
from bstore.specs.terms.model import Atom, ImproperList

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
# The agent refuses more in one `intern` request (atoms are never garbage collected).
MAX_INTERN = 4096

OK = Atom("ok")
ERROR = Atom("error")


class AgentError(BstoreError):
    """A failure talking to a node's agent; the message names the socket and the op."""

    def __init__(self, socket_path: Path, op: str, what: str, hint: str | None = None) -> None:
        super().__init__(f"agent at {socket_path}: {op}: {what}", hint)
        self.socket_path = socket_path
        self.op = op


class AgentUnavailable(AgentError):
    """No agent answers on the socket, the connection broke, or a reply timed out."""


class AgentProtocolError(AgentError):
    """The agent sent something that is not a well-formed reply to our request."""


class AgentOpError(AgentError):
    """The agent ran the operation and reported ``{error, Reason}``."""

    def __init__(self, socket_path: Path, op: str, reason: VmTerm, hint: str | None = None) -> None:
        super().__init__(socket_path, op, f"failed: {format_term(reason)}", hint)
        self.reason = reason

    @property
    def unsupported(self) -> bool:
        """Whether the agent does not know the operation: one started by an older bstore
        (the op is unknown to it, or its atom to the node, so the frame did not decode)."""
        r = self.reason
        return isinstance(r, tuple) and len(r) >= 1 and r[0] in (Atom("unknown_op"),
                                                                  Atom("bad_frame"))


class LingeringProcessesError(AgentOpError):
    """Processes still run a module's old code, so it cannot be purged; nothing was killed."""

    def __init__(self, socket_path: Path, op: str, reason: VmTerm, pids: tuple[Pid, ...]) -> None:
        AgentError.__init__(
            self,
            socket_path,
            op,
            "processes lingering in old code: [" + ", ".join(str(p) for p in pids) + "]",
            hint="the node stays on its old code; those processes must finish or make a "
            "fully qualified call before the module can be replaced",
        )
        self.reason = reason
        self.pids = pids


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What ``node_info`` reports about the node the agent runs in."""

    node: str
    otp_release: str
    erts_version: str
    os_pid: int
    uptime_ms: int
    memory_total: int


@dataclass(frozen=True, slots=True)
class AppInfo:
    """One entry of ``which_applications`` / ``loaded_applications``."""

    name: str
    description: str
    version: str


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """A successful ``reload``: the modules replaced and the processes that were suspended."""

    modules: tuple[str, ...]
    processes: tuple[Pid, ...]


def _atoms_in(term: object, found: set[str]) -> None:
    if isinstance(term, Atom):
        found.add(term.name)
    elif isinstance(term, list | tuple):
        for item in term:
            _atoms_in(item, found)
    elif isinstance(term, ImproperList):
        _atoms_in(term.items, found)
        _atoms_in(term.tail, found)
    elif isinstance(term, dict):
        for key, value in term.items():
            _atoms_in(key, found)
            _atoms_in(value, found)


def _path_term(path: Path | str) -> bytes:
    return str(path).encode("utf-8")


def _text(term: VmTerm) -> str:
    if isinstance(term, bytes):
        return term.decode("utf-8", errors="replace")
    if isinstance(term, Atom):
        return term.name
    return format_term(term)


class AgentClient:
    """A connection to the ``bstore_agent`` listening on ``socket_path``.

    Connects lazily on the first call (or explicitly with :meth:`connect`); use as a
    context manager to close it. ``timeout`` bounds connecting and every reply;
    ``max_frame`` bounds a reply's size. A timed-out or broken connection is closed and
    the next call reconnects. Not thread-safe: one request at a time.
    """

    def __init__(
        self,
        socket_path: Path,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.max_frame = max_frame
        self._sock: socket.socket | None = None
        self._ids: Iterator[int] = itertools.count(1)
        # Atoms this connection's node already has (atoms are never collected, so this
        # holds until the connection closes; a reconnect may reach a restarted node).
        self._interned: set[str] = set()

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        """Open the connection (no-op when already open)."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(
                self.socket_path,
                "connect",
                f"cannot connect: {exc.strerror or exc}",
                hint="is the node running? (bstore node status)",
            ) from exc
        self._sock = sock
        self._interned = set()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ raw calls

    def call(self, op: str, *args: AnyTerm, timeout: float | None = None) -> VmTerm:
        """Run ``op`` with ``args`` on the node and return its result term.

        Raises :class:`AgentOpError` when the agent answers ``{error, Reason}``,
        :class:`AgentUnavailable` / :class:`AgentProtocolError` on transport failures.
        """
        request_id = next(self._ids)
        try:
            frame = encode((request_id, Atom(op), list(args)))
        except EtfError as exc:
            raise AgentProtocolError(self.socket_path, op, f"cannot encode request: {exc}") from exc
        self.connect()
        sock = self._sock
        assert sock is not None
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            sock.sendall(struct.pack(">I", len(frame)) + frame)
            (length,) = struct.unpack(">I", self._recv_exactly(sock, 4, op))
            if length > self.max_frame:
                raise AgentProtocolError(
                    self.socket_path,
                    op,
                    f"reply frame of {length} bytes exceeds the limit of {self.max_frame}",
                )
            payload = self._recv_exactly(sock, length, op)
        except TimeoutError as exc:
            # A late reply would be read as the answer to the next request: drop the line.
            self.close()
            raise AgentUnavailable(
                self.socket_path, op, f"no reply within {sock.gettimeout()} s"
            ) from exc
        except OSError as exc:
            self.close()
            raise AgentUnavailable(self.socket_path, op, f"connection failed: {exc}") from exc
        except AgentError:
            self.close()
            raise
        return self._unpack_reply(op, request_id, payload)

    def _recv_exactly(self, sock: socket.socket, n: int, op: str) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = sock.recv(min(n - len(chunks), 1 << 20))
            if not chunk:
                raise AgentUnavailable(
                    self.socket_path, op, f"connection closed after {len(chunks)} of {n} bytes"
                )
            chunks += chunk
        return bytes(chunks)

    def _unpack_reply(self, op: str, request_id: int, payload: bytes) -> VmTerm:
        try:
            reply = decode(payload, max_size=self.max_frame, source=f"reply to {op}")
        except EtfError as exc:
            self.close()
            raise AgentProtocolError(self.socket_path, op, exc.message) from exc
        if not (isinstance(reply, tuple) and len(reply) == 3 and reply[1] in (OK, ERROR)):
            self.close()
            raise AgentProtocolError(
                self.socket_path,
                op,
                f"reply {format_term(reply, limit=200)} is not {{Id, ok|error, _}}",
            )
        reply_id, status, result = reply
        if status == ERROR and reply_id == Atom("undefined"):
            # The agent could not decode our frame, so it could not echo the id.
            raise AgentOpError(self.socket_path, op, result)
        if reply_id != request_id or isinstance(reply_id, bool):
            self.close()
            raise AgentProtocolError(
                self.socket_path, op, f"reply id {format_term(reply_id)} is not {request_id}"
            )
        if status == ERROR:
            raise self._op_error(op, result)
        return result

    def _op_error(self, op: str, reason: VmTerm) -> AgentOpError:
        pids = _lingering_pids(reason)
        if pids is not None:
            return LingeringProcessesError(self.socket_path, op, reason, pids)
        return AgentOpError(self.socket_path, op, reason)

    def _call_interned(self, op: str, *args: AnyTerm, timeout: float | None = None) -> VmTerm:
        """Like :meth:`call`, after creating every atom named in ``args`` on the node."""
        names: set[str] = set()
        _atoms_in(list(args), names)
        self.connect()
        ordered = sorted(names - self._interned)
        if ordered:
            # Usually the node has them all already (the app was loaded before): try
            # first, intern only when the node could not decode the request.
            try:
                result = self.call(op, *args, timeout=timeout)
            except AgentOpError as exc:
                if not _is_bad_frame(exc.reason):
                    raise
            else:
                if self._sock is not None:
                    self._interned.update(names)
                return result
        for start in range(0, len(ordered), MAX_INTERN):
            batch: list[AnyTerm] = [n.encode("utf-8") for n in ordered[start : start + MAX_INTERN]]
            self.call("intern", batch)
        result = self.call(op, *args, timeout=timeout)
        if self._sock is not None:
            self._interned.update(names)
        return result

    # ------------------------------------------------------------ typed operations

    def ping(self) -> None:
        """Raise unless the agent answers ``pong``."""
        result = self.call("ping")
        if result != Atom("pong"):
            raise AgentProtocolError(self.socket_path, "ping", f"answered {format_term(result)}")

    def node_info(self) -> NodeInfo:
        """The node's name, OTP release, ERTS version, OS pid, uptime and total memory."""
        result = self.call("node_info")
        if not isinstance(result, dict):
            raise AgentProtocolError(self.socket_path, "node_info", format_term(result))
        try:
            node, otp, erts = (
                result[Atom("node")],
                result[Atom("otp_release")],
                result[Atom("erts_version")],
            )
            numbers = [result[Atom(k)] for k in ("os_pid", "uptime_ms", "memory_total")]
        except KeyError as exc:
            raise AgentProtocolError(self.socket_path, "node_info", f"missing {exc}") from exc
        if not all(isinstance(n, int) for n in numbers):
            raise AgentProtocolError(self.socket_path, "node_info", format_term(result))
        os_pid, uptime, memory = (int(n) for n in numbers if isinstance(n, int))
        return NodeInfo(_text(node), _text(otp), _text(erts), os_pid, uptime, memory)

    def add_patha(self, directory: Path | str) -> None:
        """Prepend ``directory`` to the node's code path."""
        self.call("add_patha", _path_term(directory))

    def del_path(self, directory: Path | str) -> bool:
        """Remove ``directory`` from the code path; False when it was not there."""
        return self.call("del_path", _path_term(directory)) == Atom("true")

    def get_path(self) -> list[str]:
        """The node's code path."""
        result = self.call("get_path")
        return [_text(p) for p in result] if isinstance(result, list) else []

    def set_path(self, directories: Iterable[Path | str]) -> None:
        """Replace the code path (every directory must exist)."""
        self.call("set_path", [_path_term(d) for d in directories])

    def load_module(self, module: str, beam: Path | str) -> None:
        """Soft-purge ``module``, then load it from ``beam`` (``code:load_abs``)."""
        self._call_interned("load_module", Atom(module), _path_term(beam))

    def purge(self, module: str) -> None:
        """Soft-purge ``module``'s old code; :class:`LingeringProcessesError` if in use."""
        self._call_interned("purge", Atom(module))

    def module_md5s(self, app: str) -> dict[str, bytes | None]:
        """MD5 of each of ``app``'s modules as loaded (None: not loaded)."""
        result = self._call_interned("module_md5s", Atom(app))
        if not isinstance(result, dict):
            raise AgentProtocolError(self.socket_path, "module_md5s", format_term(result))
        return {_text(k): (v if isinstance(v, bytes) else None) for k, v in result.items()}

    def app_load(self, app: str) -> None:
        """``application:load(App)``."""
        self._call_interned("app_load", Atom(app))

    def app_start(self, app: str, start_type: str = "temporary") -> None:
        """``application:start(App, Type)``; dependencies must already run."""
        self._call_interned("app_start", Atom(app), Atom(start_type))

    def app_ensure_all_started(self, app: str) -> list[str]:
        """``application:ensure_all_started(App)``: the applications it started."""
        result = self._call_interned("app_ensure_all_started", Atom(app))
        return [_text(a) for a in result] if isinstance(result, list) else []

    def app_stop(self, app: str) -> None:
        """``application:stop(App)``."""
        self._call_interned("app_stop", Atom(app))

    def app_unload(self, app: str) -> None:
        """``application:unload(App)``."""
        self._call_interned("app_unload", Atom(app))

    def restart_app(
        self,
        app: str,
        old_ebin: Path | str | None,
        ebins: Iterable[Path | str],
        modules: Mapping[str, Path | str],
        env: Mapping[str, AnyTerm],
        *,
        timeout: float | None = None,
    ) -> list[str]:
        """Stop and start ``app`` in one request: ``app_stop`` + ``app_unload`` (an app
        already stopped/unloaded is fine), ``del_path`` of ``old_ebin``, ``add_patha`` of
        ``ebins`` (the first ends up first), ``load_module`` of ``modules`` (name ->
        ``.beam``), ``app_load``, ``set_env`` of ``env``, ``app_ensure_all_started``.
        Returns the applications started; once it has answered, the agent purges the
        code the new modules replaced (soft). The first failing step raises what that
        operation alone would have (its op name and reason; lingering processes as
        :class:`LingeringProcessesError`); the steps before it stay done."""
        old: AnyTerm = Atom("undefined") if old_ebin is None else _path_term(old_ebin)
        dirs: list[AnyTerm] = [_path_term(d) for d in ebins]
        mods: list[AnyTerm] = [(Atom(m), _path_term(p)) for m, p in modules.items()]
        pairs: list[AnyTerm] = [(Atom(k), v) for k, v in env.items()]
        try:
            result = self._call_interned("restart_app", Atom(app), old, dirs, mods, pairs,
                                         timeout=timeout)
        except AgentOpError as exc:
            step = exc.reason
            if (isinstance(step, tuple) and len(step) == 3 and step[0] == Atom("step")
                    and isinstance(step[1], Atom)):
                raise self._op_error(step[1].name, step[2]) from exc
            raise
        return [_text(a) for a in result] if isinstance(result, list) else []

    def old_code(self, modules: Iterable[str]) -> list[str]:
        """The ``modules`` that still have old code loaded (``erlang:check_old_code/1``)."""
        result = self._call_interned("old_code", [Atom(m) for m in modules])
        if not isinstance(result, list):
            raise AgentProtocolError(self.socket_path, "old_code", format_term(result))
        return [_text(m) for m in result]

    def app_running(self, app: str) -> str | None:
        """The version of ``app`` when it runs in the node, None when it does not
        (``which_applications`` narrowed to one app)."""
        result = self._call_interned("app_running", Atom(app))
        if result == Atom("false"):
            return None
        if not isinstance(result, bytes):
            raise AgentProtocolError(self.socket_path, "app_running", format_term(result))
        return _text(result)

    def running_versions(self) -> dict[str, str]:
        """Application → version of every running application (``which_applications``
        without the descriptions: what a plan compares, at a third of the reply)."""
        try:
            result = self.call("app_versions")
        except AgentOpError as exc:
            if not exc.unsupported:
                raise
            return {a.name: a.version for a in self.which_applications()}
        if not isinstance(result, list):
            raise AgentProtocolError(self.socket_path, "app_versions", format_term(result))
        versions = {}
        for item in result:
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[0], Atom) and isinstance(item[1], bytes)):
                raise AgentProtocolError(self.socket_path, "app_versions",
                                         format_term(item, limit=200))
            versions[item[0].name] = _text(item[1])
        return versions

    def which_applications(self) -> list[AppInfo]:
        """The running applications."""
        return self._apps("which_applications")

    def loaded_applications(self) -> list[AppInfo]:
        """The loaded applications."""
        return self._apps("loaded_applications")

    def _apps(self, op: str) -> list[AppInfo]:
        result = self.call(op)
        if not isinstance(result, list):
            raise AgentProtocolError(self.socket_path, op, format_term(result))
        apps = []
        for item in result:
            if not (isinstance(item, tuple) and len(item) == 3):
                raise AgentProtocolError(self.socket_path, op, format_term(item))
            apps.append(AppInfo(_text(item[0]), _text(item[1]), _text(item[2])))
        return apps

    def get_env(self, app: str) -> dict[str, VmTerm]:
        """All of ``app``'s environment (keys are atom names)."""
        result = self._call_interned("get_env", Atom(app))
        env: dict[str, VmTerm] = {}
        for item in result if isinstance(result, list) else []:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Atom):
                env[item[0].name] = item[1]
        return env

    def get_env_key(self, app: str, key: str) -> VmTerm | None:
        """One env value of ``app``; None when the key is unset."""
        result = self._call_interned("get_env", Atom(app), Atom(key))
        if isinstance(result, tuple) and len(result) == 2 and result[0] == OK:
            return result[1]
        return None

    def set_env(self, app: str, key: str, value: AnyTerm) -> None:
        """``application:set_env(App, Key, Value)`` (no config_change callback)."""
        self._call_interned("set_env", Atom(app), Atom(key), value)

    def unset_env(self, app: str, key: str) -> None:
        """``application:unset_env(App, Key)``."""
        self._call_interned("unset_env", Atom(app), Atom(key))

    def config_change(self, app: str, old_env: Mapping[str, AnyTerm]) -> None:
        """Tell ``app`` (its ``config_change/3``) that its env changed from ``old_env``."""
        before: list[AnyTerm] = [(Atom(k), v) for k, v in old_env.items()]
        self._call_interned("config_change", Atom(app), before)

    def reconfigure(
        self, app: str, set_keys: Mapping[str, AnyTerm], unset_keys: Iterable[str] = ()
    ) -> None:
        """Set and unset env keys, then run ``config_change/3``, in one agent step."""
        pairs: list[AnyTerm] = [(Atom(k), v) for k, v in set_keys.items()]
        removed: list[AnyTerm] = [Atom(k) for k in unset_keys]
        self._call_interned("reconfigure", Atom(app), pairs, removed)

    def suspend(self, app: str, modules: Iterable[str] | None = None) -> list[Pid]:
        """``sys:suspend`` ``app``'s supervision tree (only processes running ``modules``
        when given); all or none. Returns the suspended pids."""
        if modules is None:
            result = self._call_interned("suspend", Atom(app))
        else:
            mods: list[AnyTerm] = [Atom(m) for m in modules]
            result = self._call_interned("suspend", Atom(app), mods)
        return [p for p in result if isinstance(p, Pid)] if isinstance(result, list) else []

    def resume(self, target: str | Iterable[Pid]) -> None:
        """``sys:resume`` an app's whole tree (by name) or the given pids."""
        if isinstance(target, str):
            self._call_interned("resume", Atom(target))
        else:
            pids: list[AnyTerm] = list(target)
            self.call("resume", pids)

    def change_code(self, pid: Pid, module: str, old_vsn: AnyTerm, extra: AnyTerm) -> None:
        """``sys:change_code(Pid, Module, OldVsn, Extra)`` of a suspended process."""
        self._call_interned("change_code", pid, Atom(module), old_vsn, extra)

    def reload(
        self,
        app: str,
        modules: Mapping[str, Path | str],
        extra: AnyTerm = (),
        *,
        timeout: float | None = None,
    ) -> ReloadResult:
        """Replace ``modules`` (name -> ``.beam`` path) of running ``app`` in place.

        Suspend the processes running them, soft-purge, load all atomically,
        ``sys:change_code`` with the old ``-vsn`` and ``extra``, resume. On failure
        the old code stays current and :class:`AgentOpError` says which step failed
        (:class:`LingeringProcessesError` for the purge).
        """
        pairs: list[AnyTerm] = [(Atom(m), _path_term(p)) for m, p in modules.items()]
        result = self._call_interned("reload", Atom(app), pairs, extra, timeout=timeout)
        if not isinstance(result, dict):
            raise AgentProtocolError(self.socket_path, "reload", format_term(result))
        mods = result.get(Atom("modules"), [])
        procs = result.get(Atom("processes"), [])
        return ReloadResult(
            tuple(_text(m) for m in mods) if isinstance(mods, list) else (),
            tuple(p for p in procs if isinstance(p, Pid)) if isinstance(procs, list) else (),
        )

    def process_info(self, pid: Pid) -> dict[str, VmTerm] | None:
        """``current_function``, ``registered_name`` and ``status`` of ``pid``; None if dead."""
        result = self.call("process_info", pid)
        if not isinstance(result, dict):
            return None
        return {_text(k): v for k, v in result.items()}

    def connect_node(self, node: str) -> bool:
        """Connect this node to the distributed node ``node`` (``name@host``); whether
        it is connected afterwards. False when this node is not distributed."""
        result = self._call_interned("connect_node", Atom(node))
        return result == Atom("true")

    def stop_node(self) -> None:
        """Ask the node to shut down gracefully (``init:stop()``); returns at once."""
        self.call("stop_node")


def _is_bad_frame(reason: VmTerm) -> bool:
    """Whether ``reason`` is the agent's ``{bad_frame, _}``: it could not decode a request
    (with ``[safe]``: typically an atom the node does not have)."""
    return isinstance(reason, tuple) and len(reason) == 2 and reason[0] == Atom("bad_frame")


def _lingering_pids(reason: VmTerm) -> tuple[Pid, ...] | None:
    """The pids of a ``{lingering, Pids}`` reason, also nested as in reload's errors."""
    if isinstance(reason, tuple):
        if len(reason) == 2 and reason[0] == Atom("lingering") and isinstance(reason[1], list):
            return tuple(p for p in reason[1] if isinstance(p, Pid))
        for item in reason:
            found = _lingering_pids(item)
            if found is not None:
                return found
    return None
