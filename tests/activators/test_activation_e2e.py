"""The issue's acceptance list end to end: real generations (commit, rollback, journal
recovery after ``kill -9``) driving the real embedded activator on a real host node with
apps compiled by ``erlc``; GC roots of running code; guests rejoining a restarted host.

Everything goes through :func:`bstore.generations.switch.commit_generation` /
:func:`~bstore.generations.switch.rollback` with the activator's
:func:`~bstore.activators.base.activation_hook`, as ``bstore activate`` does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acthelpers import (
    AppCompiler,
    AppDef,
    Epmd,
    free_port,
    generation,
    http_get,
    read_state,
)

from bstore.activators.base import (
    ActivationFailed,
    ActivatorContext,
    ApplyResult,
    activation_hook,
)
from bstore.activators.embedded import EmbeddedActivator
from bstore.activators.plan import Action, ActionKind, AppStatus
from bstore.activators.vm import node_environment
from bstore.generations.generation import load_generation
from bstore.generations.journal import Outcome, read_journal, recover
from bstore.generations.manifest import GenerationManifest
from bstore.generations.profiles import Profile
from bstore.generations.switch import commit_generation, delete_generations, rollback
from bstore.specs.model import HealthSpec, HealthType, VmConfig
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erl") is None or shutil.which("epmd") is None,
                       reason="needs Erlang/OTP"),
]

OPTIONS = {"distribution": "off", "health_timeout": "3", "health_settle": "0.3"}


class Recording(EmbeddedActivator):
    """The embedded activator, remembering every plan and result it carried out."""

    def __init__(self, context: ActivatorContext, agent_ebin: Path) -> None:
        super().__init__(context, agent_ebin=agent_ebin)
        self.applied: list[tuple[list[Action], ApplyResult]] = []

    def apply(self, actions: Sequence[Action]) -> ApplyResult:
        result = super().apply(actions)
        self.applied.append((list(actions), result))
        return result

    def last_kinds(self) -> dict[str, ActionKind]:
        return {a.app: a.kind for a in self.applied[-1][0]}


@pytest.fixture
def act(root: Path, agent_ebin: Path) -> Iterator[Recording]:
    activator = Recording(ActivatorContext(root, "default", OPTIONS), agent_ebin)
    yield activator
    activator.shutdown()


@pytest.fixture
def profile(store: LocalStore) -> Profile:
    return Profile(store, "default")


@pytest.fixture
def gens(store: LocalStore, compiler: AppCompiler,
         work: Path) -> Callable[..., GenerationManifest]:
    def make(*apps: AppDef) -> GenerationManifest:
        return generation(store, compiler, work, apps)
    return make


def running_apps(act: EmbeddedActivator) -> dict[str, str]:
    with act.node.client() as client:
        return {a.name: a.version for a in client.which_applications()}


def test_switches_and_rollbacks_through_generations(
        act: Recording, store: LocalStore, profile: Profile,
        gens: Callable[..., GenerationManifest], work: Path) -> None:
    hook = activation_hook(store, act)
    g1 = gens(AppDef("alpha"), AppDef("beta", env={"color": 1}))
    assert commit_generation(profile, g1, hook=hook).current.number == 1
    apps = running_apps(act)
    assert (apps["alpha"], apps["beta"]) == ("1.0.0", "1.0.0")
    alpha1, beta1 = read_state(work, "alpha")[0], read_state(work, "beta")[0]

    # Upgrade of alpha: exactly alpha restarts.
    g2 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta", env={"color": 1}))
    commit_generation(profile, g2, hook=hook)
    assert act.last_kinds() == {"alpha": ActionKind.RESTART, "beta": ActionKind.KEEP}
    new_pid, version, _ = read_state(work, "alpha")
    assert new_pid != alpha1 and version == 2
    assert read_state(work, "beta")[0] == beta1

    # Env change of beta: same pid, config_change called with the change.
    g3 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta", env={"color": 2}))
    commit_generation(profile, g3, hook=hook)
    assert act.last_kinds() == {"alpha": ActionKind.KEEP, "beta": ActionKind.RECONFIGURE}
    assert read_state(work, "beta")[0] == beta1
    assert "{color,2}" in (work / "beta.change").read_text()

    # Same-version code change of beta: reloaded in place, state kept (code_change ran).
    g4 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta", variant=3,
                                                         env={"color": 2}))
    commit_generation(profile, g4, hook=hook)
    assert act.last_kinds() == {"alpha": ActionKind.KEEP, "beta": ActionKind.RELOAD}
    pid, version, state = read_state(work, "beta")
    assert (pid, version, state["upgrades"]) == (beta1, 3, 1)

    # Rollback to the previous generation: beta's old code comes back (reloaded again).
    assert rollback(profile, hook=hook).current.number == 3
    assert read_state(work, "beta")[:2] == (beta1, 1)
    # Rollback to generation 1: alpha's old version() is back, in version 1.0.0.
    assert rollback(profile, 1, hook=hook).current.number == 1
    assert act.last_kinds()["alpha"] is ActionKind.RESTART
    assert read_state(work, "alpha")[1] == 1
    assert running_apps(act)["alpha"] == "1.0.0"
    assert read_state(work, "beta")[0] == beta1
    assert read_journal(profile) is None


@pytest.mark.parametrize(("bad", "expected"), [
    (lambda port: AppDef("alpha", "2.0.0", variant=2, env={"port": port, "http_status": 500},
                         health=HealthSpec(HealthType.HTTP, port=port, path="/", timeout=1000)),
     "HTTP 500"),
    (lambda port: AppDef("alpha", "2.0.0", variant=2,
                         health=HealthSpec(HealthType.TCP, port=port, timeout=500)),
     "Connection refused"),
    (lambda port: AppDef("alpha", "2.0.0", variant=2, env={"crash_after": 30}),
     "application is not running"),
], ids=["http-500", "closed-port", "crash-loop"])
def test_unhealthy_generation_rolls_back_automatically(
        act: Recording, store: LocalStore, profile: Profile,
        gens: Callable[..., GenerationManifest], work: Path,
        bad: Callable[[int], AppDef], expected: str) -> None:
    hook = activation_hook(store, act)
    g1 = gens(AppDef("alpha"), AppDef("beta"))
    commit_generation(profile, g1, hook=hook)
    beta_pid = read_state(work, "beta")[0]
    g2 = gens(bad(free_port()), AppDef("beta"))
    with pytest.raises(ActivationFailed) as failed:
        commit_generation(profile, g2, hook=hook)
    message = failed.value.message
    assert message.startswith("activation of generation 2 failed: alpha: unhealthy")
    assert expected in message, message
    # The switch was undone: the profile is back at 1, generation 2 stays inspectable.
    current = profile.current()
    assert current is not None and current.number == 1 and 2 in profile.numbers()
    assert read_journal(profile) is None
    # Re-activating the previous generation brings the old version() back.
    back = act.plan(g2, load_generation(store, current.store_path))
    assert {a.app: a.kind for a in back}["alpha"] in (ActionKind.RESTART, ActionKind.START)
    result = act.apply(back)
    assert result.ok, result.to_json()
    assert read_state(work, "alpha")[1] == 1 and running_apps(act)["alpha"] == "1.0.0"
    assert read_state(work, "beta")[0] == beta_pid


def test_lingering_old_code_aborts_the_switch_and_kills_nothing(
        act: Recording, store: LocalStore, profile: Profile,
        gens: Callable[..., GenerationManifest], work: Path) -> None:
    hook = activation_hook(store, act)
    env = {"port": free_port()}
    commit_generation(profile, gens(AppDef("alpha", env=env), AppDef("beta")), hook=hook)
    # One reload leaves alpha's acceptor looping in the old alpha_tcp; a second cannot
    # purge that code.
    commit_generation(profile, gens(AppDef("alpha", env=env, tcp_variant=2), AppDef("beta")),
                      hook=hook)
    alpha_pid = read_state(work, "alpha")[0]
    g3 = gens(AppDef("alpha", env=env, tcp_variant=3), AppDef("beta", "2.0.0", variant=2))
    with pytest.raises(ActivationFailed, match=r"alpha: alpha: processes lingering in old"
                       r" code: \[<0\.") as failed:
        commit_generation(profile, g3, hook=hook)
    assert "beta: not done: switch aborted" in failed.value.message
    assert profile.current_number() == 2
    assert http_get(env["port"]) == (200, "1 1\n")
    assert read_state(work, "alpha")[0] == alpha_pid
    assert running_apps(act)["beta"] == "1.0.0"


CHILD = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from bstore.activators.base import ActivatorContext, activation_hook
    from bstore.activators.embedded import EmbeddedActivator
    from bstore.generations.manifest import parse_manifest
    from bstore.generations.profiles import Profile
    from bstore.generations.switch import commit_generation
    from bstore.store.local import LocalStore

    root, agent, manifest_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    options = dict(arg.split("=", 1) for arg in sys.argv[4:])
    manifest = parse_manifest(manifest_file.read_bytes(), str(manifest_file))
    with LocalStore.open(root) as store:
        act = EmbeddedActivator(ActivatorContext(root, "default", options), agent_ebin=agent)
        commit_generation(Profile(store, "default"), manifest,
                          hook=activation_hook(store, act))
    print("done")
""")


