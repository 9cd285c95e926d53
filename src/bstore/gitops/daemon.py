"""The GitOps daemon: the timed reconcile loop, VM supervision and the HTTP API.

:class:`Daemon` runs three background threads around one reconciler:

* the **loop**: a pass at start, then every ``reconcile_interval``; a webhook
  (:meth:`Daemon.request_pass`) wakes it for an immediate pass — a push arriving while a
  pass runs is not lost, it makes the loop run once more right after;
* the **supervisor**: every ``supervise_interval`` seconds, the activator's supervision
  round (a dead host node rebooted in the active generation, dead VMs restarted with
  backoff); a round is skipped while a pass runs, so the two never act on a VM at once;
* the **HTTP API** (:mod:`bstore.gitops.http_api`).

Passes never overlap: the timed loop, ``POST /reconcile`` and ``POST /rollback`` all take
one pass lock. The loop waits for it; an API request finding a pass running does not
wait (a pass can take minutes of building) but answers **409** with the running pass's
trigger and start time, and the client retries (``Retry-After`` is sent). The reconciler
itself also serialises passes across processes (a ``bstore reconcile`` next to the daemon).

**Suspend/resume** stops timed and webhook passes (manual ``POST /reconcile`` still
runs); it is persisted in ``<gitops dir>/daemon.json`` (``<root>/gitops/<profile>``
unless ``local_path`` says otherwise) so a restart stays suspended, and ``GET /status``
says ``"loop": "suspended"``. A manual ``POST /rollback`` suspends the loop too
(otherwise the next pass would re-apply the commit just rolled back); ``POST /resume``
hands control back to git.

**Stopping** (:meth:`Daemon.stop`, SIGTERM, SIGINT) ends the threads after the pass in
progress, if any, and leaves the apps running: the host node and VMs outlive the daemon
(``bstore node stop`` stops them). A second signal exits at once.

Events go to ``<root>/logs/events.jsonl`` (one JSON line each, rotated to ``.1`` past
:data:`EVENT_LOG_MAX_BYTES`), to an in-memory ring for ``GET /events`` and to the metrics.
One daemon per root and profile: ``<root>/locks/daemon-<profile>.lock`` is held (flock,
released by the kernel if the daemon dies) and names the holder's pid.

The API token is the configured one (``api_token``/``api_token_env``); when none is
configured a random one is created once in ``<gitops dir>/api-token`` (0600),
so POSTs are never open and a local operator can still read it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from bstore.errors import BstoreError
from bstore.events import EventBus, EventRing, Handle, JsonLinesSink, default_bus
from bstore.gitops.activation_ops import Supervise, default_supervise
from bstore.gitops.config import Config
from bstore.gitops.http_api import ApiServer, Conflict
from bstore.gitops.metrics import Metrics, app_statuses
from bstore.gitops.pidlock import LockHeld, PidLock
from bstore.gitops.views import app_records, generation_rows, iso, to_jsonable
from bstore.store.atomic import fsync_path

_log = logging.getLogger("bstore.gitops.daemon")

#: The event log is rotated past this size (one ``.1`` kept): months of events, bounded.
EVENT_LOG_MAX_BYTES = 16 << 20
#: How often the supervision round runs by default (a dead VM is noticed within this).
SUPERVISE_INTERVAL = 1.0
#: While waiting for the pass lock the loop re-checks for a stop request this often.
_LOCK_POLL = 0.2


class DaemonError(BstoreError):
    """The daemon cannot start or do what was asked."""


class DaemonRunning(DaemonError):
    """Another daemon already runs for this root and profile."""


class ReconcileBusy(Conflict):
    """A pass is running; the request was not queued (retry)."""

    retry_after = 5


class Suspended(Conflict):
    """The loop is suspended; webhooks do not start passes."""


class ReconcilerLike(Protocol):
    """What the daemon needs of a reconciler (:class:`bstore.gitops.reconciler.Reconciler`)."""

    def reconcile_once(self, *, wait: bool = True, trigger: str = "manual") -> Any:
        """Run one pass; return its result (with ``ok`` and ``error`` if it has them).

        ``wait=False``: raise the reconciler's busy error instead of waiting for a pass
        another process runs."""

    def status(self) -> Any:
        """The current status (a value with ``to_dict()``, a dataclass or a dict)."""

    def rollback(self, to: int | None = None, *, wait: bool = True) -> Any:
        """Switch back to generation ``to`` (None: the previous) and activate it, under
        the reconcile lock, leaving the status right; the result has ``ok``. Raises a
        ``ProfileError`` for a missing generation, the busy error with ``wait=False``."""


#: Rolls the profile back to a generation (``None``: the previous) and activates it.
RollbackFn = Callable[[int | None], Any]


def write_json_atomic(path: Path, data: Mapping[str, Any], mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DaemonError(f"cannot write {str(path)!r}: {exc.strerror}") from exc



@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One pass the daemon ran: why, when, how long, and how it ended."""

    number: int
    trigger: str
    started: float
    duration: float
    ok: bool
    error: str | None = None
    result: Any = None

    def __post_init__(self) -> None:
        if self.number < 1 or self.duration < 0:
            raise ValueError(f"invalid pass record {self.number}/{self.duration}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"number": self.number, "trigger": self.trigger, "started": iso(self.started),
                "duration_ms": round(self.duration * 1000, 1), "ok": self.ok,
                "error": self.error, "result": to_jsonable(self.result)}


