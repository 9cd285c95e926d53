"""The daemon: timed loop, no overlapping passes, suspend/resume, the profile lock, the
event log, supervision, and SIGTERM to a real daemon process.

The reconciler here is a small double (:class:`FakeReconciler`) that emits the events a
real pass emits and detects concurrent entry; end-to-end runs with the real reconciler
are in ``tests/cli/test_daemon_cli.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bstore.errors import BstoreError
from bstore.events import EventBus
from bstore.gitops.config import Config
from bstore.gitops.daemon import Daemon, DaemonRunning, ReconcileBusy, Suspended

DEADLINE = 30.0


def wait_for(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after a generous deadline."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class FakeReconciler:
    """A reconciler double: counts passes, detects overlap, can block or fail a pass."""

    def __init__(self, bus: EventBus, *, delay: float = 0.0) -> None:
        self.bus = bus
        self.delay = delay
        self.passes = 0
        self.active = 0
        self.max_active = 0
        self.fail_next: str | None = None
        self.gate: threading.Event | None = None  # set: a pass waits until it is set
        self.entered = threading.Event()
        self.rollbacks: list[int | None] = []
        self.triggers: list[tuple[str, bool]] = []
        self.commit = "0" * 40
        self._lock = threading.Lock()

    def reconcile_once(self, *, wait: bool = True, trigger: str = "manual") -> dict[str, Any]:
        self.triggers.append((trigger, wait))
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.entered.set()
            with self.bus.span("bstore.reconcile") as span:
                if self.gate is not None:
                    assert self.gate.wait(DEADLINE), "test never opened the gate"
                if self.delay:
                    time.sleep(self.delay)
                self.bus.emit("bstore.build.stop", {"duration": 5.0}, app="web", result="ok")
                self.bus.emit("bstore.health.check", app="web", result="ok")
                if self.fail_next:
                    message, self.fail_next = self.fail_next, None
                    raise BstoreError(message)
                with self._lock:
                    self.passes += 1
                span.set(result="ok", commit=self.commit)
            return {"commit": self.commit, "pass": self.passes}
        finally:
            with self._lock:
                self.active -= 1

    def status(self) -> dict[str, Any]:
        return {"state": "synced" if self.passes else "initializing",
                "last_commit": self.commit if self.passes else None,
                "app_count": 2, "healthy_count": 1,
                "apps": {"web": {"name": "web", "version": "1.0.0", "status": "running"},
                         "db": {"name": "db", "version": "2.1.0", "status": "failed",
                                "last_error": "boom"}}}

    def rollback(self, to: int | None = None, *, wait: bool = True) -> dict[str, Any]:
        assert not wait  # the daemon answers 409 rather than wait behind a pass
        self.rollbacks.append(to)
        return {"from": 3, "to": to or 2}


def make_config(tmp_path: Path, **changes: Any) -> Config:
    values: dict[str, Any] = {"repo_url": "https://git.example.invalid/specs.git",
                              "reconcile_interval": 30.0, "api_address": "127.0.0.1:0",
                              "local_path": tmp_path / "root" / "gitops" / "default"}
    values.update(changes)
    return Config(**values)


TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def fake(bus: EventBus) -> FakeReconciler:
    return FakeReconciler(bus)


@pytest.fixture
def make_daemon(tmp_path: Path, bus: EventBus) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(reconciler: Any, *, start: bool = True, **kwargs: Any) -> Daemon:
        config = kwargs.pop("config", None) or make_config(tmp_path)
        kwargs.setdefault("token", TOKEN)
        d = Daemon(config, tmp_path / "root", reconciler=reconciler, events=bus, **kwargs)
        if start:
            d.start()
            started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def test_timed_loop_runs_passes_at_the_interval(make_daemon: Any, tmp_path: Path,
                                                fake: FakeReconciler) -> None:
    d = make_daemon(fake, config=make_config(tmp_path, reconcile_interval=0.2))
    wait_for(lambda: fake.passes >= 4, "4 timed passes")
    status = d.status()
    assert status["daemon"]["loop"] == "running"
    assert status["daemon"]["passes"] >= 4
    assert status["daemon"]["last_pass"]["trigger"] == "timer"
    assert status["daemon"]["last_pass"]["ok"] is True
    assert status["state"] == "synced"


def test_manual_and_timed_passes_never_overlap(make_daemon: Any, tmp_path: Path,
                                               bus: EventBus) -> None:
    slow = FakeReconciler(bus, delay=0.05)
    d = make_daemon(slow, config=make_config(tmp_path, reconcile_interval=0.01))
    outcomes: list[str] = []

    def hammer() -> None:
        for _ in range(15):
            try:
                d.reconcile("manual")
                outcomes.append("ran")
            except ReconcileBusy as exc:
                assert "already running" in exc.message
                outcomes.append("busy")

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: slow.passes >= 10, "10 passes")
    assert slow.max_active == 1
    assert len(outcomes) == 45 and "busy" in outcomes


def test_manual_pass_while_one_runs_is_refused_with_409_semantics(
        make_daemon: Any, fake: FakeReconciler) -> None:
    fake.gate = threading.Event()
    d = make_daemon(fake)
    assert fake.entered.wait(DEADLINE)  # the start-up pass is running, held by the gate
    with pytest.raises(ReconcileBusy) as caught:
        d.reconcile("manual")
    assert "a reconcile pass is already running (a timer pass started at" in caught.value.message
    assert caught.value.status == 409 and caught.value.retry_after
    assert d.status()["daemon"]["pass_running"]["trigger"] == "timer"
    fake.gate.set()
    wait_for(lambda: d.status()["daemon"]["pass_running"] is None, "the pass to end")
    assert d.reconcile("manual")["ok"] is True
    assert fake.triggers == [("timer", True), ("manual", False)]
    assert fake.max_active == 1


def test_a_failing_pass_is_recorded_and_the_loop_goes_on(make_daemon: Any, tmp_path: Path,
                                                         fake: FakeReconciler) -> None:
    fake.fail_next = "repository 'x' is unreachable"
    lines: list[str] = []
    d = make_daemon(fake, config=make_config(tmp_path, reconcile_interval=0.1), log=lines.append)
    wait_for(lambda: fake.passes >= 2, "passes after the failure")
    assert any("reconcile pass (timer) failed: repository 'x' is unreachable" in line
               for line in lines)
    errors = d.recent_events(prefix="bstore.reconcile.error")
    assert errors and errors[0]["metadata"]["error"] == "repository 'x' is unreachable"


def test_webhook_wakes_the_loop_at_once(make_daemon: Any, fake: FakeReconciler) -> None:
    d = make_daemon(fake)  # interval 30 s: only the start-up pass would run
    wait_for(lambda: fake.passes == 1, "the start-up pass")
    answer = d.request_pass("webhook", {"ref": "refs/heads/main"})
    assert answer["accepted"] and answer["queued"]
    wait_for(lambda: fake.passes == 2, "the webhook pass")
    assert d.status()["daemon"]["last_pass"]["trigger"] == "webhook"
    assert fake.triggers[-1] == ("webhook", True)


def test_suspend_stops_timed_passes_persists_and_resume_restarts(
        make_daemon: Any, tmp_path: Path, fake: FakeReconciler, bus: EventBus) -> None:
    config = make_config(tmp_path, reconcile_interval=0.05)
    d = make_daemon(fake, config=config)
    wait_for(lambda: fake.passes >= 1, "a pass")
    answer = d.suspend("maintenance")
    assert answer["suspended"] and answer["changed"] and answer["reason"] == "maintenance"
    wait_for(lambda: d.status()["daemon"]["pass_running"] is None, "the pass to end")
    before = fake.passes
    time.sleep(0.5)  # ten intervals: a running loop would have passed several times
    assert fake.passes == before
    status = d.status()
    assert status["suspended"] is True and status["daemon"]["loop"] == "suspended"
    assert status["daemon"]["suspended"]["reason"] == "maintenance"
    with pytest.raises(Suspended, match="suspended; the push was not applied"):
        d.request_pass("webhook", {})
    assert d.reconcile("manual")["ok"]  # an explicit pass still runs
    assert d.suspend()["changed"] is False
    d.stop()

    again = Daemon(config, tmp_path / "root", reconciler=fake, events=bus, api=False)
    again.start()
    try:
        assert again.suspended  # persisted across a restart
        count = fake.passes
        assert again.resume() == {"suspended": False, "changed": True}
        wait_for(lambda: fake.passes > count + 2, "passes after resume")
        assert not again.status()["suspended"]
    finally:
        again.stop()
    assert json.loads((tmp_path / "root/gitops/default/daemon.json").read_text()) == {
        "suspended": False}


def test_rollback_uses_the_reconciler_and_suspends(make_daemon: Any,
                                                   fake: FakeReconciler) -> None:
    d = make_daemon(fake)
    wait_for(lambda: fake.passes == 1, "the start-up pass")
    answer = d.rollback(2)
    assert answer == {"ok": True, "rollback": {"from": 3, "to": 2}, "suspended": True}
    assert fake.rollbacks == [2]
    assert "rolled back to generation 2" in d.status()["daemon"]["suspended"]["reason"]


def test_two_daemons_on_one_root_and_profile_are_refused(
        make_daemon: Any, tmp_path: Path, fake: FakeReconciler) -> None:
    make_daemon(fake, api=False)
    second = make_daemon(fake, start=False, api=False)
    with pytest.raises(DaemonRunning) as caught:
        second.start()
    assert f"another bstore daemon (pid {os.getpid()}) is running for profile 'default'" \
        in caught.value.message
    assert "daemon-default.lock" in caught.value.message
    # another profile of the same root is independent
    other = make_daemon(fake, api=False, config=make_config(
        tmp_path, profile="staging", local_path=tmp_path / "root/gitops/staging"))
    assert other.status()["daemon"]["profile"] == "staging"


def test_a_second_daemon_in_another_process_is_refused(make_daemon: Any, tmp_path: Path,
                                                       fake: FakeReconciler) -> None:
    make_daemon(fake, api=False)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from bstore.gitops.config import Config
        from bstore.gitops.daemon import Daemon, DaemonRunning
        config = Config(repo_url="https://git.example.invalid/specs.git",
                        local_path=Path({str(tmp_path / "root/gitops/default")!r}))
        try:
            Daemon(config, Path({str(tmp_path / "root")!r}), reconciler=object(),
                   api=False).start()
        except DaemonRunning as exc:
            print(exc.message)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=DEADLINE).stdout
    assert f"another bstore daemon (pid {os.getpid()})" in out


def test_events_are_logged_as_json_lines(make_daemon: Any, tmp_path: Path,
                                         fake: FakeReconciler) -> None:
    d = make_daemon(fake, event_log_max_bytes=2000,
                    config=make_config(tmp_path, reconcile_interval=0.02))
    wait_for(lambda: fake.passes >= 10, "10 passes")
    d.stop()
    log = tmp_path / "root/logs/events.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    rotated = [json.loads(line) for line in log.with_name("events.jsonl.1")
               .read_text().splitlines()]
    names = {e["name"] for e in lines + rotated}
    assert {"bstore.reconcile.stop", "bstore.build.stop"} <= names
    assert lines[-1]["name"] == "bstore.daemon.stop"
    assert log.stat().st_size < 4000  # rotated at the bound instead of growing


def test_supervision_runs_periodically_but_never_during_a_pass(
        make_daemon: Any, fake: FakeReconciler) -> None:
    calls: list[int] = []

    def supervise() -> list[str]:
        calls.append(fake.active)
        return ["vm_app: restarted"]

    lines: list[str] = []
    fake.gate = threading.Event()
    make_daemon(fake, supervise=supervise, supervise_interval=0.02, log=lines.append)
    assert fake.entered.wait(DEADLINE)
    time.sleep(0.2)  # supervision rounds come due while the pass is held
    assert calls == []
    fake.gate.set()
    wait_for(lambda: len(calls) >= 3, "3 supervision rounds")
    assert set(calls) == {0}
    assert "supervisor: vm_app: restarted" in lines


def test_stop_waits_for_the_running_pass(make_daemon: Any, fake: FakeReconciler) -> None:
    fake.gate = threading.Event()
    d = make_daemon(fake)
    assert fake.entered.wait(DEADLINE)
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive()  # still waiting for the pass
    fake.gate.set()
    stopper.join(DEADLINE)
    assert not stopper.is_alive() and fake.passes == 1 and fake.active == 0


DAEMON_SCRIPT = """
import os, sys, threading, time
from pathlib import Path
from bstore.events import EventBus
from bstore.gitops.config import Config
from bstore.gitops.daemon import Daemon

