"""bstore_agent in a real host node: every operation, hostile frames, node lifecycle."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from bstore.activators.agent_client import (
    AgentClient,
    AgentOpError,
    AgentUnavailable,
    LingeringProcessesError,
)
from bstore.activators.etf import decode, encode
from bstore.activators.hostnode import HostNode, HostNodeError
from bstore.activators.processes import process_start_time, wait_gone
from bstore.activators.vmterms import Pid
from bstore.specs.terms.model import Atom

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erl") is None, reason="needs Erlang/OTP"),
]

# A small OTP application: a supervisor with one gen_server. The gen_server writes its
# pid and state to `statefile` whenever they change and spawns a helper that loops in
# bstest_helper's code without ever making an external call (so it lingers in old code).
# config_change/3 appends its arguments to `log`. Files are how the test observes the
# node without any eval-like operation in the agent.
APP_SRC = """\
{application, bstest,
 [{vsn, "1"}, {description, "bstore agent test app"},
  {modules, [bstest_app, bstest_sup, bstest_srv, bstest_helper]},
  {registered, [bstest_sup, bstest_srv]},
  {applications, [kernel, stdlib]},
  {mod, {bstest_app, []}},
  {env, [{color, red}, {size, 1}, {log, "@LOG@"}, {statefile, "@STATE@"},
         {helperfile, "@HELPER@"}]}]}.
"""

APP_MOD = """\
-module(bstest_app).
-behaviour(application).
-export([start/2, stop/1, config_change/3]).
start(_Type, _Args) -> bstest_sup:start_link().
stop(_State) -> ok.
config_change(Changed, New, Removed) ->
    {ok, Log} = application:get_env(bstest, log),
    ok = file:write_file(Log, io_lib:format("~p.~n", [{Changed, New, Removed}]), [append]).
