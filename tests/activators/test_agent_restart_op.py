"""The agent's one-request ``restart_app`` and ``app_running`` on a real node: the steps
run in order, and the first failing one is reported as that operation alone would be."""

# ruff: noqa: F811  (the fixtures imported from test_agent are parameters here)

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import cast

import pytest
from test_agent import BuiltApp, app, app_build, client, node  # noqa: F401

from bstore.activators.agent_client import AgentClient, AgentOpError, AgentProtocolError
from bstore.activators.etf import AnyTerm, decode, encode
from bstore.specs.terms.model import Atom


def test_restart_app_stops_loads_sets_env_and_starts(client: AgentClient,
                                                      app: BuiltApp) -> None:
    assert client.app_running("bstest") is None
    # not started and not loaded yet: the stop steps tolerate that
    started = client.restart_app("bstest", None, [app.ebin], {}, {"extra_key": 42})
    assert started == ["bstest"]
    assert client.app_running("bstest") == "1"
    assert client.get_env_key("bstest", "extra_key") == 42
    pid_before, _ = app.state()
    md5_before = client.module_md5s("bstest")["bstest_srv"]
    # a real restart, with new code for one module: a new process runs it
    client.restart_app("bstest", app.ebin, [app.ebin], {"bstest_srv": app.srv_v2}, {})
    assert client.app_running("bstest") == "1"
    pid_after, _ = app.state()
    assert pid_after != pid_before
    assert client.module_md5s("bstest")["bstest_srv"] not in (None, md5_before)
    assert str(app.ebin) in client.get_path()
    # The replaced code is purged once the reply is out (nothing of the stopped app
    # runs it), so the next restart's load has no old code to purge first.
    deadline = time.monotonic() + 10
    while client.old_code(["bstest_srv", "bstest_sup"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.old_code(["bstest_srv", "bstest_sup"]) == []



@pytest.mark.parametrize(("ebins", "modules", "op", "text"), [
    (["{missing}"], {}, "add_patha", "bad_directory"),
    (["{ebin}"], {"bstest_srv": "{missing}/bstest_srv.beam"}, "load_module", "load_failed"),
    (["{ebin}"], {"bstest_srv": "{ebin}/other.beam"}, "load_module", "module_name_mismatch"),
])
def test_restart_app_reports_the_failing_step(client: AgentClient, app: BuiltApp,
                                              tmp_path: Path, ebins: list[str],
                                              modules: dict[str, str], op: str,
                                              text: str) -> None:
    def fill(s: str) -> str:
        return s.format(missing=tmp_path / "missing", ebin=app.ebin)

    with pytest.raises(AgentOpError) as info:
        client.restart_app("bstest", None, [fill(e) for e in ebins],
                           {m: fill(p) for m, p in modules.items()}, {})
    assert info.value.op == op
    assert text in info.value.message
    assert client.app_running("bstest") is None


def test_restart_app_of_an_unknown_app_fails_at_app_load(client: AgentClient,
                                                         app: BuiltApp) -> None:
    with pytest.raises(AgentOpError) as info:
        client.restart_app("no_such_app_here", None, [app.ebin], {}, {})
    assert info.value.op == "app_load"
    # the reason is application:load's own ({"no such file or directory", ".app"})
    assert "app_load: failed: {" in info.value.message


# ------------------------------------------------------------------ app_versions replies


def _serve_one_agent(path: Path, replies: dict[str, tuple[str, AnyTerm]]) -> threading.Thread:
    """A stand-in agent on a Unix socket: answers each op with ``replies[op]`` (a
    ``(status, result)`` pair) in the real framing."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            while True:
                head = conn.recv(4)
                if len(head) < 4:
                    return
                (n,) = struct.unpack(">I", head)
                frame = b""
                while len(frame) < n:
                    frame += conn.recv(n - len(frame))
                request = decode(frame)
                assert isinstance(request, tuple) and isinstance(request[1], Atom)
                status, result = replies[request[1].name]
                out = encode((cast(AnyTerm, request[0]), Atom(status), result))
                conn.sendall(struct.pack(">I", len(out)) + out)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("reply", "text"), [
    (Atom("nonsense"), "app_versions"),
    ([(Atom("kernel"), 8)], "{kernel,8}"),
    ([(b"kernel", b"8.5")], "kernel"),
])
def test_malformed_app_versions_reply_is_a_protocol_error(tmp_path: Path, reply: AnyTerm,
                                                          text: str) -> None:
    sock = tmp_path / "agent.sock"
    _serve_one_agent(sock, {"app_versions": ("ok", reply)})
    with AgentClient(sock, timeout=5.0) as client, pytest.raises(AgentProtocolError) as info:
        client.running_versions()
    assert "app_versions" in info.value.message and text in info.value.message


def test_app_versions_falls_back_for_an_older_agent(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    _serve_one_agent(sock, {
        "app_versions": ("error", (Atom("unknown_op"), Atom("app_versions"))),
        "which_applications": ("ok", [(Atom("kernel"), b"ERTS  CXC 138 10", b"8.5")]),
    })
    with AgentClient(sock, timeout=5.0) as client:
        assert client.running_versions() == {"kernel": "8.5"}
