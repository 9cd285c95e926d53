"""The ``dry-run`` activator: shows and records a plan, runs nothing.

It is what ``--dry-run`` and tests use, and the default until a real activator is
configured: :meth:`DryRunActivator.apply` prints each action through the context's
``echo``, records it in :attr:`DryRunActivator.applied`, and updates a simulated running
state (so a second plan against it shows drift healing). Options:

``fail``  comma-separated app names whose actions fail (to exercise blocking and
          rollback paths); the apps that depend on them come back blocked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bstore.activators.base import (
    ActionOutcome,
    Activator,
    ActivatorContext,
    ApplyResult,
    HealthResult,
    blocked_outcome,
)
from bstore.activators.plan import (
    Action,
    ActionKind,
    AppStatus,
    RunningState,
    mark_blocked,
    plan,
)
from bstore.generations.manifest import GenerationManifest


class DryRunActivator(Activator):
    """Records actions instead of running them (see the module docstring)."""

    name = "dry-run"

    def __init__(self, context: ActivatorContext,
                 initial_state: Mapping[str, RunningState] | None = None) -> None:
        super().__init__(context)
        self.applied: list[Action] = []
        self._state: dict[str, RunningState] | None = (
            None if initial_state is None else dict(initial_state))
        self._fail = {a for a in context.options.get("fail", "").split(",") if a}

    def plan(self, old: GenerationManifest | None, new: GenerationManifest) -> list[Action]:
        """Plan against the simulated state once there is one, else old → new only."""
        return plan(old, new, self._state)

    def apply(self, actions: Sequence[Action]) -> ApplyResult:
        """Record (and echo) each action; fail the apps named in the ``fail`` option."""
        state = self._state if self._state is not None else {}
        failed: dict[str, str] = {}
        outcomes: list[ActionOutcome] = []
        todo = list(actions)
        while todo:
            action = todo.pop(0)
            if action.kind is ActionKind.BLOCKED:
                outcomes.append(blocked_outcome(action))
                continue
            if action.app in self._fail:
                failed[action.app] = "failed (dry-run option fail)"
                outcomes.append(ActionOutcome(action, False, failed[action.app]))
                state[action.app] = RunningState(action.app, AppStatus.FAILED, action.version,
                                                 reason=failed[action.app])
                todo = mark_blocked(todo, failed)
                continue
            self.applied.append(action)
            if self.context.echo is not None and action.kind is not ActionKind.KEEP:
                self.context.echo(f"dry-run: {action.kind.value} {action.app}")
            if action.kind is ActionKind.STOP:
                state.pop(action.app, None)
            else:
                state[action.app] = RunningState(action.app, AppStatus.RUNNING, action.version,
                                                 healthy=True)
            outcomes.append(ActionOutcome(action, True))
        self._state = state
        return ApplyResult(tuple(outcomes))

    def current_state(self) -> Mapping[str, RunningState]:
        """The simulated state (empty before anything was applied)."""
        return dict(self._state or {})

    def health(self, app: str) -> HealthResult:
        """Healthy exactly when the simulated state has the app running."""
        state = (self._state or {}).get(app)
        ok = state is not None and state.status is AppStatus.RUNNING
        return HealthResult(app, ok, "running (simulated)" if ok else "not running")
