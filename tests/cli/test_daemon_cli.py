"""``bstore daemon`` as a real process: a real git repo of specs, a real erlc build, the
real reconciler and the embedded activator (a real host node); a new commit is picked up
by the timed loop, a webhook reconciles at once, SIGTERM exits 0 leaving the node up."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "builders"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gitops"))

import realise_helpers as rh
import sample_apps
from gitrepos import GitRemote

from bstore.cli.daemon import describe_event
from bstore.cli.main import cli
from bstore.events import Event

pytestmark = pytest.mark.integration

BSTORE = [str(Path(sys.executable).with_name("bstore"))]
TOKEN = "cli-test-token"
DEADLINE = 120.0


def wait_for(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Setup:
    """A specs repo with one erlc app (git source), a state root and a bstore.toml."""

    def __init__(self, tmp: Path, activator: str, *, vm_app: bool = False) -> None:
        self.tmp = tmp
        self.plain = rh.git_repo(sample_apps.erlc_app(tmp / "repos"))
        self.source_ref = rh.git(self.plain, "rev-parse", "HEAD").strip()
        # With vm_app, a second app runs in a VM of its own (the vm activator's part).
        self.vm_repo = rh.git_repo(sample_apps.erlc_app(tmp / "repos", "vmapp")) \
            if vm_app else None
        self.remote = GitRemote(tmp / "git")
        # Unix socket paths are limited to 107 bytes: xdist's tmp paths leave too little
        # room for nodes/<profile>/vms/<app>/agent.sock, so the state root is short.
        self.root = Path(tempfile.mkdtemp(prefix="bsd-", dir="/tmp"))
        # A profile per test: the host node's name derives from it, and tests run in
        # parallel against one epmd.
        self.profile = "d" + hashlib.sha256(str(tmp).encode()).hexdigest()[:6]
        self.config = tmp / "bstore.toml"
        self.log = tmp / "daemon.log"
        self.config.write_text(
            f'repo_url = "{self.remote.url}"\nprofile = "{self.profile}"\n'
            f'activator = "{activator}"\nreconcile_interval = "300ms"\n'
            f'api_address = "127.0.0.1:0"\napi_token = "{TOKEN}"\n')

    def push_spec(self, version: str = "1.0.0", message: str = "change") -> str:
        spec = {"name": "plainapp", "version": version,
                "source": {"type": "git", "url": self.plain.as_uri(), "ref": self.source_ref}}
        files = {"apps/plainapp/app.json": json.dumps(spec)}
        if self.vm_repo is not None:
            ref = rh.git(self.vm_repo, "rev-parse", "HEAD").strip()
            files["apps/vmapp/app.json"] = json.dumps(
                {"name": "vmapp", "version": "1.0.0", "isolation": "vm",
                 "source": {"type": "git", "url": self.vm_repo.as_uri(), "ref": ref}})
        commit = self.remote.commit(files, message)
        self.remote.push()
        return commit

    def args(self, *more: str) -> list[str]:
        return [*BSTORE, "--root", str(self.root), *more]


@pytest.fixture
def dry(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path, "dry-run")
    yield s
    shutil.rmtree(s.root, ignore_errors=True)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path, "embedded", vm_app=True)
    yield s
    if s.log.exists():
        print(s.log.read_text())  # shown when the test failed
    subprocess.run(s.args("node", "stop", "-p", s.profile), capture_output=True, timeout=60,
                   check=False)
    subprocess.run(["chmod", "-R", "u+w", str(s.root)], check=False)
    shutil.rmtree(s.root, ignore_errors=True)


def start_daemon(s: Setup, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``bstore daemon``; its log goes to ``s.log`` (a file: a pipe nobody drains
    could fill and block the daemon)."""
    with s.log.open("w") as log:
        proc = subprocess.Popen(s.args("daemon", "--config", str(s.config), *extra),
                                stdout=subprocess.DEVNULL, stderr=log, text=True)
    found: list[str] = []

    def announced() -> bool:
        found.extend(re.findall(r"API (http://127\.0\.0\.1:\d+)", s.log.read_text()))
        return bool(found) or proc.poll() is not None

    wait_for(announced, "the daemon to announce its API")
    if not found:
        pytest.fail(f"daemon exited {proc.returncode}: {s.log.read_text()}")
    return proc, found[0]


