"""The event bus: every step of bstore says what it did, as a named event.

Events carry the names of the original telemetry (``[bc_gitops, reconcile, stop]``
becomes ``"bstore.reconcile.stop"``), ``measurements`` (numbers: ``duration`` in
milliseconds, counts) and ``metadata`` (``app``, ``result``, ``error``, …). Consumers
attach handlers by exact name or by dotted prefix (``"bstore.reconcile"`` receives
``bstore.reconcile.start``, ``.stop`` and ``.error``; ``"*"`` receives everything).

Emitting never fails the caller: a handler that raises is logged and detached, so a
broken log sink cannot stop a deployment. Handlers run synchronously in the emitting
thread, outside the bus lock (a handler may itself emit or attach).

Known event names (the seed's telemetry, prefixed ``bstore.``)::

    reconcile.start|stop|error      duration; status / error
    deploy.start|stop               app; app, result
    upgrade.start|stop              app, from_version, to_version; app, result
    remove.start|stop               app; app, result
    reconfigure.start|stop          app; app, result
    rollback.start|stop|error       from_generation, to_generation
    git.pull                        repo, branch, commit, changed
    git.clone_start|clone_stop      repo, branch
    git.refused                     repo, branch, commit, reason (signature/history policy)
    deps.start|stop  build.start|stop   app, tool, result
    code.load  code.purge           app, module(s)
    mesh.fetch_start|fetch_stop     mcid, result
    vm.spawn_start|spawn_stop  vm.stop_start|stop_stop   app, node
    cluster.node_up|node_down       node
    health.check                    app, result
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from bstore.errors import BstoreError

_log = logging.getLogger("bstore.events")

#: Dotted lower-case words, the shape of every event name (``bstore.git.clone_start``).
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
#: Metadata keys whose values are never written out (JSON, /events), whatever the emitter.
_SECRET_KEY_RE = re.compile(r"token|password|passphrase|secret|credential", re.IGNORECASE)

KNOWN_EVENTS: tuple[str, ...] = (
    "bstore.reconcile.start", "bstore.reconcile.stop", "bstore.reconcile.error",
    "bstore.deploy.start", "bstore.deploy.stop", "bstore.upgrade.start", "bstore.upgrade.stop",
    "bstore.remove.start", "bstore.remove.stop", "bstore.reconfigure.start",
    "bstore.reconfigure.stop", "bstore.rollback.start", "bstore.rollback.stop",
    "bstore.rollback.error", "bstore.git.pull", "bstore.git.clone_start", "bstore.git.clone_stop",
    "bstore.git.refused", "bstore.deps.start", "bstore.deps.stop", "bstore.build.start",
    "bstore.build.stop", "bstore.code.load", "bstore.code.purge", "bstore.mesh.fetch_start",
    "bstore.mesh.fetch_stop", "bstore.vm.spawn_start", "bstore.vm.spawn_stop",
    "bstore.vm.stop_start", "bstore.vm.stop_stop", "bstore.cluster.node_up",
    "bstore.cluster.node_down", "bstore.health.check",
)


class EventError(BstoreError):
    """An event name or handler pattern that is not valid."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise EventError(
            f"{what} {name!r} is not a dotted lower-case name",
            hint="use names like 'bstore.reconcile.stop'",
        )
    return name


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Event:
    """One emitted event. ``time`` is wall-clock seconds since the epoch (UTC)."""

    seq: int
    name: str
    time: float
    measurements: Mapping[str, float] = field(default_factory=lambda: _frozen(None))
    metadata: Mapping[str, Any] = field(default_factory=lambda: _frozen(None))

    def __post_init__(self) -> None:
        _check_name(self.name, "event name")
        for key, value in self.measurements.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise EventError(
                    f"measurement {key!r} of event {self.name!r} is {value!r}, not a number"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; metadata values that look secret are redacted."""
        return {
            "seq": self.seq,
            "name": self.name,
            "time": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds"),
            "measurements": dict(self.measurements),
            "metadata": {key: _jsonable(key, value) for key, value in self.metadata.items()},
        }

    def to_json(self) -> str:
        """One line of JSON (no newline inside)."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str, separators=(",", ":"))


def _jsonable(key: str, value: Any) -> Any:
    if _SECRET_KEY_RE.search(key):
        return "<redacted>"
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(key, v) for v in value]
    return str(value)


Handler = Callable[[Event], None]


@dataclass(frozen=True)
class Handle:
    """What :meth:`EventBus.attach` returns; give it to :meth:`EventBus.detach`."""

    id: int
    pattern: str


def _matches(pattern: str, name: str) -> bool:
    return pattern == "*" or name == pattern or name.startswith(pattern + ".")


class SpanContext:
    """Yielded by :meth:`EventBus.span`: add metadata to the closing event."""

    def __init__(self) -> None:
        self.stop_metadata: dict[str, Any] = {}
        self.stop_measurements: dict[str, float] = {}

    def set(self, **metadata: Any) -> None:
        """Metadata for the ``stop`` (or ``error``) event, e.g. ``result="ok"``."""
        self.stop_metadata.update(metadata)

    def measure(self, **measurements: float) -> None:
        """Extra measurements for the closing event (``duration`` is added anyway)."""
        self.stop_measurements.update(measurements)


