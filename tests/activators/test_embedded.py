"""The embedded activator against a real host node and real OTP apps built with erlc:
start, upgrade (only that app restarts), reconfigure (pid kept, config_change called),
reload (state kept), lingering old code (abort, nothing killed), health failures,
blocking, and booting from the profile's current generation after a crash."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acthelpers import (
    AppCompiler,
    AppDef,
    free_port,
    generation,
    http_get,
    read_state,
)

from bstore.activators.base import ActivatorContext, ApplyResult, activation_hook
from bstore.activators.embedded import EmbeddedActivator
from bstore.activators.plan import Action, ActionKind, AppStatus
from bstore.generations.manifest import GenerationManifest
from bstore.generations.profiles import Profile
from bstore.generations.switch import commit_generation
from bstore.specs.model import HealthSpec, HealthType
from bstore.specs.terms.model import Atom
from bstore.store.local import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erl") is None, reason="needs Erlang/OTP"),
]


@pytest.fixture
def act(root: Path, agent_ebin: Path) -> Iterator[EmbeddedActivator]:
    ctx = ActivatorContext(root, "default", {"distribution": "off", "health_timeout": "4",
                                             "health_settle": "0.3"})
    activator = EmbeddedActivator(ctx, agent_ebin=agent_ebin)
    yield activator
    activator.shutdown()


class Gens:
    """Builds manifests for one test."""

    def __init__(self, store: LocalStore, compiler: AppCompiler, work: Path) -> None:
        self.store, self.compiler, self.work = store, compiler, work

    def __call__(self, *apps: AppDef) -> GenerationManifest:
        return generation(self.store, self.compiler, self.work, apps)


@pytest.fixture
def gens(store: LocalStore, compiler: AppCompiler, work: Path) -> Gens:
    return Gens(store, compiler, work)


def activate(act: EmbeddedActivator, old: GenerationManifest | None,
             new: GenerationManifest) -> tuple[list[Action], ApplyResult]:
    actions = act.plan(old, new)
    return actions, act.apply(actions)


def kinds(actions: list[Action]) -> dict[str, ActionKind]:
    return {a.app: a.kind for a in actions}


def running_apps(act: EmbeddedActivator) -> dict[str, str]:
    with act.node.client() as client:
        return {a.name: a.version for a in client.which_applications()}


def test_upgrade_restarts_only_that_app(act: EmbeddedActivator, gens: Gens, work: Path) -> None:
    g1 = gens(AppDef("alpha"), AppDef("beta"))
    actions, result = activate(act, None, g1)
    assert kinds(actions) == {"alpha": ActionKind.START, "beta": ActionKind.START}
    assert result.ok, result.to_json()
    alpha_pid, alpha_v, _ = read_state(work, "alpha")
    beta_pid, _, _ = read_state(work, "beta")
    assert alpha_v == 1
    state = act.current_state()
    assert {a: (s.status, s.version) for a, s in state.items()} == {
        "alpha": (AppStatus.RUNNING, "1.0.0"), "beta": (AppStatus.RUNNING, "1.0.0")}

    g2 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta"))
    actions, result = activate(act, g1, g2)
    assert kinds(actions) == {"alpha": ActionKind.RESTART, "beta": ActionKind.KEEP}
    assert result.ok, result.to_json()
    new_pid, new_v, new_state = read_state(work, "alpha")
    assert new_v == 2 and new_pid != alpha_pid and new_state["upgrades"] == 0
    assert read_state(work, "beta")[0] == beta_pid
    assert running_apps(act)["alpha"] == "2.0.0"
    # The old version's ebin left the code path; the new one is on it.
    with act.node.client() as client:
        path = client.get_path()
    assert [p for p in path if "/alpha-" in p] == [
        str(act.store_dir / str(g2.apps["alpha"].output) / "lib/alpha-2.0.0/ebin")]


@pytest.mark.parametrize(("settle", "seen"), [
    # the agent's "started" answer is the first probe of an app without a health spec ...
    ("0", "application started (version 2.0.0)"),
    # ... and only the first: the settle probe asks the node
    ("0.2", "application running (version 2.0.0)"),
])
def test_health_after_a_restart(root: Path, agent_ebin: Path, gens: Gens, settle: str,
                                seen: str) -> None:
    ctx = ActivatorContext(root, "default", {"distribution": "off", "health_timeout": "4",
                                             "health_settle": settle})
    act = EmbeddedActivator(ctx, agent_ebin=agent_ebin)
    try:
        g1 = gens(AppDef("alpha"), AppDef("beta"))
        assert activate(act, None, g1)[1].ok
        g2 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta"))
        _actions, result = activate(act, g1, g2)
        details = {o.action.app: o.detail for o in result.outcomes}
        assert details == {"alpha": f"restarted; healthy ({seen})", "beta": "kept"}
    finally:
        act.shutdown()


def test_env_change_reconfigures_keeping_the_pid(act: EmbeddedActivator, gens: Gens,
                                                 work: Path) -> None:
    g1 = gens(AppDef("alpha", env={"color": Atom("red"), "size": 1}))
    assert activate(act, None, g1)[1].ok
    pid, _, _ = read_state(work, "alpha")
    g2 = gens(AppDef("alpha", env={"color": Atom("blue")}))
    actions, result = activate(act, g1, g2)
    assert kinds(actions) == {"alpha": ActionKind.RECONFIGURE}
    assert result.ok, result.to_json()
    assert read_state(work, "alpha")[0] == pid
    change = (work / "alpha.change").read_text()
    assert "{color,blue}" in change and "[size]" in change, change
    with act.node.client() as client:
        assert client.get_env_key("alpha", "color") == Atom("blue")
        assert client.get_env_key("alpha", "size") is None


def test_same_version_code_change_reloads_and_keeps_state(act: EmbeddedActivator, gens: Gens,
                                                          work: Path) -> None:
    g1 = gens(AppDef("alpha"))
    assert activate(act, None, g1)[1].ok
    pid, _, before = read_state(work, "alpha")
    g2 = gens(AppDef("alpha", variant=2))
    actions, result = activate(act, g1, g2)
    assert kinds(actions) == {"alpha": ActionKind.RELOAD}
    assert actions[0].modules == ("alpha_srv",)
    assert result.ok, result.to_json()
    assert "reloaded alpha_srv" in result.outcomes[0].detail
    new_pid, version, after = read_state(work, "alpha")
    assert (new_pid, version) == (pid, 2)
    assert after == {"id": before["id"], "upgrades": 1}


def test_lingering_old_code_aborts_and_kills_nothing(act: EmbeddedActivator, gens: Gens,
                                                     work: Path) -> None:
    port = free_port()
    env = {"port": port}
    g1 = gens(AppDef("alpha", env=env), AppDef("beta"))
    assert activate(act, None, g1)[1].ok
    # The acceptor loops in alpha_tcp without external calls: after one reload it runs
    # old code, and a second reload cannot purge that code.
    g2 = gens(AppDef("alpha", env=env, tcp_variant=2), AppDef("beta"))
    assert activate(act, g1, g2)[1].ok
    pid, _, _ = read_state(work, "alpha")
    g3 = gens(AppDef("alpha", env=env, tcp_variant=3), AppDef("beta", "2.0.0", variant=2))
    actions, result = activate(act, g2, g3)
    assert kinds(actions)["alpha"] is ActionKind.RELOAD
    assert not result.ok
    by_app = {o.action.app: o for o in result.outcomes}
    assert "processes lingering in old code: [<0." in by_app["alpha"].detail
    assert by_app["beta"].detail.startswith("not done: switch aborted")
    # Nothing was killed: the lingering acceptor still answers, with the old code.
    assert http_get(port) == (200, "1 1\n")
    assert read_state(work, "alpha")[0] == pid
    assert running_apps(act)["beta"] == "1.0.0"


@pytest.mark.parametrize(("make", "expected"), [
    (lambda port: AppDef("alpha", env={"port": port, "http_status": 500},
                         health=HealthSpec(HealthType.HTTP, port=port, path="/health",
                                           timeout=1000)),
     "HTTP 500"),
    (lambda port: AppDef("alpha", health=HealthSpec(HealthType.TCP, port=port, timeout=500)),
     "Connection refused"),
    (lambda port: AppDef("alpha", env={"crash_after": 30}), "application is not running"),
    (lambda port: AppDef("alpha", env={"check_result": Atom("degraded")},
                         health=HealthSpec(HealthType.CUSTOM, module="alpha_srv",
                                           timeout=1000)),
     "alpha_srv:check() returned degraded"),
], ids=["http-500", "closed-port", "crash-loop", "custom-not-ok"])
def test_unhealthy_app_fails_its_action(act: EmbeddedActivator, gens: Gens, make: object,
                                        expected: str) -> None:
    app = make(free_port())  # type: ignore[operator]
    _actions, result = activate(act, None, gens(app))
    assert not result.ok
    detail = result.failed["alpha"]
    assert detail.startswith("unhealthy: not healthy within 4 s") and expected in detail, detail


def test_healthy_checks_pass(act: EmbeddedActivator, gens: Gens) -> None:
    port = free_port()
    app = AppDef("alpha", env={"port": port},
                 health=HealthSpec(HealthType.HTTP, port=port, path="/", timeout=1000))
    custom = AppDef("beta", health=HealthSpec(HealthType.CUSTOM, module="beta_srv"))
    _actions, result = activate(act, None, gens(app, custom))
    assert result.ok, result.to_json()
    assert act.health("alpha").healthy and "HTTP 200" in act.health("alpha").detail
    assert act.health("beta").detail == "beta_srv:check() returned ok"


def test_custom_check_only_calls_the_apps_own_modules(act: EmbeddedActivator,
                                                      gens: Gens) -> None:
    app = AppDef("alpha", health=HealthSpec(HealthType.CUSTOM, module="erlang", timeout=500))
    _, result = activate(act, None, gens(app))
    assert "not_a_module_of" in result.failed["alpha"], result.failed


def test_failed_dependency_blocks_dependents_and_removed_apps_stop(
        act: EmbeddedActivator, gens: Gens, work: Path) -> None:
    g1 = gens(AppDef("alpha"), AppDef("beta"))
    assert activate(act, None, g1)[1].ok
    # gamma depends on delta, whose listener cannot bind (the port is taken).
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        g2 = gens(AppDef("alpha"), AppDef("delta", env={"port": port}),
                  AppDef("gamma", depends_on=("delta",)))
        actions, result = activate(act, g1, g2)
    assert kinds(actions)["beta"] is ActionKind.STOP
    assert "delta" in result.failed
    assert result.failed["gamma"].startswith("dependency 'delta' failed")
    apps = running_apps(act)
    assert "beta" not in apps and "gamma" not in apps and "alpha" in apps
    assert "beta" not in act.current_state()


def test_host_node_comes_back_in_the_active_generation(
        act: EmbeddedActivator, store: LocalStore, gens: Gens, work: Path) -> None:
    profile = Profile(store, "default")
    g1 = gens(AppDef("alpha"))
    commit_generation(profile, g1, hook=activation_hook(store, act))
    g2 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta"))
    commit_generation(profile, g2, hook=activation_hook(store, act))
    assert running_apps(act)["alpha"] == "2.0.0"
    record = act.node.read_record()
    assert record is not None
    os.killpg(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while act.node.status().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert act.current_state()["alpha"].status is AppStatus.STOPPED
    done = act.supervise_once()
    assert done and done[0].startswith("host node restarted (2 app(s) started"), done
    apps = running_apps(act)
    assert (apps["alpha"], apps["beta"]) == ("2.0.0", "1.0.0")
    assert read_state(work, "alpha")[1] == 2


def test_the_plans_connection_serves_only_its_own_apply(act: EmbeddedActivator,
                                                        gens: Gens) -> None:
    g1 = gens(AppDef("alpha"), AppDef("beta"))
    assert activate(act, None, g1)[1].ok
    g2 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta"))
    # planned in another thread: apply opens its own connection
    planned: list[list[Action]] = []
    worker = threading.Thread(target=lambda: planned.append(act.plan(g1, g2)))
    worker.start()
    worker.join()
    assert act.apply(planned[0]).ok
    assert running_apps(act)["alpha"] == "2.0.0"
    # planned, then the node dies: apply starts a new node, not a dead connection
    actions = act.plan(g2, g1)
    record = act.node.read_record()
    assert record is not None
    os.killpg(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while act.node.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    result = act.apply(actions)
    assert act.node.read_record() != record
    # the new node had none of the apps: the restart of alpha loads it afresh there
    assert {o.action.app: o.ok for o in result.outcomes}["alpha"], result.to_json()


def test_apply_without_plan_is_refused(act: EmbeddedActivator) -> None:
    from bstore.activators.base import ActivatorError

    with pytest.raises(ActivatorError, match="apply\\(\\) without plan\\(\\)"):
        act.apply([])


def test_periodic_health_rounds(act: EmbeddedActivator, gens: Gens) -> None:
    from bstore.activators.health import HealthSchedule

    port = free_port()
    g1 = gens(AppDef("alpha", env={"port": port},
                     health=HealthSpec(HealthType.TCP, port=port, interval=1000)),
              AppDef("beta"))
    assert activate(act, None, g1)[1].ok
    sched = HealthSchedule()
    first = act.health_round(sched, now=100.0)
    assert {r.app: r.healthy for r in first} == {"alpha": True, "beta": True}
    assert act.health_round(sched, now=100.5) == []
    with act.node.client() as client:
        client.app_stop("beta")
    assert [r.app for r in act.health_round(sched, now=101.0)] == ["alpha"]
    later = act.health_round(sched, now=130.0)
    assert {r.app: r.detail for r in later}["beta"] == "application is not running"
    assert list(sched.unhealthy()) == ["beta"]