root = Path(sys.argv[1])
class Rec:
    passes = 0
    def reconcile_once(self, *, wait=True, trigger="manual"):
        self.passes += 1
        (root / "passes").write_text(str(self.passes))
        time.sleep(float(sys.argv[2]))
        return {"pass": self.passes}
    def status(self):
        return {"state": "synced", "apps": {}}

config = Config(repo_url="https://git.example.invalid/specs.git", reconcile_interval=0.05,
                api_address="127.0.0.1:0", local_path=root / "gitops" / "default")
d = Daemon(config, root, reconciler=Rec(), events=EventBus(), token="t")
code = d.run_forever(on_start=lambda: print(d.api_url, flush=True))
(root / "exited").write_text("clean")
sys.exit(code)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_real_daemon_process_cleanly(tmp_path: Path, signum: int) -> None:
    script = tmp_path / "run_daemon.py"
    script.write_text(DAEMON_SCRIPT)
    root = tmp_path / "root"
    # A child that outlives the daemon stands for the apps (host node, VMs): SIGTERM to the
    # daemon must not take it down.
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                           start_new_session=True)
    proc = subprocess.Popen([sys.executable, str(script), str(root), "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        wait_for(lambda: (root / "passes").exists(), "a pass")
        assert httpx.get(f"{url}/status").json()["daemon"]["pid"] == proc.pid
        proc.send_signal(signum)
        assert proc.wait(DEADLINE) == 0, proc.stderr.read() if proc.stderr else ""
        assert (root / "exited").read_text() == "clean"
        events = [json.loads(x) for x in (root / "logs/events.jsonl").read_text().splitlines()]
        assert events[-1]["name"] == "bstore.daemon.stop"
        assert app.poll() is None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/status")
    finally:
        if proc.poll() is None:
            proc.kill()
        app.kill()
        app.wait()


def test_a_timed_pass_waiting_during_a_rollback_does_not_undo_it(
        make_daemon: Any, tmp_path: Path, fake: FakeReconciler) -> None:
    calls: list[int] = []

    def slow_rollback(to: int | None) -> dict[str, Any]:
        calls.append(fake.passes)
        time.sleep(0.4)  # timed passes come due and wait for the lock meanwhile
        return {"to": to}

    d = make_daemon(fake, rollback=slow_rollback,
                    config=make_config(tmp_path, reconcile_interval=0.05))
    wait_for(lambda: fake.passes >= 2, "timed passes")
    assert d.rollback(1)["suspended"] is True
    after = fake.passes
    time.sleep(0.4)
    assert fake.passes == after == calls[0]
