"""Where nodes keep what the kernel and the emulator make: the agent socket when the
state root is too deep for ``sun_path``, and the crash dump (never the caller's cwd)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acthelpers import AppCompiler, AppDef, Epmd, generation

from bstore.activators.base import ActivatorContext
from bstore.activators.embedded import EmbeddedActivator
from bstore.activators.hostnode import HostNode, HostNodeError, NodePaths, socket_path
from bstore.specs.model import VmConfig
from bstore.store.local import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erl") is None or shutil.which("epmd") is None,
                       reason="needs Erlang/OTP"),
]

OPTIONS = {"health_timeout": "10", "health_settle": "0"}


@pytest.fixture
def long_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("RELEASE_COOKIE", "ERLANG_COOKIE"):
        monkeypatch.delenv(var, raising=False)
    # ~150 bytes whatever tmp_path is: nodes/<p>/vms/<app>/agent.sock cannot fit in 107.
    pad = max(1, 150 - len(str(tmp_path)) - 1)
    root = tmp_path / ("r" * pad)
    root.mkdir()
    assert len(str(root)) >= 150
    return root


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except OSError:
            return
        if state == "Z":
            os.waitpid(pid, os.WNOHANG)
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still runs")


def test_long_root_host_node_and_vm_app_start_and_answer(
        long_root: Path, agent_ebin: Path, epmd: Epmd, tmp_path: Path) -> None:
    compiler = AppCompiler(tmp_path / "apps")
    work = tmp_path / "obs"
    work.mkdir()
    act = EmbeddedActivator(ActivatorContext(long_root, "default", OPTIONS),
                            agent_ebin=agent_ebin)
    try:
        with LocalStore.open(long_root) as store:
            g1 = generation(store, compiler, work,
                            [AppDef("alpha"), AppDef("beta", vm=VmConfig(scheduler_limit=1))])
        result = act.apply(act.plan(None, g1))
        assert result.ok, result.to_json()

        guest = act.vms.guest("beta")
        for paths in (act.node.paths, guest.node.paths):
            sock = paths.socket
            assert len(os.fsencode(str(paths.directory / "agent.sock"))) > 107
            assert len(os.fsencode(str(sock))) <= 107 and paths.socket_outside
            assert stat.S_ISSOCK(os.stat(sock).st_mode)
            info = os.lstat(sock.parent)
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
            # Another bstore process computes the same place from the node directory.
            assert NodePaths.in_directory(paths.directory).socket == sock
        assert act.node.paths.socket != guest.node.paths.socket
        with act.node.client(10.0) as client:
            assert "alpha" in {a.name for a in client.which_applications()}
        with HostNode(long_root, "default").client(10.0) as client:  # a fresh view
            client.ping()
        with guest.client(10.0) as client:
            assert "beta" in {a.name for a in client.which_applications()}
        dirs = [act.node.paths.socket.parent, guest.node.paths.socket.parent]
    finally:
        act.shutdown()
    # Stopped nodes leave no private directory behind.
    assert not any(d.exists() for d in dirs)


def test_socket_path_short_enough_stays_in_the_node_directory(tmp_path: Path) -> None:
    assert socket_path(tmp_path / "n") == tmp_path / "n" / "agent.sock"
    deep = tmp_path / ("d" * 120)
    assert socket_path(deep) != socket_path(tmp_path / ("e" * 120))
    assert socket_path(deep).name == "agent.sock"
    assert socket_path(deep).parent.parent.name == f"bstore-{os.getuid()}"


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_planted_socket_directory_is_refused(
        tmp_path: Path, agent_ebin: Path, planted: str) -> None:
    node = HostNode(tmp_path / ("p" * 130), "default")
    sock_dir = node.paths.socket.parent
    sock_dir.parent.mkdir(mode=0o700, exist_ok=True)
    if planted == "symlink":
        (tmp_path / "elsewhere").mkdir()
        sock_dir.symlink_to(tmp_path / "elsewhere")
    else:
        sock_dir.write_text("")
    try:
        with pytest.raises(HostNodeError) as info:
            node.start(agent_ebin)
        assert f"socket directory {sock_dir} is not a directory" in info.value.message
    finally:
        sock_dir.unlink()


def test_crash_dump_goes_to_the_node_directory_not_the_cwd(
        tmp_path: Path, agent_ebin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # The caller's ERL_CRASH_DUMP (here: its cwd) must not steer the node's dump.
    monkeypatch.setenv("ERL_CRASH_DUMP", str(cwd / "erl_crash.dump"))
    monkeypatch.setenv("ERL_CRASH_DUMP_SECONDS", "10")
    node = HostNode(tmp_path / "state", "dumpy")
    node.start(agent_ebin)
    record = node.read_record()
    assert record is not None
    assert Path(os.readlink(f"/proc/{record.pid}/cwd")) == node.paths.directory.absolute()
    # SIGUSR1 makes the emulator write a crash dump and halt.
    os.kill(record.pid, signal.SIGUSR1)
    _wait_gone(record.pid)
    node.stop()
    assert not (cwd / "erl_crash.dump").exists()
    dump = node.paths.directory / "erl_crash.dump"
    assert dump.exists() and "SIGUSR1" in dump.read_text(errors="replace")[:2000]