@pytest.mark.parametrize(("point", "outcome", "number"), [
    ("gen-after-journal", Outcome.REVERTED, 1),
    ("gen-after-link", Outcome.REVERTED, 1),
    ("gen-after-switch", Outcome.FINISHED, 2),
    ("act-after-action", Outcome.FINISHED, 2),
    ("gen-after-activate", Outcome.FINISHED, 2),
])
def test_kill_9_at_each_activation_step_leaves_a_whole_generation(
        act: Recording, root: Path, agent_ebin: Path, store: LocalStore, profile: Profile,
        gens: Callable[..., GenerationManifest], work: Path, tmp_path: Path,
        point: str, outcome: Outcome, number: int) -> None:
    hook = activation_hook(store, act)
    g1 = gens(AppDef("alpha"), AppDef("beta"))
    commit_generation(profile, g1, hook=hook)
    node_pid = act.node.read_record().pid  # type: ignore[union-attr]
    g2 = gens(AppDef("alpha", "2.0.0", variant=2), AppDef("beta", "2.0.0", variant=2))
    manifest_file = tmp_path / "g2.json"
    manifest_file.write_bytes(g2.to_bytes())
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.run(
        [sys.executable, str(script), str(root), str(agent_ebin), str(manifest_file),
         *(f"{k}={v}" for k, v in OPTIONS.items())],
        env={**os.environ, "BSTORE_CRASH_AT": point}, capture_output=True, text=True,
        timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    journal = read_journal(profile)
    assert journal is not None and journal.to_number == 2
    # Whatever the step, the profile names one whole generation (1 or 2).
    assert profile.current_number() in (1, 2)
    load_generation(store, profile.current().store_path)  # type: ignore[union-attr]

    with profile.locked():
        recovered = recover(profile, hook)
    assert recovered.outcome is outcome
    assert profile.current_number() == number and read_journal(profile) is None
    if outcome is Outcome.REVERTED:
        assert profile.numbers() == [1]
    # The host node (never restarted) runs exactly the current generation.
    current = load_generation(store, profile.current().store_path)  # type: ignore[union-attr]
    assert act.node.read_record().pid == node_pid  # type: ignore[union-attr]
    apps = running_apps(act)
    assert {a: apps.get(a) for a in current.apps} == {
        a: e.version for a, e in current.apps.items()}
    assert {read_state(work, a)[1] for a in current.apps} == {number}
    if point == "act-after-action":
        # The half-done plan was finished, not redone: alpha (done before the kill)
        # was kept, only beta restarted.
        assert act.last_kinds() == {"alpha": ActionKind.KEEP, "beta": ActionKind.RESTART}


def test_gc_keeps_what_running_nodes_loaded_until_they_stop(
        root: Path, agent_ebin: Path, epmd: Epmd, compiler: AppCompiler, work: Path) -> None:
    # Each step opens (and closes) its own store: paths registered by a store still open
    # are temporary GC roots of this process, which would hide what the roots keep.
    act = Recording(ActivatorContext(root, "default", {**OPTIONS, "distribution": "on"}),
                    agent_ebin)

    def make(*apps: AppDef) -> GenerationManifest:
        with LocalStore.open(root) as st:
            return generation(st, compiler, work, apps)

    def commit(manifest: GenerationManifest, activate: bool) -> None:
        with LocalStore.open(root) as st:
            commit_generation(Profile(st, "default"), manifest,
                              hook=activation_hook(st, act) if activate else None)

    def gc() -> tuple[set[str], set[str]]:
        """(deleted, still valid) after a GC."""
        with LocalStore.open(root) as st:
            deleted = {str(p) for p in collect_garbage(st).deleted}
            return deleted, {str(p) for p in st.valid_paths()}

    try:
        g1 = make(AppDef("alpha"), AppDef("beta", vm=VmConfig()))
        commit(g1, True)
        alpha1, beta1 = str(g1.apps["alpha"].output), str(g1.apps["beta"].output)
        roots = act.roots.directory
        store_dir = os.path.realpath(root / "store")
        assert os.readlink(roots / "host" / "alpha") == f"{store_dir}/{alpha1}"
        assert os.readlink(roots / "vm" / "beta") == f"{store_dir}/{beta1}"
        # Generation 2 becomes current without being activated yet (as after a kill -9
        # before the activation): the nodes still run generation 1's code.
        g2 = make(AppDef("alpha", "2.0.0", variant=2),
                  AppDef("beta", "2.0.0", variant=2, vm=VmConfig()))
        commit(g2, False)
        with LocalStore.open(root) as st:
            assert delete_generations(Profile(st, "default"), keep=1) == [1]
        deleted, valid = gc()
        # Generation 1's manifest path went (no link, no node reads it); the code the VM
        # and the host node run stayed, closures included.
        assert deleted, "GC deleted nothing: the test would prove nothing"
        g1_code = {str(p) for p in (*g1.apps["alpha"].closure, *g1.apps["beta"].closure)}
        assert g1_code <= valid and not g1_code & deleted
        assert all((root / "store" / p).is_dir() for p in g1_code)
        beta_pid = act.vms.guest("beta").node.read_record().pid  # type: ignore[union-attr]
        assert read_state(work, "beta")[1] == 1

        # The VM stops: its code is unrooted and the next GC frees it; the host node
        # still runs alpha 1.0.0, which stays.
        act.vms.stop_vm("beta")
        assert act.roots.read("vm") == {}
        deleted, valid = gc()
        assert beta1 in deleted and beta1 not in valid
        assert alpha1 in valid
        assert _zombie(beta_pid)

        # Activating generation 2 moves the host root to alpha 2.0.0: alpha 1 is freed.
        result = act.apply(act.plan(g1, g2))
        assert result.ok, result.to_json()
        assert act.roots.read("host") == {"alpha": str(g2.apps["alpha"].output)}
        assert act.roots.read("vm") == {"beta": str(g2.apps["beta"].output)}
        deleted, valid = gc()
        assert alpha1 in deleted
        # The nodes stop: their roots go with them.
        act.shutdown()
        assert act.roots.read("host") == {} and act.roots.read("vm") == {}
    finally:
        act.shutdown()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def _wait(cond: Callable[[], object], what: str, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_guests_rejoin_a_restarted_host_node(
        root: Path, agent_ebin: Path, epmd: Epmd, store: LocalStore, profile: Profile,
        gens: Callable[..., GenerationManifest], work: Path) -> None:
    act = Recording(ActivatorContext(root, "default", {**OPTIONS, "distribution": "on",
                                                       "health_settle": "0"}), agent_ebin)
    try:
        commit_generation(profile, gens(AppDef("alpha"), AppDef("beta", vm=VmConfig())),
                          hook=activation_hook(store, act))
        guest = act.vms.guest("beta")
        vm_pid = guest.node.read_record().pid  # type: ignore[union-attr]
        _wait(lambda: act.current_state()["beta"].reason == "node up", "beta to join")
        sup = act.vms.supervisor()
        sup.poll()

        # kill -9 of the host node: supervision brings it back in the active generation;
        # the guest keeps running (same VM) and rejoins the new host node.
        host_pid = act.node.read_record().pid  # type: ignore[union-attr]
        os.killpg(host_pid, signal.SIGKILL)
        _wait(lambda: not act.node.status().running, "the host node to die")
        done = act.supervise_once()
        assert done[0].startswith("host node restarted (2 app(s) started"), done
        assert act.node.read_record().pid != host_pid  # type: ignore[union-attr]
        assert guest.node.read_record().pid == vm_pid  # type: ignore[union-attr]
        state = act.current_state()["beta"]
        assert (state.status, state.reason) == (AppStatus.RUNNING, "node up")
        with act.node.client() as client:
            peers = client.call("nodes")
        assert isinstance(peers, list)
        assert "bstore_default_beta@127.0.0.1" in {getattr(n, "name", n) for n in peers}

        # A bare restart of the host node (no boot): the guest shows "node down" until
        # the supervisor's next poll reconnects it.
        act.node.stop()
        act.node.start(agent_ebin, node_name=act.node_name,
                       env=node_environment(act.context, act.node.paths.directory / "home"))
        down = act.current_state()["beta"].reason
        assert down == "node down: not connected to bstore_default@127.0.0.1", down
        sup.poll()
        assert act.current_state()["beta"].reason == "node up"
        assert guest.node.read_record().pid == vm_pid  # type: ignore[union-attr]
    finally:
        act.shutdown()


@pytest.mark.parametrize(("args", "expected"), [
    (("bstore_default@127.0.0.1",), "false"),      # this node is not distributed
    (("no_at_sign",), "false"),
    ((5,), "bad_args"),
    (("a@b", "extra"), "bad_args"),
])
def test_connect_node_is_narrow(act: Recording, args: tuple[object, ...],
                                expected: str) -> None:
    from bstore.activators.agent_client import AgentOpError
    from bstore.specs.terms.model import Atom

    act.boot()
    with act.node.client() as client:
        if expected == "false":
            assert client.connect_node(str(args[0])) is False
            return
        terms = [Atom(a) if isinstance(a, str) else a for a in args]
        with pytest.raises(AgentOpError) as err:
            client._call_interned("connect_node", *terms)
        assert "bad_args" in err.value.message and "connect_node" in err.value.message
