"""What a pass saw, turned into the :class:`~bstore.gitops.status.Status` it reports.

Pure: :func:`compose_status` takes the active generation, what the activator observes,
the pass's failures (bad specs, failed builds, failed or unhealthy activations), the
quarantine and the manual operations, and the previous status (so ``since`` only moves
when an app's version or state changes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bstore.activators.base import HealthResult
from bstore.activators.plan import ActionKind, RunningState
from bstore.activators.plan import AppStatus as Observed
from bstore.generations.manifest import AppEntry, GenerationManifest
from bstore.gitops.status import AppState, AppStatus, State, Status, now_iso
from bstore.store.paths import StorePath

_OBSERVED = {Observed.RUNNING: AppState.RUNNING, Observed.STARTING: AppState.STARTING,
             Observed.STOPPED: AppState.STOPPED, Observed.FAILED: AppState.FAILED}


@dataclass(frozen=True)
class PassView:
    """Everything one pass (or manual operation) knows at its end."""

    profile: str
    active: GenerationManifest | None
    running: Mapping[str, RunningState]
    tip: str | None
    applied: str | None
    generation: int | None
    failed: Mapping[str, str] = field(default_factory=dict)
    quarantine: Mapping[str, Any] | None = None
    health: Mapping[str, HealthResult] = field(default_factory=dict)
    activation_failed: Mapping[str, str] = field(default_factory=dict)
    #: Apps the attempt did not touch because a dependency failed (a subset of
    #: ``activation_failed``): after a rollback they still run, unharmed.
    activation_blocked: frozenset[str] = frozenset()
    manual: Mapping[str, Any] = field(default_factory=dict)
    reverted: Mapping[str, Any] = field(default_factory=dict)


def blocked_apps(activation: Any) -> frozenset[str]:
    """Apps an activation result lists as blocked (not attempted: a dependency failed)."""
    if activation is None:
        return frozenset()
    return frozenset(a.app for a in activation.actions if a.kind is ActionKind.BLOCKED)


def observed(state: RunningState | None) -> tuple[AppState, bool | None, str | None]:
    """An activator's view of one app as (status, healthy, reason)."""
    if state is None:
        return AppState.PENDING, None, None
    return _OBSERVED[state.status], state.healthy, state.reason


def _note(name: str, view: PassView) -> str | None:
    if name in view.manual:
        op = view.manual[name]
        return (f"manual {op.get('op', 'change')} at {op.get('at')}; the next reconcile"
                " reverts it to the repository")
    if name in view.reverted:
        return f"manual {view.reverted[name].get('op', 'change')} reverted by reconcile"
    return None


def compose_status(view: PassView, previous: Status, *,
                   full_path: Callable[[StorePath], str],
                   node_of: Callable[[AppEntry], str | None]) -> Status:
    """The status after a pass (see the module docstring)."""
    now = now_iso()
    apps: dict[str, AppStatus] = {}
    entries = view.active.apps if view.active is not None else {}
    for name, entry in entries.items():
        state, healthy, observed_reason = observed(view.running.get(name))
        check = view.health.get(name)
        healthy = check.healthy if check is not None else healthy
        fine = state is AppState.RUNNING and healthy is not False
        note = _note(name, view)
        # What the activator says of a running, healthy app ("node up") is information,
        # not an error; an app merely blocked by a failed dependency still runs its
        # previous version after the rollback.
        reason = view.activation_failed.get(name) or view.failed.get(name)
        if reason is not None and fine and name in view.activation_blocked:
            note, reason = note or f"not changed: {reason}", None
        if reason is None and not fine:
            reason = observed_reason
        elif reason is None and observed_reason and note is None:
            note = observed_reason
        line = AppStatus(
            name, entry.version, state, store_path=full_path(entry.output),
            isolation=entry.isolation.value, node=node_of(entry),
            healthy=healthy, health=check.detail if check is not None else None,
            since=now, last_error=reason, note=note)
        old = previous.apps.get(name)
        if old is not None and (old.version, old.status) == (line.version, line.status):
            line = replace(line, since=old.since)
        apps[name] = line
    for name, why in view.failed.items():
        if name not in apps:
            apps[name] = AppStatus(name, None, AppState.FAILED, since=now, last_error=why)
    notes = [f"manual {v.get('op', 'change')} of {k} reverted to the repository"
             for k, v in sorted(view.reverted.items())]
    notes += [f"{k}: manual {v.get('op')} outside git; the next reconcile reverts it"
              for k, v in sorted(view.manual.items())]
    error = None
    if view.quarantine:
        error = (f"commit {str(view.quarantine.get('commit'))[:12]} quarantined:"
                 f" {view.quarantine.get('reason')}")
    elif view.failed:
        error = "; ".join(f"{k}: {v}" for k, v in sorted(view.failed.items()))
    bad = any(a.status is not AppState.RUNNING or a.healthy is False for a in apps.values())
    overall = State.DEGRADED if (view.quarantine or view.failed or bad) else State.SYNCED
    return Status(state=overall, profile=view.profile, last_commit=view.applied,
                  tip_commit=view.tip, generation=view.generation, last_reconcile=now,
                  last_success=now if overall is State.SYNCED else previous.last_success,
                  error=error, quarantine=view.quarantine, apps=apps, notes=tuple(notes))
