"""What the daemon does through the activator besides passes: the supervision round
(a dead host node or VM brought back, periodic health checks as events). A manual
rollback is :meth:`bstore.gitops.reconciler.Reconciler.rollback` (it keeps the status
right), called by the daemon directly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bstore.events import EventBus

#: One supervision round; returns a line per thing it did.
Supervise = Callable[[], Sequence[str]]


def default_supervise(reconciler: object, bus: EventBus) -> Supervise | None:
    """The activator's supervision round (dead host node, dead VMs) and its periodic
    health checks (each app at its spec's interval; results become events), if any."""
    activator = getattr(reconciler, "activator", None)
    once = getattr(activator, "supervise_once", None)
    if not callable(once):
        supervisor = getattr(activator, "supervisor", None)
        once = (lambda: supervisor().poll()) if callable(supervisor) else None
    health_round = getattr(activator, "health_round", None)
    if once is None and not callable(health_round):
        return None
    from bstore.activators.health import HealthSchedule

    schedule = HealthSchedule()

    def supervise() -> list[str]:
        lines: list[str] = list(once()) if once is not None else []
        if callable(health_round):
            for result in health_round(schedule):
                bus.emit("bstore.health.check", app=result.app, periodic=True,
                         result="healthy" if result.healthy else "unhealthy",
                         detail=result.detail)
                if not result.healthy:
                    lines.append(f"{result.app}: unhealthy: {result.detail}")
        return lines

    return supervise

