"""The activation plan: what to do to each app to go from one generation to another.

Pure: :func:`plan` looks only at two manifests (and, optionally, what is running) and
returns a list of :class:`Action` that is shown before it runs. One action per app:

============  =====================================================================
kind          when
============  =====================================================================
start         the app is new, or (drift) it should run but does not
stop          the app is gone from the generation, or runs without belonging to it
restart       version, source, dependency closure, non-module files, isolation or
              vm_config changed; or (drift) it runs unhealthy or another version
reload        same version, only ``.beam`` contents changed: ``modules`` lists them
              (env changes ride along in ``env_set``/``env_unset``)
reconfigure   only env changed: set ``env_set``, unset ``env_unset``; no restart
keep          nothing that needs the VM changed (``reasons`` says what did, if any)
blocked       not done because an app it depends on failed (:func:`mark_blocked`)
============  =====================================================================

Order: every stop first, in reverse dependency order of the old generation; then all
other actions in dependency order of the new generation (an app after what it depends
on), so starts and restarts find their dependencies running.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from bstore.generations.manifest import (
    AppEntry,
    GenerationManifest,
    canonical_term,
    dependency_order,
    env_term,
)
from bstore.specs import termjson
from bstore.specs import terms as erl_terms
from bstore.specs.model import Isolation
from bstore.specs.terms.model import Atom, Term, exactly_equal


class ActionKind(StrEnum):
    """What an activator does to one app."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    RELOAD = "reload"
    RECONFIGURE = "reconfigure"
    KEEP = "keep"
    BLOCKED = "blocked"


class AppStatus(StrEnum):
    """What an activator observes about an app."""

    RUNNING = "running"
    STARTING = "starting"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RunningState:
    """An app as an activator sees it now (``Activator.current_state``).

    ``healthy`` is ``None`` when not checked; ``output`` is the store path base name the
    running code came from, when known; ``reason`` explains a failed/stopped status.
    """

    app: str
    status: AppStatus
    version: str | None = None
    healthy: bool | None = None
    output: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"app": self.app, "status": self.status.value, "version": self.version,
                "healthy": self.healthy, "output": self.output, "reason": self.reason}


#: The default ``env_set``; shared safely because every action stores a copy.
_NO_ENV: Mapping[Atom, Term] = {}
_ENV_KINDS = frozenset({ActionKind.RECONFIGURE, ActionKind.RELOAD})


