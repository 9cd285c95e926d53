"""Health checks of running apps: one probe, waiting until healthy, and periodic checks.

A :class:`~bstore.specs.model.HealthSpec` says how an app is checked:

======  =======================================================================
http    ``GET http://127.0.0.1:<port><path>``; any 2xx status is healthy
tcp     a TCP connect to ``127.0.0.1:<port>`` succeeds
custom  ``Module:check()`` inside the app's node returns ``ok`` or ``healthy``
        (the agent's ``health_check`` op, which only calls a module of that
        running application)
none    no spec: healthy exactly when the application is running
======  =======================================================================

Each probe is bounded by the spec's ``timeout`` (ms). After an activation, bstore
probes until the app is healthy or a deadline passes (:func:`wait_until_healthy`),
then every ``interval`` (:class:`HealthSchedule`, driven by whoever is long-lived).
Probes only ever talk to 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx

from bstore.activators.agent_client import AgentClient, AgentError, AgentOpError
from bstore.activators.base import HealthResult
from bstore.activators.etf import format_term
from bstore.generations.manifest import AppEntry
from bstore.specs.model import HealthSpec, HealthType
from bstore.specs.terms.model import Atom

#: Probes never leave the machine.
LOOPBACK = "127.0.0.1"
#: Pause between probes while waiting for an app to become healthy.
RETRY_PAUSE = 0.1
#: Seconds to wait for an app without a health spec to be running after an action.
DEFAULT_HEALTH_WAIT = 5.0
#: A healthy probe is confirmed this many seconds later (catches fast crash loops).
DEFAULT_SETTLE = 0.3
_HEALTHY_ANSWERS = (Atom("ok"), Atom("healthy"))

#: A probe: one check of one app, returning its result.
Probe = Callable[[], HealthResult]


def check_http(app: str, port: int, path: str, timeout: float) -> HealthResult:
    """``GET http://127.0.0.1:<port><path>``: healthy on a 2xx status."""
    url = f"http://{LOOPBACK}:{port}{path}"
    try:
        # trust_env=False: a proxy from the environment must never see a health probe.
        with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False) as http:
            response = http.get(url)
    except httpx.HTTPError as exc:
        return HealthResult(app, False, f"GET {url}: {type(exc).__name__}: {exc}")
    ok = 200 <= response.status_code < 300
    return HealthResult(app, ok, f"GET {url}: HTTP {response.status_code}")


def check_tcp(app: str, port: int, timeout: float) -> HealthResult:
    """A TCP connect to ``127.0.0.1:<port>``: healthy when it is accepted."""
    where = f"{LOOPBACK}:{port}"
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            pass
    except OSError as exc:
        return HealthResult(app, False, f"connect {where}: {exc.strerror or exc}")
    return HealthResult(app, True, f"connect {where}: accepted")


def check_custom(app: str, module: str, client: AgentClient, timeout: float) -> HealthResult:
    """``Module:check()`` in the app's node through its agent: healthy on ``ok``/``healthy``."""
    timeout_ms = max(1, int(timeout * 1000))
    try:
        client.call("intern", [app.encode(), module.encode()])
        result = client.call("health_check", Atom(app), Atom(module), timeout_ms,
                             timeout=timeout + 5.0)
    except AgentError as exc:
        return HealthResult(app, False, f"{module}:check(): {exc.message}")
    if result in _HEALTHY_ANSWERS:
        return HealthResult(app, True, f"{module}:check() returned {format_term(result)}")
    if result == Atom("timeout"):
        return HealthResult(app, False, f"{module}:check() did not return within {timeout} s")
    return HealthResult(app, False, f"{module}:check() returned {format_term(result, limit=300)}")


