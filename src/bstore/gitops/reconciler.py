"""One GitOps pass, and the manual operations, for one profile.

:meth:`Reconciler.reconcile_once`: sync the repo → parse the tip's specs (a bad spec
fails that app only; it keeps its previous generation entry if it had one) → plan
against the active generation and what runs → realise what changed (in parallel) → a
new generation recording the commit → activate → health within each spec's timeout →
keep it, or roll back to the previous generation and **quarantine** the commit (in
``quarantine.json``; not retried until the tip changes). A repo that cannot be reached,
or a tip the policy refuses, leaves everything running and reports ``error``.

The work is proportional to the change: a pass whose tip is the applied commit only
fetches and checks what runs; specs are parsed again only for app directories whose
git tree changed; apps whose version and source did not change keep their output
(no realise).

State under the profile's gitops directory (next to :mod:`.repo_sync`'s files)::

    status.json        the Status (bstore status, the daemon and the API read it)
    quarantine.json    the refused commit and why
    reconciler.json    the last applied commit, manual operations not yet reverted
    reconcile.lock     held for a pass or a manual operation (across processes)

One lock (a per-directory thread lock plus ``flock`` on ``reconcile.lock``) makes
manual and timed passes, and manual operations, run one at a time: a second caller
waits, or with ``wait=False`` gets :class:`ReconcileBusy` ("reconcile already running").
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bstore.activation import ActivationResult, BuildFn, BuildOutcome, Pipeline, realise_builder
from bstore.activators.base import Activator, ActivatorContext, load_activator
from bstore.activators.plan import ActionKind, RunningState
from bstore.errors import BstoreError
from bstore.events import EventBus, default_bus
from bstore.generations.failed import failed_number
from bstore.generations.generation import AppBuild
from bstore.generations.manifest import AppEntry, GenerationManifest
from bstore.generations.profiles import ProfileError
from bstore.gitops.config import Config
from bstore.gitops.desired import (
    SpecCache,
    annotate_store,
    app_errors,
    drop_orphans,
    merge_manifest,
    reuse_entry,
    spec_from_entry,
)
from bstore.gitops.lock import LOCK_FILE, ReconcileBusy, ReconcileError, reconcile_lock
from bstore.gitops.planner import (
    BuildNeed,
    ChangeKind,
    ReconcilePlan,
    drifting,
    plan_reconcile,
)
from bstore.gitops.repo_sync import RepoSync, RepoSyncError, SyncResult
from bstore.gitops.report import PassView, blocked_apps, compose_status
from bstore.gitops.status import (
    AppState,
    State,
    Status,
    now_iso,
    read_status,
    write_json_atomic,
    write_status,
)
from bstore.gitops.status import (
    AppStatus as AppStatusLine,
)
from bstore.specs.model import AppSpec
from bstore.store.local import LocalStore

__all__ = ["LOCK_FILE", "QUARANTINE_FILE", "STATE_FILE", "ReconcileBusy", "ReconcileError",
           "ReconcileResult", "Reconciler"]

QUARANTINE_FILE = "quarantine.json"
STATE_FILE = "reconciler.json"


#: Per-app events, by plan kind (the seed's telemetry names).
_KIND_EVENT = {ChangeKind.DEPLOY: "deploy", ChangeKind.UPGRADE: "upgrade",
               ChangeKind.RESTART: "reconfigure", ChangeKind.RECONFIGURE: "reconfigure",
               ChangeKind.UPDATE: "reconfigure", ChangeKind.REMOVE: "remove"}


@dataclass(frozen=True)
class ReconcileResult:
    """What one pass did. ``state`` is the status state after it; ``commit`` the tip
    seen (None when the repo could not be reached); ``skipped`` says why nothing was
    applied (``"no change"``, ``"quarantined"``); ``substituted`` the derivations fetched
    from binary caches instead of built, ``cache_errors`` what went wrong with them."""

    state: State
    commit: str | None = None
    changed: bool = False
    plan: ReconcilePlan | None = None
    activation: ActivationResult | None = None
    error: str | None = None
    quarantined: bool = False
    skipped: str | None = None
    built: tuple[str, ...] = ()
    duration_ms: float = 0.0
    substituted: tuple[str, ...] = ()
    cache_errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the pass ended synced (nothing failed)."""
        return self.state is State.SYNCED

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"state": self.state.value, "ok": self.ok, "commit": self.commit,
                "changed": self.changed, "error": self.error,
                "quarantined": self.quarantined, "skipped": self.skipped,
                "built": list(self.built), "substituted": list(self.substituted),
                "cache_errors": list(self.cache_errors),
                "duration_ms": round(self.duration_ms, 3),
                "plan": self.plan.to_json() if self.plan else None,
                "activation": self.activation.to_json() if self.activation else None}


