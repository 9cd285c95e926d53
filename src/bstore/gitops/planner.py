"""The reconcile plan: what a pass would do to each app, before anything is built.

Pure: :func:`plan_reconcile` compares the desired state (the parsed specs of the repo
tip, plus the apps whose spec failed) with the active generation and, when given, what
the activator sees running. Every field that matters is compared — version, source,
env, isolation, vm_config, health, depends_on — and an app that should run but crashed
or is unhealthy is healed (restarted) even when its spec did not change.

=============  ====================================================================
kind           when
=============  ====================================================================
deploy         the app is new
upgrade        version or source changed (a new build; restart)
restart        isolation or vm_config changed (same build; restart)
reconfigure    only env changed (no restart)
update         only health or depends_on changed (new generation; no restart)
heal           nothing changed, but the app is not running or not healthy (restart)
remove         the app is gone from the repo (or runs without belonging anywhere)
keep           nothing to do
failed         the spec is invalid: the previous generation's entry is kept if any
=============  ====================================================================

Order: removals first (dependents before their dependencies), then every other app in
dependency order of the desired specs. ``build`` says per app whether its code must be
built (``build``), is the active generation's (``reuse``), or nothing is needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bstore.activators.plan import AppStatus, RunningState
from bstore.generations.manifest import AppEntry, GenerationManifest, SourceIdentity
from bstore.specs.model import AppSpec
from bstore.specs.terms.model import exactly_equal


class ChangeKind(StrEnum):
    """What a pass does to one app (see the module docstring)."""

    DEPLOY = "deploy"
    UPGRADE = "upgrade"
    RESTART = "restart"
    RECONFIGURE = "reconfigure"
    UPDATE = "update"
    HEAL = "heal"
    REMOVE = "remove"
    KEEP = "keep"
    FAILED = "failed"


class BuildNeed(StrEnum):
    """Whether an app's code must be realised for this pass."""

    NONE = "none"  # removed, or failed with nothing to keep
    REUSE = "reuse"  # the active generation's output (no realise at all)
    BUILD = "build"  # realise (skipped by the realiser when already in the store)


#: Kinds that stop and start the app's code.
RESTARTING = frozenset({ChangeKind.DEPLOY, ChangeKind.UPGRADE, ChangeKind.RESTART,
                        ChangeKind.HEAL})


@dataclass(frozen=True)
class AppChange:
    """One app's line of the plan. ``in_store`` is filled by callers that asked the
    realiser whether the output of a ``build`` already exists (``bstore plan``)."""

    name: str
    kind: ChangeKind
    from_version: str | None
    to_version: str | None
    reasons: tuple[str, ...] = ()
    build: BuildNeed = BuildNeed.NONE
    output: str | None = None
    in_store: bool | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ChangeKind):
            raise ValueError(f"change kind {self.kind!r} is not a ChangeKind")

    @property
    def restarts(self) -> bool:
        """Whether the app's code is (re)started by this change."""
        return self.kind in RESTARTING

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "kind": self.kind.value,
                "from_version": self.from_version, "to_version": self.to_version,
                "reasons": list(self.reasons), "build": self.build.value,
                "output": self.output, "in_store": self.in_store, "restarts": self.restarts,
                "error": self.error}