def check_running(app: str, client: AgentClient) -> HealthResult:
    """No health spec: healthy exactly when the application runs in the node."""
    try:
        try:
            version = client.app_running(app)
        except AgentOpError as exc:
            if not exc.unsupported:
                raise
            # An agent without app_running (a node started before it existed).
            version = {a.name: a.version for a in client.which_applications()}.get(app)
    except AgentError as exc:
        return HealthResult(app, False, f"node unreachable: {exc.message}")
    if version is not None:
        return HealthResult(app, True, f"application running (version {version})")
    return HealthResult(app, False, "application is not running")


def probe(app: str, spec: HealthSpec | None, client: AgentClient | None) -> HealthResult:
    """One check of ``app`` as ``spec`` says (``client`` reaches the app's node; needed
    for custom checks and for apps without a spec)."""
    if spec is None or spec.type is HealthType.CUSTOM:
        if client is None:
            return HealthResult(app, False, "node not running")
        if spec is None:
            return check_running(app, client)
        assert spec.module is not None  # HealthSpec checks it for custom checks
        return check_custom(app, spec.module, client, spec.timeout / 1000)
    assert spec.port is not None  # HealthSpec checks it for http and tcp checks
    if spec.type is HealthType.HTTP:
        return check_http(app, spec.port, spec.path or "/", spec.timeout / 1000)
    return check_tcp(app, spec.port, spec.timeout / 1000)


def wait_until_healthy(check: Probe, deadline: float, *,
                       settle: float = 0.0,
                       pause: float = RETRY_PAUSE,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> HealthResult:
    """Probe until healthy or ``deadline`` seconds have passed; the last result.

    With ``settle`` > 0 a healthy probe counts only if another one ``settle`` seconds
    later is healthy too: an app in a fast crash loop looks healthy between crashes.
    The detail of an unhealthy result says how long was waited.
    """
    end = clock() + deadline
    while True:
        result = check()
        if result.healthy and settle > 0:
            sleep(settle)
            result = check()
        if result.healthy:
            return result
        if clock() >= end:
            return HealthResult(result.app, False,
                                f"not healthy within {deadline:g} s: {result.detail}")
        sleep(max(0.0, min(pause, end - clock())))


@dataclass
class HealthSchedule:
    """Periodic checks of many apps, each every its own interval (poll-driven: the
    long-lived process calls :meth:`due` and :meth:`record`)."""

    intervals: dict[str, float] = field(default_factory=dict)
    last: dict[str, HealthResult] = field(default_factory=dict)
    _next: dict[str, float] = field(default_factory=dict)

    def watch(self, app: str, spec: HealthSpec | None, now: float,
              default_interval: float = 30.0) -> None:
        """Check ``app`` every ``spec.interval`` (or ``default_interval`` s), first at ``now``."""
        self.intervals[app] = default_interval if spec is None else spec.interval / 1000
        self._next[app] = now

    def forget(self, app: str) -> None:
        """Stop checking ``app``."""
        for table in (self.intervals, self.last, self._next):
            table.pop(app, None)

    def due(self, now: float) -> list[str]:
        """Apps whose next check time has come."""
        return sorted(a for a, t in self._next.items() if t <= now)

    def record(self, result: HealthResult, now: float) -> None:
        """Remember ``result`` and schedule the app's next check."""
        self.last[result.app] = result
        if result.app in self.intervals:
            self._next[result.app] = now + self.intervals[result.app]

    def unhealthy(self) -> Mapping[str, HealthResult]:
        """The apps whose last check failed."""
        return {a: r for a, r in self.last.items() if not r.healthy}


def settle_seconds(options: Mapping[str, str]) -> float:
    """The ``health_settle`` option of an activator (default :data:`DEFAULT_SETTLE`)."""
    return float(options.get("health_settle", DEFAULT_SETTLE))


def health_deadline(options: Mapping[str, str], entry: AppEntry) -> float:
    """How long to wait for ``entry`` to become healthy after an action: the
    ``health_timeout`` option, else its health spec's timeout, else
    :data:`DEFAULT_HEALTH_WAIT`."""
    option = options.get("health_timeout")
    if option is not None:
        return float(option)
    return DEFAULT_HEALTH_WAIT if entry.health is None else entry.health.timeout / 1000