"""

SUP_MOD = """\
-module(bstest_sup).
-behaviour(supervisor).
-export([start_link/0, init/1]).
start_link() -> supervisor:start_link({local, bstest_sup}, ?MODULE, []).
init([]) ->
    {ok, {#{strategy => one_for_one, intensity => 0, period => 1},
          [#{id => srv, start => {bstest_srv, start_link, []}, modules => [bstest_srv]}]}}.
"""

SRV_MOD = """\
-module(bstest_srv).
-behaviour(gen_server).
-vsn("@VSN@").
-export([start_link/0, version/0]).
-export([init/1, handle_call/3, handle_cast/2, code_change/3]).
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).
version() -> @VSN@.
init([]) ->
    bstest_helper:start(),
    State = {v1, erlang:unique_integer([positive])},
    publish(State),
    {ok, State}.
handle_call(state, _From, S) -> {reply, S, S}.
handle_cast(_, S) -> {noreply, S}.
@CODE_CHANGE@
publish(State) ->
    {ok, File} = application:get_env(bstest, statefile),
    ok = file:write_file(File, io_lib:format("~p.~n", [{self(), State}])).
"""

CODE_CHANGE = {
    "1": "code_change(_Old, S, _Extra) -> {ok, S}.",
    "2": textwrap.dedent(
        """\
        code_change({down, _}, {v2, U, _, _}, _Extra) -> S = {v1, U}, publish(S), {ok, S};
        code_change(Old, {v1, U}, Extra) -> S = {v2, U, Extra, Old}, publish(S), {ok, S}."""
    ),
    "3": "code_change(_Old, _S, _Extra) -> erlang:error(refusing_to_upgrade).",
}

HELPER_MOD = """\
-module(bstest_helper).
-export([start/0, loop/0, version/0]).
version() -> @VSN@.
start() ->
    Pid = spawn(fun bstest_helper:loop/0),
    {ok, File} = application:get_env(bstest, helperfile),
    ok = file:write_file(File, io_lib:format("~p.~n", [Pid])).
loop() -> receive _ -> loop() end.
"""


@dataclass(frozen=True)
class BuiltApp:
    lib: Path
    ebin: Path
    srv_v2: Path
    srv_v3: Path
    helper_v2: Path
    log: Path
    statefile: Path
    helperfile: Path

    def state(self) -> tuple[str, str]:
        """(pid, state) as the gen_server last wrote them."""
        match = re.fullmatch(r"\{(<[\d.]+>),(.*)\}\.\n", self.statefile.read_text())
        assert match, self.statefile.read_text()
        return match.group(1), match.group(2)

    def helper_pid(self) -> str:
        return self.helperfile.read_text().strip().rstrip(".")


def _erlc(src_dir: Path, out: Path, files: dict[str, str]) -> None:
    src_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        (src_dir / name).write_text(text)
        paths.append(str(src_dir / name))
    subprocess.run(["erlc", "-o", str(out), *paths], check=True, capture_output=True)


@pytest.fixture(scope="session")
def app_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("bstest")
    ebin = base / "lib" / "bstest-1" / "ebin"

    def srv(vsn: str) -> str:
        return SRV_MOD.replace("@VSN@", vsn).replace("@CODE_CHANGE@", CODE_CHANGE[vsn])

    _erlc(
        base / "src1",
        ebin,
        {
            "bstest_app.erl": APP_MOD,
            "bstest_sup.erl": SUP_MOD,
            "bstest_srv.erl": srv("1"),
            "bstest_helper.erl": HELPER_MOD.replace("@VSN@", "1"),
        },
    )
    _erlc(base / "src2", base / "v2", {"bstest_srv.erl": srv("2")})
    _erlc(base / "src3", base / "v3", {"bstest_srv.erl": srv("3")})
    _erlc(base / "srch", base / "h2", {"bstest_helper.erl": HELPER_MOD.replace("@VSN@", "2")})
    return base


@pytest.fixture
def app(app_build: Path, tmp_path: Path) -> BuiltApp:
    """The built app with an .app file pointing at this test's own files."""
    lib = tmp_path / "lib"
    shutil.copytree(app_build / "lib", lib)
    files = {k: tmp_path / k for k in ("cc.log", "state.txt", "helper.txt")}
    text = (
        APP_SRC.replace("@LOG@", str(files["cc.log"]))
        .replace("@STATE@", str(files["state.txt"]))
        .replace("@HELPER@", str(files["helper.txt"]))
    )
    ebin = lib / "bstest-1" / "ebin"
    (ebin / "bstest.app").write_text(text)
    return BuiltApp(
        lib,
        ebin,
        app_build / "v2" / "bstest_srv.beam",
        app_build / "v3" / "bstest_srv.beam",
        app_build / "h2" / "bstest_helper.beam",
        files["cc.log"],
        files["state.txt"],
        files["helper.txt"],
    )


@pytest.fixture
def node(tmp_path: Path, agent_ebin: Path, app: BuiltApp) -> Iterator[HostNode]:
    host = HostNode(tmp_path / "st", "t")
    host.start(agent_ebin, [app.ebin])
    yield host
    host.stop(graceful_timeout=5, term_timeout=2)


@pytest.fixture
def client(node: HostNode) -> Iterator[AgentClient]:
    with node.client(timeout=30) as c:
        yield c


# ------------------------------------------------------------------ basics


def test_ping_node_info_and_socket_permissions(node: HostNode, client: AgentClient) -> None:
    client.ping()
    info = client.node_info()
    status = node.status()
    assert status.running and status.agent_ok and status.problem is None
    assert info.os_pid == status.pid
    assert info.node == "nonode@nohost"
    release = subprocess.run(
        ["erl", "-noshell", "-eval", "io:put_chars(erlang:system_info(otp_release)), halt()."],
        capture_output=True,
        text=True,
        check=True,
        cwd=node.paths.directory,  # never the repository (erl_crash.dump)
    ).stdout
    assert info.otp_release == release
    assert info.memory_total > 0
    assert stat.S_ISSOCK(os.stat(node.paths.socket).st_mode)
    assert stat.S_IMODE(os.stat(node.paths.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(node.paths.directory).st_mode) == 0o700


def test_code_paths(client: AgentClient, tmp_path: Path) -> None:
    extra = tmp_path / "extra_ebin"
    extra.mkdir()
    client.add_patha(extra)
    assert client.get_path()[0] == str(extra)
    assert client.del_path(extra) is True
    assert client.del_path(extra) is False
    with pytest.raises(AgentOpError, match="bad_directory"):
        client.add_patha(tmp_path / "missing")
    current = client.get_path()
    client.set_path([*current, str(extra)])
    assert client.get_path()[-1] == str(extra)


def test_load_module_compiled_at_test_time(client: AgentClient, tmp_path: Path) -> None:
    _erlc(tmp_path / "src", tmp_path / "ebin", {"fresh_mod.erl": "-module(fresh_mod).\n"})
    beam = tmp_path / "ebin" / "fresh_mod.beam"
    client.load_module("fresh_mod", beam)
    client.load_module("fresh_mod", str(beam)[: -len(".beam")])  # without extension too
    client.purge("fresh_mod")
    with pytest.raises(AgentOpError, match="module_name_mismatch"):
        client.load_module("other_name", beam)
    with pytest.raises(AgentOpError, match="load_failed"):
        client.load_module("nowhere", tmp_path / "nowhere.beam")


# ------------------------------------------------------------------ applications


def test_application_lifecycle_and_md5s(client: AgentClient, app: BuiltApp) -> None:
    client.app_load("bstest")
    md5s = client.module_md5s("bstest")
    assert set(md5s) == {"bstest_app", "bstest_sup", "bstest_srv", "bstest_helper"}
    assert md5s["bstest_srv"] is None  # loaded app, modules not loaded yet
    assert client.app_ensure_all_started("bstest") == ["bstest"]
    running = {a.name: a for a in client.which_applications()}
    assert running["bstest"].version == "1"
    assert running["bstest"].description == "bstore agent test app"
    md5s = client.module_md5s("bstest")
    assert all(isinstance(v, bytes) and len(v) == 16 for v in md5s.values())
    with pytest.raises(AgentOpError, match=r"already_started"):
        client.app_start("bstest")
    client.app_stop("bstest")
    assert "bstest" not in {a.name for a in client.which_applications()}
    client.app_unload("bstest")
    assert "bstest" not in {a.name for a in client.loaded_applications()}
    with pytest.raises(AgentOpError, match="not_loaded"):
        client.module_md5s("bstest")


def test_env_and_config_change_keep_the_process(client: AgentClient, app: BuiltApp) -> None:
    client.app_start("bstest")
    pid_before, _ = app.state()
    assert client.get_env_key("bstest", "color") == Atom("red")
    # A value with an atom the node has never seen: interned first, then sent.
    client.reconfigure(
        "bstest", {"color": Atom("blue"), "mode": Atom("mode_never_seen_before")}, ["size"]
    )
    env = client.get_env("bstest")
    assert env["color"] == Atom("blue") and env["mode"] == Atom("mode_never_seen_before")
    assert "size" not in env
    calls = app.log.read_text()
    assert "{[{color,blue}],[{mode,mode_never_seen_before}],[size]}" in calls

    old = client.get_env("bstest")
    client.set_env("bstest", "color", Atom("green"))
    client.unset_env("bstest", "mode")
    assert client.get_env_key("bstest", "mode") is None
    client.config_change("bstest", old)
    assert app.log.read_text().splitlines()[-1] == "{[{color,green}],[],[mode]}."
    assert app.state()[0] == pid_before


def test_suspend_resume_and_change_code(client: AgentClient, app: BuiltApp) -> None:
    client.app_start("bstest")
    srv_pid, state = app.state()
    assert state.startswith("{v1,")
    pids = client.suspend("bstest", ["bstest_srv"])
    assert [str(p) for p in pids] == [srv_pid]
    client.load_module("bstest_srv", app.srv_v2)
    client.change_code(pids[0], "bstest_srv", b"1", Atom("by_hand"))
    client.resume(pids)
    assert app.state() == (srv_pid, state.replace("{v1,", "{v2,")[:-1] + ',by_hand,<<"1">>}')
    everything = client.suspend("bstest")
    assert len(everything) == 2  # the supervisor and the gen_server
    for pid in everything:
        info = client.process_info(pid)
        assert info is not None and _suspended(info)
    client.resume("bstest")
    for pid in everything:
        info = client.process_info(pid)
        assert info is not None and not _suspended(info)
    info = client.process_info(pids[0])
    assert info is not None and info["registered_name"] == Atom("bstest_srv")
    client.app_stop("bstest")  # would hang on a suspended supervisor


def _suspended(info: Mapping[str, object]) -> bool:
    function = info["current_function"]
    return isinstance(function, tuple) and function[:2] == (Atom("sys"), Atom("suspend_loop"))


# ------------------------------------------------------------------ reload


def test_reload_keeps_state_and_pid(client: AgentClient, app: BuiltApp) -> None:
    client.app_start("bstest")
    srv_pid, state = app.state()
    md5_before = client.module_md5s("bstest")["bstest_srv"]
    result = client.reload("bstest", {"bstest_srv": app.srv_v2}, Atom("upgrade_extra"))
    assert result.modules == ("bstest_srv",)
    assert srv_pid in [str(p) for p in result.processes]
    new_pid, new_state = app.state()
    assert new_pid == srv_pid
    unique = state.removeprefix("{v1,").removesuffix("}")
    assert new_state == f'{{v2,{unique},upgrade_extra,"1"}}'
    assert client.module_md5s("bstest")["bstest_srv"] != md5_before
    for pid in result.processes:
        info = client.process_info(pid)
        assert info is not None and not _suspended(info)
    client.app_stop("bstest")


def test_failed_reload_leaves_old_code_running(client: AgentClient, app: BuiltApp) -> None:
    client.app_start("bstest")
    before = app.state()
    md5_before = client.module_md5s("bstest")["bstest_srv"]
    with pytest.raises(AgentOpError) as info:
        client.reload("bstest", {"bstest_srv": app.srv_v3})
    message = str(info.value)
    assert "reload" in message and "change_code" in message
    assert "refusing_to_upgrade" in message and "rolled_back" in message
    assert client.module_md5s("bstest")["bstest_srv"] == md5_before
    assert app.state() == before
    # The node is fine: the good upgrade still goes through afterwards.
    client.reload("bstest", {"bstest_srv": app.srv_v2})
    assert app.state()[1].startswith("{v2,")


def test_reload_of_missing_beam_names_the_file(client: AgentClient, app: BuiltApp) -> None:
    client.app_start("bstest")
    with pytest.raises(AgentOpError, match=r"read,bstest_srv,<<\"/[^>]*nope.beam\">>,enoent"):
        client.reload("bstest", {"bstest_srv": app.ebin / "nope.beam"})


def test_lingering_old_code_blocks_purge_and_kills_nothing(
    client: AgentClient, app: BuiltApp
) -> None:
    client.app_start("bstest")
    helper = app.helper_pid()
    # First load: the helper keeps running version 1, which is now old code.
    client.reload("bstest", {"bstest_helper": app.helper_v2})
    md5_after_first = client.module_md5s("bstest")["bstest_helper"]
    with pytest.raises(LingeringProcessesError) as purge_error:
        client.purge("bstest_helper")
    assert [str(p) for p in purge_error.value.pids] == [helper]
    assert f"processes lingering in old code: [{helper}]" in str(purge_error.value)
    with pytest.raises(LingeringProcessesError) as reload_error:
        client.reload("bstest", {"bstest_helper": app.helper_v2})
    assert [str(p) for p in reload_error.value.pids] == [helper]
    with pytest.raises(LingeringProcessesError):
        client.load_module("bstest_helper", app.helper_v2)
    assert client.module_md5s("bstest")["bstest_helper"] == md5_after_first
    pid = purge_error.value.pids[0]
    info = client.process_info(pid)
    assert info is not None
    assert info["current_function"] == (Atom("bstest_helper"), Atom("loop"), 0)


# ------------------------------------------------------------------ hostile frames


def _raw_call(sock: socket.socket, payload: bytes) -> object:
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    (n,) = struct.unpack(">I", _recv(sock, 4))
    return decode(_recv(sock, n))


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


BAD_FRAMES = [
    (b"\x00garbage", "undefined", "bad_frame"),
    (
        encode((1, Atom("ping"), [Atom("zz_atom_the_node_never_saw_1234")])),
        "undefined",
        "bad_frame",
    ),
    (encode(Atom("ok")), "undefined", "bad_request"),
    (encode((7, b"ping", [])), 7, "bad_request"),
    (encode((8, Atom("halt"), [])), 8, "unknown_op"),
    (encode((9, Atom("ping"), [1])), 9, "bad_args"),
    (encode((10, Atom("load_module"), [1, 2])), 10, "bad_args"),
    (encode((11, Atom("add_patha"), [[1, 2, -5]])), 11, "exception"),
]


@pytest.mark.parametrize(("frame", "reply_id", "reason"), BAD_FRAMES)
def test_agent_answers_bad_frames_with_errors(
    node: HostNode, frame: bytes, reply_id: object, reason: str
) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(node.paths.socket))
        reply = _raw_call(sock, frame)
        assert isinstance(reply, tuple) and len(reply) == 3
        expected_id = Atom(reply_id) if isinstance(reply_id, str) else reply_id
        assert reply[0] == expected_id and reply[1] == Atom("error")
        assert isinstance(reply[2], tuple) and reply[2][0] == Atom(reason)
        # The same connection keeps working.
        assert _raw_call(sock, encode((2, Atom("ping"), []))) == (2, Atom("ok"), Atom("pong"))


def test_oversized_and_truncated_frames_close_only_that_connection(node: HostNode) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(node.paths.socket))
        sock.sendall(struct.pack(">I", 64 * 1024 * 1024) + b"x" * 100)
        assert sock.recv(10) == b""  # the agent hung up on the 64 MiB claim
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(node.paths.socket))
        sock.sendall(struct.pack(">I", 100) + b"abc")  # then vanish mid-frame
    with node.client(timeout=10) as c:
        c.ping()


