"""The Activator interface: how bstore makes running BEAM VMs match a generation.

An activator is a small object built for one profile (:class:`ActivatorContext`)::

    plan(old, new)      -> list[Action]                 pure diff + what runs now
    apply(actions)      -> ApplyResult                  do them, in order
    current_state()     -> Mapping[str, RunningState]   what runs now
    health(app)         -> HealthResult                 one health check

Activators plug in through the ``bstore.activators`` entry-point group (name →
``module:factory``, the factory called with an :class:`ActivatorContext`); the ones that
ship with bstore are registered in ``pyproject.toml`` and also found by
:func:`load_activator` without installed metadata (a source checkout).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from bstore.activators.plan import Action, ActionKind, RunningState, plan, render_plan
from bstore.errors import BstoreError
from bstore.generations.generation import load_generation
from bstore.generations.manifest import GenerationManifest
from bstore.generations.profiles import GenerationLink
from bstore.generations.switch import ActivationHook
from bstore.store.local import LocalStore
from bstore.store.paths import StorePath

#: The entry-point group activators register under.
ENTRY_POINT_GROUP = "bstore.activators"

#: Activators shipped with bstore (the same as the pyproject entry points), used when the
#: package metadata is missing or stale.
BUILTIN_ACTIVATORS: dict[str, str] = {
    "dry-run": "bstore.activators.dryrun:DryRunActivator",
    "embedded": "bstore.activators.embedded:EmbeddedActivator",
    "vm": "bstore.activators.vm:VmActivator",
}


class ActivatorError(BstoreError):
    """An activator that cannot be found, loaded or used."""


@dataclass(frozen=True)
class ActivatorContext:
    """What an activator is built for: the state root, the profile, and its options
    (free-form strings from the command line or config; each activator documents its own).
    ``echo`` receives human progress lines (the CLI passes ``click.echo``)."""

    root: Path
    profile: str
    options: Mapping[str, str] = field(default_factory=dict)
    echo: Callable[[str], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class HealthResult:
    """One health check of one app: healthy or not, and what was seen."""

    app: str
    healthy: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"app": self.app, "healthy": self.healthy, "detail": self.detail}


@dataclass(frozen=True)
class ActionOutcome:
    """What happened to one action: done, failed (with why), or skipped (blocked)."""

    action: Action
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class ApplyResult:
    """The result of :meth:`Activator.apply`: an outcome per action, in order."""

    outcomes: tuple[ActionOutcome, ...]

    @property
    def ok(self) -> bool:
        """Whether every action was done (blocked ones count as not done)."""
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> dict[str, str]:
        """App → reason for every action that failed or was blocked."""
        return {o.action.app: o.detail for o in self.outcomes if not o.ok}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"ok": self.ok, "outcomes": [
            {"action": o.action.to_json(), "ok": o.ok, "detail": o.detail}
            for o in self.outcomes]}


class Activator(ABC):
    """Base class of activators (see the module docstring)."""

    #: The entry-point name it is registered under.
    name: str = ""

    def __init__(self, context: ActivatorContext) -> None:
        self.context = context

    def plan(self, old: GenerationManifest | None, new: GenerationManifest) -> list[Action]:
        """The actions from ``old`` to ``new``, healing drift seen in :meth:`current_state`."""
        return plan(old, new, self.current_state())

    @abstractmethod
    def apply(self, actions: Sequence[Action]) -> ApplyResult:
        """Carry out ``actions`` in order. An app whose dependency failed is not touched:
        its action comes back blocked (:func:`bstore.activators.plan.mark_blocked`)."""

    @abstractmethod
    def current_state(self) -> Mapping[str, RunningState]:
        """Every app this activator runs (or knows failed), by name."""

    @abstractmethod
    def health(self, app: str) -> HealthResult:
        """Check one app's health now."""


def _resolve(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ActivatorError(f"activator {target!r} cannot be imported: {exc}",
                             hint="check the plugin's installation") from exc
    return obj


def available_activators() -> dict[str, str]:
    """Name → ``module:attr`` of every activator found (entry points win over built-ins)."""
    found = dict(BUILTIN_ACTIVATORS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def load_activator(name: str, context: ActivatorContext) -> Activator:
    """Build the activator registered as ``name`` for ``context``."""
    known = available_activators()
    if name not in known:
        raise ActivatorError(f"no activator named {name!r}",
                             hint=f"known: {', '.join(sorted(known))}; plugins register in"
                             f" the {ENTRY_POINT_GROUP!r} entry-point group")
    factory = _resolve(known[name])
    if not callable(factory):
        raise ActivatorError(f"activator {name!r} ({known[name]}) is not callable")
    activator = factory(context)
    if not isinstance(activator, Activator):
        raise ActivatorError(f"activator {name!r} ({known[name]}) did not build an Activator",
                             hint="the factory must return a bstore.activators.base.Activator")
    return activator


def blocked_outcome(action: Action) -> ActionOutcome:
    """The outcome of an action that was not run because it is blocked."""
    return ActionOutcome(action, False, action.reasons[0] if action.reasons else "blocked")


__all__ = [
    "ENTRY_POINT_GROUP",
    "Action",
    "ActionKind",
    "ActionOutcome",
    "ActivationFailed",
    "Activator",
    "ActivatorContext",
    "ActivatorError",
    "ApplyResult",
    "HealthResult",
    "RunningState",
    "activation_hook",
    "available_activators",
    "blocked_outcome",
    "load_activator",
]


#: Manifests an activation hook keeps parsed (a rollback goes back to a recent one).
_MANIFEST_CACHE = 8


class ActivationFailed(BstoreError):
    """An activation whose actions did not all succeed (names each app and why)."""


def activation_hook(store: LocalStore, activator: Activator,
                    echo: Callable[[str], None] | None = None) -> ActivationHook:
    """A hook for :mod:`bstore.generations.switch`: plan old → new with ``activator``,
    show the plan through ``echo``, apply it; raise :class:`ActivationFailed` if any action
    failed or was blocked (the switch is then undone)."""

    # A generation's store path names its content: a manifest read once stays right.
    manifests: dict[StorePath, GenerationManifest] = {}

    def load(sp: StorePath) -> GenerationManifest:
        if sp not in manifests:
            if len(manifests) >= _MANIFEST_CACHE:
                manifests.pop(next(iter(manifests)))
            manifests[sp] = load_generation(store, sp)
        return manifests[sp]

    def hook(old: GenerationLink | None, new: GenerationLink) -> None:
        old_manifest = None if old is None else load(old.store_path)
        new_manifest = load(new.store_path)
        actions = activator.plan(old_manifest, new_manifest)
        if echo is not None:
            span = f"{old.number if old else 'none'} -> {new.number}"
            echo(render_plan(actions, f"activation plan ({activator.name}), generation {span}"))
        result = activator.apply(actions)
        if not result.ok:
            reasons = "; ".join(f"{app}: {why}" for app, why in result.failed.items())
            raise ActivationFailed(f"activation of generation {new.number} failed: {reasons}",
                                   hint="the profile was switched back; see the app logs")

    return hook