@dataclass(frozen=True)
class ReconcilePlan:
    """The ordered changes of one pass towards ``commit``."""

    commit: str | None
    changes: tuple[AppChange, ...]
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def by_name(self) -> dict[str, AppChange]:
        """Changes by app name."""
        return {c.name: c for c in self.changes}

    @property
    def to_build(self) -> list[str]:
        """Apps whose code must be realised."""
        return [c.name for c in self.changes if c.build is BuildNeed.BUILD]

    @property
    def failed(self) -> list[str]:
        """Apps whose spec is invalid."""
        return [c.name for c in self.changes if c.kind is ChangeKind.FAILED]

    @property
    def needs_generation(self) -> bool:
        """Whether the pass makes a new generation (anything but keep/heal/failed)."""
        return any(c.kind not in (ChangeKind.KEEP, ChangeKind.HEAL, ChangeKind.FAILED)
                   for c in self.changes)

    @property
    def needs_heal(self) -> bool:
        """Whether some unchanged app must be restarted (drift)."""
        return any(c.kind is ChangeKind.HEAL for c in self.changes)

    @property
    def idle(self) -> bool:
        """Nothing to do at all."""
        return not self.needs_generation and not self.needs_heal

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``bstore plan --json``)."""
        return {"commit": self.commit, "changes": [c.to_json() for c in self.changes],
                "build": self.to_build,
                "restart": [c.name for c in self.changes if c.restarts],
                "failed": self.failed, "problems": list(self.problems)}

    def render(self) -> str:
        """Human text: one line per app that changes, then the build and restart lists."""
        head = f"plan for commit {self.commit[:12]}" if self.commit else "plan"
        lines = [head + ":"]
        shown = [c for c in self.changes if c.kind is not ChangeKind.KEEP]
        if not shown:
            lines.append("  nothing to do")
        for c in shown:
            versions = (f"{c.from_version} -> {c.to_version}"
                        if c.from_version and c.to_version and c.from_version != c.to_version
                        else (c.to_version or c.from_version or "-"))
            build = {BuildNeed.BUILD: (" [in store]" if c.in_store else
                                       " [build]" if c.in_store is False else " [build?]"),
                     BuildNeed.REUSE: "", BuildNeed.NONE: ""}[c.build]
            why = f"  ({'; '.join(c.reasons)})" if c.reasons else ""
            lines.append(f"  {c.kind.value:<11} {c.name} {versions}{build}{why}")
            if c.error:
                lines.append(f"      error: {c.error}")
        keep = sum(1 for c in self.changes if c.kind is ChangeKind.KEEP)
        if keep:
            lines.append(f"  ({keep} app(s) unchanged)")
        builds = self.to_build
        if builds:
            lines.append("would build: " + ", ".join(builds))
        restarts = [c.name for c in self.changes if c.restarts]
        if restarts:
            lines.append("would restart: " + ", ".join(restarts))
        for p in self.problems:
            lines.append(f"problem: {p}")
        return "\n".join(lines)

    def to_text_json(self) -> str:
        """Compact JSON (for events and logs)."""
        return json.dumps(self.to_json(), sort_keys=True)


def same_build_inputs(spec: AppSpec, entry: AppEntry) -> bool:
    """Whether ``spec`` builds the same code as ``entry`` (same version and source), so
    the active output can be reused without asking the realiser."""
    return (spec.version == entry.version
            and SourceIdentity.from_spec(spec.source).same_spec(entry.source))


def _env_reasons(spec: AppSpec, entry: AppEntry) -> list[str]:
    changed = sorted(k.name for k, v in spec.env.items()
                     if k not in entry.env or not exactly_equal(entry.env[k], v))
    removed = sorted(k.name for k in entry.env if k not in spec.env)
    out = []
    if changed:
        out.append("env set " + ", ".join(changed))
    if removed:
        out.append("env unset " + ", ".join(removed))
    return out


def diff_app(spec: AppSpec, entry: AppEntry | None) -> tuple[ChangeKind, list[str]]:
    """The kind of change from ``entry`` (the active generation's, if any) to ``spec``,
    and a reason per field that differs."""
    if entry is None:
        return ChangeKind.DEPLOY, ["new app"]
    reasons: list[str] = []
    kind = ChangeKind.KEEP
    if spec.version != entry.version:
        reasons.append(f"version {entry.version} -> {spec.version}")
    if not SourceIdentity.from_spec(spec.source).same_spec(entry.source):
        reasons.append("source changed")
    if reasons:
        kind = ChangeKind.UPGRADE
    if spec.isolation != entry.isolation:
        reasons.append(f"isolation {entry.isolation.value} -> {spec.isolation.value}")
    if spec.vm_config != entry.vm_config:
        reasons.append("vm_config changed")
    if kind is ChangeKind.KEEP and reasons:
        kind = ChangeKind.RESTART
    env = _env_reasons(spec, entry)
    reasons += env
    if kind is ChangeKind.KEEP and env:
        kind = ChangeKind.RECONFIGURE
    meta = []
    if spec.health != entry.health:
        meta.append("health changed")
    if tuple(spec.depends_on) != tuple(entry.depends_on):
        meta.append(f"depends_on {list(entry.depends_on)} -> {list(spec.depends_on)}")
    reasons += meta
    if kind is ChangeKind.KEEP and meta:
        kind = ChangeKind.UPDATE
    return kind, reasons


def _drift(state: RunningState | None) -> str | None:
    if state is None:
        return "not running"
    if state.status is not AppStatus.RUNNING:
        why = f": {state.reason}" if state.reason else ""
        return f"{state.status.value}{why}"
    if state.healthy is False:
        return "unhealthy" + (f": {state.reason}" if state.reason else "")
    return None


def spec_order(specs: Mapping[str, AppSpec]) -> list[str]:
    """App names, each after the apps it depends on (among ``specs``); deterministic.
    Cycles (which :func:`~bstore.specs.directory.cross_check` already excludes) are
    broken at the point they are found."""
    order: list[str] = []
    seen: set[str] = set()
    for start in sorted(specs):
        stack: list[tuple[str, list[str]]] = []
        if start in seen:
            continue
        seen.add(start)
        stack.append((start, sorted(d for d in specs[start].depends_on if d in specs)))
        while stack:
            node, deps = stack[-1]
            if deps:
                dep = deps.pop(0)
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, sorted(d for d in specs[dep].depends_on
                                              if d in specs)))
                continue
            stack.pop()
            order.append(node)
    return order


def _removal_order(names: Sequence[str], active: GenerationManifest) -> list[str]:
    """Dependents before their dependencies (reverse dependency order of ``active``)."""
    from bstore.generations.manifest import dependency_order

    wanted = set(names)
    return [n for n in reversed(dependency_order(active)) if n in wanted]


def plan_reconcile(desired: Mapping[str, AppSpec], active: GenerationManifest | None, *,
                   failed: Mapping[str, str] | None = None,
                   running: Mapping[str, RunningState] | None = None,
                   commit: str | None = None,
                   problems: Sequence[str] = ()) -> ReconcilePlan:
    """The plan from ``active`` (and ``running``, when known) to ``desired``.

    ``failed`` maps apps whose spec is invalid to the error: they keep their active
    entry (if any) and are never removed because of a bad spec.
    """
    failed = failed or {}
    active_apps: Mapping[str, AppEntry] = active.apps if active is not None else {}
    changes: list[AppChange] = []
    gone = [n for n in active_apps if n not in desired and n not in failed]
    if active is not None:
        for name in _removal_order(gone, active):
            gone_entry = active_apps[name]
            changes.append(AppChange(name, ChangeKind.REMOVE, gone_entry.version, None,
                                     ("removed from the repository",),
                                     output=str(gone_entry.output)))
    for name, state in sorted((running or {}).items()):
        if (name not in desired and name not in active_apps and name not in failed
                and state.status in (AppStatus.RUNNING, AppStatus.STARTING)):
            changes.append(AppChange(name, ChangeKind.REMOVE, state.version, None,
                                     ("running but not in the repository (drift)",)))
    for name in sorted(failed):
        if name in desired:
            continue
        e = active_apps.get(name)
        keep = f"keeping {e.version} from the active generation" if e else "not deployed"
        changes.append(AppChange(name, ChangeKind.FAILED, e.version if e else None,
                                 e.version if e else None, (f"invalid spec; {keep}",),
                                 BuildNeed.REUSE if e else BuildNeed.NONE,
                                 output=str(e.output) if e else None, error=failed[name]))
    for name in spec_order(desired):
        spec = desired[name]
        entry = active_apps.get(name)
        kind, reasons = diff_app(spec, entry)
        if running is not None and entry is not None and kind in (
                ChangeKind.KEEP, ChangeKind.RECONFIGURE, ChangeKind.UPDATE):
            drift = _drift(running.get(name))
            if drift is not None:
                reasons.append(f"drift: {drift}")
                kind = ChangeKind.HEAL if kind is ChangeKind.KEEP else ChangeKind.RESTART
        reuse = entry is not None and same_build_inputs(spec, entry)
        changes.append(AppChange(
            name, kind, entry.version if entry else None, spec.version, tuple(reasons),
            BuildNeed.REUSE if reuse else BuildNeed.BUILD,
            output=str(entry.output) if reuse and entry else None))
    return ReconcilePlan(commit, tuple(changes), tuple(problems))


def drifting(active: GenerationManifest | None,
             running: Mapping[str, RunningState]) -> bool:
    """Whether what runs differs from what the active generation says should run."""
    apps = active.apps if active is not None else {}
    for name in apps:
        st = running.get(name)
        if st is None or st.status is not AppStatus.RUNNING or st.healthy is False:
            return True
    return any(n not in apps and s.status in (AppStatus.RUNNING, AppStatus.STARTING)
               for n, s in running.items())