@dataclass
class _Memo:
    """Per-instance caches that make an unchanged pass cheap."""

    manifest_path: str | None = None
    manifest: GenerationManifest | None = None
    idle_key: tuple[str | None, str | None] | None = None
    specs: SpecCache = field(default_factory=SpecCache)
    #: The last status an idle pass wrote, and what it was made from.
    status: Status | None = None
    status_key: Any = None


class Reconciler:
    """Reconciles one profile towards one repo (see the module docstring).

    ``activator``: an :class:`Activator` instance (default: the configured one, loaded
    when first needed); ``builder``: given the open store, how specs become outputs
    (default: the realiser).
    """

    def __init__(self, config: Config, root: Path, *, activator: Activator | None = None,
                 events: EventBus | None = None,
                 builder: Callable[[LocalStore], BuildFn] | None = None,
                 echo: Callable[[str], None] | None = None,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.config = config
        self.root = Path(root)
        self.events = events or default_bus
        self.echo = echo
        self.log = log
        self._activator = activator
        self._builder = builder
        self.gitops_dir = config.gitops_dir(self.root)
        self.sync_ = RepoSync.from_config(config, self.root, events=self.events, log=log)
        self._memo = _Memo()

    # -- plumbing ------------------------------------------------------------------------

    @property
    def activator(self) -> Activator:
        """The activator (the configured one unless one was given)."""
        if self._activator is None:
            self._activator = load_activator(
                self.config.activator,
                ActivatorContext(self.root, self.config.profile, echo=self.echo))
        return self._activator

    def locked(self, *, wait: bool = True) -> AbstractContextManager[None]:
        """Hold the reconcile lock of this profile (see :mod:`.lock`)."""
        return reconcile_lock(self.gitops_dir, self.config.profile, wait=wait)

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.gitops_dir / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _state(self) -> dict[str, Any]:
        return self._read_json(STATE_FILE)

    def _save_state(self, state: Mapping[str, Any]) -> None:
        write_json_atomic(self.gitops_dir / STATE_FILE, dict(state))

    def quarantine(self) -> dict[str, Any] | None:
        """The quarantined commit and why, if any."""
        return self._read_json(QUARANTINE_FILE) or None

    def _pipeline(self, store: LocalStore) -> Pipeline:
        pipeline = Pipeline(store, self.config.profile, self.activator, events=self.events,
                            echo=self.echo, health_timeout=self.config.health.timeout)
        if self._memo.manifest is not None:
            pipeline.remember(self._memo.manifest)
        return pipeline

    def _build_fn(self, store: LocalStore) -> BuildFn:
        if self._builder is not None:
            return self._builder(store)
        return realise_builder(store, hex_repos=self._hex_repos(), events=self.events,
                               substituters=self.config.substituters,
                               trusted_keys=self.config.trusted_public_keys,
                               mesh_peers=self.config.mesh_peers, log=self.log)

    def _hex_repos(self) -> Any:
        from bstore.builders.hex.repos import HexRepo, Repos

        return Repos([HexRepo(r.name, r.url, r.public_key)
                      for r in self.config.hex_repositories])

    def _active(self, store: LocalStore, pipeline: Pipeline) -> GenerationManifest | None:
        current = pipeline.profile.current()
        if current is None or failed_number(pipeline.profile) == current.number:
            # A failed first generation runs nothing: plan from nothing, so the next tip
            # starts its apps instead of finding "no change" against it.
            return None
        if self._memo.manifest_path != str(current.store_path):
            self._memo.manifest = pipeline.load_manifest(current)
            self._memo.manifest_path = str(current.store_path)
            pipeline.remember(self._memo.manifest)
        return self._memo.manifest

    # -- reading -------------------------------------------------------------------------

    def status(self) -> Status:
        """The persisted status."""
        return read_status(self.gitops_dir, self.config.profile)

    def app_status(self, name: str) -> AppStatusLine:
        """One app's persisted status."""
        status = self.status()
        if name not in status.apps:
            raise ReconcileError(f"no app named {name!r} in the status of profile"
                                 f" {self.config.profile!r}",
                                 hint="bstore status lists the apps")
        return status.apps[name]

    def sync(self) -> SyncResult:
        """Fetch and check the tip (no apply), under the lock. Before the first pass
        the status becomes ``ready``."""
        with self.locked(), LocalStore.open(self.root) as store:
            active = self._active(store, self._pipeline(store))
            synced = self.sync_.sync(self._last_applied(active))
            status = self.status()
            if status.state in (State.INITIALIZING, State.READY):
                # Synced but nothing applied yet: the seed's 'ready'.
                write_status(self.gitops_dir, status.with_(
                    state=State.READY, tip_commit=synced.commit,
                    profile=self.config.profile))
            return synced

    def get_desired_state(self) -> dict[str, AppSpec]:
        """The valid specs of the tip (syncs first)."""
        synced = self.sync()
        result = self._memo.specs.load(self.gitops_dir / "repo.git", synced.commit,
                                       synced.checkout_dir, self.config.apps_dir)
        return dict(result.specs)

    def get_current_state(self) -> dict[str, RunningState]:
        """What the activator sees running."""
        return dict(self.activator.current_state())

    def plan(self, *, check_store: bool = False) -> ReconcilePlan:
        """Sync, parse and plan without applying anything (``bstore plan``). With
        ``check_store``, the realiser plans the apps to build (fetching their sources) to
        say which outputs are already in the store."""
        with self.locked(), LocalStore.open(self.root) as store:
            pipeline = self._pipeline(store)
            active = self._active(store, pipeline)
            synced = self.sync_.sync(self._last_applied(active))
            specs = self._memo.specs.load(self.gitops_dir / "repo.git", synced.commit,
                                          synced.checkout_dir, self.config.apps_dir)
            failed, problems = app_errors(specs, synced.checkout_dir)
            plan = plan_reconcile(
                specs.specs, active, failed=failed,
                running=self.activator.current_state(), commit=synced.commit,
                problems=problems)
            if check_store and plan.to_build:
                plan = annotate_store(store, plan, specs.specs, self._hex_repos(), self.log)
            return plan

    def _last_applied(self, active: GenerationManifest | None) -> str | None:
        applied = self._state().get("applied")
        if isinstance(applied, str):
            return applied
        if active is None or active.commit is None:
            return None
        # A first generation that failed stays current (there is nothing to switch back
        # to); its commit was never applied.
        quarantined = (self.quarantine() or {}).get("commit")
        return None if quarantined == active.commit else active.commit

    # -- the pass ------------------------------------------------------------------------

    def reconcile_once(self, *, wait: bool = True, trigger: str = "manual"
                       ) -> ReconcileResult:
        """One pass (see the module docstring). Never raises for repo, spec, build or
        activation failures: they are in the result and the status."""
        with self.locked(wait=wait):
            started = time.monotonic()
            self.events.emit("bstore.reconcile.start", {"system_time": time.time()},
                             profile=self.config.profile, trigger=trigger)
            try:
                result = self._pass()
            except BstoreError as exc:
                result = self._failed_pass(exc)
            except OSError as exc:
                # The state dir or store failing under us (disk full, permissions): the
                # pass stops, the apps keep running, the status says why.
                result = self._failed_pass(ReconcileError(
                    f"reconcile of profile {self.config.profile!r} failed:"
                    f" {exc.strerror or exc} ({exc.filename or self.root})",
                    hint="check the state directory (space, permissions)"))
            duration = (time.monotonic() - started) * 1000.0
            result = replace(result, duration_ms=duration)
            if result.error is not None and result.state is State.ERROR:
                self.events.emit("bstore.reconcile.error", {"duration": duration},
                                 profile=self.config.profile, error=result.error,
                                 commit=result.commit, trigger=trigger)
            else:
                self.events.emit("bstore.reconcile.stop", {"duration": duration},
                                 profile=self.config.profile, status=result.state.value,
                                 commit=result.commit, changed=result.changed,
                                 trigger=trigger)
            return result

    def _failed_pass(self, exc: BstoreError) -> ReconcileResult:
        """Repo unreachable, commit refused, unusable checkout: nothing is touched."""
        previous = self.status()
        status = previous.with_(state=State.ERROR, error=exc.message,
                                last_reconcile=now_iso(),
                                profile=self.config.profile)
        write_status(self.gitops_dir, status)
        commit = getattr(exc, "commit", None)
        return ReconcileResult(State.ERROR, commit if isinstance(commit, str) else None,
                               error=exc.message)

    def _pass(self) -> ReconcileResult:
        with LocalStore.open(self.root) as store:
            pipeline = self._pipeline(store)
            pipeline.recover()
            active = self._active(store, pipeline)
            state = self._state()
            last_applied = self._last_applied(active)
            try:
                synced = self.sync_.sync(last_applied)
            except RepoSyncError as exc:
                return self._failed_pass(exc)
            tip = synced.commit
            quarantine = self.quarantine()
            current = pipeline.profile.current()
            gen_key = (str(current.store_path) if current else None, tip)
            manual = state.get("manual") or {}
            running = self.activator.current_state()
            if quarantine and quarantine.get("commit") == tip:
                return self._idle(pipeline, active, running, tip, synced.changed,
                                  skipped="quarantined", quarantine=quarantine)
            if (self._memo.idle_key == gen_key and not manual and tip == last_applied
                    and not drifting(active, running)):
                # The common case: nothing new, everything runs. No parse, no plan.
                return self._idle(pipeline, active, running, tip, synced.changed,
                                  skipped="no change")
            specs = self._memo.specs.load(self.gitops_dir / "repo.git", tip,
                                          synced.checkout_dir, self.config.apps_dir)
            failed, problems = app_errors(specs, synced.checkout_dir)
            plan = plan_reconcile(specs.specs, active, failed=failed, running=running,
                                  commit=tip, problems=problems)
            if not plan.needs_generation:
                self._memo.idle_key = gen_key if not failed else None
                self._finish_ok(tip, state, quarantine_clear=quarantine is not None)
                return self._idle(pipeline, active, running, tip, synced.changed,
                                  skipped="no change", plan=plan, failed=failed,
                                  reverted=manual)
            return self._apply(store, pipeline, active, plan, specs.specs, failed, tip,
                               synced.changed, state, manual)

    def _idle(self, pipeline: Pipeline, active: GenerationManifest | None,
              running: Mapping[str, RunningState], tip: str, changed: bool, *,
              skipped: str, quarantine: Mapping[str, Any] | None = None,
              plan: ReconcilePlan | None = None, failed: Mapping[str, str] | None = None,
              reverted: Mapping[str, Any] | None = None) -> ReconcileResult:
        activation = None
        if drifting(active, running):
            activation = pipeline.heal()
            running = self.activator.current_state()
        # The same inputs give the same status but for the time of the pass: reuse it
        # (composing 1,000 app lines is most of an unchanged pass otherwise).
        key = (tip, self._memo.manifest_path, repr(quarantine), repr(sorted((failed or
               {}).items())), tuple(sorted(running.items())), repr(self._state()))
        memo = self._memo.status
        if activation is None and not reverted and memo is not None \
                and self._memo.status_key == key:
            now = now_iso()
            status = memo.with_(last_reconcile=now, last_success=(
                now if memo.state is State.SYNCED else memo.last_success))
        else:
            status = self._make_status(pipeline, active, running, tip, failed=failed or {},
                                       quarantine=quarantine, activation=activation,
                                       reverted=reverted)
        self._memo.status, self._memo.status_key = status, key
        write_status(self.gitops_dir, status)
        return ReconcileResult(status.state, tip, changed, plan, activation,
                               error=status.error, quarantined=quarantine is not None,
                               skipped=skipped)

    def _finish_ok(self, tip: str, state: Mapping[str, Any], *,
                   quarantine_clear: bool) -> None:
        if state.get("applied") != tip or state.get("manual"):
            self._save_state({"applied": tip, "manual": {}})
        if quarantine_clear:
            with contextlib.suppress(FileNotFoundError):
                (self.gitops_dir / QUARANTINE_FILE).unlink()

    def _apply(self, store: LocalStore, pipeline: Pipeline,
               active: GenerationManifest | None, plan: ReconcilePlan,
               desired: Mapping[str, AppSpec], failed: dict[str, str], tip: str,
               changed: bool, state: Mapping[str, Any],
               manual: Mapping[str, Any]) -> ReconcileResult:
        active_apps: Mapping[str, AppEntry] = active.apps if active is not None else {}
        to_build = [desired[n] for n in plan.to_build]
        outcome = pipeline.build(to_build, self._build_fn(store)) if to_build \
            else BuildOutcome({})
        for name, why in outcome.errors.items():
            failed[name] = f"build failed: {why}"
        kept: dict[str, AppEntry] = {}
        built: list[AppBuild] = []
        for change in plan.changes:
            name = change.name
            if change.kind is ChangeKind.REMOVE:
                continue
            if name in failed:
                if name in active_apps:  # a failed app keeps what it had
                    kept[name] = active_apps[name]
                continue
            if change.build is BuildNeed.REUSE:
                kept[name] = reuse_entry(active_apps[name], desired[name], tip)
            elif name in outcome.builds:
                b = outcome.builds[name]
                built.append(AppBuild(b.spec, b.output, b.resolved, tip))
        drop_orphans(kept, built, desired, failed)
        manifest = merge_manifest(store, active, kept, built, commit=tip)
        self._write_progress(pipeline, active, plan, failed, tip)
        spans = self._app_events_start(plan, failed)
        result = pipeline.activate_manifest(manifest)
        if result.ok and result.reused and drifting(manifest, self.activator.current_state()):
            result = pipeline.heal()  # same content: no switch ran, so heal here
        self._app_events_stop(spans, result)
        quarantine = None
        if result.ok:
            self._finish_ok(tip, state, quarantine_clear=True)
            self._memo.idle_key = None
        else:
            quarantine = {"commit": tip, "reason": result.error or "activation failed",
                          "failed": dict(result.failed), "at": now_iso(),
                          "generation": result.attempted,
                          "rolled_back_to": result.rolled_back_to}
            write_json_atomic(self.gitops_dir / QUARANTINE_FILE, quarantine)
        new_active = self._active(store, pipeline)
        running = self.activator.current_state()
        status = self._make_status(pipeline, new_active, running, tip, failed=failed,
                                   quarantine=quarantine, activation=result,
                                   reverted=manual if result.ok else None)
        write_status(self.gitops_dir, status)
        return ReconcileResult(status.state, tip, changed, plan, result, error=status.error,
                               quarantined=quarantine is not None,
                               built=outcome.built, substituted=outcome.substituted,
                               cache_errors=outcome.cache_errors)

    def _write_progress(self, pipeline: Pipeline, active: GenerationManifest | None,
                        plan: ReconcilePlan, failed: Mapping[str, str], tip: str) -> None:
        """Before activating: upgraded apps show ``upgrading``, new ones ``starting``, so
        ``bstore status`` during a long activation says what is happening."""
        previous = self.status()
        apps = dict(previous.apps)
        now = now_iso()
        for c in plan.changes:
            if c.name in failed:
                continue
            old = apps.get(c.name)
            if c.kind in (ChangeKind.UPGRADE, ChangeKind.RESTART) and old is not None:
                apps[c.name] = replace(old, status=AppState.UPGRADING, since=now,
                                       note=f"upgrading to {c.to_version}")
            elif c.kind is ChangeKind.DEPLOY:
                apps[c.name] = AppStatusLine(c.name, c.to_version, AppState.STARTING,
                                             since=now)
        write_status(self.gitops_dir, previous.with_(
            apps=apps, tip_commit=tip, profile=self.config.profile))

    def _app_events_start(self, plan: ReconcilePlan, failed: Mapping[str, str]
                          ) -> list[tuple[str, str, float]]:
        spans = []
        for c in plan.changes:
            event = _KIND_EVENT.get(c.kind)
            if event is None or c.name in failed:
                continue
            meta: dict[str, Any] = {"app": c.name}
            if event == "upgrade":
                meta.update(from_version=c.from_version, to_version=c.to_version)
            self.events.emit(f"bstore.{event}.start", {"system_time": time.time()}, **meta)
            spans.append((event, c.name, time.monotonic()))
        return spans

    def _app_events_stop(self, spans: list[tuple[str, str, float]],
                         result: ActivationResult) -> None:
        for event, app, t0 in spans:
            why = result.failed.get(app)
            outcome = "ok" if result.ok else ("failed" if why else "rolled_back")
            self.events.emit(f"bstore.{event}.stop", {"duration": (time.monotonic() - t0)
                                                      * 1000.0},
                             app=app, result=outcome, **({"error": why} if why else {}))

    # -- status --------------------------------------------------------------------------

    def _make_status(self, pipeline: Pipeline, active: GenerationManifest | None,
                     running: Mapping[str, RunningState], tip: str | None, *,
                     failed: Mapping[str, str], quarantine: Mapping[str, Any] | None,
                     activation: ActivationResult | None,
                     reverted: Mapping[str, Any] | None) -> Status:
        current = pipeline.profile.current()
        return compose_status(
            PassView(profile=self.config.profile, active=active, running=running,
                     tip=tip, applied=self._last_applied(active),
                     generation=current.number if current else None, failed=failed,
                     quarantine=quarantine,
                     health=activation.health if activation is not None else {},
                     activation_failed=activation.failed if activation is not None else {},
                     activation_blocked=blocked_apps(activation),
                     manual=self._state().get("manual") or {}, reverted=reverted or {}),
            self.status(), full_path=pipeline.store.full_path, node_of=self._node_of)

    def _node_of(self, entry: AppEntry) -> str | None:
        activator = self._activator
        if activator is None:
            return None
        vms = getattr(activator, "vms", None)
        if entry.isolation.value == "vm" and vms is not None:
            try:
                return str(vms.node_name(entry))
            except (BstoreError, AttributeError):
                return None
        node = getattr(activator, "node_name", None)
        return node if isinstance(node, str) else None

    # -- manual operations ---------------------------------------------------------------

    def deploy(self, spec: AppSpec) -> ActivationResult:
        """Build and run ``spec`` now, bypassing git (the next reconcile reverts it)."""
        with self.events.span("bstore.deploy", app=spec.name, manual=True) as span:
            result = self._manual("deploy", spec.name, lambda active: (spec, None))
            span.set(result="ok" if result.ok else "failed")
        return result

    def upgrade(self, name: str, version: str) -> ActivationResult:
        """Build and run ``name`` at ``version`` (same source, new version)."""
        def change(active: GenerationManifest | None) -> tuple[AppSpec | None, str | None]:
            entry = self._entry(active, name)
            return spec_from_entry(entry, version=version), None

        with self.events.span("bstore.upgrade", app=name, to_version=version,
                              manual=True) as span:
            result = self._manual("upgrade", name, change)
            span.set(result="ok" if result.ok else "failed")
        return result

    def remove(self, name: str) -> ActivationResult:
        """Stop ``name`` and drop it from the generation."""
        def change(active: GenerationManifest | None) -> tuple[AppSpec | None, str | None]:
            self._entry(active, name)
            return None, name

        with self.events.span("bstore.remove", app=name, manual=True) as span:
            result = self._manual("remove", name, change)
            span.set(result="ok" if result.ok else "failed")
        return result

    def _entry(self, active: GenerationManifest | None, name: str) -> AppEntry:
        if active is None or name not in active.apps:
            raise ReconcileError(f"app {name!r} is not deployed in profile"
                                 f" {self.config.profile!r}",
                                 hint="bstore status lists the deployed apps")
        return active.apps[name]

    def _manual(self, op: str,
                name: str,
                change: Callable[[GenerationManifest | None],
                                 tuple[AppSpec | None, str | None]]) -> ActivationResult:
        with self.locked(), LocalStore.open(self.root) as store:
            pipeline = self._pipeline(store)
            pipeline.recover()
            active = self._active(store, pipeline)
            spec, removed = change(active)
            kept = {n: e for n, e in (active.apps if active else {}).items()
                    if n != name}
            built: list[AppBuild] = []
            if spec is not None:
                outcome = pipeline.build([spec], self._build_fn(store))
                if spec.name not in outcome.builds:
                    raise ReconcileError(
                        f"cannot {op} {spec.name!r}: "
                        f"{outcome.errors.get(spec.name, 'no output')}",
                        hint=f"bstore log {spec.name} shows the build log")
                built.append(outcome.builds[spec.name])
            elif removed is None:
                raise ReconcileError(f"nothing to {op}")
            commit = active.commit if active is not None else None
            manifest = merge_manifest(store, active, kept, built, commit=commit)
            result = pipeline.activate_manifest(manifest)
            if result.ok:
                state = self._state()
                manual = dict(state.get("manual") or {})
                manual[name] = {"op": op, "at": now_iso()}
                self._save_state({**state, "manual": manual})
                self._memo.idle_key = None
            new_active = self._active(store, pipeline)
            status = self._make_status(pipeline, new_active, self.activator.current_state(),
                                       self.status().tip_commit, failed={},
                                       quarantine=self.quarantine(), activation=result,
                                       reverted=None)
            write_status(self.gitops_dir, status)
            return result

    def rollback(self, to: int | None = None, *, wait: bool = True) -> ActivationResult:
        """Switch back to generation ``to`` (default: the one before the current) and
        activate it with the pipeline (health-checked; a failure switches back), under the
        reconcile lock (``wait=False``: :class:`ReconcileBusy` if a pass holds it); then
        rewrite the status from what is active. The apps it changed are noted as a manual
        ``rollback``: the next pass re-applies the repository's tip, which is why the
        daemon suspends its loop after one. :class:`ProfileError` names a missing ``to``."""
        with self.locked(wait=wait), LocalStore.open(self.root) as store:
            pipeline = self._pipeline(store)
            pipeline.recover()
            profile = pipeline.profile
            current = profile.current_number()
            if to is None:
                to = None if current is None else profile.previous_number(current)
                if to is None:
                    raise ProfileError(
                        f"profile {profile.name!r} has no generation before"
                        f" {current if current is not None else 'none'} to roll back to",
                        hint="bstore generations lists them")
            else:
                profile.get(to)  # a missing number is a ProfileError naming it
            with self.events.span("bstore.rollback", manual=True, from_generation=current,
                                  to_generation=to) as span:
                result = pipeline.activate_generation(to)
                span.set(result="ok" if result.ok else "failed")
            self._memo.idle_key = None
            if result.ok:
                state = self._state()
                manual = dict(state.get("manual") or {})
                at = now_iso()
                manual.update({a.app: {"op": "rollback", "at": at, "generation": to}
                               for a in result.actions if a.kind is not ActionKind.KEEP})
                self._save_state({**state, "manual": manual})
            active = self._active(store, pipeline)
            status = self._make_status(pipeline, active, self.activator.current_state(),
                                       self.status().tip_commit, failed={},
                                       quarantine=self.quarantine(), activation=result,
                                       reverted=None)
            if result.ok:
                tip = status.tip_commit
                status = status.with_(
                    last_commit=active.commit if active is not None else None,
                    notes=(*status.notes, f"rolled back by hand to generation {to}: the apps"
                           f" run generation {to}; the next reconcile re-applies "
                           + (f"commit {tip[:12]}" if tip else "the repository")
                           + " unless the loop is suspended (bstore daemon suspends it;"
                           " POST /resume follows git again)"))
            write_status(self.gitops_dir, status)
            return result
