"""Helpers for reconciler tests: a specs repo, a fast builder double that registers real
store outputs, dry-run activators that can be told to crash or be unhealthy, and an
event recorder."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import blake3
from gitrepos import GitRemote

from bstore.activation import BuildFn, BuildOutcome
from bstore.activators.base import ActivatorContext, ApplyResult, HealthResult
from bstore.activators.dryrun import DryRunActivator
from bstore.activators.plan import Action, AppStatus, RunningState
from bstore.events import Event, EventBus
from bstore.generations.generation import AppBuild
from bstore.gitops.config import Config
from bstore.gitops.reconciler import Reconciler
from bstore.specs.model import AppSpec
from bstore.store.local import LocalStore
from bstore.store.paths import PathKind


def spec_yaml(name: str, version: str = "1.0.0", *, env: Mapping[str, object] | None = None,
              depends_on: Sequence[str] = (), health_timeout: int | None = None,
              isolation: str | None = None) -> str:
    """An ``app.yaml`` (hex source by default)."""
    lines = [f"name: {name}", f"version: '{version}'"]
    if env:
        lines.append("env:")
        lines += [f"  {k}: {v!r}" if isinstance(v, str) else f"  {k}: {v}"
                  for k, v in env.items()]
    if depends_on:
        lines.append(f"depends_on: [{', '.join(depends_on)}]")
    if health_timeout is not None:
        lines.append(f"health: {{type: tcp, port: 1, timeout: {health_timeout}}}")
    if isolation is not None:
        lines.append(f"isolation: {isolation}")
    return "\n".join(lines) + "\n"


def app_files(**apps: str | None) -> dict[str, str | None]:
    """``{"apps/<name>/app.yaml": text}`` for each app (None deletes it)."""
    return {f"apps/{name}/app.yaml": text for name, text in apps.items()}


def erlc_git_app(root: Path, name: str, greeting: str = "hi") -> Path:
    """A plain erlc OTP app (application callback + empty supervisor, so it is really
    started) with ``<name>:greeting()``, committed in its own git repository."""
    import subprocess

    d = root / name
    (d / "src").mkdir(parents=True)
    (d / "src" / f"{name}.app.src").write_text(
        f'{{application, {name}, [{{vsn, "0.0.0"}}, {{modules, []}}, {{registered, []}},\n'
        f"  {{applications, [kernel, stdlib]}}, {{mod, {{{name}, []}}}}]}}.\n")
    (d / "src" / f"{name}.erl").write_text(
        f"-module({name}).\n-behaviour(application).\n-behaviour(supervisor).\n"
        "-export([start/2, stop/1, init/1, greeting/0]).\n"
        f"start(_T, _A) -> supervisor:start_link({{local, {name}_sup}}, ?MODULE, []).\n"
        "stop(_S) -> ok.\n"
        "init([]) -> {ok, {#{strategy => one_for_one}, []}}.\n"
        f'greeting() -> "{greeting}".\n')
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": str(d),
           "PATH": "/usr/bin:/bin"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "v1"]):
        subprocess.run(["git", "-C", str(d), *args], check=True, capture_output=True,
                       env=env)
    return d


def git_spec_text(name: str, version: str, url: str, *, extra: str = "") -> str:
    """An ``app.yaml`` whose source is the git repository at ``url`` (branch main)."""
    return (f"name: {name}\nversion: '{version}'\n"
            f"source: {{type: git, url: '{url}', ref: main}}\n{extra}")


class FakeBuilder:
    """Registers a real OUTPUT path per spec (``lib/<name>-<vsn>/ebin/<name>.app`` and a
    stand-in ``.beam`` whose bytes depend on the version and source), like a build.
    ``fail`` names apps whose build fails; ``gate`` (when set) is waited on first."""

    def __init__(self) -> None:
        self.built: list[str] = []
        self.fail: set[str] = set()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, store: LocalStore) -> BuildFn:
        def build(specs: Sequence[AppSpec]) -> BuildOutcome:
            self.entered.set()
            if self.gate is not None:
                self.gate.wait(60)
            builds: dict[str, AppBuild] = {}
            errors: dict[str, str] = {}
            for spec in specs:
                if spec.name in self.fail:
                    errors[spec.name] = f"compile error in {spec.name} (test)"
                    continue
                self.built.append(f"{spec.name}-{spec.version}")
                builds[spec.name] = AppBuild(spec, register(store, spec))
            return BuildOutcome(builds, errors, tuple(f"{s}" for s in builds))
        return build


def register(store: LocalStore, spec: AppSpec) -> object:
    """The output of ``spec`` (registered once; the same spec gives the same path)."""
    from bstore.store.paths import StorePath

    ident = f"{spec.name}\0{spec.version}\0{spec.source!r}"
    digest = blake3.blake3(ident.encode()).hexdigest()
    with store.staging_dir("test-out") as stage:
        tree = stage / "out"
        ebin = tree / "lib" / f"{spec.name}-{spec.version}" / "ebin"
        ebin.mkdir(parents=True)
        (ebin / f"{spec.name}.beam").write_bytes(b"FOR1 " + ident.encode())
        (ebin / f"{spec.name}.app").write_text(
            f'{{application,{spec.name},[{{vsn,"{spec.version}"}},'
            f"{{modules,[{spec.name}]}}]}}.\n")
        sp: StorePath = store.register_tree(tree, f"{spec.name}-{spec.version}",
                                            kind=PathKind.OUTPUT, hash_hex=digest)
    return sp


class TestActivator(DryRunActivator):
    """The dry-run activator plus: apps that are never healthy, and crashing an app."""

    __test__ = False

    def __init__(self, context: ActivatorContext) -> None:
        super().__init__(context, initial_state={})
        self.unhealthy: set[str] = set()
        self.during_apply: Callable[[], None] | None = None

    def apply(self, actions: Sequence[Action]) -> ApplyResult:
        if self.during_apply is not None:
            self.during_apply()
        return super().apply(actions)

    def health(self, app: str) -> HealthResult:
        if app in self.unhealthy:
            return HealthResult(app, False, "HTTP 500 from /health (test)")
        return super().health(app)

    def crash(self, app: str) -> None:
        """What a crashed app looks like to the activator."""
        assert self._state is not None
        old = self._state[app]
        self._state[app] = replace(old, status=AppStatus.FAILED, healthy=None,
                                   reason="crashed (test)")

    def running(self) -> dict[str, RunningState]:
        """The simulated state."""
        return dict(self._state or {})


class Recorder:
    """Every event of a bus, by name."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        bus.attach("*", self.events.append)

    def names(self, prefix: str = "bstore.") -> list[str]:
        """Event names in order (those starting with ``prefix``)."""
        return [e.name for e in self.events if e.name.startswith(prefix)]

    def of(self, name: str) -> list[Event]:
        """Events named ``name``."""
        return [e for e in self.events if e.name == name]

    def clear(self) -> None:
        """Forget what was recorded."""
        self.events.clear()


