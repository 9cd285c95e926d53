"""The daemon's HTTP API over real HTTP on 127.0.0.1 (a free port): auth, every endpoint's
shape, hostile requests, the metrics scrape and the webhook."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import TOKEN, FakeReconciler, make_config, wait_for

from bstore.events import EventBus
from bstore.gitops.daemon import Daemon
from bstore.gitops.http_api import MAX_BODY, ROUTES, ApiError

SECRET = "webhook-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def fake(bus: EventBus) -> FakeReconciler:
    return FakeReconciler(bus)


@pytest.fixture
def daemon(tmp_path: Path, bus: EventBus, fake: FakeReconciler) -> Iterator[Daemon]:
    d = Daemon(make_config(tmp_path), tmp_path / "root", reconciler=fake, events=bus,
               token=TOKEN, webhook_secret=SECRET)
    d.start()
    wait_for(lambda: fake.passes == 1, "the start-up pass")
    yield d
    d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[httpx.Client]:
    assert daemon.api_url is not None
    with httpx.Client(base_url=daemon.api_url, timeout=30) as c:
        yield c


POSTS = ["/reconcile", "/rollback", "/suspend", "/resume", "/hooks/git"]


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize(("headers", "message"), [
    ({}, "needs 'Authorization: Bearer <token>'"),
    ({"Authorization": "Bearer wrong-token"}, "the bearer token is wrong"),
    ({"Authorization": f"Bearer {TOKEN}x"}, "the bearer token is wrong"),
    ({"Authorization": f"Basic {TOKEN}"}, "needs 'Authorization: Bearer <token>'"),
    ({"Authorization": "Bearer"}, "needs 'Authorization: Bearer <token>'"),
])
def test_state_changing_requests_need_the_token(client: httpx.Client, fake: FakeReconciler,
                                                path: str, headers: dict[str, str],
                                                message: str) -> None:
    r = client.post(path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="bstore"'
    body = r.json()
    assert body["error"] == "Unauthorized" and message in body["message"]
    assert fake.passes == 1 and fake.rollbacks == []


@pytest.mark.parametrize(("path", "status"), [
    ("/reconcile", 200), ("/suspend", 200), ("/resume", 200), ("/hooks/git", 202),
    ("/rollback", 200)])
def test_the_right_token_is_accepted(client: httpx.Client, path: str, status: int) -> None:
    r = client.post(path, headers=AUTH)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"


def test_gets_are_open_on_loopback(client: httpx.Client) -> None:
    for path in ("/status", "/apps", "/apps/web", "/generations", "/events", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_status_shape(client: httpx.Client, daemon: Daemon) -> None:
    body = client.get("/status").json()
    assert body["state"] == "synced" and body["last_commit"] == "0" * 40
    assert body["suspended"] is False
    d = body["daemon"]
    assert d["loop"] == "running" and d["passes"] == 1 and d["api"] == daemon.api_url
    assert d["last_pass"]["ok"] is True and d["last_pass"]["trigger"] == "timer"
    assert d["last_pass"]["result"] == {"commit": "0" * 40, "pass": 1}


def test_apps_and_one_app(client: httpx.Client) -> None:
    apps = client.get("/apps").json()["apps"]
    assert [(a["name"], a["status"]) for a in apps] == [("db", "failed"), ("web", "running")]
    assert client.get("/apps/db").json()["last_error"] == "boom"
    r = client.get("/apps/nope")
    assert r.status_code == 404 and "no app named 'nope'" in r.json()["message"]
    r = client.get("/apps/%2e%2e%00x")
    assert r.status_code == 400 and "is not an app name" in r.json()["message"]


def test_generations_without_a_store_is_empty(client: httpx.Client) -> None:
    assert client.get("/generations").json() == {"generations": []}


def test_events_after_and_prefix(client: httpx.Client, bus: EventBus) -> None:
    everything = client.get("/events").json()
    names = [e["name"] for e in everything["events"]]
    assert "bstore.reconcile.stop" in names and "bstore.daemon.start" in names
    last = everything["last_seq"]
    assert last == everything["events"][-1]["seq"]
    bus.emit("bstore.deploy.stop", app="web", result="ok", api_token="hidden!")
    bus.emit("bstore.health.check", app="web", result="failed")
    newer = client.get("/events", params={"after": last}).json()["events"]
    assert [e["name"] for e in newer] == ["bstore.deploy.stop", "bstore.health.check"]
    assert newer[0]["metadata"]["api_token"] == "<redacted>"
    only = client.get("/events", params={"after": last, "prefix": "bstore.deploy"}).json()
    assert [e["name"] for e in only["events"]] == ["bstore.deploy.stop"]
    limited = client.get("/events", params={"limit": 1}).json()["events"]
    assert [e["name"] for e in limited] == ["bstore.health.check"]
    assert client.get("/events", params={"after": 10**9}).json() == {
        "events": [], "last_seq": 10**9}


@pytest.mark.parametrize(("query", "message"), [
    ({"after": "-1"}, "after='-1' is not a non-negative integer"),
    ({"after": "x"}, "after='x' is not a non-negative integer"),
    ({"limit": "1e3"}, "limit='1e3' is not a non-negative integer"),
    ({"after": "9" * 40}, "is not a non-negative integer"),
    ({"prefix": "Bstore..x"}, "prefix='Bstore..x' is not a dotted event name"),
    ({"prefix": "../etc"}, "is not a dotted event name"),
])
def test_events_bad_query(client: httpx.Client, query: dict[str, str], message: str) -> None:
    r = client.get("/events", params=query)
    assert r.status_code == 400
    assert message in r.json()["message"]


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_scrape_changes_after_a_pass(client: httpx.Client, bus: EventBus) -> None:
    before = _metrics(client)
    assert before[("bstore_reconciles_total", (("result", "ok"),))] == 1
    assert before[("bstore_reconcile_duration_seconds_count", ())] == 1
    assert before[("bstore_builds_total", (("result", "ok"),))] == 1
    assert before[("bstore_health_checks_total", (("result", "ok"),))] == 1
    assert before[("bstore_apps", (("status", "running"),))] == 1
    assert before[("bstore_apps", (("status", "failed"),))] == 1
    assert before[("bstore_apps", (("status", "upgrading"),))] == 0
    last_ok = before[("bstore_last_successful_reconcile_timestamp_seconds", ())]
    assert last_ok > 1.7e9

    assert client.post("/reconcile", headers=AUTH).status_code == 200
    bus.emit("bstore.health.check", app="db", result="failed")
    bus.emit("bstore.build.stop", {"duration": 9.0}, apps=3)  # the aggregate: not a build
    after = _metrics(client)
    assert after[("bstore_reconciles_total", (("result", "ok"),))] == 2
    assert after[("bstore_reconcile_duration_seconds_count", ())] == 2
    assert after[("bstore_builds_total", (("result", "ok"),))] == 2
    assert after[("bstore_health_checks_total", (("result", "failed"),))] == 1
    assert after[("bstore_last_successful_reconcile_timestamp_seconds", ())] >= last_ok


def test_metrics_count_failed_passes(client: httpx.Client, fake: FakeReconciler) -> None:
    fake.fail_next = "tip refused"
    r = client.post("/reconcile", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["ok"] is False and r.json()["error"] == "tip refused"
    assert _metrics(client)[("bstore_reconciles_total", (("result", "error"),))] == 1


def test_reconcile_while_a_pass_runs_is_409(client: httpx.Client, daemon: Daemon,
                                            fake: FakeReconciler) -> None:
    fake.gate = threading.Event()
    fake.entered.clear()
    runner = threading.Thread(target=daemon.reconcile)
    runner.start()
    assert fake.entered.wait(30)
    try:
        r = client.post("/reconcile", headers=AUTH)
        assert r.status_code == 409
        assert "a reconcile pass is already running (a manual pass" in r.json()["message"]
        assert r.headers["retry-after"] == "5"
        assert client.post("/rollback", headers=AUTH).status_code == 409
        assert client.get("/status").json()["daemon"]["pass_running"]["trigger"] == "manual"
    finally:
        fake.gate.set()
        runner.join()
    assert fake.max_active == 1


def test_suspend_resume_over_http(client: httpx.Client) -> None:
    r = client.post("/suspend", headers=AUTH, json={"reason": "db migration"})
    assert r.json()["suspended"] is True and r.json()["reason"] == "db migration"
    assert client.get("/status").json()["daemon"]["loop"] == "suspended"
    hook = client.post("/hooks/git", headers=AUTH)
    assert hook.status_code == 409 and "suspended" in hook.json()["message"]
    assert client.post("/resume", headers=AUTH).json() == {"suspended": False,
                                                           "changed": True}
    assert client.get("/status").json()["daemon"]["loop"] == "running"


def test_rollback_over_http(client: httpx.Client, fake: FakeReconciler) -> None:
    r = client.post("/rollback", headers=AUTH, json={"to": 2})
    assert r.status_code == 200 and r.json()["suspended"] is True
    assert client.post("/rollback", headers=AUTH).status_code == 200
    assert fake.rollbacks == [2, None]


@pytest.mark.parametrize(("body", "message"), [
    (b"{", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"to": "2"}', "'to' must be a generation number (a positive integer), got '2'"),
    (b'{"to": 0}', "got 0"),
    (b'{"to": true}', "got True"),
    (b'{"to": 1, "force": true}', "unknown key 'force' in POST /rollback"),
])
def test_rollback_bad_bodies(client: httpx.Client, fake: FakeReconciler, body: bytes,
                             message: str) -> None:
    r = client.post("/rollback", headers={**AUTH, "Content-Type": "application/json"},
                    content=body)
    assert r.status_code == 400
    assert message in r.json()["message"]
    assert fake.rollbacks == []


def test_oversized_body_is_413_without_reading_it(client: httpx.Client) -> None:
    r = client.post("/reconcile", headers=AUTH, content=b"x" * (MAX_BODY + 1))
    assert r.status_code == 413
    assert f"request body of {MAX_BODY + 1} bytes is over the limit" in r.json()["message"]


def _raw(daemon: Daemon, request: bytes) -> tuple[int, dict[str, Any]]:
    assert daemon.api_url is not None
    host, port = daemon.api_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(("request_bytes", "status", "message"), [
    (b"POST /reconcile HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Connection: close\r\n\r\n0\r\n\r\n", 411, "must have a Content-Length"),
    (b"POST /reconcile HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n"
     b"Connection: close\r\n\r\n", 400, "Content-Length '-5' is not a number"),
    (b"POST /reconcile HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n"
     b"Connection: close\r\n\r\n", 413, "over the limit"),
])
def test_hostile_framing(daemon: Daemon, request_bytes: bytes, status: int,
                         message: str) -> None:
    got, body = _raw(daemon, request_bytes)
    assert got == status and message in body["message"]


def test_a_stalled_body_does_not_hold_the_server(daemon: Daemon,
                                                 client: httpx.Client) -> None:
    assert daemon.api_url is not None
    host, port = daemon.api_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as stalled:
        stalled.sendall(b"POST /reconcile HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        # other clients are served meanwhile (one thread per connection)
        assert client.get("/status").status_code == 200
        stalled.shutdown(socket.SHUT_WR)  # the client gives up: no answer, no pass
        assert stalled.recv(100) == b""
    assert client.get("/status").json()["daemon"]["passes"] == 1


def test_unknown_path_and_wrong_method(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "no such endpoint: '/nope'" in r.json()["message"]
    r = client.get("/status/extra")
    assert r.status_code == 404
    r = client.post("/status", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert "POST is not allowed on '/status'" in r.json()["message"]
    r = client.get("/reconcile")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = client.delete("/apps/web", headers=AUTH)
    assert r.status_code == 405


def test_route_table_covers_the_api() -> None:
    table = {(r.method, r.pattern.pattern, r.auth) for r in ROUTES}
    assert all(auth for method, _, auth in table if method == "POST")
    assert not any(auth for method, _, auth in table if method == "GET")
    assert {p for _, p, _ in table} == {
        "/status", "/apps", "/apps/(?P<name>[^/]+)", "/generations", "/events", "/metrics",
        "/reconcile", "/rollback", "/suspend", "/resume", "/hooks/git"}


def _sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


PUSH = json.dumps({"ref": "refs/heads/main", "after": "a" * 40,
                   "repository": {"full_name": "org/specs"}}).encode()


def test_webhook_plain_post_reconciles_at_once(client: httpx.Client,
                                               fake: FakeReconciler) -> None:
    r = client.post("/hooks/git", headers=AUTH)
    assert r.status_code == 202 and r.json()["queued"] is True
    wait_for(lambda: fake.passes == 2, "the webhook pass")


@pytest.mark.parametrize("headers", [
    {"X-Hub-Signature-256": f"sha256={_sign(PUSH)}", "X-GitHub-Event": "push"},
    {"X-Gitea-Signature": _sign(PUSH), "X-Gitea-Event": "push"},
])
def test_webhook_signed_push_reconciles(client: httpx.Client, fake: FakeReconciler,
                                        daemon: Daemon, headers: dict[str, str]) -> None:
    r = client.post("/hooks/git", content=PUSH,
                    headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 202, r.text
    wait_for(lambda: fake.passes == 2, "the webhook pass")
    wake = daemon.recent_events(prefix="bstore.daemon.wake")[-1]["metadata"]
    assert wake["commit"] == "a" * 40 and wake["ref"] == "refs/heads/main"


@pytest.mark.parametrize(("headers", "body"), [
    ({"X-Hub-Signature-256": f"sha256={_sign(PUSH, 'other')}"}, PUSH),
    ({"X-Hub-Signature-256": f"sha256={_sign(PUSH)}"}, PUSH + b" "),
    ({"X-Hub-Signature-256": "sha256="}, PUSH),
    ({"X-Gitea-Signature": "zz"}, PUSH),
])
def test_webhook_bad_signature_is_401(client: httpx.Client, fake: FakeReconciler,
                                      headers: dict[str, str], body: bytes) -> None:
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 401
    assert "webhook signature does not match the body" in r.json()["message"]
    assert fake.passes == 1


def test_webhook_for_another_branch_and_ping_do_not_reconcile(
        client: httpx.Client, daemon: Daemon) -> None:
    other = json.dumps({"ref": "refs/heads/feature"}).encode()
    r = client.post("/hooks/git", content=other,
                    headers={"X-Hub-Signature-256": f"sha256={_sign(other)}",
                             "Content-Type": "application/json"})
    assert r.status_code == 200
    assert r.json() == {"accepted": False, "queued": False,
                        "reason": "push to 'refs/heads/feature', not 'refs/heads/main'"}
    ping = b'{"zen": "hi"}'
    r = client.post("/hooks/git", content=ping,
                    headers={"X-Hub-Signature-256": f"sha256={_sign(ping)}",
                             "X-GitHub-Event": "ping"})
    assert r.status_code == 200 and r.json()["reason"] == "ping"
    assert daemon.recent_events(prefix="bstore.daemon.wake") == []


def test_webhook_bad_json_is_400(client: httpx.Client) -> None:
    r = client.post("/hooks/git", content=b"{nope",
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "POST /hooks/git is not valid JSON" in r.json()["message"]


def test_without_a_configured_token_one_is_generated(tmp_path: Path, bus: EventBus,
                                                     fake: FakeReconciler) -> None:
    d = Daemon(make_config(tmp_path), tmp_path / "root", reconciler=fake, events=bus)
    d.start()
    try:
        assert d.token_file.stat().st_mode & 0o777 == 0o600
        token = d.token_file.read_text().strip()
        assert len(token) >= 32
        assert d.api_url is not None
        with httpx.Client(base_url=d.api_url) as c:
            assert c.post("/suspend").status_code == 401
            assert c.post("/suspend", headers={"Authorization": f"Bearer {token}"}
                          ).status_code == 200
    finally:
        d.stop()
    again = Daemon(make_config(tmp_path), tmp_path / "root", reconciler=fake, events=bus)
    assert again.token == token  # kept across restarts


def test_api_port_in_use_is_a_clear_error(tmp_path: Path, bus: EventBus,
                                          fake: FakeReconciler) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Daemon(make_config(tmp_path, api_address=f"127.0.0.1:{port}"), tmp_path / "root",
                   reconciler=fake, events=bus, token=TOKEN)
        with pytest.raises(ApiError, match=f"cannot listen on 127.0.0.1:{port}"):
            d.start()
    # the failed start released the profile lock
    d2 = Daemon(make_config(tmp_path), tmp_path / "root", reconciler=fake, events=bus,
                token=TOKEN, api=False)
    d2.start()
    d2.stop()