def _is_busy(exc: BstoreError) -> bool:
    """Whether ``exc`` is the reconciler's "another pass holds the lock" error."""
    try:
        from bstore.gitops.reconciler import ReconcileBusy as ReconcilerBusy
    except ImportError:  # pragma: no cover - the reconciler ships with the daemon
        return False
    return isinstance(exc, ReconcilerBusy)


class Daemon:
    """The long-running reconciler (see the module docstring).

    ``reconciler`` defaults to a :class:`bstore.gitops.reconciler.Reconciler` for
    ``config`` and ``root``; ``supervise`` to its activator's supervision round;
    ``rollback`` to the reconciler's ``rollback``. ``api=False`` runs without the HTTP API;
    ``api_address`` overrides the configured one (port 0: a free port, see :attr:`api_url`).
    """

    def __init__(
        self, config: Config, root: Path, *, reconciler: ReconcilerLike | None = None,
        events: EventBus | None = None, supervise: Supervise | None = None,
        supervise_interval: float = SUPERVISE_INTERVAL, rollback: RollbackFn | None = None,
        api: bool = True, api_address: tuple[str, int] | None = None,
        token: str | None = None, webhook_secret: str | None = None,
        log: Callable[[str], None] | None = None,
        event_log_max_bytes: int = EVENT_LOG_MAX_BYTES, ring_capacity: int = 2000,
    ) -> None:
        self.config = config
        self.root = Path(root)
        self.bus = events if events is not None else default_bus
        self.state_dir = config.gitops_dir(self.root)
        self.state_file = self.state_dir / "daemon.json"
        self.event_log = self.root / "logs" / "events.jsonl"
        self.ring = EventRing(ring_capacity)
        self.metrics = Metrics()
        self._reconciler = reconciler
        self._supervise = supervise
        self._supervise_interval = supervise_interval
        self._rollback = rollback
        self._api_enabled = api
        self._api_address = api_address or (config.api_host, config.api_port)
        self._token = token
        self._webhook_secret = webhook_secret
        self._say = log or (lambda line: _log.info("%s", line))
        self._event_log_max = event_log_max_bytes
        self._pid_lock = PidLock(self.root / "locks" / f"daemon-{config.profile}.lock",
                                 f"profile {config.profile!r} of {str(self.root)!r}")
        self._pass_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handles: list[Handle] = []
        self._sink: JsonLinesSink | None = None
        self._server: ApiServer | None = None
        self._started: float | None = None
        self._running: tuple[str, float] | None = None
        self._passes = 0
        self._last: PassRecord | None = None
        self._suspended: dict[str, Any] | None = None
        self._started_ok = False

    # -- parts -----------------------------------------------------------------------------

    @property
    def reconciler(self) -> ReconcilerLike:
        """The reconciler (created on first use)."""
        if self._reconciler is None:
            module = importlib.import_module("bstore.gitops.reconciler")
            self._reconciler = module.Reconciler(self.config, self.root, events=self.bus)
        return self._reconciler

    @property
    def api_url(self) -> str | None:
        """The API's base URL once started (``None`` without the API)."""
        return None if self._server is None else self._server.url

    @property
    def token(self) -> str:
        """The API token: given, configured, or created in ``<state>/api-token``."""
        if self._token is None:
            self._token = self.config.api_token_value() or self._stored_token()
        return self._token

    @property
    def token_file(self) -> Path:
        """Where a generated token is kept."""
        return self.state_dir / "api-token"

    def _stored_token(self) -> str:
        try:
            text = self.token_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise DaemonError(f"cannot read {str(self.token_file)!r}: {exc.strerror}") from exc
        if text:
            return text
        token = secrets.token_urlsafe(32)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.token_file, {}, 0o600)  # create 0600 first, then fill
        self.token_file.write_text(token + "\n", encoding="utf-8")
        return token

    # -- lifecycle --------------------------------------------------------------------------

    def _open(self) -> None:
        """Take the profile's daemon lock, attach the event sinks, make the reconciler."""
        try:
            self._pid_lock.acquire()
        except LockHeld as exc:
            raise DaemonRunning(exc.message, exc.hint) from exc
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._suspended = self._load_suspended()
            self._sink = JsonLinesSink(self.event_log, max_bytes=self._event_log_max)
            for pattern, handler in (("*", self.ring), ("*", self._sink),
                                     ("bstore", self.metrics)):
                self._handles.append(self.bus.attach(pattern, handler))
            reconciler = self.reconciler
            if self._supervise is None:
                self._supervise = default_supervise(reconciler, self.bus)
        except BaseException:
            self._teardown()
            raise

    def run_once(self) -> PassRecord:
        """One pass under the daemon lock, with the event log (``bstore daemon --once``)."""
        self._open()
        try:
            record = self._run_pass("once", wait=True)
            assert record is not None
            return record
        finally:
            self._teardown()

    def start(self) -> None:
        """Take the profile's daemon lock, attach the event sinks, start the threads."""
        self._open()
        try:
            if self._api_enabled:
                host, port = self._api_address
                self._server = ApiServer(self, host, port, token=self.token,
                                         webhook_secret=self._webhook_secret)
                self._server.start()
        except BaseException:
            self._teardown()
            raise
        self._started = time.time()
        self._started_ok = True
        self._spawn(self._loop, "bstore-reconcile-loop")
        if self._supervise is not None:
            self._spawn(self._supervise_loop, "bstore-supervise")
        self.bus.emit("bstore.daemon.start", profile=self.config.profile,
                      interval=self.config.reconcile_interval, api=self.api_url,
                      suspended=self.suspended)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop the threads (after the pass in progress) and the API; apps keep running."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self._started_ok:
            self.bus.emit("bstore.daemon.stop", profile=self.config.profile,
                          passes=self._passes)
            self._started_ok = False
        self._teardown()

    def _teardown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        for handle in self._handles:
            self.bus.detach(handle)
        self._handles.clear()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._pid_lock.release()

    def request_stop(self) -> None:
        """Ask :meth:`run_forever` to stop (signal-safe: only sets flags)."""
        self._stopping.set()
        self._wake.set()

    def run_forever(self, *, handle_signals: bool = True,
                    on_start: Callable[[], None] | None = None) -> int:
        """Start, run until SIGTERM/SIGINT (or :meth:`request_stop`), stop; returns 0.

        ``on_start`` runs once everything is up (the API bound: :attr:`api_url` is known).
        """
        self.start()
        if on_start is not None:
            on_start()
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: object) -> None:
            if self._stopping.is_set():  # a second signal: do not wait for the pass
                os._exit(128 + signum)
            self._say(f"{signal.Signals(signum).name}: stopping after the current pass;"
                      " apps keep running")
            self.request_stop()

        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[int(sig)] = signal.signal(sig, on_signal)
        try:
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()
            for number, handler in previous.items():
                signal.signal(number, handler)
        return 0

    # -- passes -----------------------------------------------------------------------------

    def _loop(self) -> None:
        interval = self.config.reconcile_interval
        next_at = time.monotonic()  # the first pass runs at once
        while not self._stopping.is_set():
            woken = self._wake.wait(max(0.0, next_at - time.monotonic()))
            if self._stopping.is_set():
                break
            self._wake.clear()
            trigger = "webhook" if woken else "timer"
            if not self.suspended:
                self._run_pass(trigger, wait=True, automatic=True)
            next_at = time.monotonic() + interval

    def _run_pass(self, trigger: str, *, wait: bool,
                  automatic: bool = False) -> PassRecord | None:
        if not self._pass_lock.acquire(blocking=False):
            if not wait:
                raise self._busy()
            while not self._pass_lock.acquire(timeout=_LOCK_POLL):
                if self._stopping.is_set():
                    return None
        try:
            # Suspension may have come while this pass waited for the lock (a rollback
            # suspends before it lets go of it): a timed pass must not undo it.
            if automatic and self.suspended:
                return None
            started, clock = time.time(), time.monotonic()
            with self._state_lock:
                self._running = (trigger, started)
            result: Any = None
            error: str | None = None
            try:
                result = self.reconciler.reconcile_once(wait=wait, trigger=trigger)
            except BstoreError as exc:
                if _is_busy(exc) and not wait:  # another process's pass (bstore reconcile)
                    raise ReconcileBusy(exc.message, exc.hint) from exc
                error = exc.message
            except Exception as exc:  # a bug in one pass must not end the loop
                _log.exception("reconcile pass (%s) failed", trigger)
                error = f"internal error: {type(exc).__name__}: {exc}"
            if error is None and getattr(result, "error", None):
                error = str(result.error)  # the pass ran but could not apply the tip
            ok = error is None and bool(getattr(result, "ok", True))
            with self._state_lock:
                self._passes += 1
                record = PassRecord(self._passes, trigger, started,
                                    time.monotonic() - clock, ok, error, result)
                self._last = record
                self._running = None
            if error is not None:
                self._say(f"reconcile pass ({trigger}) failed: {error}")
            elif not ok:
                state = to_jsonable(getattr(result, "state", None))
                self._say(f"reconcile pass ({trigger}) ended {state or 'not ok'}")
            return record
        finally:
            self._pass_lock.release()

    def _busy(self) -> ReconcileBusy:
        with self._state_lock:
            running = self._running
        what = (f"a {running[0]} pass started at {iso(running[1])}" if running
                else "another operation")
        return ReconcileBusy(f"a reconcile pass is already running ({what})",
                             hint="retry when it finishes (GET /status shows it)")

    def reconcile(self, trigger: str = "manual") -> dict[str, Any]:
        """Run one pass now in the calling thread; :class:`ReconcileBusy` if one runs."""
        record = self._run_pass(trigger, wait=False)
        assert record is not None
        return record.to_dict()

    def request_pass(self, reason: str = "webhook",
                     detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Wake the loop for an immediate pass (coalesced with one queued already)."""
        if self.suspended:
            raise Suspended("the reconcile loop is suspended; the push was not applied",
                            hint="POST /resume to follow git again")
        self.bus.emit("bstore.daemon.wake", reason=reason, **dict(detail or {}))
        with self._state_lock:
            running = self._running is not None
        self._wake.set()
        return {"accepted": True, "queued": True, "pass_running": running}

    def _supervise_loop(self) -> None:
        assert self._supervise is not None
        said: set[str] = set()
        while not self._stopping.wait(self._supervise_interval):
            # Never act on VMs while a pass is activating them; the next round catches up.
            if not self._pass_lock.acquire(blocking=False):
                continue
            try:
                lines = list(self._supervise())
                # A VM that keeps failing the same way says so once, not every round.
                for line in lines:
                    if line not in said:
                        self._say(f"supervisor: {line}")
                said = set(lines)
            except (BstoreError, OSError) as exc:
                self._say(f"supervisor: {exc}")
            except Exception:
                _log.exception("supervision round failed")
            finally:
                self._pass_lock.release()

    # -- suspend / resume -------------------------------------------------------------------

    def _load_suspended(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DaemonError(f"cannot read daemon state {str(self.state_file)!r}: {exc}",
                              hint="fix or delete the file (it only records suspension)"
                              ) from exc
        if not isinstance(data, dict) or not data.get("suspended"):
            return None
        return {"since": data.get("since"), "reason": data.get("reason")}

    @property
    def suspended(self) -> bool:
        """Whether timed and webhook passes are suspended."""
        return self._suspended is not None

    def suspend(self, reason: str | None = None) -> dict[str, Any]:
        """Suspend timed and webhook passes (persisted)."""
        with self._state_lock:
            if self._suspended is None:
                self._suspended = {"since": iso(time.time()), "reason": reason}
                write_json_atomic(self.state_file, {"suspended": True, **self._suspended})
                changed = True
            else:
                changed = False
        if changed:
            self.bus.emit("bstore.daemon.suspend", profile=self.config.profile, reason=reason)
            self._say(f"reconcile loop suspended{f': {reason}' if reason else ''}")
        return {"suspended": True, "changed": changed, **(self._suspended or {})}

    def resume(self) -> dict[str, Any]:
        """Resume timed passes; the next one runs at once."""
        with self._state_lock:
            changed = self._suspended is not None
            self._suspended = None
            if changed:
                write_json_atomic(self.state_file, {"suspended": False})
        if changed:
            self.bus.emit("bstore.daemon.resume", profile=self.config.profile)
            self._say("reconcile loop resumed")
            self._wake.set()
        return {"suspended": False, "changed": changed}

    # -- rollback ---------------------------------------------------------------------------

    def rollback(self, to: int | None = None) -> dict[str, Any]:
        """Roll back and activate (no pass runs meanwhile), then suspend the loop so the
        next pass does not re-apply the commit just left (``POST /resume`` to follow git)."""
        if not self._pass_lock.acquire(blocking=False):
            raise self._busy()
        try:
            reconciler = self.reconciler
            fn = self._rollback or (lambda n: reconciler.rollback(n, wait=False))
            try:
                result = fn(to)
            except BstoreError as exc:
                from bstore.generations.profiles import ProfileError

                if isinstance(exc, ProfileError):  # nothing to roll back to, no such N
                    raise Conflict(exc.message, exc.hint) from exc
                if _is_busy(exc):
                    raise ReconcileBusy(exc.message, exc.hint) from exc
                raise
            ok = bool(getattr(result, "ok", True))
            if ok:  # before the lock is let go: a waiting timed pass must see it
                target = "the previous generation" if to is None else f"generation {to}"
                self.suspend(f"rolled back to {target} through the API")
        finally:
            self._pass_lock.release()
        return {"ok": ok, "rollback": to_jsonable(result), "suspended": self.suspended}

    # -- reading ----------------------------------------------------------------------------

    def _reconciler_status(self) -> dict[str, Any]:
        data = to_jsonable(self.reconciler.status())
        return dict(data) if isinstance(data, dict) else {"status": data}

    def daemon_status(self) -> dict[str, Any]:
        """The daemon's own part of the status."""
        with self._state_lock:
            running, last, passes = self._running, self._last, self._passes
            suspended = dict(self._suspended) if self._suspended is not None else None
        return {
            "pid": os.getpid(), "started": iso(self._started), "profile": self.config.profile,
            "interval_seconds": self.config.reconcile_interval,
            "loop": "suspended" if suspended is not None else "running",
            "suspended": suspended, "passes": passes,
            "pass_running": None if running is None else {"trigger": running[0],
                                                          "started": iso(running[1])},
            "last_pass": None if last is None else last.to_dict(),
            "api": self.api_url, "event_log": str(self.event_log),
        }

    def status(self) -> dict[str, Any]:
        """The reconciler's status with ``daemon`` (loop state, passes) and ``suspended``."""
        doc = self._reconciler_status()
        doc["daemon"] = self.daemon_status()
        doc["suspended"] = self.suspended
        return doc

    def apps(self) -> list[dict[str, Any]]:
        """Per-app records of the status, each with ``name``."""
        return app_records(self._reconciler_status())

    def generations(self) -> list[dict[str, Any]]:
        """The profile's generations (number, date, current, store path, commit, apps)."""
        return generation_rows(self.root, self.config.profile)

    def recent_events(self, after: int = 0, prefix: str | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        """Events from the ring, oldest first (see :meth:`EventRing.recent`)."""
        return [e.to_dict() for e in self.ring.recent(after_seq=after, prefix=prefix,
                                                      limit=limit)]

    def metrics_text(self) -> bytes:
        """The Prometheus exposition, with the apps gauge refreshed from the status."""
        try:
            self.metrics.observe_apps(app_statuses(self.apps()))
        except BstoreError as exc:  # a status that cannot be read must not hide counters
            _log.warning("metrics: cannot read the status: %s", exc.message)
        return self.metrics.render()

    @property
    def branch(self) -> str:
        """The branch the configuration follows."""
        return self.config.branch
