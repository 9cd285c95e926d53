"""The daemon's Prometheus metrics, fed by the event bus and the reconciler's status.

Counters and the duration histogram follow events as they are emitted (attach
:class:`Metrics` to a bus with ``bus.attach("bstore", metrics)``); the apps-by-status
gauge is recomputed from the status at each scrape (:meth:`Metrics.observe_apps`), so it
can never drift from what ``GET /status`` says. Every daemon has its own
:class:`~prometheus_client.CollectorRegistry` (never the process-global one), so two
daemons in one test process do not share counters.

=================================================  =========  ===========================
metric                                             type       from
=================================================  =========  ===========================
``bstore_reconcile_duration_seconds``              histogram  ``bstore.reconcile.stop|error``
``bstore_reconciles_total{result}``                counter    same (``error`` for .error)
``bstore_last_successful_reconcile_timestamp_seconds``  gauge  ``reconcile.stop``, result ok
``bstore_apps{status}``                            gauge      the status, at scrape time
``bstore_builds_total{result}``                    counter    ``bstore.build.stop`` (each)
``bstore_health_checks_total{result}``             counter    ``bstore.health.check``
``bstore_events_total``                            counter    every event
=================================================  =========  ===========================
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bstore.events import Event

#: The per-app states the status reports (issue 6); each always has a sample, 0 or more,
#: so a dashboard sees "failed 0" rather than a missing series.
APP_STATUSES: tuple[str, ...] = ("pending", "starting", "running", "stopped", "failed",
                                 "upgrading")
#: Results of a pass that count as success for the "last successful reconcile" gauge.
_OK_RESULTS = frozenset({"ok", "synced", "ready", "unchanged", "success", "noop"})
#: Reconcile passes range from milliseconds (nothing changed) to minutes (a cold build).
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                     300.0, 600.0, float("inf"))

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _label(value: Any, default: str) -> str:
    """A label value from event metadata: short, printable, never empty."""
    text = str(value) if value is not None else default
    text = "".join(ch for ch in text if ch.isprintable())[:64]
    return text or default


class Metrics:
    """The metrics of one daemon; call it with each event (it is a bus handler)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self.reconcile_duration = Histogram(
            "bstore_reconcile_duration_seconds", "Duration of reconcile passes.",
            registry=self.registry, buckets=_DURATION_BUCKETS)
        self.reconciles = Counter(
            "bstore_reconciles", "Reconcile passes by result.", ["result"],
            registry=self.registry)
        self.last_success = Gauge(
            "bstore_last_successful_reconcile_timestamp_seconds",
            "Unix time at which the last successful reconcile pass ended (0: never).",
            registry=self.registry)
        self.apps = Gauge("bstore_apps", "Apps by status.", ["status"], registry=self.registry)
        self.builds = Counter("bstore_builds", "Builds by result.", ["result"],
                              registry=self.registry)
        self.health_checks = Counter("bstore_health_checks", "Health checks by result.",
                                     ["result"], registry=self.registry)
        self.events = Counter("bstore_events", "Events emitted.", registry=self.registry)
        for status in APP_STATUSES:
            self.apps.labels(status=status).set(0)

    def __call__(self, event: Event) -> None:
        """Account for one event."""
        self.events.inc()
        name = event.name
        if name in ("bstore.reconcile.stop", "bstore.reconcile.error"):
            duration_ms = event.measurements.get("duration")
            if duration_ms is not None:
                self.reconcile_duration.observe(max(0.0, float(duration_ms)) / 1000.0)
            if name.endswith(".error"):
                result = "error"
            else:
                meta = event.metadata
                result = _label(meta.get("result", meta.get("status")), "ok")
            self.reconciles.labels(result=result).inc()
            if result in _OK_RESULTS:
                self.last_success.set(event.time)
        elif name == "bstore.build.stop":
            # One event per derivation built (``derivation``/``app``); the pass's
            # aggregate ``bstore.build`` span (``apps``: how many) is not a build.
            if "derivation" in event.metadata or "app" in event.metadata:
                self.builds.labels(result=_label(event.metadata.get("result"), "ok")).inc()
        elif name == "bstore.health.check":
            self.health_checks.labels(
                result=_label(event.metadata.get("result"), "unknown")).inc()

    def observe_apps(self, statuses: Iterable[str]) -> None:
        """Set the apps-by-status gauge from the per-app statuses of the current status."""
        tally = _Tally(_label(s, "unknown") for s in statuses)
        with self._lock:
            for status in set(APP_STATUSES) | set(tally):
                self.apps.labels(status=status).set(tally.get(status, 0))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def app_statuses(apps: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ``status`` of each per-app record (``unknown`` when a record has none)."""
    return [str(app.get("status") or "unknown") for app in apps]
