"""The activation pipeline shared by ``bstore activate`` and the GitOps reconciler.

build (realise) → generation → switch (journaled, with the activator as the switch hook)
→ health (each acted-on app until healthy or its spec's timeout) → keep, or switch back
to the previous generation and re-activate it.

::

    pipeline = Pipeline(store, "default", activator, events=bus)
    pipeline.recover()                        # finish/revert a switch a kill interrupted
    outcome = pipeline.build(specs)           # realise what is not in the store yet
    result = pipeline.activate(outcome.builds.values(), commit=sha)
    result.ok, result.generation, result.rolled_back_to, result.failed

Building is a :data:`BuildFn` (specs → :class:`BuildOutcome`), so tests and callers with
outputs at hand skip the realiser; :func:`realise_builder` is the real one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bstore.activators.base import ActivationFailed, Activator, HealthResult
from bstore.activators.plan import Action, ActionKind, render_plan
from bstore.errors import BstoreError
from bstore.events import EventBus, default_bus
from bstore.generations.failed import clear_failed, failed_number, mark_failed
from bstore.generations.generation import (
    AppBuild,
    generation_path,
    load_generation,
    make_manifest,
)
from bstore.generations.journal import Outcome, Recovery, recover
from bstore.generations.manifest import GenerationManifest
from bstore.generations.profiles import GenerationLink, Profile
from bstore.generations.switch import SwitchResult, commit_generation, switch_to_number
from bstore.specs.model import AppSpec
from bstore.store.local import LocalStore

#: Seconds an app without a health spec gets to become healthy (the seed's default).
DEFAULT_HEALTH_TIMEOUT = 5.0
#: Pause between two health probes of one app while waiting for it.
HEALTH_POLL = 0.1
#: Actions after which an app must prove itself healthy.
_CHECKED = (ActionKind.START, ActionKind.RESTART, ActionKind.RELOAD, ActionKind.RECONFIGURE)


class ActivationError(BstoreError):
    """An activation that could not run (as opposed to one that ran and failed)."""


@dataclass(frozen=True)
class BuildOutcome:
    """What building a set of specs gave: an :class:`AppBuild` per app that has an
    output, the error of each app that has none, and which derivations were built or
    found valid; of those found, which came from a binary cache (``substituted``), and
    the cache trouble met on the way (never fatal: the realiser built instead)."""

    builds: Mapping[str, AppBuild]
    errors: Mapping[str, str] = field(default_factory=dict)
    built: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    substituted: tuple[str, ...] = ()
    cache_errors: tuple[str, ...] = ()


#: Builds specs into store outputs (the realiser, or a test double).
BuildFn = Callable[[Sequence[AppSpec]], BuildOutcome]


def realise_builder(store: LocalStore, *, hex_repos: Any = None, jobs: int | None = None,
                    events: EventBus | None = None,
                    substituters: Sequence[str] = (), trusted_keys: Sequence[str] = (),
                    mesh_peers: Sequence[str] = (),
                    log: Callable[[str], None] = lambda _m: None) -> BuildFn:
    """A :data:`BuildFn` running the realiser on ``store``, ``jobs`` derivations at a time
    (default: one per core), emitting ``bstore.build.start|stop`` per derivation.

    Outputs a trusted cache among ``substituters`` has are fetched, not built; mesh
    sources come from ``mesh_peers``.
    """
    bus = events or default_bus

    def build(specs: Sequence[AppSpec]) -> BuildOutcome:
        import httpx

        from bstore.builders.hex.repos import Repos
        from bstore.builders.realise import AppState, Progress, Realiser
        from bstore.builders.sources import Fetcher

        if not specs:
            return BuildOutcome({})
        started: dict[str, float] = {}
        lock = threading.Lock()

        def on_start(label: str) -> None:
            with lock:
                started[label] = time.monotonic()
            bus.emit("bstore.build.start", {"system_time": time.time()}, derivation=label)

        def on_finish(label: str, state: str) -> None:
            with lock:
                t0 = started.pop(label, time.monotonic())
            bus.emit("bstore.build.stop", {"duration": (time.monotonic() - t0) * 1000.0},
                     derivation=label, result=state)

        subs = None
        if substituters:
            from bstore.store.cache.binary_cache import Substituters
            from bstore.store.signing import TrustedKeys

            subs = Substituters(list(substituters), TrustedKeys.parse(list(trusted_keys)))
        try:
            with httpx.Client(trust_env=False) as client:
                fetcher = Fetcher(store, client, hex_repos=hex_repos or Repos(),
                                  mesh_peers=tuple(mesh_peers), log=log)
                realiser = Realiser(fetcher, progress=Progress(on_start=on_start,
                                                               on_finish=on_finish),
                                    substituters=subs, log=log)
                report = realiser.build(list(specs), jobs=jobs or os.cpu_count() or 1,
                                        keep_going=True)
        finally:
            # Each pass makes its own caches: their kept-alive connections must not
            # outlive it (a daemon would hold them until a garbage collection).
            if subs is not None:
                subs.close()
        if subs is not None:
            for error in subs.report.errors:
                log(f"substituter: {error}")
        by_name = {s.name: s for s in specs}
        builds: dict[str, AppBuild] = {}
        errors: dict[str, str] = {}
        for name, app in report.apps.items():
            if app.state in (AppState.BUILT, AppState.SKIPPED) and app.output is not None:
                builds[name] = AppBuild(by_name[name], store.parse_path(app.output))
            else:
                errors[name] = app.error or app.state.value
        return BuildOutcome(builds, errors, report.built, report.skipped,
                            report.substituted,
                            tuple(subs.report.errors) if subs is not None else ())

    return build


@dataclass(frozen=True)
class ActivationResult:
    """Where an activation left the profile.

    ``generation``: the generation now current; ``attempted``: the one that was tried
    (equal to ``generation`` on success); ``rolled_back_to``: set when the attempt failed
    and the profile was switched back; ``failed``: app → why; ``health``: the last check
    of every app checked. A failed FIRST generation has nothing to switch back to: the
    profile stays on it, ``rolled_back_to`` is None and the activator stops what the
    attempt started."""

    profile: str
    ok: bool
    generation: int | None
    previous: int | None
    attempted: int | None
    reused: bool = False
    actions: tuple[Action, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)
    health: Mapping[str, HealthResult] = field(default_factory=dict)
    rolled_back_to: int | None = None
    error: str | None = None
    recovered: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "profile": self.profile, "ok": self.ok, "generation": self.generation,
            "previous": self.previous, "attempted": self.attempted, "reused": self.reused,
            "actions": [a.to_json() for a in self.actions], "failed": dict(self.failed),
            "health": {k: v.to_json() for k, v in self.health.items()},
            "rolled_back_to": self.rolled_back_to, "error": self.error,
            "recovered": self.recovered,
        }


class Pipeline:
    """Activates generations of one profile with one activator (see the module doc).

    ``activator=None`` switches links only (no apps are touched, no health checks).
    ``health_timeout`` is the wait for apps whose spec has no health timeout.
    """

    def __init__(self, store: LocalStore, profile: str, activator: Activator | None, *,
                 events: EventBus | None = None,
                 echo: Callable[[str], None] | None = None,
                 health_timeout: float = DEFAULT_HEALTH_TIMEOUT) -> None:
        self.store = store
        self.profile = Profile(store, profile)
        self.activator = activator
        self.events = events or default_bus
        self.echo = echo
        self.health_timeout = health_timeout
        self._last_actions: list[Action] = []
        self._last_health: dict[str, HealthResult] = {}
        self._failure: dict[str, str] = {}
        # Manifests already in hand by store path: a generation of 1,000 apps takes
        # ~0.15 s to read back, and the switch hook reads the old and the new one.
        self._known: dict[str, GenerationManifest] = {}

    def remember(self, manifest: GenerationManifest) -> None:
        """Let the switch hook use ``manifest`` instead of reading it from the store."""
        self._known[str(generation_path(self.store, manifest))] = manifest

    def load_manifest(self, link: GenerationLink) -> GenerationManifest:
        """The manifest of ``link`` (from memory when :meth:`remember` was told it)."""
        known = self._known.get(str(link.store_path))
        if known is not None and self.store.is_valid(link.store_path):
            return known
        return load_generation(self.store, link.store_path)

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Finish (re-running the activation) or revert a switch an earlier bstore was
        killed in; run before anything else touches the profile."""
        with self.profile.locked():
            return recover(self.profile, self._hook if self.activator else None)

    # -- build ---------------------------------------------------------------------------

    def build(self, specs: Sequence[AppSpec], builder: BuildFn | None = None) -> BuildOutcome:
        """Realise ``specs`` (or run ``builder``), inside a ``bstore.build`` span."""
        fn = builder or realise_builder(self.store, events=self.events)
        with self.events.span("bstore.build", apps=len(specs)) as span:
            outcome = fn(specs)
            span.set(built=len(outcome.built), skipped=len(outcome.skipped),
                     failed=sorted(outcome.errors))
        return outcome

    # -- activation ----------------------------------------------------------------------

    def activate(self, builds: Iterable[AppBuild], *, commit: str | None = None
                 ) -> ActivationResult:
        """Make a generation of ``builds`` current and running; roll back on failure."""
        manifest = make_manifest(self.store, list(builds), commit=commit)
        return self.activate_manifest(manifest)

    def activate_manifest(self, manifest: GenerationManifest) -> ActivationResult:
        """Like :meth:`activate` for a manifest made by the caller."""
        previous = self.profile.current()
        self.remember(manifest)
        if (previous is not None and self.activator is not None
                and failed_number(self.profile) == previous.number
                and generation_path(self.store, manifest) == previous.store_path):
            return self._retry_failed(previous)
        return self._run(previous, lambda hook: commit_generation(
            self.profile, manifest, hook=hook, finish=hook))

    def _retry_failed(self, current: GenerationLink) -> ActivationResult:
        """Activate the failed first generation again (the same content was asked for:
        the switch would reuse it without running anything); a failure stops it again."""
        self._last_actions, self._last_health, self._failure = [], {}, {}
        n = current.number
        try:
            self._hook(None, current)
        except ActivationFailed as exc:
            self._roll_back(None, n, exc.message)
            return ActivationResult(
                self.profile.name, False, n, n, n, actions=tuple(self._last_actions),
                failed=self._failed_of(exc), health=dict(self._last_health),
                error=exc.message)
        clear_failed(self.profile)
        return ActivationResult(self.profile.name, True, n, n, n,
                                actions=tuple(self._last_actions),
                                health=dict(self._last_health))

    def activate_generation(self, number: int) -> ActivationResult:
        """Make the existing generation ``number`` current and running (``--generation``)."""
        previous = self.profile.current()
        return self._run(previous, lambda hook: switch_to_number(
            self.profile, number, hook=hook, finish=hook, operation="activate"))

    def heal(self) -> ActivationResult:
        """Re-apply the current generation against what runs (crashed or unhealthy apps
        are restarted, strays stopped): the drift healing of a pass with no change."""
        current = self.profile.current()
        if current is None or self.activator is None or \
                failed_number(self.profile) == current.number:
            # A failed first generation runs nothing: healing it would restart what its
            # rollback stopped (and a crash-looping app every pass).
            n = None if current is None else current.number
            return ActivationResult(self.profile.name, True, n, n, n, reused=True)
        self._last_actions, self._last_health = [], {}
        try:
            self._hook(current, current)
        except BstoreError as exc:
            return ActivationResult(
                self.profile.name, False, current.number, current.number, current.number,
                reused=True, actions=tuple(self._last_actions),
                failed=self._failed_of(exc), health=dict(self._last_health),
                error=exc.message)
        return ActivationResult(self.profile.name, True, current.number, current.number,
                                current.number, reused=True,
                                actions=tuple(self._last_actions),
                                health=dict(self._last_health))

    def _run(self, previous: GenerationLink | None,
             switch: Callable[[Any], SwitchResult]) -> ActivationResult:
        self._last_actions, self._last_health, self._failure = [], {}, {}
        hook = self._hook if self.activator is not None else None
        prev_n = previous.number if previous else None
        try:
            result = switch(hook)
        except ActivationFailed as exc:
            attempted = self._attempted_number(prev_n)
            back = self._roll_back(previous, attempted, exc.message)
            current = self.profile.current_number()
            if self.activator is not None and current is not None and (
                    previous is None or failed_number(self.profile) == current):
                # Nothing to go back to: the failed generation stays current, and must
                # not be run again by a heal or a host node reboot.
                mark_failed(self.profile, current)
            return ActivationResult(
                self.profile.name, False, back, prev_n, attempted,
                actions=tuple(self._last_actions), failed=self._failed_of(exc),
                health=dict(self._last_health), rolled_back_to=back, error=exc.message)
        if self.activator is not None:
            clear_failed(self.profile)
        recovered = (result.recovered.describe()
                     if result.recovered.outcome is not Outcome.NONE else None)
        return ActivationResult(
            self.profile.name, True, result.current.number, prev_n, result.current.number,
            reused=result.reused, actions=tuple(self._last_actions),
            health=dict(self._last_health), recovered=recovered)

    def _failed_of(self, exc: BstoreError) -> dict[str, str]:
        return dict(self._failure) or {"*": exc.message}

    def _attempted_number(self, prev: int | None) -> int | None:
        numbers = self.profile.numbers()
        above = [n for n in numbers if prev is None or n > prev]
        return max(above) if above else None

    def _roll_back(self, previous: GenerationLink | None, attempted: int | None,
                   reason: str) -> int | None:
        """The switch put the old link back; make the running apps match it again."""
        to = previous.number if previous else None
        with self.events.span("bstore.rollback", from_generation=attempted,
                              to_generation=to, reason=reason) as span:
            if self.activator is None or attempted is None:
                return to
            new = self.load_manifest(self.profile.get(attempted))
            # Back to a failed first generation is back to nothing running.
            old = (self.load_manifest(previous) if previous is not None
                   and failed_number(self.profile) != previous.number
                   else GenerationManifest.of([], {}))
            actions = self.activator.plan(new, old)
            if self.echo is not None:
                self.echo(render_plan(actions, f"rollback plan, generation {attempted} ->"
                                      f" {to if to is not None else 'none'}"))
            applied = self.activator.apply(actions)
            span.set(result="ok" if applied.ok else "failed", failed=applied.failed)
            if not applied.ok:
                self._failure.update({f"rollback:{k}": v for k, v in applied.failed.items()})
        return to

    def _hook(self, old: GenerationLink | None, new: GenerationLink) -> None:
        """The switch hook: plan, apply, then wait for each acted-on app to be healthy."""
        assert self.activator is not None
        old_manifest = None if old is None else self.load_manifest(old)
        new_manifest = self.load_manifest(new)
        actions = self.activator.plan(old_manifest, new_manifest)
        self._last_actions = list(actions)
        if self.echo is not None and any(a.kind is not ActionKind.KEEP for a in actions):
            span = f"{old.number if old else 'none'} -> {new.number}"
            self.echo(render_plan(actions, f"activation plan ({self.activator.name}),"
                                  f" generation {span}"))
        applied = self.activator.apply(actions)
        if not applied.ok:
            self._failure = dict(applied.failed)
            reasons = "; ".join(f"{app}: {why}" for app, why in applied.failed.items())
            raise ActivationFailed(f"activation of generation {new.number} failed: {reasons}",
                                   hint="the profile was switched back to the previous"
                                   " generation; see the app logs (bstore node logs)")
        unhealthy = self._wait_healthy(new_manifest, actions)
        if unhealthy:
            self._failure = unhealthy
            reasons = "; ".join(f"{app}: {why}" for app, why in unhealthy.items())
            raise ActivationFailed(
                f"generation {new.number}: not healthy in time: {reasons}",
                hint="the profile was switched back to the previous generation; fix the"
                " app or its health spec and commit again")

    def _wait_healthy(self, manifest: GenerationManifest,
                      actions: Sequence[Action]) -> dict[str, str]:
        """Probe every app an action touched until healthy or its timeout; app → why not."""
        assert self.activator is not None
        pending = {a.app for a in actions if a.kind in _CHECKED and a.app in manifest.apps}
        deadlines = {}
        now = time.monotonic()
        for name in pending:
            spec = manifest.apps[name].health
            timeout = spec.timeout / 1000.0 if spec is not None else self.health_timeout
            deadlines[name] = now + timeout
        unhealthy: dict[str, str] = {}
        while pending:
            for name in sorted(pending):
                started = time.monotonic()
                try:
                    result = self.activator.health(name)
                except BstoreError as exc:
                    result = HealthResult(name, False, exc.message)
                self.events.emit("bstore.health.check",
                                 {"duration": (time.monotonic() - started) * 1000.0},
                                 app=name, result="healthy" if result.healthy else "unhealthy",
                                 detail=result.detail)
                self._last_health[name] = result
                if result.healthy:
                    pending.discard(name)
                elif time.monotonic() >= deadlines[name]:
                    pending.discard(name)
                    unhealthy[name] = f"unhealthy: {result.detail or 'no detail'}"
            if pending:
                time.sleep(HEALTH_POLL)
        return unhealthy