def test_client_errors_name_socket_and_op(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    with pytest.raises(AgentUnavailable) as info:
        AgentClient(missing, timeout=1).ping()
    assert str(missing) in str(info.value) and "connect" in str(info.value)


def test_client_call_without_interning_is_rejected_by_safe(client: AgentClient) -> None:
    with pytest.raises(AgentOpError, match="bad_frame") as info:
        client.call("get_env", Atom("app_the_node_never_saw_987"))
    assert "get_env" in str(info.value)
    assert client.get_env("app_the_node_never_saw_987") == {}


# ------------------------------------------------------------------ lifecycle


def test_node_outlives_the_process_that_started_it(tmp_path: Path, agent_ebin: Path) -> None:
    state = tmp_path / "st"
    script = (
        "import sys; from pathlib import Path; "
        "from bstore.activators.hostnode import HostNode; "
        "s = HostNode(Path(sys.argv[1]), 'bg').start(Path(sys.argv[2])); print(s.pid)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(state), str(agent_ebin)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    host = HostNode(state, "bg")
    status = host.status()
    assert status.running and status.agent_ok and status.pid == int(out.stdout)
    with pytest.raises(HostNodeError, match="already runs"):
        host.start(agent_ebin)
    assert host.stop() == "graceful"
    assert not host.status().running
    assert not host.paths.socket.exists() and not host.paths.record.exists()
    assert "bstore: starting" in host.read_log()


def test_stop_escalates_term_then_kill(tmp_path: Path, agent_ebin: Path) -> None:
    host = HostNode(tmp_path / "st", "esc")
    host.start(agent_ebin)
    host.paths.socket.unlink()  # agent unreachable: SIGTERM (init:stop) must do it
    assert host.stop(graceful_timeout=1, term_timeout=20) == "terminated"

    host.start(agent_ebin)
    status = host.status()
    assert status.pid is not None
    os.kill(status.pid, signal.SIGSTOP)  # deaf to everything but SIGKILL
    assert host.stop(graceful_timeout=1, term_timeout=1) == "killed"
    assert not host.status().running


def test_restart_after_kill_removes_the_stale_socket(tmp_path: Path, agent_ebin: Path) -> None:
    host = HostNode(tmp_path / "st", "stale")
    status = host.start(agent_ebin)
    assert status.pid is not None
    os.killpg(status.pid, signal.SIGKILL)
    host.stop()  # reaps; the record is now stale
    assert host.start(agent_ebin).agent_ok
    assert host.stop() == "graceful"


def test_recycled_pid_is_never_signalled(tmp_path: Path) -> None:
    host = HostNode(tmp_path / "st", "recycled")
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        start_time = process_start_time(bystander.pid)
        assert start_time is not None
        host.paths.directory.mkdir(parents=True, mode=0o700)
        host.paths.record.write_text(
            f'{{"pid": {bystander.pid}, "start_time": {start_time - 1}, '
            f'"socket": "{host.paths.socket}", "node_name": null}}'
        )
        status = host.status()
        assert not status.running and status.problem is not None and "stale" in status.problem
        assert host.stop() == "not_running"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_liveness_follows_the_recorded_process_only(tmp_path: Path) -> None:
    host = HostNode(tmp_path / "st", "watched")
    host.paths.directory.mkdir(parents=True, mode=0o700)

    def record(pid: int, start_time: int) -> None:
        host.paths.record.write_text(
            f'{{"pid": {pid}, "start_time": {start_time}, '
            f'"socket": "{host.paths.socket}", "node_name": null}}'
        )

    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        start_time = process_start_time(child.pid)
        assert start_time is not None
        record(child.pid, start_time - 1)  # the pid of another process than recorded
        assert not host.is_running()
        record(child.pid, start_time)
        assert host.is_running() and host.is_running()  # the second: one poll, no /proc
        child.kill()
        child.wait()
        assert not host.is_running()
        assert not host.is_running()
    finally:
        child.kill()
        child.wait()
    # our own child that died unreaped is reaped by the check (no zombie left behind)
    zombie = subprocess.Popen(["sleep", "0.3"])
    zombie_start = process_start_time(zombie.pid)
    assert zombie_start is not None
    record(zombie.pid, zombie_start)
    assert host.is_running()
    deadline = time.monotonic() + 10
    # exited, not reaped: process_start_time no longer sees it, the pidfd says so too
    while process_start_time(zombie.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not host.is_running()
    with pytest.raises(ChildProcessError):
        os.waitpid(zombie.pid, os.WNOHANG)


# The main thread ends first (a zombie in /proc), another one goes on for a while: how a
# BEAM looks while its schedulers tear down after init:stop().
_LEADER_EXITS_FIRST = """
import ctypes, threading, time
def finish():
    time.sleep(1.0)
    import os
    os._exit(0)
threading.Thread(target=finish).start()
print("up", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_stop_waits_for_every_thread_of_the_node(tmp_path: Path) -> None:
    host = HostNode(tmp_path / "st", "dying")
    host.paths.directory.mkdir(parents=True, mode=0o700)
    child = subprocess.Popen([sys.executable, "-c", _LEADER_EXITS_FIRST],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        start_time = process_start_time(child.pid)
        if start_time is None:  # already a zombie leader: read the start time from /proc
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            start_time = int(fields[19])
        host.paths.record.write_text(
            f'{{"pid": {child.pid}, "start_time": {start_time}, '
            f'"socket": "{host.paths.socket}", "node_name": null}}'
        )
        record = host.read_record()
        assert record is not None
        deadline = time.monotonic() + 5
        while process_start_time(child.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child.poll() is None  # /proc says zombie, yet the process is still there
        # the wait lasts until the last thread is gone, not until the main one is
        assert wait_gone(record, 10.0)
        assert child.poll() is not None or not Path(f"/proc/{child.pid}").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("mode", "message"),
    [(0o755, "directory_not_private"), (0o710, "directory_not_private")],
)
def test_agent_refuses_a_socket_directory_others_can_enter(
    tmp_path: Path, agent_ebin: Path, mode: int, message: str
) -> None:
    sock_dir = tmp_path / "open"
    sock_dir.mkdir()
    sock_dir.chmod(mode)
    proc = subprocess.run(
        [
            "erl",
            "-noshell",
            "-noinput",
            "-pa",
            str(agent_ebin),
            "-bstore_agent_socket",
            str(sock_dir / "a.sock"),
            "-eval",
            "bstore_agent:start()",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and str(sock_dir) in proc.stderr


def test_second_agent_on_a_live_socket_refuses(node: HostNode, agent_ebin: Path) -> None:
    proc = subprocess.run(
        [
            "erl",
            "-noshell",
            "-noinput",
            "-pa",
            str(agent_ebin),
            "-bstore_agent_socket",
            str(node.paths.socket),
            "-eval",
            "bstore_agent:start()",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=node.paths.directory,
    )
    assert proc.returncode == 2 and "agent_already_running" in proc.stderr
    with node.client(timeout=10) as c:
        c.ping()


@pytest.mark.parametrize(
    ("profile", "message"),
    [("../evil", "profile name '../evil' is not valid"), ("", "profile name '' is not valid")],
)
def test_bad_profile_names(tmp_path: Path, profile: str, message: str) -> None:
    with pytest.raises(HostNodeError, match=re.escape(message)):
        HostNode(tmp_path, profile)


def test_pid_values_round_trip_to_the_node(client: AgentClient, app: BuiltApp) -> None:
    client.app_start("bstest")
    pids = client.suspend("bstest")
    assert all(isinstance(p, Pid) and p.node == Atom("nonode@nohost") for p in pids)
    client.resume(pids)
    assert client.process_info(dataclasses.replace(pids[0], id=32767, serial=8191)) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"code_paths": [Path("relative/ebin")]}, "code path relative/ebin is not an absolute"),
        ({"code_paths": [Path("/nonexistent/ebin")]}, "code path /nonexistent/ebin is not an"),
        ({"node_name": "bad name!"}, "node name 'bad name!' is not valid"),
    ],
)
def test_start_rejects_bad_arguments(
    tmp_path: Path, agent_ebin: Path, kwargs: dict[str, object], message: str
) -> None:
    host = HostNode(tmp_path / "st", "args")
    with pytest.raises(HostNodeError, match=re.escape(message)):
        host.start(agent_ebin, **kwargs)  # type: ignore[arg-type]
    assert not host.status().running


def test_start_with_a_node_directory_too_deep_for_sun_path(tmp_path: Path,
                                                           agent_ebin: Path) -> None:
    # The socket moves to a short private directory (test_node_dirs.py has the details).
    host = HostNode(tmp_path / ("d" * 120), "long")
    try:
        status = host.start(agent_ebin)
        assert status.agent_ok and len(os.fsencode(str(host.paths.socket))) <= 107
        assert host.paths.socket.parent != host.paths.directory
    finally:
        host.stop()


def test_start_reports_a_node_that_dies_at_once(tmp_path: Path, agent_ebin: Path) -> None:
    host = HostNode(tmp_path / "st", "dies")
    with pytest.raises(HostNodeError, match="exited") as info:
        host.start(agent_ebin, extra_args=["-bstore_agent_socket", "/second/arg"])
    assert "expected exactly one -bstore_agent_socket" in str(info.value)
    assert not host.paths.record.exists()


def test_reconfigure_a_library_application(client: AgentClient, tmp_path: Path) -> None:
    """An application without a callback module (`mod`) is reconfigured without error:
    there is no config_change/3 to call, the env is simply in place."""
    ebin = tmp_path / "libapp" / "ebin"
    ebin.mkdir(parents=True)
    (ebin / "libapp.app").write_text(
        '{application, libapp, [{vsn, "1.0"}, {modules, []}, {registered, []},'
        ' {applications, [kernel, stdlib]}, {env, [{level, 1}]}]}.\n')
    client.add_patha(ebin)
    client.app_start("libapp")
    client.reconfigure("libapp", {"level": 2}, [])
    assert client.get_env_key("libapp", "level") == 2
    old = client.get_env("libapp")
    client.set_env("libapp", "level", 3)
    client.config_change("libapp", old)
    assert client.get_env_key("libapp", "level") == 3
