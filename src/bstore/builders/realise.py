"""From app specs to store paths: plan the derivation graph, then realise it.

:meth:`Realiser.plan` fetches every app's source (:mod:`.sources`), detects its build
system, reads the Hex dependencies it declares (:mod:`.declared_deps`, honouring a
``rebar.lock``/``mix.lock``), resolves them against the verified registries and makes a
:class:`~bstore.builders.derivation.Derivation` for the app and for every package of the
resolution. A package's derivation names its own source, builder and its dependencies'
output paths, so the same package version with the same dependencies is the same
derivation (one node, one build) for every app that uses it.

:meth:`Realiser.realise` runs the graph with :func:`~.scheduler.run_graph`, N at a time,
dependencies first. A node whose output path is already valid is skipped (no compiler
runs). Otherwise it is built in a store staging dir by
:func:`~bstore.builders.buildsystems.build` (``release`` sources: the tree is copied
as-is) and registered as an OUTPUT path whose digest is the derivation hash, with its
direct dependencies' outputs as references and the derivation hash as deriver.

On disk (under the state root):

- ``derivations/<drv-hash>.json``: the canonical JSON of every derivation realised here
  (kept beside the store, not inside the output, so two derivations that build
  byte-identical trees also give identical MCIDs: the early cutoff stays visible);
- ``logs/<drv-hash>.log``: the build log (kept after success and failure), plus links
  ``logs/by-app/<app>.log`` and ``logs/by-path/<digest>-<name>.log`` for ``bstore log``.

Everything a build relies on (sources, dependency outputs) is a temporary GC root of the
open store before the build starts, so a concurrent GC cannot remove it mid-build.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bstore.builders.buildsystems import DepLib, build, detect_build_system
from bstore.builders.declared_deps import read_declared_deps
from bstore.builders.derivation import Derivation, canonical_json
from bstore.builders.hex.registry import package_lookup
from bstore.builders.hex.resolve import Requested, Resolution, Resolved, resolve
from bstore.builders.report import (
    AppResult,
    AppState,
    BuildReport,
    Progress,
    RealiseError,
)
from bstore.builders.sandbox import BuildError, Isolation, read_log_tail
from bstore.builders.scheduler import JobState, SchedulerHooks, run_graph
from bstore.builders.sources import FetchedSource, Fetcher
from bstore.builders.toolchain import Toolchain, detect_toolchain
from bstore.errors import BstoreError
from bstore.specs.model import AppSpec, SourceSpec, SourceType
from bstore.store.cache.binary_cache import Substituters
from bstore.store.paths import PathKind, StorePath

__all__ = [
    "AppResult",
    "AppState",
    "BuildPlan",
    "BuildReport",
    "DerivationFailed",
    "Node",
    "Progress",
    "RealiseError",
    "Realiser",
    "log_for",
]

#: Wall-clock bound of one build (seconds): a hung compiler must not hang a reconcile.
DEFAULT_BUILD_TIMEOUT = 1800.0
#: What every build sees on top of the sandbox's whitelist (recorded in the derivation).
BUILD_ENV: Mapping[str, str] = {"MIX_ENV": "prod"}


class DerivationFailed(RealiseError):
    """One derivation's build failed: names it, its log, and the log's tail."""

    def __init__(self, node: Node, log_path: Path, cause: BstoreError) -> None:
        super().__init__(
            f"building {node.label} (derivation {node.key}) failed: {cause.message}",
            hint=f"the full log is {str(log_path)!r} (bstore log {node.drv.name})",
        )
        self.node = node
        self.log_path = log_path
        self.log_tail = read_log_tail(log_path) if log_path.exists() else ""


@dataclass(frozen=True)
class Node:
    """One derivation of the plan, with where its inputs are."""

    drv: Derivation
    out: StorePath
    source: StorePath
    deps: tuple[str, ...]
    apps: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The derivation hash."""
        return self.drv.hash_hex

    @property
    def label(self) -> str:
        """``<name>-<version>``."""
        return self.drv.output_name


