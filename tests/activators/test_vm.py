"""The vm activator with real VMs: own node name, argv, hidden cookie, loopback-only
distribution, cluster membership, crash restarts with backoff then ``failed``, memory
limit reported as ``oom``, one-shot supervision, and stopping."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acthelpers import (
    AppCompiler,
    AppDef,
    Epmd,
    all_cmdlines,
    generation,
    listening_sockets,
    read_state,
)

from bstore.activators.base import ActivatorContext
from bstore.activators.cookie import resolve_cookie
from bstore.activators.embedded import EmbeddedActivator
from bstore.activators.plan import ActionKind, AppStatus
from bstore.activators.vm import VmActivator, VmState
from bstore.generations.generation import AppBuild, make_manifest
from bstore.generations.manifest import GenerationManifest
from bstore.specs.model import AppSpec, IconSpec, SourceSpec, SourceType, VmConfig
from bstore.specs.terms.model import Atom
from bstore.store.local import LocalStore
from bstore.store.paths import PathKind, StorePath

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erl") is None or shutil.which("epmd") is None,
                       reason="needs Erlang/OTP"),
]


OPTIONS = {"health_timeout": "10", "health_settle": "0", "restart_backoff": "0.2",
           "restart_burst": "1"}


@pytest.fixture
def host(root: Path, agent_ebin: Path, epmd: Epmd) -> Iterator[EmbeddedActivator]:
    act = EmbeddedActivator(ActivatorContext(root, "default", OPTIONS), agent_ebin=agent_ebin)
    yield act
    act.shutdown()


def gen(store: LocalStore, compiler: AppCompiler, work: Path,
        *apps: AppDef) -> GenerationManifest:
    return generation(store, compiler, work, apps)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def vm_pid(act: VmActivator, app: str) -> int:
    record = act.guest(app).node.read_record()
    assert record is not None
    return record.pid


def test_vm_app_in_its_own_vm(host: EmbeddedActivator, store: LocalStore, work: Path,
                              compiler: AppCompiler, root: Path) -> None:
    vm = VmConfig(memory_limit=200, scheduler_limit=1, extra_args=("+sbwt", "none"))
    g1 = gen(store, compiler, work, AppDef("alpha"), AppDef("beta", vm=vm))
    actions = host.plan(None, g1)
    assert {a.app: (a.kind, a.isolation.value) for a in actions} == {
        "alpha": (ActionKind.START, "embedded"), "beta": (ActionKind.START, "vm")}
    result = host.apply(actions)
    assert result.ok, result.to_json()

    pid = vm_pid(host.vms, "beta")
    assert pid != host.node.read_record().pid  # type: ignore[union-attr]
    with host.vms.guest("beta").client() as client:
        info = client.node_info()
        assert info.node == "bstore_default_beta@127.0.0.1" and info.os_pid == pid
        assert "beta" in {a.name for a in client.which_applications()}
    # erlexec hands emulator flags to beam.smp as -S, -sbwt, ... (each its own item).
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for flag, value in ((b"-S", b"1:1"), (b"-sbwt", b"none")):
        assert argv[argv.index(flag) + 1] == value
    if host.vms.cgroups.usable:
        cgroup = host.vms.guest("beta").node.cgroup
        assert cgroup is not None and pid in cgroup.pids()
    else:
        assert argv[argv.index(b"-MMscs") + 1] == b"200"
        assert argv[argv.index(b"-Musac") + 1] == b"false"

    # The cookie: generated (>= 128 bits), 0400, never on a command line or in a log.
    cookie = resolve_cookie(root / "nodes" / "default")
    assert cookie.source.endswith("/nodes/default/cookie") and len(cookie.value) >= 32
    assert stat.S_IMODE(os.stat(cookie.source).st_mode) == 0o400
    assert not [c for c in all_cmdlines() if cookie.value.encode() in c]
    assert not any(b"setcookie" in c for c in all_cmdlines())
    assert cookie.value not in host.vms.guest("beta").node.read_log()
    assert cookie.value not in host.node.read_log()
    environ = dict(item.split(b"=", 1) for item in
                   Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    assert environ[b"ERL_EPMD_ADDRESS"] == b"127.0.0.1"
    assert environ[b"HOME"] == str(host.vms.guest("beta").directory / "home").encode()
    assert cookie.value.encode() not in b"".join(environ.values())

    # Distribution (and everything else the nodes listen on) is on loopback only.
    for p in (pid, host.node.read_record().pid):  # type: ignore[union-attr]
        listening = listening_sockets(p)
        assert listening and all(s.startswith("127.0.0.1:") for s in listening), listening

    # The guest joined the host's cluster; state shows it.
    state = wait_for(lambda: (s := host.current_state()["beta"]).reason == "node up" and s,
                     "beta to be connected")
    assert state.status is AppStatus.RUNNING and state.version == "1.0.0"  # type: ignore[union-attr]

    # Env change in the VM: reconfigured in place.
    beta_pid = read_state(work, "beta")[0]
    g2 = gen(store, compiler, work, AppDef("alpha"),
             AppDef("beta", vm=vm, env={"color": 1}))
    actions = host.plan(g1, g2)
    assert {a.app: a.kind for a in actions}["beta"] is ActionKind.RECONFIGURE
    assert host.apply(actions).ok
    assert read_state(work, "beta")[0] == beta_pid and vm_pid(host.vms, "beta") == pid
    assert "{color,1}" in (work / "beta.change").read_text()

    # Removed from the generation: the VM is stopped gracefully.
    g3 = gen(store, compiler, work, AppDef("alpha"))
    actions = host.plan(g2, g3)
    assert {a.app: a.kind for a in actions}["beta"] is ActionKind.STOP
    result = host.apply(actions)
    assert result.ok and "VM stopped (graceful)" in result.outcomes[0].detail
    assert not Path(f"/proc/{pid}").exists() or _zombie_or_gone(pid)
    assert "beta" not in host.current_state()


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_guest_crash_restarts_with_backoff_then_fails(
        host: EmbeddedActivator, store: LocalStore, work: Path, compiler: AppCompiler) -> None:
    g1 = gen(store, compiler, work, AppDef("alpha"), AppDef("beta", vm=VmConfig()),
             AppDef("gamma", vm=VmConfig()))
    assert host.apply(host.plan(None, g1)).ok
    host_pid = host.node.read_record().pid  # type: ignore[union-attr]
    alpha_pid = read_state(work, "alpha")[0]
    gamma_pid = vm_pid(host.vms, "gamma")
    sup = host.vms.supervisor()

    first = vm_pid(host.vms, "beta")
    os.kill(first, signal.SIGKILL)
    lines = wait_for(lambda: sup.poll(), "the supervisor to notice")
    assert lines == ["beta: died (killed by SIGKILL); restart in 0.2 s"], lines
    wait_for(lambda: "beta: restarted" in sup.poll(), "the restart")
    second = vm_pid(host.vms, "beta")
    assert second != first
    # Node down at the crash, up again once the new VM joined the cluster.
    assert host.current_state()["beta"].reason == "node up"
    assert sup.poll() == ["beta: node up"]
    assert read_state(work, "beta")[1] == 1

    # Host node, the embedded app and the other guest never noticed.
    assert host.node.read_record().pid == host_pid  # type: ignore[union-attr]
    assert read_state(work, "alpha")[0] == alpha_pid
    assert vm_pid(host.vms, "gamma") == gamma_pid
    with host.node.client() as client:
        assert "alpha" in {a.name for a in client.which_applications()}

    # Burst limit 1: the second crash within the window fails the app, with the reason.
    os.kill(second, signal.SIGKILL)
    lines = wait_for(lambda: sup.poll(), "the second crash")
    assert lines == ["beta: failed after 2 crashes in 60 s: killed by SIGKILL"], lines
    state = host.current_state()["beta"]
    assert (state.status, state.reason) == (AppStatus.FAILED, "killed by SIGKILL")
    assert sup.poll() == []
    # The plan heals a failed app by starting it again.
    assert {a.app: a.kind for a in host.plan(g1, g1)}["beta"] is ActionKind.START


def test_memory_limit_kills_the_guest_and_says_oom(
        root: Path, agent_ebin: Path, epmd: Epmd, store: LocalStore, work: Path,
        compiler: AppCompiler) -> None:
    opts = {**OPTIONS, "restart_burst": "0", "distribution": "off"}
    vms = VmActivator(ActivatorContext(root, "default", opts), agent_ebin=agent_ebin)
    try:
        g1 = gen(store, compiler, work, AppDef("hog", env={"hog": 400},
                                               vm=VmConfig(memory_limit=64)))
        vms.apply(vms.plan(None, g1))
        sup = vms.supervisor()
        lines = wait_for(lambda: sup.poll(), "the VM to die")
        assert lines == ["hog: failed after 1 crashes in 60 s: oom"], lines
        state = vms.current_state()["hog"]
        assert (state.status, state.reason) == (AppStatus.FAILED, "oom")
        if not vms.cgroups.usable:
            assert "Cannot allocate" in vms.guest("hog").node.read_log()
    finally:
        vms.stop_all()


def test_one_shot_command_restarts_a_dead_vm(
        root: Path, agent_ebin: Path, epmd: Epmd, store: LocalStore, work: Path,
        compiler: AppCompiler) -> None:
    opts = {**OPTIONS, "restart_backoff": "0", "distribution": "off"}
    ctx = ActivatorContext(root, "default", opts)
    first = VmActivator(ctx, agent_ebin=agent_ebin)
    try:
        g1 = gen(store, compiler, work, AppDef("beta", vm=VmConfig()))
        assert first.apply(first.plan(None, g1)).ok
        pid = vm_pid(first, "beta")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _zombie_or_gone(pid), "the VM to die")
        # A later bstore process that did not start the VM: no exit status, but it
        # restarts the VM from the files under nodes/<profile>/vms/beta/.
        later = VmActivator(ctx, agent_ebin=agent_ebin)
        assert later.current_state()["beta"].status is AppStatus.STOPPED
        lines = later.supervisor().poll()
        assert lines == ["beta: restarted"], lines
        assert vm_pid(later, "beta") != pid
        assert later.current_state()["beta"].status is AppStatus.RUNNING
        assert VmState.read(later.guest("beta").state_file).last_exit == "exited"
    finally:
        first.stop_all()


def test_vm_activator_refuses_embedded_apps(root: Path, agent_ebin: Path, store: LocalStore,
                                            work: Path, compiler: AppCompiler) -> None:
    vms = VmActivator(ActivatorContext(root, "default", {"distribution": "off"}),
                      agent_ebin=agent_ebin)
    g1 = gen(store, compiler, work, AppDef("alpha"))
    result = vms.apply(vms.plan(None, g1))
    assert "is not isolation vm; the vm activator only runs VMs" in result.failed["alpha"]


def _release_output(store: LocalStore, compiler: AppCompiler, tmp: Path, work: Path
                    ) -> StorePath:
    """A release tree (as a release tarball unpacks) of app ``relapp``: lib/, and
    releases/1.0.0/{start.boot, sys.config} made by systools with $RELEASE_LIB paths."""
    tree = tmp / "rel"
    lib = tree / "lib"
    shutil.copytree(compiler.ebin("relapp", "1.0.0", 1), lib / "relapp-1.0.0" / "ebin")
    rel_dir = tree / "releases" / "1.0.0"
    rel_dir.mkdir(parents=True)
    script = (
        'R = code:root_dir(), '
        'V = fun(A) -> application:load(A), {ok, Vsn} = application:get_key(A, vsn), Vsn end, '
        'Rel = {release, {"relapp", "1.0.0"}, {erts, erlang:system_info(version)}, '
        '[{kernel, V(kernel)}, {stdlib, V(stdlib)}, {relapp, "1.0.0"}]}, '
        f'ok = file:write_file("{rel_dir}/start.rel", io_lib:format("~p.~n", [Rel])), '
        f'case systools:make_script("{rel_dir}/start", [{{path, ["{lib}/*/ebin"]}}, '
        f'{{outdir, "{rel_dir}"}}, {{variables, [{{"RELEASE_LIB", "{lib}"}}]}}, silent]) of '
        '{ok, _, _} -> _ = R, halt(); E -> io:format("~p~n", [E]), halt(1) end.'
    )
    # cwd: a failing script's erl_crash.dump must not land in the repository.
    made = subprocess.run(["erl", "-noshell", "-eval", script], capture_output=True,
                          text=True, timeout=60, cwd=tmp)
    assert made.returncode == 0, made.stdout + made.stderr
    (rel_dir / "sys.config").write_text(
        f'[{{relapp, [{{from_sys_config, yes}}, {{dir, "{work}"}}]}}].\n')
    (tree / "releases" / "start_erl.data").write_text("0 1.0.0\n")
    with store.staging_dir("rel") as stage:
        shutil.copytree(tree, stage / "out", symlinks=True)
        out = store.register_tree(stage / "out", "relapp-1.0.0", kind=PathKind.OUTPUT,
                                  hash_hex="ab" * 32, references=[])
    # Only the store copy is left: the boot file must resolve $RELEASE_LIB to it.
    shutil.rmtree(tree)
    return out


def test_release_runs_in_its_own_vm_from_its_boot_files(
        host: EmbeddedActivator, store: LocalStore, work: Path, compiler: AppCompiler,
        tmp_path: Path) -> None:
    out = _release_output(store, compiler, tmp_path, work)
    spec = AppSpec(name="relapp", version="1.0.0",
                   source=SourceSpec(SourceType.RELEASE, url="https://example.invalid/r.tgz",
                                     sha256="0" * 64),
                   icon=IconSpec.identicon("relapp"))
    manifest = make_manifest(store, [AppBuild(spec, out)])
    result = host.apply(host.plan(None, manifest))
    assert result.ok, result.to_json()
    pid = vm_pid(host.vms, "relapp")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    boot = str(store.real_path(out) / "releases" / "1.0.0" / "start").encode()
    assert argv[argv.index(b"-boot") + 1] == boot
    with host.vms.guest("relapp").client() as client:
        # Started by the boot script, configured by the release's sys.config.
        assert client.get_env_key("relapp", "from_sys_config") == Atom("yes")
        assert client.node_info().node == "bstore_default_relapp@127.0.0.1"
    with host.node.client() as client:
        assert "relapp" not in {a.name for a in client.which_applications()}
    assert read_state(work, "relapp")[1] == 1


def test_crash_loop_inside_a_vm_is_unhealthy_then_failed(
        root: Path, agent_ebin: Path, epmd: Epmd, store: LocalStore, work: Path,
        compiler: AppCompiler) -> None:
    opts = {**OPTIONS, "distribution": "off", "health_timeout": "2", "health_settle": "0.5"}
    vms = VmActivator(ActivatorContext(root, "default", opts), agent_ebin=agent_ebin)
    try:
        g1 = gen(store, compiler, work, AppDef("beta", env={"crash_after": 30},
                                               vm=VmConfig()))
        result = vms.apply(vms.plan(None, g1))
        assert result.failed["beta"].startswith("unhealthy: not healthy within 2 s:")
        assert "application is not running" in result.failed["beta"]
        sup = vms.supervisor()
        first = vm_pid(vms, "beta")
        assert sup.poll() == [
            "beta: died (application beta stopped in its VM); restart in 0.2 s"]
        assert _zombie_or_gone(first)  # the VM without its app was stopped
        wait_for(lambda: "beta: restarted" in sup.poll(), "the restart")
        lines = wait_for(lambda: sup.poll(), "the second death")
        assert lines == ["beta: failed after 2 crashes in 60 s: application beta stopped"
                         " in its VM"], lines
    finally:
        vms.stop_all()