def node_status(s: Setup) -> dict[str, Any]:
    out = subprocess.run(s.args("--json", "node", "status", "-p", s.profile),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(json.loads(out))


def test_daemon_follows_new_commits_and_sigterm_leaves_the_apps_running(
        embedded: Setup) -> None:
    s = embedded
    first = s.push_spec(message="first")
    proc, url = start_daemon(s)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_for(lambda: client.get("/status").json()["last_commit"] == first,
                     "the first commit to be applied")
            status = client.get("/status").json()
            assert status["state"] == "synced" and status["profile"] == s.profile
            assert client.get("/apps/plainapp").json()["status"] == "running"
            assert client.get("/apps/vmapp").json()["status"] == "running"

            # A new commit is found by the timed loop alone.
            second = s.push_spec("1.0.1", "upgrade")
            wait_for(lambda: client.get("/status").json()["last_commit"] == second,
                     "the timed loop to apply the second commit")

            # Suspended, the loop ignores a push; a webhook is refused; resume applies it.
            assert client.post("/suspend", headers={"Authorization": f"Bearer {TOKEN}"}
                               ).status_code == 200
            third = s.push_spec("1.0.2", "while suspended")
            hook = client.post("/hooks/git", headers={"Authorization": f"Bearer {TOKEN}"})
            assert hook.status_code == 409
            assert client.get("/status").json()["last_commit"] == second
            assert client.post("/resume", headers={"Authorization": f"Bearer {TOKEN}"}
                               ).json()["changed"] is True
            wait_for(lambda: client.get("/status").json()["last_commit"] == third,
                     "the third commit after resume")

            gens = client.get("/generations").json()["generations"]
            assert [g["commit"] for g in gens] == [first, second, third]
            assert gens[-1]["current"] is True
            metrics = client.get("/metrics").text
            assert re.search(r'bstore_reconciles_total\{result="synced"\} [1-9]', metrics)
            assert 'bstore_apps{status="running"} 2.0' in metrics
            assert re.search(r'bstore_builds_total\{result="done"\} [1-9]', metrics)
            assert re.search(r'bstore_health_checks_total\{result="healthy"\} [1-9]', metrics)
            assert not re.search(r"bstore_last_successful_reconcile_timestamp_seconds 0", metrics)
            events = client.get("/events", params={"prefix": "bstore.deploy"}).json()
            assert sorted((e["name"], e["metadata"]["app"]) for e in events["events"]) == [
                ("bstore.deploy.start", "plainapp"), ("bstore.deploy.start", "vmapp"),
                ("bstore.deploy.stop", "plainapp"), ("bstore.deploy.stop", "vmapp")]
            upgrades = client.get("/events", params={"prefix": "bstore.upgrade"}).json()
            assert [e["metadata"]["app"] for e in upgrades["events"]] == ["plainapp"] * 4
            assert client.get("/apps/plainapp").json()["version"] == "1.0.2"

            # A manual rollback activates generation 2 and suspends the loop, so the next
            # pass does not bring 1.0.2 back.
            auth = {"Authorization": f"Bearer {TOKEN}"}
            back = client.post("/rollback", headers=auth)
            assert back.status_code == 200, back.text
            assert back.json()["ok"] is True and back.json()["suspended"] is True
            assert back.json()["rollback"]["generation"] == 2
            current = [g for g in client.get("/generations").json()["generations"]
                       if g["current"]]
            assert [g["number"] for g in current] == [2]
            assert node_status(s)["apps"]["plainapp"]["version"] == "1.0.1", back.text
            assert client.get("/status").json()["daemon"]["loop"] == "suspended"
            nothing = client.post("/rollback", headers=auth, json={"to": 99})
            assert nothing.status_code == 409, nothing.text
            assert "99" in nothing.json()["message"]

        pid = node_status(s)["pid"]
        vm_pid = vm_record(s)["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0, s.log.read_text()
        err = s.log.read_text()
        assert "SIGTERM: stopping after the current pass; apps keep running" in err
        after = node_status(s)
        assert after["running"] is True and after["pid"] == pid
        assert after["apps"]["plainapp"]["status"] == "running"
        assert after["apps"]["vmapp"]["status"] == "running"
        assert vm_record(s)["pid"] == vm_pid
        os.kill(vm_pid, 0)  # the VM process itself is alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def vm_record(s: Setup) -> dict[str, Any]:
    path = s.root / "nodes" / s.profile / "vms" / "vmapp" / "node.json"
    return dict(json.loads(path.read_text()))


def test_the_daemon_supervises_vms(embedded: Setup) -> None:
    """With an hour between passes only the supervision thread can restart a killed VM."""
    s = embedded
    s.config.write_text(s.config.read_text().replace('"300ms"', '"1h"'))
    s.push_spec(message="first")
    proc, url = start_daemon(s)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_for(lambda: client.get("/status").json()["state"] == "synced", "synced")
        old = vm_record(s)["pid"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: vm_record(s)["pid"] != old, "the supervisor to restart the VM")
        wait_for(lambda: "supervisor: vmapp: restarted" in s.log.read_text(),
                 "the supervisor's log line")
        assert node_status(s)["apps"]["vmapp"]["status"] == "running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_webhook_reconciles_at_once(dry: Setup) -> None:
    s = dry
    s.config.write_text(s.config.read_text().replace('"300ms"', '"1h"'))
    first = s.push_spec(message="first")
    proc, url = start_daemon(s)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_for(lambda: client.get("/status").json()["last_commit"] == first, "first")
            second = s.push_spec("1.1.0", "second")
            push = json.dumps({"ref": "refs/heads/main", "after": second})
            r = client.post("/hooks/git", content=push,
                            headers={"Authorization": f"Bearer {TOKEN}",
                                     "Content-Type": "application/json",
                                     "X-GitHub-Event": "push"})
            assert r.status_code == 202
            # the interval is an hour: only the webhook can have applied it
            wait_for(lambda: client.get("/status").json()["last_commit"] == second,
                     "the webhook pass")
            assert client.get("/status").json()["daemon"]["last_pass"]["trigger"] == "webhook"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_once_runs_one_pass(dry: Setup) -> None:
    commit = dry.push_spec(message="first")
    done = subprocess.run(dry.args("--json", "daemon", "--config", str(dry.config), "--once"),
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["ok"] is True and record["trigger"] == "once"
    assert record["result"]["commit"] == commit and record["result"]["state"] == "synced"
    log = (dry.root / "logs/events.jsonl").read_text().splitlines()
    assert any(json.loads(line)["name"] == "bstore.reconcile.stop" for line in log)


def test_once_with_an_unreachable_repo_fails(dry: Setup) -> None:
    dry.config.write_text(dry.config.read_text().replace(
        dry.remote.url, (dry.tmp / "missing.git").as_uri()))
    done = subprocess.run(dry.args("daemon", "--config", str(dry.config), "--once"),
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 1
    assert "pass FAILED" in done.stdout and "missing.git" in done.stdout


def test_a_second_daemon_on_the_same_root_is_refused(dry: Setup) -> None:
    dry.push_spec(message="first")
    proc, _url = start_daemon(dry)
    try:
        second = subprocess.run(dry.args("daemon", "--config", str(dry.config)),
                                capture_output=True, text=True, timeout=DEADLINE)
        assert second.returncode == 1
        assert f"error: another bstore daemon (pid {proc.pid}) is running for profile" \
            f" {dry.profile!r}" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0


def test_a_missing_token_variable_is_an_error_before_listening(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("BSTORE_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    config = tmp_path / "bstore.toml"
    config.write_text('repo_url = "https://x.invalid/r.git"\napi_token_env = "NO_SUCH_TOKEN_VAR"\n'
                      'api_address = "127.0.0.1:0"\n')
    result = CliRunner().invoke(cli, ["--root", str(tmp_path / "state"), "daemon",
                                      "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "environment variable NO_SUCH_TOKEN_VAR is not set" in result.output
    assert "export NO_SUCH_TOKEN_VAR=<token>" in result.output


@pytest.mark.parametrize(("args", "code", "message"), [
    (["daemon"], 1, "config key 'repo_url' is required"),
    (["daemon", "--repo-url", "https://x.invalid/r.git", "--interval", "soon"], 1,
     "config key 'reconcile_interval' in option --reconcile-interval"),
    (["daemon", "--repo-url", "https://x.invalid/r.git", "--api-address", "nope"], 2,
     "Invalid value for --api-address"),
    (["daemon", "--repo-url", "https://x.invalid/r.git", "--api-address", "0.0.0.0:1"], 1,
     "listens beyond this machine but no api_token"),
    (["daemon", "--config", "/nonexistent/bstore.toml"], 1, "cannot read config file"),
])
def test_bad_configuration_is_refused_before_anything_runs(
        tmp_path: Path, args: list[str], code: int, message: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("BSTORE_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(cli, ["--root", str(tmp_path / "state"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "state" / "locks").exists()


@pytest.mark.parametrize(("name", "meta", "expected"), [
    ("bstore.reconcile.stop", {"status": "synced", "changed": False}, None),
    ("bstore.reconcile.stop", {"status": "synced", "changed": True, "commit": "a" * 40},
     "reconcile.stop status=synced commit=aaaaaaaaaaaa"),
    ("bstore.reconcile.stop", {"status": "degraded", "changed": False},
     "reconcile.stop status=degraded"),
    ("bstore.git.pull", {"changed": False, "commit": "b" * 40}, None),
    ("bstore.health.check", {"app": "web", "result": "healthy"}, None),
    ("bstore.health.check", {"app": "web", "result": "unhealthy"},
     "health.check app=web result=unhealthy"),
    ("bstore.deploy.start", {"app": "web"}, None),
    ("bstore.build.start", {"app": "web"}, None),
    ("other.thing", {}, None),
])
def test_log_lines(name: str, meta: dict[str, Any], expected: str | None) -> None:
    line = describe_event(Event(1, name, time.time(), {}, meta))
    if expected is None:
        assert line is None
    else:
        assert line is not None and line.split(" ", 1)[1] == expected


def test_verbose_log_shows_passes_that_changed_nothing() -> None:
    event = Event(1, "bstore.reconcile.stop", time.time(), {"duration": 12.0},
                  {"status": "synced", "changed": False})
    line = describe_event(event, verbose=True)
    assert line is not None and line.endswith("reconcile.stop status=synced 12ms")