@dataclass(frozen=True)
class AppPlan:
    """What one app needs: its node (``None`` when planning failed) and its resolution."""

    name: str
    version: str
    key: str | None
    source: Mapping[str, str] = field(default_factory=dict)
    resolution: Resolution | None = None
    lock_file: str | None = None
    error: BstoreError | None = None


@dataclass(frozen=True)
class BuildPlan:
    """The derivation graph of a set of apps."""

    nodes: Mapping[str, Node]
    apps: Mapping[str, AppPlan]

    def graph(self) -> dict[str, list[str]]:
        """Node key → the keys it depends on (for the scheduler)."""
        return {key: list(node.deps) for key, node in self.nodes.items()}

    def closure(self, key: str) -> list[str]:
        """``key``'s dependencies, transitively (without ``key``), in a stable order."""
        seen: dict[str, None] = {}
        stack = list(self.nodes[key].deps)
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen[dep] = None
                stack.extend(self.nodes[dep].deps)
        return sorted(seen, key=lambda k: self.nodes[k].label)


def _source_view(fetched: FetchedSource) -> dict[str, str]:
    """The source part of a derivation: what the content is, not where it came from
    (a mirror URL must not change the output path), plus the content-addressed path."""
    view = {k: v for k, v in fetched.identity.items() if k != "url"}
    view["path"] = str(fetched.path)
    return view


