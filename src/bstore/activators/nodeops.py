"""What an activator does to one app inside one BEAM node, through that node's agent,
and the loop that carries out a plan's actions.

Both real activators use it: the embedded one on the profile's host node, the vm one on
each app's own VM (same agent, same operations). Per action kind:

===========  ==========================================================================
start        add the app's closure ``ebin`` dirs to the code path, ``application:load``,
             set every env key of the manifest (exact Erlang terms), start it with its
             dependencies (``ensure_all_started``)
stop         ``application:stop`` + ``unload``, remove its ``ebin`` from the code path
restart      stop on the old side, load the new modules over the old, start
reload       the agent's ``reload`` (suspend, soft purge, load, ``code_change``, resume)
             with the changed modules; then the code path and env follow. Any failure
             but lingering processes falls back to a restart
reconfigure  the agent's ``reconfigure``: set/unset keys, ``config_change/3``; pid kept
===========  ==========================================================================

Processes lingering in old code abort the whole switch (:class:`SwitchAborted`): the
node keeps its old code, nothing is killed, and the actions not yet done are reported as
not done.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from bstore.activators.agent_client import AgentClient, AgentOpError, LingeringProcessesError
from bstore.activators.base import ActionOutcome, ApplyResult, HealthResult, blocked_outcome
from bstore.activators.etf import format_term
from bstore.activators.health import wait_until_healthy
from bstore.activators.plan import Action, ActionKind, mark_blocked
from bstore.errors import BstoreError
from bstore.generations.manifest import AppEntry, GenerationManifest
from bstore.specs.terms.model import Atom
from bstore.store.crash import crash_point

#: ``BSTORE_CRASH_AT`` point after each action that succeeded (:mod:`bstore.store.crash`).
ACTION_CRASH_POINT = "act-after-action"


class SwitchAborted(BstoreError):
    """A step that must stop the whole switch (processes lingering in old code)."""


# -- paths ----------------------------------------------------------------------------------


def app_dir(store_dir: Path, entry: AppEntry) -> Path:
    """``<store>/<output>/lib/<app>-<vsn>``: the app's own directory."""
    return store_dir / str(entry.output) / "lib" / entry.lib_name


def app_ebin(store_dir: Path, entry: AppEntry) -> Path:
    """The app's own ``ebin`` directory."""
    return app_dir(store_dir, entry) / "ebin"


def closure_ebins(store_dir: Path, manifest: GenerationManifest | None,
                  entry: AppEntry) -> list[Path]:
    """The ``ebin`` dirs of every lib dir in ``entry``'s closure (its own first)."""
    own = app_ebin(store_dir, entry)
    dirs = [own]
    if manifest is not None:
        closure = {str(p) for p in entry.closure}
        for target in manifest.code_path.values():
            # The closure test first: a generation's code path names every app's lib dir.
            if target.split("/", 1)[0] not in closure:
                continue
            ebin = store_dir / target / "ebin"
            if ebin != own and ebin.is_dir():
                dirs.append(ebin)
    return dirs


def generation_ebins(store_dir: Path, manifest: GenerationManifest,
                     keep: Callable[[AppEntry], bool] | None = None) -> list[Path]:
    """Every ``ebin`` dir the apps of ``manifest`` (those ``keep`` accepts) need."""
    seen: dict[Path, None] = {}
    for entry in manifest.apps.values():
        if keep is None or keep(entry):
            for d in closure_ebins(store_dir, manifest, entry):
                seen.setdefault(d, None)
    return list(seen)


# -- operations on one node -----------------------------------------------------------------


def _ignore(exc: AgentOpError, *reasons: str) -> bool:
    """Whether an op error is the harmless ``{error, {Reason, App}}`` kind."""
    r = exc.reason
    return isinstance(r, tuple) and len(r) == 2 and r[0] in tuple(Atom(x) for x in reasons)


def start_app(client: AgentClient, ebins: Sequence[Path], entry: AppEntry) -> None:
    """Add ``ebins`` to the code path, load ``entry``'s app, set its env, start it."""
    for d in reversed(list(ebins)):
        client.add_patha(d)
    try:
        client.app_load(entry.name)
    except AgentOpError as exc:
        if not _ignore(exc, "already_loaded"):
            raise
    for key, value in entry.env.items():
        client.set_env(entry.name, key.name, value)
    client.app_ensure_all_started(entry.name)


def stop_app(client: AgentClient, app: str, ebin: Path | None) -> None:
    """Stop and unload ``app`` and drop its ``ebin`` from the code path (each step
    tolerates an app that is already stopped or unloaded)."""
    try:
        client.app_stop(app)
    except AgentOpError as exc:
        if not _ignore(exc, "not_started"):
            raise
    try:
        client.app_unload(app)
    except AgentOpError as exc:
        if not _ignore(exc, "not_loaded"):
            raise
    if ebin is not None:
        client.del_path(ebin)


def load_new_code(client: AgentClient, ebin: Path, entry: AppEntry,
                  modules: Sequence[str] | None = None) -> None:
    """Make ``entry``'s modules (or just ``modules``: those whose code changed) current,
    after the app stopped: the old version's code would otherwise stay loaded and be what
    starts again. Raises :class:`LingeringProcessesError` if something still runs the
    code being replaced."""
    for module in entry.modules if modules is None else modules:
        client.load_module(module, ebin / f"{module}.beam")