class World:
    """A repo, a state root, a reconciler with the test activator and builder."""

    def __init__(self, tmp: Path, **config: object) -> None:
        self.remote = GitRemote(tmp / "git")
        self.root = tmp / "state"
        self.bus = EventBus()
        self.recorder = Recorder(self.bus)
        self.builder = FakeBuilder()
        self.activator = TestActivator(ActivatorContext(self.root, "p"))
        self.config_kw: dict[str, object] = {"repo_url": self.remote.url, "profile": "p",
                                             "activator": "dry-run", **config}
        self.reconciler = self.make()

    def make(self, **overrides: object) -> Reconciler:
        """A reconciler over this world's state (shares activator, builder and bus)."""
        config = Config(**{**self.config_kw, **overrides})  # type: ignore[arg-type]
        return Reconciler(config, self.root, activator=self.activator, events=self.bus,
                          builder=self.builder)

    def push(self, files: Mapping[str, str | None], message: str = "change") -> str:
        """Commit ``files`` and push; returns the commit."""
        commit = self.remote.commit(files, message)
        self.remote.push()
        return commit

    def versions(self) -> dict[str, str | None]:
        """App → version the activator runs."""
        return {n: s.version for n, s in self.activator.running().items()
                if s.status is AppStatus.RUNNING}


def kinds(actions: Iterable[object]) -> list[tuple[str, str]]:
    """``(kind, app)`` of every activation action that is not ``keep``."""
    return [(a.kind.value, a.app) for a in actions  # type: ignore[attr-defined]
            if a.kind.value != "keep"]  # type: ignore[attr-defined]


Callback = Callable[[], None]