def _atomic_symlink(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def log_for(root: Path, what: str) -> Path:
    """The kept build log of an app name, an output base name (``<digest>-<name>``) or a
    derivation hash under the state ``root`` (``bstore log``); :class:`RealiseError`
    when there is none."""
    logs = root / "logs"
    if "/" in what or what.startswith(".") or not what:
        raise RealiseError(f"{what!r} is not an app name, store path base name or"
                           " derivation hash")
    for candidate in (logs / "by-app" / f"{what}.log", logs / "by-path" / f"{what}.log",
                      logs / f"{what}.log"):
        if candidate.is_file():
            return candidate
    raise RealiseError(f"no build log for {what!r} under {str(logs)!r}",
                       hint="give an app name or an output path built by bstore build")


class Realiser:
    """Plans and realises app specs into one store (see the module doc).

    ``fetcher`` brings sources (and holds the store and its lock); ``toolchain``
    defaults to the one on ``$PATH``; ``isolation`` overrides the sandbox (tests);
    ``timeout`` bounds each build; setting ``cancel`` kills running builds.
    """

    def __init__(self, fetcher: Fetcher, *, toolchain: Toolchain | None = None,
                 timeout: float = DEFAULT_BUILD_TIMEOUT, isolation: Isolation | None = None,
                 cancel: threading.Event | None = None,
                 progress: Progress | None = None,
                 substituters: Substituters | None = None,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.fetcher = fetcher
        #: Binary caches asked for an output before it is built (one object for the
        #: whole run, so its negative-lookup cache and down-cache memory carry over).
        self.substituters = substituters
        self.store = fetcher.store
        self.lock = fetcher.lock
        self.toolchain = toolchain or detect_toolchain()
        self.timeout = timeout
        self.isolation = isolation
        self.cancel = cancel
        self.progress = progress or Progress()
        self.log = log
        self.root = self.store.root
        self.logs_dir = self.root / "logs"
        self.drv_dir = self.root / "derivations"
        #: Output base names built (compiled or copied) by this realiser, in order.
        self.builds: list[str] = []
        self._skipped: set[str] = set()
        self._substituted: set[str] = set()
        self._plan_jobs = 1
        self._package_errors: dict[tuple[str, str, str], BstoreError] = {}

    # -- planning ------------------------------------------------------------------------

    def plan(self, specs: Iterable[AppSpec], *, jobs: int = 1) -> BuildPlan:
        """The derivation graph of ``specs``. An app whose source, dependencies or build
        system cannot be worked out gets an :class:`AppPlan` with ``error`` (the others
        are planned regardless). The apps' own sources are fetched ``jobs`` at a time."""
        specs = list(specs)
        nodes: dict[str, Node] = {}
        apps: dict[str, AppPlan] = {}
        lookup = package_lookup(self.fetcher.client, self.fetcher.hex_repos,
                                policy=self.fetcher.policy)
        packages: dict[tuple[str, ...], str] = {}
        fingerprint = self.toolchain.fingerprint()
        prefetched = self._prefetch(specs, jobs)
        self._plan_jobs = jobs
        self._package_errors.clear()
        for spec in specs:
            try:
                apps[spec.name] = self._plan_app(spec, nodes, packages, lookup, fingerprint,
                                                 prefetched.get(spec.name))
            except BstoreError as exc:
                apps[spec.name] = AppPlan(spec.name, spec.version, None, error=exc)
        return BuildPlan(nodes, apps)

    def _prefetch(self, specs: list[AppSpec], jobs: int
                  ) -> dict[str, FetchedSource | BstoreError]:
        """Fetch the git and release sources of ``specs`` in parallel (remote fetches
        dominate a cold plan); errors are kept for :meth:`_plan_app` to report."""
        wanted = [s for s in specs if s.source.type in (SourceType.GIT, SourceType.RELEASE)]

        def one(spec: AppSpec) -> FetchedSource | BstoreError:
            try:
                return self.fetcher.fetch(spec.source, name=spec.name, version=spec.version)
            except BstoreError as exc:
                return exc

        if jobs <= 1 or len(wanted) <= 1:
            return {s.name: one(s) for s in wanted}
        with ThreadPoolExecutor(max_workers=min(jobs, len(wanted))) as pool:
            return dict(zip([s.name for s in wanted], pool.map(one, wanted), strict=True))

    def _fetch_package(self, r: Resolved) -> FetchedSource:
        failed = self._package_errors.get((r.repository, r.package, r.version))
        if failed is not None:
            raise failed
        return self.fetcher.fetch(
            SourceSpec(SourceType.HEX, ref=r.version, repo=r.repository),
            name=r.package, version=r.version,
            extra={"outer_checksum": r.outer_checksum or "", "inner_checksum": r.inner_checksum},
        )

    def _prefetch_packages(self, resolution: Resolution, jobs: int) -> None:
        """Bring every package of ``resolution`` into the store, ``jobs`` at a time (the
        graph is then built from the fetch cache, in order). Errors surface when the
        package's node is planned."""
        if jobs <= 1 or len(resolution.packages) <= 1:
            return

        def one(r: Resolved) -> None:
            try:
                self._fetch_package(r)
            except BstoreError as exc:
                # Raised again (not fetched twice) when the package's node is planned.
                with self.lock:
                    self._package_errors[(r.repository, r.package, r.version)] = exc

        with ThreadPoolExecutor(max_workers=min(jobs, len(resolution.packages))) as pool:
            list(pool.map(one, resolution.packages))

    def _node(self, nodes: dict[str, Node], drv: Derivation, source: StorePath,
              deps: Iterable[str], app: str | None) -> str:
        key = drv.hash_hex
        old = nodes.get(key)
        names = (*old.apps, app) if old is not None and app else (app,) if app else ()
        nodes[key] = Node(drv, drv.output_path(str(self.store.store_dir)), source,
                          tuple(sorted(set(deps))), tuple(n for n in names if n))
        return key

    def _plan_package(self, r: Resolved, resolution: Resolution, nodes: dict[str, Node],
                      packages: dict[tuple[str, ...], str], lookup: Any,
                      fingerprint: Mapping[str, str], app: str | None) -> str:
        dep_keys = [self._plan_package(resolution.get(d), resolution, nodes, packages,
                                       lookup, fingerprint, None) for d in r.deps]
        memo = (r.repository, r.package, r.version, *dep_keys)
        if memo in packages:
            known = nodes[packages[memo]]
            if app is not None and app not in known.apps:
                nodes[known.key] = Node(known.drv, known.out, known.source, known.deps,
                                        (*known.apps, app))
            return known.key
        fetched = self._fetch_package(r)
        builder = detect_build_system(self.store.real_path(fetched.path))
        drv = Derivation(
            name=r.app, version=r.version, builder=builder, source=_source_view(fetched),
            dependencies=tuple(sorted({str(nodes[k].out) for k in dep_keys})),
            build_env=dict(BUILD_ENV), toolchain=fingerprint,
        )
        key = self._node(nodes, drv, fetched.path, dep_keys, app)
        packages[memo] = key
        return key

    def _plan_app(self, spec: AppSpec, nodes: dict[str, Node],
                  packages: dict[tuple[str, ...], str], lookup: Any,
                  fingerprint: Mapping[str, str],
                  prefetched: FetchedSource | BstoreError | None = None) -> AppPlan:
        source = spec.source
        if source.type is SourceType.HEX:
            pinned = resolve(
                [Requested(spec.name, f"== {source.ref or spec.version}",
                           repository=source.repo or "hexpm")], lookup)
            key = self._plan_package(pinned.get(spec.name), pinned, nodes, packages,
                                     lookup, fingerprint, spec.name)
            return AppPlan(spec.name, spec.version, key, dict(nodes[key].drv.source), pinned)
        if isinstance(prefetched, BstoreError):
            raise prefetched
        fetched = prefetched or self.fetcher.fetch(source, name=spec.name, version=spec.version)
        src_dir = self.store.real_path(fetched.path)
        if source.type is SourceType.RELEASE:
            drv = Derivation(name=spec.name, version=spec.version, builder="release",
                             source=_source_view(fetched), toolchain={})
            key = self._node(nodes, drv, fetched.path, (), spec.name)
            return AppPlan(spec.name, spec.version, key, dict(fetched.identity))
        builder = detect_build_system(src_dir)
        declared = read_declared_deps(src_dir, builder, label=f"{spec.name} source")
        resolution: Resolution | None = None
        dep_keys: list[str] = []
        if declared.requested:
            resolution = resolve(declared.requested, lookup, lock=declared.lock)
            self._prefetch_packages(resolution, self._plan_jobs)
            dep_keys = [self._plan_package(r, resolution, nodes, packages, lookup,
                                           fingerprint, None)
                        for r in resolution.packages]
        view = _source_view(fetched)
        if resolution is not None:
            # Pinned explicitly (the dependency paths imply it, but this is what a user
            # reads when asking why an app was rebuilt).
            view["hex_resolution"] = canonical_json(resolution.to_json()).decode("utf-8")
        drv = Derivation(
            name=spec.name, version=spec.version, builder=builder, source=view,
            dependencies=tuple(sorted({str(nodes[k].out) for k in dep_keys})),
            build_env=dict(BUILD_ENV), toolchain=fingerprint,
        )
        key = self._node(nodes, drv, fetched.path, dep_keys, spec.name)
        return AppPlan(spec.name, spec.version, key, dict(fetched.identity), resolution,
                       declared.lock_file)

    # -- realising -----------------------------------------------------------------------

    def realise(self, plan: BuildPlan, *, jobs: int = 1, keep_going: bool = False) -> BuildReport:
        """Build every node of ``plan`` whose output is not valid yet, ``jobs`` at a time."""
        failed_plans = [a for a in plan.apps.values() if a.error is not None]
        wanted = {a.key for a in plan.apps.values() if a.key is not None}
        graph = plan.graph()
        # Only what the planned apps need (a node of a failed app's partial plan is kept
        # out, though any node an app needs is always in the graph).
        needed: set[str] = set()
        for key in wanted:
            needed.add(key)
            needed.update(plan.closure(key))
        graph = {k: v for k, v in graph.items() if k in needed}
        if failed_plans and not keep_going:
            graph = {}
        self.progress.on_plan(len(graph))
        labels = {k: plan.nodes[k].label for k in graph}
        hooks: SchedulerHooks[str] = SchedulerHooks(
            on_start=lambda k: self.progress.on_start(labels[k]),
            on_finish=lambda k, s: self.progress.on_finish(
                labels[k], "substituted" if k in self._substituted
                else "already valid" if k in self._skipped else s.value),
        )
        outcomes = run_graph(graph, lambda k: self._realise_node(plan, k), jobs=jobs,
                             keep_going=keep_going, hooks=hooks)
        built = tuple(labels[k] for k, o in outcomes.items() if o.state is JobState.DONE
                      and o.result == AppState.BUILT)
        skipped = tuple(labels[k] for k, o in outcomes.items() if o.state is JobState.DONE
                        and o.result == AppState.SKIPPED)
        failed = tuple(labels[k] for k, o in outcomes.items() if o.state is JobState.FAILED)
        substituted = tuple(labels[k] for k in outcomes if k in self._substituted)
        results: dict[str, AppResult] = {}
        for name, app in plan.apps.items():
            results[name] = self._app_result(plan, app, outcomes)
        return BuildReport(results, built, skipped, failed, substituted)

    def _app_result(self, plan: BuildPlan, app: AppPlan, outcomes: Mapping[str, Any]
                    ) -> AppResult:
        resolution = app.resolution.to_json() if app.resolution is not None else None
        if app.error is not None or app.key is None:
            error = app.error or RealiseError(f"app {app.name!r} was not planned")
            return AppResult(app.name, app.version, AppState.FAILED, error=error.message,
                             hint=error.hint, resolution=resolution, exception=error)
        node = plan.nodes[app.key]
        outcome = outcomes.get(app.key)
        log = self.logs_dir / f"{node.key}.log"
        common: dict[str, Any] = {"derivation": node.key, "resolution": resolution,
                  "log": str(log) if log.exists() else None}
        if outcome is None:
            return AppResult(app.name, app.version, AppState.NOT_STARTED,
                             error="not started: another app failed to plan", **common)
        if outcome.state is JobState.DONE:
            return AppResult(app.name, app.version, AppState(outcome.result),
                             output=self.store.full_path(node.out), **common)
        err = outcome.error
        message = err.message if isinstance(err, BstoreError) else (outcome.reason or "failed")
        hint = err.hint if isinstance(err, BstoreError) else None
        state = {JobState.FAILED: AppState.FAILED,
                 JobState.DEPENDENCY_FAILED: AppState.DEPENDENCY_FAILED}.get(
                     outcome.state, AppState.NOT_STARTED)
        if state is AppState.DEPENDENCY_FAILED:
            # The scheduler names the dependency by key; users know it by name-version.
            broken = [plan.nodes[k].label for k in plan.closure(node.key)
                      if k in outcomes and outcomes[k].state is JobState.FAILED]
            message = (f"{node.label} not built: dependency {', '.join(broken)} failed"
                       if broken else f"{outcome.reason}")
            hint = "see the failed dependency's log (bstore log <its output path>)"
        elif state is not AppState.FAILED:
            message = f"{outcome.reason}"
        return AppResult(app.name, app.version, state, error=message, hint=hint,
                         exception=err if state is AppState.FAILED else None, **common)

    def _realise_node(self, plan: BuildPlan, key: str) -> AppState:
        node = plan.nodes[key]
        if self.cancel is not None and self.cancel.is_set():
            raise RealiseError(f"{node.label} not built: the build was cancelled")
        with self.lock:
            if self.store.is_valid(node.out):
                self.store.add_temp_root(node.out)
                self._link_logs(node)
                self._skipped.add(key)
                return AppState.SKIPPED
            # A trusted cache that has the output (verified, signed) saves the build;
            # cache trouble is never fatal, it only means we build.
            if self.substituters is not None and self.substituters.substitute(
                    self.store, node.out):
                self._skipped.add(key)
                self._substituted.add(key)
                return AppState.SKIPPED
            # Inputs first: GC must not take them while we build against them.
            self.store.add_temp_root(node.source)
            for dep in node.deps:
                self.store.add_temp_root(plan.nodes[dep].out)
        log_path = self.logs_dir / f"{key}.log"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        _atomic_write(self.drv_dir / f"{key}.json", node.drv.to_json())
        with open(log_path, "ab") as fh:
            fh.write(f"bstore: building {node.label} (derivation {key}, builder"
                     f" {node.drv.builder})\n".encode())
        self._link_logs(node)
        started = time.monotonic()
        try:
            with self.fetcher.staging(f"build-{node.label}") as stage:
                out = stage / "out"
                self._build_into(plan, node, out, stage / "work", log_path)
                with self.lock:
                    sp = self.store.register_tree(
                        out, node.label, kind=PathKind.OUTPUT, hash_hex=key,
                        references=[plan.nodes[d].out for d in node.deps], deriver=key)
                    self.store.add_temp_root(sp)
        except BuildError as exc:
            raise DerivationFailed(node, log_path, exc) from exc
        except BstoreError as exc:
            with open(log_path, "ab") as fh:
                fh.write(f"bstore: {exc.message}\n".encode())
            raise DerivationFailed(node, log_path, exc) from exc
        if sp != node.out:
            raise RealiseError(f"{node.label} was registered as {str(sp)!r}, expected"
                               f" {str(node.out)!r}")
        with self.lock:
            self.builds.append(node.label)
        self.log(f"built {node.label} in {time.monotonic() - started:.1f} s")
        return AppState.BUILT

    def _build_into(self, plan: BuildPlan, node: Node, out: Path, work: Path,
                    log_path: Path) -> None:
        source_dir = self.store.real_path(node.source)
        if node.drv.builder == "release":
            # A release is already built: its tree is the output, byte for byte.
            try:
                shutil.copytree(source_dir, out, symlinks=True)
            except (OSError, shutil.Error) as exc:
                raise RealiseError(f"cannot copy release {str(source_dir)!r}: {exc}") from exc
            with open(log_path, "ab") as fh:
                fh.write(f"bstore: release tree {str(source_dir)!r} copied as-is\n".encode())
            return
        deps = []
        for dep_key in plan.closure(node.key):
            dep = plan.nodes[dep_key]
            deps.append(DepLib.from_out(self.store.real_path(dep.out), dep.drv.name,
                                        dep.drv.version))
        build(source_dir, out, app_name=node.drv.name, version=node.drv.version, deps=deps,
              toolchain=self.toolchain, work_dir=work, log_path=log_path,
              timeout=self.timeout, build_system=node.drv.builder,
              env=dict(node.drv.build_env), isolation=self.isolation, cancel=self.cancel)

    def _link_logs(self, node: Node) -> None:
        target = self.logs_dir / f"{node.key}.log"
        if not target.exists():
            return
        try:
            for app in node.apps:
                _atomic_symlink(f"../{target.name}", self.logs_dir / "by-app" / f"{app}.log")
            _atomic_symlink(f"../{target.name}", self.logs_dir / "by-path" / f"{node.out}.log")
        except OSError as exc:
            self.log(f"cannot link the log of {node.label}: {exc.strerror}")

    def build(self, specs: Iterable[AppSpec], *, jobs: int = 1,
              keep_going: bool = False) -> BuildReport:
        """:meth:`plan` then :meth:`realise`."""
        return self.realise(self.plan(specs, jobs=jobs), jobs=jobs, keep_going=keep_going)