def reconfigure_app(client: AgentClient, action: Action) -> None:
    """Set/unset the action's env keys and run the app's ``config_change/3``."""
    client.reconfigure(action.app, {k.name: v for k, v in action.env_set.items()},
                       [k.name for k in action.env_unset])


# -- the action loop ------------------------------------------------------------------------


class Target(Protocol):
    """Where an activator's actions land (the activator implements these)."""

    def do_start(self, entry: AppEntry) -> str:
        """Start ``entry``; returns a detail line."""

    def do_stop(self, action: Action) -> str:
        """Stop the app of ``action`` (on its old side); returns a detail line."""

    def do_restart(self, action: Action, entry: AppEntry) -> str:
        """Stop the old side, start ``entry``; returns a detail line."""

    def do_reload(self, action: Action, entry: AppEntry) -> str:
        """Reload changed modules (falls back to restart); returns a detail line."""

    def do_reconfigure(self, action: Action, entry: AppEntry) -> str:
        """Change env in place; returns a detail line."""

    def probe(self, entry: AppEntry) -> HealthResult:
        """One health check of ``entry``."""


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed step."""
    if isinstance(exc, BstoreError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def run_actions(target: Target, actions: Sequence[Action], new: GenerationManifest | None,
                health_deadline: Callable[[AppEntry], float],
                echo: Callable[[str], None] | None = None, *,
                settle: float = 0.0) -> ApplyResult:
    """Carry out ``actions`` in order on ``target``; check health after each app changes.

    A failed app blocks the apps that depend on it; :class:`SwitchAborted` (lingering
    processes) stops the loop and reports every remaining action as not done.
    """
    outcomes: list[ActionOutcome] = []
    failed: dict[str, str] = {}
    todo = list(actions)
    while todo:
        action = todo.pop(0)
        if action.kind is ActionKind.BLOCKED:
            outcomes.append(blocked_outcome(action))
            continue
        entry = new.apps.get(action.app) if new is not None else None
        if action.kind is not ActionKind.STOP and entry is None:
            outcomes.append(ActionOutcome(action, False, "app is not in the planned generation"
                                          " (plan before apply)"))
            failed[action.app] = outcomes[-1].detail
            continue
        try:
            if action.kind is ActionKind.KEEP:
                outcomes.append(ActionOutcome(action, True, "kept"))
                continue
            if echo is not None:
                echo(f"{action.kind.value} {action.app}")
            detail = _run_one(target, action, entry)
        except SwitchAborted as exc:
            why = exc.message
            outcomes.append(ActionOutcome(action, False, why))
            outcomes.extend(ActionOutcome(a, False, f"not done: switch aborted ({why})")
                            for a in todo)
            return ApplyResult(tuple(outcomes))
        except (BstoreError, OSError) as exc:
            failed[action.app] = describe_error(exc)
            outcomes.append(ActionOutcome(action, False, failed[action.app]))
            todo = mark_blocked(todo, failed)
            continue
        if entry is not None and action.kind is not ActionKind.STOP:
            result = wait_until_healthy(functools.partial(target.probe, entry),
                                        health_deadline(entry), settle=settle)
            if not result.healthy:
                failed[action.app] = f"unhealthy: {result.detail}"
                outcomes.append(ActionOutcome(action, False, failed[action.app]))
                todo = mark_blocked(todo, failed)
                continue
            detail = f"{detail}; healthy ({result.detail})" if detail else result.detail
        outcomes.append(ActionOutcome(action, True, detail))
        # A kill here leaves a half-applied plan: re-running it (journal recovery) must
        # keep what is done and do the rest.
        crash_point(ACTION_CRASH_POINT)
    return ApplyResult(tuple(outcomes))


def _run_one(target: Target, action: Action, entry: AppEntry | None) -> str:
    try:
        if action.kind is ActionKind.STOP:
            return target.do_stop(action)
        assert entry is not None
        if action.kind is ActionKind.START:
            return target.do_start(entry)
        if action.kind is ActionKind.RESTART:
            return target.do_restart(action, entry)
        if action.kind is ActionKind.RELOAD:
            return target.do_reload(action, entry)
        if action.kind is ActionKind.RECONFIGURE:
            return target.do_reconfigure(action, entry)
    except LingeringProcessesError as exc:
        raise SwitchAborted(
            f"{action.app}: processes lingering in old code: ["
            + ", ".join(str(p) for p in exc.pids) + "]",
            hint="the node stays on its old code and nothing was killed; let those processes"
            " finish (or make a fully qualified call), then activate again") from exc
    raise BstoreError(f"unknown action {action.kind.value} for {action.app!r}")


def reload_or_restart(client: AgentClient, store_dir: Path, action: Action, entry: AppEntry,
                      old_ebin: Path | None, restart: Callable[[], str]) -> str:
    """The reload step: agent ``reload`` with the changed modules, then the code path and
    env follow. Lingering processes propagate (abort); any other failure restarts."""
    ebin = app_ebin(store_dir, entry)
    beams = {m: ebin / f"{m}.beam" for m in action.modules}
    try:
        result = client.reload(action.app, beams)
    except LingeringProcessesError:
        raise
    except AgentOpError as exc:
        why = format_term(exc.reason, limit=300)
        return f"reload failed ({why}); {restart()}"
    client.add_patha(ebin)
    if old_ebin is not None and old_ebin != ebin:
        client.del_path(old_ebin)
    if action.env_set or action.env_unset:
        reconfigure_app(client, action)
    return (f"reloaded {', '.join(result.modules)} ({len(result.processes)} process(es)"
            " suspended)")
