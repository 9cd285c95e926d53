"""The agent's one-request ``restart_app`` and ``app_running`` on a real node: the steps
run in order, and the first failing one is reported as that operation alone would be."""

# ruff: noqa: F811  (the fixtures imported from test_agent are parameters here)

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_agent import BuiltApp, app, app_build, client, node  # noqa: F401

from bstore.activators.agent_client import AgentClient, AgentOpError


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