class EventBus:
    """Named events to attached handlers; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Copy-on-write tuple: emit() reads it without the lock and never sees a
        # half-updated list; attach/detach replace it under the lock.
        self._handlers: tuple[tuple[Handle, Handler], ...] = ()
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    def attach(self, pattern: str, handler: Handler) -> Handle:
        """Call ``handler(event)`` for events named ``pattern``, under it, or all (``*``)."""
        if pattern != "*":
            _check_name(pattern, "event pattern")
        if not callable(handler):
            raise EventError(f"handler for {pattern!r} is not callable: {handler!r}")
        with self._lock:
            handle = Handle(next(self._ids), pattern)
            self._handlers = (*self._handlers, (handle, handler))
        return handle

    def detach(self, handle: Handle) -> bool:
        """Remove a handler; ``False`` when it was not attached (already detached)."""
        with self._lock:
            kept = tuple(pair for pair in self._handlers if pair[0] != handle)
            found = len(kept) != len(self._handlers)
            self._handlers = kept
        return found

    def handler_count(self) -> int:
        """How many handlers are attached (for tests and status)."""
        return len(self._handlers)

    def emit(
        self, name: str, measurements: Mapping[str, float] | None = None, /, **metadata: Any
    ) -> Event:
        """Build the event and give it to every matching handler; returns the event."""
        with self._lock:
            seq = next(self._seq)
        event = Event(seq, name, time.time(), _frozen(measurements), _frozen(metadata))
        for handle, handler in self._handlers:
            if not _matches(handle.pattern, name):
                continue
            try:
                handler(event)
            except Exception:
                # The caller is doing real work (a deploy); a broken observer must not
                # stop it. Detach so a handler failing on every event logs only once.
                self.detach(handle)
                _log.exception(
                    "event handler %r for %r raised on %r and was detached",
                    handler, handle.pattern, name,
                )
        return event

    @contextmanager
    def span(
        self, name: str, /, *, underscore: bool = False, **metadata: Any
    ) -> Iterator[SpanContext]:
        """Emit ``<name>.start``, then ``<name>.stop`` with ``duration`` (ms).

        If the body raises, ``<name>.error`` is emitted instead with ``error`` (the
        message) and ``kind`` (the exception type) and the exception propagates.
        ``underscore=True`` gives the seed's ``<name>_start`` / ``_stop`` / ``_error``
        forms (``bstore.git.clone_start``).
        """
        sep = "_" if underscore else "."
        _check_name(name + sep + "start", "event name")
        context = SpanContext()
        started = time.monotonic()
        self.emit(name + sep + "start", {"system_time": time.time()}, **metadata)
        try:
            yield context
        except BaseException as exc:
            duration = (time.monotonic() - started) * 1000.0
            message = exc.message if isinstance(exc, BstoreError) else str(exc)
            self.emit(
                name + sep + "error",
                {**context.stop_measurements, "duration": duration},
                **{**metadata, **context.stop_metadata,
                   "error": message, "kind": type(exc).__name__},
            )
            raise
        duration = (time.monotonic() - started) * 1000.0
        self.emit(
            name + sep + "stop",
            {**context.stop_measurements, "duration": duration},
            **{**metadata, **context.stop_metadata},
        )


class EventRing:
    """A bounded in-memory ring of recent events (the HTTP API's ``/events``).

    Attach it as a handler: ``bus.attach("*", ring)``.
    """

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise EventError(f"event ring capacity {capacity!r} must be at least 1")
        self.capacity = capacity
        self._events: deque[Event] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    def __len__(self) -> int:
        return len(self._events)

    def recent(
        self, *, after_seq: int = 0, prefix: str | None = None, limit: int | None = None
    ) -> list[Event]:
        """Events with ``seq > after_seq`` (matching ``prefix``), oldest first.

        With ``limit``, the newest ``limit`` of them.
        """
        with self._lock:
            events = [
                e for e in self._events
                if e.seq > after_seq and (prefix is None or _matches(prefix, e.name))
            ]
        if limit is not None:
            events = events[-limit:] if limit > 0 else []
        return events


class JsonLinesSink:
    """Writes each event as one JSON line to a file (appending) or an open stream.

    With a path and ``max_bytes``, the file is rotated to ``<path>.1`` when it grows
    past the bound, so a daemon running for months keeps bounded logs.
    """

    def __init__(
        self, target: Path | IO[str], *, max_bytes: int | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._max_bytes = max_bytes
        if isinstance(target, Path):
            self._path = target
            self._stream: IO[str] = self._open(target)
            self._owned = True
        else:
            self._stream = target
            self._owned = False

    @staticmethod
    def _open(path: Path) -> IO[str]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("a", encoding="utf-8")
        except OSError as exc:
            raise EventError(
                f"cannot open event log {str(path)!r}: {exc.strerror}",
                hint="check that the directory exists and is writable",
            ) from exc

    def __call__(self, event: Event) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()
            if self._path is not None and self._max_bytes is not None \
                    and self._stream.tell() > self._max_bytes:
                self._stream.close()
                os.replace(self._path, self._path.with_name(self._path.name + ".1"))
                self._stream = self._open(self._path)

    def close(self) -> None:
        """Close the file if this sink opened it."""
        with self._lock:
            if self._owned:
                self._stream.close()


#: The process-wide default bus behind the module-level functions (the Python API
#: ``bstore.events.attach``); components take a bus argument defaulting to it.
default_bus = EventBus()


def attach(pattern: str, handler: Handler) -> Handle:
    """Attach ``handler`` to the default bus (see :meth:`EventBus.attach`)."""
    return default_bus.attach(pattern, handler)


def detach(handle: Handle) -> bool:
    """Detach from the default bus (see :meth:`EventBus.detach`)."""
    return default_bus.detach(handle)


def emit(
    name: str, measurements: Mapping[str, float] | None = None, /, **metadata: Any
) -> Event:
    """Emit on the default bus (see :meth:`EventBus.emit`)."""
    return default_bus.emit(name, measurements, **metadata)


def span(
    name: str, /, *, underscore: bool = False, **metadata: Any
) -> AbstractContextManager[SpanContext]:
    """A span on the default bus (see :meth:`EventBus.span`)."""
    return default_bus.span(name, underscore=underscore, **metadata)
