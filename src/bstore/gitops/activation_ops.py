"""What the daemon does through the activator besides passes: the supervision round
(a dead host node or VM brought back, periodic health checks as events) and a manual
rollback through the activation pipeline (switch, activate, health-check, or back)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bstore.events import EventBus
from bstore.gitops.config import Config

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


def rollback_with_pipeline(reconciler: object, config: Config, root: Path, bus: EventBus,
                           to: int | None) -> Any:
    """Roll back with the activation pipeline, under the reconciler's lock: switch to
    ``to`` (default: the generation before the current), activate, health-check; a
    failure switches back (the result says so)."""
    from bstore.activation import Pipeline
    from bstore.generations.profiles import ProfileError
    from bstore.store.local import LocalStore

    locked = getattr(reconciler, "locked", None)
    with locked(wait=False) if callable(locked) else nullcontext(), \
            LocalStore.open(root, create=False) as store:
        pipeline = Pipeline(store, config.profile,
                            getattr(reconciler, "activator", None), events=bus,
                            health_timeout=config.health.timeout)
        pipeline.recover()
        profile = pipeline.profile
        if to is None:
            current = profile.current_number()
            to = None if current is None else profile.previous_number(current)
            if to is None:
                raise ProfileError(
                    f"profile {profile.name!r} has no generation before"
                    f" {current if current is not None else 'none'} to roll back to",
                    hint="GET /generations lists them")
        else:
            profile.get(to)  # a missing number is a ProfileError naming it
        with bus.span("bstore.rollback", to_generation=to,
                      from_generation=profile.current_number()) as span:
            result = pipeline.activate_generation(to)
            span.set(result="ok" if result.ok else "failed")
        return result