@dataclass(frozen=True, init=False)
class Action:
    """One step of a plan. ``version``/``isolation`` describe the app after the action
    (before it, for ``stop``); ``old_version``/``old_isolation`` before it (``None`` for a
    new app). ``modules``: changed modules of a reload. ``env_set``: keys to set with
    their new values; ``env_unset``: keys to remove (reconfigure, reload)."""

    kind: ActionKind
    app: str
    version: str | None
    old_version: str | None = None
    isolation: Isolation = Isolation.EMBEDDED
    old_isolation: Isolation | None = None
    reasons: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    env_set: Mapping[Atom, Term] = field(default_factory=dict)
    env_unset: tuple[Atom, ...] = ()
    depends_on: tuple[str, ...] = ()

    # Written out (same fields, order and defaults as above; a test compares them)
    # because the generated __init__ of a frozen dataclass sets each field through
    # object.__setattr__, twice the cost of one dict update, and a plan builds one
    # Action per app on every switch.
    def __init__(self, kind: ActionKind, app: str, version: str | None,
                 old_version: str | None = None, isolation: Isolation = Isolation.EMBEDDED,
                 old_isolation: Isolation | None = None, reasons: tuple[str, ...] = (),
                 modules: tuple[str, ...] = (), env_set: Mapping[Atom, Term] = _NO_ENV,
                 env_unset: tuple[Atom, ...] = (), depends_on: tuple[str, ...] = ()) -> None:
        if not isinstance(kind, ActionKind):
            raise ValueError(f"action kind {kind!r} is not an ActionKind")
        if modules and kind is not ActionKind.RELOAD:
            raise ValueError(f"{kind.value} action for {app!r} lists modules")
        if (env_set or env_unset) and kind not in _ENV_KINDS:
            raise ValueError(f"{kind.value} action for {app!r} changes env")
        # Checked before any field is set: an invalid action never exists, even half-made.
        vars(self).update(kind=kind, app=app, version=version, old_version=old_version,
                          isolation=isolation, old_isolation=old_isolation, reasons=reasons,
                          modules=modules, env_set=dict(env_set), env_unset=env_unset,
                          depends_on=depends_on)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form; env values in the tagged form and as Erlang source."""
        env = env_term(self.env_set)
        return {
            "kind": self.kind.value,
            "app": self.app,
            "version": self.version,
            "old_version": self.old_version,
            "isolation": self.isolation.value,
            "old_isolation": None if self.old_isolation is None else self.old_isolation.value,
            "reasons": list(self.reasons),
            "modules": list(self.modules),
            "env_set": termjson.encode(env),
            "env_set_erlang": erl_terms.format(env),
            "env_unset": [k.name for k in self.env_unset],
            "depends_on": list(self.depends_on),
        }


def _env_diff(old: AppEntry, new: AppEntry) -> tuple[dict[Atom, Term], tuple[Atom, ...]]:
    changed = {k: v for k, v in new.env.items()
               if k not in old.env or not exactly_equal(old.env[k], v)}
    removed = tuple(sorted((k for k in old.env if k not in new.env), key=lambda a: a.name))
    return changed, removed


def _restart_reasons(old: AppEntry, new: AppEntry) -> list[str]:
    reasons = []
    if old.version != new.version:
        reasons.append(f"version {old.version} -> {new.version}")
    if not old.source.same_spec(new.source):
        # A hex source's ref follows the version: that is the upgrade, said once.
        moved_ref = replace(old.source, ref=new.source.ref)
        if old.version == new.version or not moved_ref.same_spec(new.source):
            reasons.append("source changed")
    # Equal tuples are equal sets: the sets are built only when the closures differ.
    if (old.closure != new.closure
            and set(old.closure) - {old.output} != set(new.closure) - {new.output}):
        reasons.append("dependency closure changed")
    if old.mcid != new.mcid:
        if old.resources != new.resources:
            reasons.append("files other than modules changed (.app, priv, ...)")
        if set(old.modules) != set(new.modules):
            reasons.append("modules added or removed")
    if old.isolation is not new.isolation:
        reasons.append(f"isolation {old.isolation.value} -> {new.isolation.value}")
    elif old.vm_config != new.vm_config:
        reasons.append("vm_config changed")
    return reasons


def _changed_modules(old: AppEntry, new: AppEntry) -> tuple[str, ...]:
    return tuple(sorted(m for m, h in new.modules.items() if old.modules.get(m) != h))


def _drift(state: RunningState | None, expected: AppEntry) -> tuple[ActionKind, str] | None:
    """What a running state that disagrees with ``expected`` (the app as the old
    generation has it) calls for, if anything."""
    if state is None or state.status in (AppStatus.STOPPED, AppStatus.FAILED):
        why = "not running" if state is None else state.status.value
        detail = f": {state.reason}" if state is not None and state.reason else ""
        return ActionKind.START, f"{why}{detail} (drift)"
    if state.version is not None and state.version != expected.version:
        return ActionKind.RESTART, (f"running version {state.version}, not"
                                    f" {expected.version} (drift)")
    if state.output is not None and state.output != str(expected.output):
        return ActionKind.RESTART, "running code from another build (drift)"
    if state.healthy is False:
        return ActionKind.RESTART, "running but unhealthy (drift)"
    return None


def _runs_new_build(state: RunningState | None, old: AppEntry | None, new: AppEntry) -> bool:
    """Whether the new build already runs (healthy or unchecked), e.g. because an
    interrupted activation got that far: re-running it must not restart the app again."""
    return (state is not None and state.status is AppStatus.RUNNING
            and state.healthy is not False and state.output == str(new.output)
            and (old is None or old.output != new.output))


def _action(kind: ActionKind, old: AppEntry | None, new: AppEntry, reasons: tuple[str, ...],
            modules: tuple[str, ...] = (), env_set: Mapping[Atom, Term] = _NO_ENV,
            env_unset: tuple[Atom, ...] = ()) -> Action:
    # Positional: the plan builds one action per app and keyword passing costs more.
    return Action(kind, new.name, new.version, None if old is None else old.version,
                  new.isolation, None if old is None else old.isolation, reasons, modules,
                  env_set, env_unset, new.depends_on)


def _same_env(old: Mapping[Atom, Term], new: Mapping[Atom, Term]) -> bool:
    """Whether :func:`_env_diff` would find nothing to set or unset.

    An app's env is stored in canonical key order, so equal envs pair up item by item
    without a lookup (hashing an :class:`Atom` runs Python code); envs that do not pair
    up are reported as different, which only sends them the long way.
    """
    if len(old) != len(new):
        return False
    for (old_key, old_value), (key, value) in zip(old.items(), new.items(), strict=True):
        if old_key.name != key.name or not exactly_equal(old_value, value):
            return False
    return True


def _unchanged_action(old: AppEntry, new: AppEntry, state: RunningState | None,
                      check_running: bool) -> Action | None:
    """The action for an app whose entry did not change, or ``None`` if it changed.

    Most apps of a switch are unchanged (a 50-app generation with one app bumped), and
    for them the full rules reduce to "keep, unless what runs drifted": the same build
    cannot already run as a *new* build, there is no restart reason, no changed module,
    no env change and no note. This answers that with one comparison and skips the diff
    work; ``test_unchanged_fast_path_matches_full_rules`` holds it to :func:`_full_action`.
    """
    # AppEntry equality covers every field the rules read (origin/commit are not compared
    # and the rules ignore them); env needs =:= on top, as == takes 1 for 1.0.
    if old != new or not _same_env(old.env, new.env):
        return None
    drift = _drift(state, old) if check_running else None
    if drift is None:
        return _action(ActionKind.KEEP, old, new, ())
    return _action(drift[0], old, new, (drift[1],))


def _full_action(old: AppEntry | None, new: AppEntry, state: RunningState | None,
                 check_running: bool) -> Action:
    """The action for one app by the rules of the module docstring (any change)."""
    already = check_running and _runs_new_build(state, old, new)
    if old is None:
        if already:
            return _action(ActionKind.KEEP, old, new, ("new app, already running",))
        return _action(ActionKind.START, old, new, ("new app",))
    env_set, env_unset = _env_diff(old, new)
    env_note = [f"env: set {', '.join(k.name for k in env_set)}"] if env_set else []
    env_note += [f"env: unset {', '.join(k.name for k in env_unset)}"] if env_unset else []
    if already:
        # Setting env is idempotent, so it is done again; the code is not touched.
        if env_set or env_unset:
            return _action(ActionKind.RECONFIGURE, old, new,
                           ("already running the new build", *env_note),
                           env_set=env_set, env_unset=env_unset)
        return _action(ActionKind.KEEP, old, new, ("already running the new build",))
    reasons = _restart_reasons(old, new)
    drift = _drift(state, old) if check_running else None
    if drift is not None and drift[0] is ActionKind.START:
        return _action(ActionKind.START, old, new, (drift[1], *reasons))
    if reasons or drift is not None:
        return _action(ActionKind.RESTART, old, new,
                       (*reasons, *([drift[1]] if drift else [])))
    modules = _changed_modules(old, new)
    if modules:
        return _action(ActionKind.RELOAD, old, new,
                       (f"{len(modules)} module(s) changed", *env_note),
                       modules=modules, env_set=env_set, env_unset=env_unset)
    if env_set or env_unset:
        return _action(ActionKind.RECONFIGURE, old, new, tuple(env_note),
                       env_set=env_set, env_unset=env_unset)
    notes = []
    if old.output != new.output:
        notes.append("rebuilt, byte-identical")
    if old.health != new.health:
        notes.append("health check changed")
    if old.depends_on != new.depends_on:
        notes.append("depends_on changed")
    return _action(ActionKind.KEEP, old, new, tuple(notes))


def _app_action(old: AppEntry | None, new: AppEntry, state: RunningState | None,
                check_running: bool) -> Action:
    if old is not None:
        unchanged = _unchanged_action(old, new, state, check_running)
        if unchanged is not None:
            return unchanged
    return _full_action(old, new, state, check_running)


#: ``dependency_order`` results by what it reads: each app's name and ``depends_on``.
_ORDERS: dict[tuple[tuple[str, tuple[str, ...]], ...], tuple[str, ...]] = {}
#: Past this many dependency structures the memo starts over (a handful is typical).
_MAX_ORDERS = 16


def _dependency_order(manifest: GenerationManifest) -> tuple[str, ...]:
    """:func:`dependency_order`, remembered: ordering 50 apps costs as much as planning
    them, and successive generations nearly always share their dependency structure."""
    key = tuple((name, app.depends_on) for name, app in manifest.apps.items())
    order = _ORDERS.get(key)
    if order is None:
        order = tuple(dependency_order(manifest))
        if len(_ORDERS) >= _MAX_ORDERS:
            _ORDERS.clear()
        _ORDERS[key] = order
    return order


def plan(old: GenerationManifest | None, new: GenerationManifest,
         running: Mapping[str, RunningState] | None = None) -> list[Action]:
    """The actions that take the apps of ``old`` (or nothing) to those of ``new``.

    With ``running`` (an activator's :meth:`current_state`), apps whose observed state
    disagrees with ``old`` are healed: started if not running, restarted if unhealthy or
    running other code, stopped if running without belonging to ``new``; an app already
    running its new build (an interrupted activation run again) is kept (its env set
    again if it changed). Without ``running``, ``old`` is assumed to be exactly what runs.
    """
    old_apps: Mapping[str, AppEntry] = old.apps if old is not None else {}
    check = running is not None
    states: Mapping[str, RunningState] = running or {}
    stops: list[Action] = []
    gone = {n for n in old_apps if n not in new.apps}
    # Ordering the old generation costs as much as the rest of a plan: only when needed.
    if old is not None and gone:
        for name in reversed(_dependency_order(old)):
            if name in gone:
                app = old_apps[name]
                stops.append(Action(ActionKind.STOP, name, app.version, app.version,
                                    app.isolation, app.isolation, ("removed",),
                                    depends_on=app.depends_on))
    stray = sorted(n for n, s in states.items()
                   if n not in new.apps and n not in old_apps
                   and s.status in (AppStatus.RUNNING, AppStatus.STARTING))
    for name in stray:
        stops.append(Action(ActionKind.STOP, name, states[name].version,
                            states[name].version, reasons=("running but not in the generation"
                                                           " (drift)",)))
    rest = [_app_action(old_apps.get(n), new.apps[n], states.get(n), check)
            for n in _dependency_order(new)]
    return stops + rest


# -- failures and blocking ------------------------------------------------------------------


def blocked_by(manifest: GenerationManifest, failed: Mapping[str, str]) -> dict[str, str]:
    """Apps of ``manifest`` that (transitively) depend on a failed app → why they wait.

    ``failed`` maps app name → failure reason. Failed apps themselves are not included.
    """
    out: dict[str, str] = {}
    for name in dependency_order(manifest):
        if name in failed:
            continue
        for dep in manifest.apps[name].depends_on:
            if dep in failed:
                out[name] = f"dependency {dep!r} failed: {failed[dep]}"
                break
            if dep in out:
                out[name] = f"dependency {dep!r} is blocked ({out[dep]})"
                break
    return out


_MOVABLE = (ActionKind.START, ActionKind.RESTART, ActionKind.RELOAD, ActionKind.RECONFIGURE,
            ActionKind.KEEP)


def mark_blocked(actions: Sequence[Action], failed: Mapping[str, str]) -> list[Action]:
    """``actions`` (in plan order) with the action of every app that depends, directly or
    through other blocked apps, on a failed app turned into ``blocked`` with the reason.

    ``failed`` maps app → failure reason. Stops are never blocked. Call it with the
    actions not yet done each time an action fails.
    """
    reasons: dict[str, str] = {}
    out = []
    for a in actions:
        why = None
        if a.kind is not ActionKind.STOP and a.app not in failed:
            for dep in a.depends_on:
                if dep in failed:
                    why = f"dependency {dep!r} failed: {failed[dep]}"
                    break
                if dep in reasons:
                    why = f"dependency {dep!r} is blocked"
                    break
        if why is not None and a.kind in _MOVABLE:
            reasons[a.app] = why
            out.append(Action(ActionKind.BLOCKED, a.app, a.version, a.old_version,
                              a.isolation, a.old_isolation, (why,), depends_on=a.depends_on))
        else:
            out.append(a)
    return out


# -- showing a plan -------------------------------------------------------------------------


def plan_to_json(actions: Iterable[Action]) -> list[dict[str, Any]]:
    """The plan as JSON-ready dicts (``bstore ... --json``)."""
    return [a.to_json() for a in actions]


def _describe(a: Action) -> str:
    if a.kind is ActionKind.RELOAD:
        detail = f"modules {', '.join(a.modules)}"
    elif a.kind is ActionKind.RECONFIGURE:
        detail = ""
    else:
        detail = "; ".join(a.reasons)
    if a.kind in (ActionKind.RELOAD, ActionKind.RECONFIGURE):
        sets = [f"{erl_terms.format(k)} = {erl_terms.format(canonical_term(v))}"
                for k, v in a.env_set.items()]
        parts = [detail] if detail else []
        if sets:
            parts.append("set " + ", ".join(sets))
        if a.env_unset:
            parts.append("unset " + ", ".join(k.name for k in a.env_unset))
        detail = "; ".join(parts)
    return detail


def render_plan(actions: Sequence[Action], title: str = "activation plan") -> str:
    """A human table of the plan, one line per app (``keep`` lines included)."""
    if not actions:
        return f"{title}: nothing to do (no apps)"
    width = max(len(a.app) for a in actions)
    lines = [f"{title}:"]
    for a in actions:
        if a.old_version and a.version and a.old_version != a.version:
            version = f"{a.old_version} -> {a.version}"
        else:
            version = a.version or a.old_version or ""
        where = f" [{a.isolation.value}]" if a.isolation is Isolation.VM else ""
        detail = _describe(a)
        lines.append(f"  {a.kind.value:<11} {a.app:<{width}} {version}{where}"
                     + (f"  ({detail})" if detail else ""))
    counts: dict[str, int] = {}
    for a in actions:
        counts[a.kind.value] = counts.get(a.kind.value, 0) + 1
    lines.append("  " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return "\n".join(lines)


def plan_summary_json(actions: Sequence[Action]) -> str:
    """The plan as one JSON document (for logs and events)."""
    return json.dumps(plan_to_json(actions), sort_keys=True)
