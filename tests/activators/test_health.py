"""Health probes against real loopback servers, waiting until healthy, and the schedule."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bstore.activators.base import HealthResult
from bstore.activators.health import (
    HealthSchedule,
    check_http,
    check_tcp,
    probe,
    wait_until_healthy,
)
from bstore.specs.model import HealthSpec, HealthType


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/status/") else 200
        if self.path == "/slow":
            threading.Event().wait(2)
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("path", "healthy", "detail"), [
    ("/status/200", True, "HTTP 200"),
    ("/status/204", True, "HTTP 204"),
    ("/status/302", False, "HTTP 302"),
    ("/status/404", False, "HTTP 404"),
    ("/status/500", False, "HTTP 500"),
    ("/status/503", False, "HTTP 503"),
    ("/slow", False, "ReadTimeout"),
])
def test_http_probe(http_port: int, path: str, healthy: bool, detail: str) -> None:
    result = check_http("web", http_port, path, timeout=0.5)
    assert result.healthy is healthy
    assert f"GET http://127.0.0.1:{http_port}{path}" in result.detail
    assert detail in result.detail


def test_http_probe_of_closed_port() -> None:
    port = _closed_port()
    result = check_http("web", port, "/", timeout=0.5)
    assert not result.healthy and "ConnectError" in result.detail


def test_tcp_probe(http_port: int) -> None:
    assert check_tcp("web", http_port, 0.5) == HealthResult(
        "web", True, f"connect 127.0.0.1:{http_port}: accepted")
    closed = _closed_port()
    result = check_tcp("web", closed, 0.5)
    assert not result.healthy and "Connection refused" in result.detail


def test_probe_dispatch_without_a_node(http_port: int) -> None:
    spec = HealthSpec(HealthType.HTTP, port=http_port, path="/status/200")
    assert probe("web", spec, None).healthy
    assert probe("web", None, None) == HealthResult("web", False, "node not running")
    custom = HealthSpec(HealthType.CUSTOM, module="web_health")
    assert probe("web", custom, None).detail == "node not running"


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_until_healthy_retries_then_succeeds() -> None:
    clock = _FakeClock()
    answers = iter([False, False, True])
    result = wait_until_healthy(lambda: HealthResult("a", next(answers), "x"), 5.0,
                                clock=clock, sleep=clock.sleep)
    assert result.healthy and clock.now == pytest.approx(0.2)


def test_wait_until_healthy_gives_up_at_the_deadline() -> None:
    clock = _FakeClock()
    calls = []

    def check() -> HealthResult:
        calls.append(clock.now)
        return HealthResult("a", False, "HTTP 500")

    result = wait_until_healthy(check, 1.0, clock=clock, sleep=clock.sleep)
    assert result == HealthResult("a", False, "not healthy within 1 s: HTTP 500")
    # Probed every 0.1 s, the last one at the deadline.
    assert calls[-1] == pytest.approx(1.0)
    assert all(0 < b - a <= 0.1 + 1e-9 for a, b in itertools.pairwise(calls))


def test_settle_catches_an_app_that_flaps() -> None:
    clock = _FakeClock()
    answers = iter([True, False] * 100)
    result = wait_until_healthy(lambda: HealthResult("a", next(answers), "flap"), 1.0,
                                settle=0.3, clock=clock, sleep=clock.sleep)
    assert not result.healthy and "not healthy within 1 s" in result.detail


def test_schedule_checks_each_app_at_its_interval() -> None:
    sched = HealthSchedule()
    sched.watch("a", HealthSpec(HealthType.TCP, port=1, interval=1000), now=0.0)
    sched.watch("b", None, now=0.0, default_interval=10.0)
    assert sched.due(0.0) == ["a", "b"]
    sched.record(HealthResult("a", True), 0.0)
    sched.record(HealthResult("b", False, "down"), 0.0)
    assert sched.due(0.5) == []
    assert sched.due(1.0) == ["a"]
    assert list(sched.unhealthy()) == ["b"]
    sched.forget("b")
    assert sched.due(100.0) == ["a"] and not sched.unhealthy()
