"""The event bus: matching, spans, failing handlers, threads, the ring and the JSON sink."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from pathlib import Path

import pytest

from bstore import events
from bstore.errors import BstoreError
from bstore.events import (
    KNOWN_EVENTS,
    Event,
    EventBus,
    EventError,
    EventRing,
    JsonLinesSink,
)


def collect(bus: EventBus, pattern: str) -> list[Event]:
    seen: list[Event] = []
    bus.attach(pattern, seen.append)
    return seen


@pytest.mark.parametrize(
    ("pattern", "delivered"),
    [
        ("*", ["bstore.reconcile.start", "bstore.reconcile.stop", "bstore.reconciler.x",
               "bstore.git.pull"]),
        ("bstore", ["bstore.reconcile.start", "bstore.reconcile.stop", "bstore.reconciler.x",
                    "bstore.git.pull"]),
        ("bstore.reconcile", ["bstore.reconcile.start", "bstore.reconcile.stop"]),
        ("bstore.reconcile.stop", ["bstore.reconcile.stop"]),
        ("bstore.git", ["bstore.git.pull"]),
        ("bstore.deploy", []),
    ],
)
def test_attach_by_name_or_dotted_prefix(pattern: str, delivered: list[str]) -> None:
    bus = EventBus()
    seen = collect(bus, pattern)
    for name in ("bstore.reconcile.start", "bstore.reconcile.stop", "bstore.reconciler.x",
                 "bstore.git.pull"):
        bus.emit(name)
    assert [e.name for e in seen] == delivered


def test_emit_carries_measurements_and_metadata() -> None:
    bus = EventBus()
    seen = collect(bus, "bstore.deploy")
    returned = bus.emit("bstore.deploy.stop", {"duration": 12.5}, app="counter", result="ok",
                        name="shadowing is fine")
    assert seen == [returned]
    event = seen[0]
    assert event.measurements == {"duration": 12.5}
    assert event.metadata == {"app": "counter", "result": "ok", "name": "shadowing is fine"}
    with pytest.raises(TypeError):
        event.metadata["app"] = "other"  # type: ignore[index]


def test_sequence_numbers_increase() -> None:
    bus = EventBus()
    seqs = [bus.emit("bstore.a").seq for _ in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


def test_detach() -> None:
    bus = EventBus()
    seen: list[Event] = []
    handle = bus.attach("bstore", seen.append)
    bus.emit("bstore.one")
    assert bus.detach(handle) is True
    assert bus.detach(handle) is False
    bus.emit("bstore.two")
    assert [e.name for e in seen] == ["bstore.one"]
    assert bus.handler_count() == 0


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Bstore.x", "event name 'Bstore.x' is not a dotted lower-case name"),
        ("bstore..x", "event name 'bstore..x'"),
        ("bstore.x.", "event name 'bstore.x.'"),
        ("", "event name ''"),
        ("bstore x", "event name 'bstore x'"),
    ],
)
def test_bad_event_names(name: str, fragment: str) -> None:
    bus = EventBus()
    with pytest.raises(EventError, match="^" + fragment.replace(".", r"\.")):
        bus.emit(name)


@pytest.mark.parametrize("pattern", ["bstore.", "*.x", "A"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(EventError, match=re.escape(f"event pattern {pattern!r}")):
        EventBus().attach(pattern, lambda e: None)


@pytest.mark.parametrize("value", ["12", None, True, [1]])
def test_measurements_must_be_numbers(value: object) -> None:
    with pytest.raises(EventError, match=r"measurement 'duration' of event 'bstore\.x' is"):
        EventBus().emit("bstore.x", {"duration": value})  # type: ignore[dict-item]


def test_raising_handler_is_detached_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    calls: list[str] = []

    def broken(event: Event) -> None:
        calls.append(event.name)
        raise RuntimeError("sink is full")

    bus.attach("bstore", broken)
    after = collect(bus, "bstore")
    with caplog.at_level(logging.ERROR, logger="bstore.events"):
        bus.emit("bstore.first")  # must not raise
        bus.emit("bstore.second")
    assert calls == ["bstore.first"]  # detached after the first failure
    assert [e.name for e in after] == ["bstore.first", "bstore.second"]
    assert "raised on 'bstore.first' and was detached" in caplog.text
    assert "sink is full" in caplog.text


def test_span_start_stop_with_duration() -> None:
    bus = EventBus()
    seen = collect(bus, "bstore.deploy")
    with bus.span("bstore.deploy", app="counter") as span:
        span.set(result="ok")
        span.measure(modules=3)
    start, stop = seen
    assert (start.name, stop.name) == ("bstore.deploy.start", "bstore.deploy.stop")
    assert start.metadata == {"app": "counter"}
    assert stop.metadata == {"app": "counter", "result": "ok"}
    assert stop.measurements["duration"] >= 0 and stop.measurements["modules"] == 3


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (BstoreError("build failed for 'counter'", hint="see the log"),
         "build failed for 'counter'"),
        (ValueError("boom"), "boom"),
    ],
)
def test_span_error_reports_and_reraises(exc: Exception, message: str) -> None:
    bus = EventBus()
    seen = collect(bus, "bstore.reconcile")
    with pytest.raises(type(exc)), bus.span("bstore.reconcile"):
        raise exc
    assert [e.name for e in seen] == ["bstore.reconcile.start", "bstore.reconcile.error"]
    error = seen[1]
    assert error.metadata["error"] == message
    assert error.metadata["kind"] == type(exc).__name__
    assert error.measurements["duration"] >= 0


def test_span_underscore_form_matches_seed_names() -> None:
    bus = EventBus()
    seen = collect(bus, "bstore.vm")
    with bus.span("bstore.vm.spawn", underscore=True, app="a", node="a@h"):
        pass
    with pytest.raises(RuntimeError), bus.span("bstore.vm.stop", underscore=True, app="a"):
        raise RuntimeError("kill failed")
    assert [e.name for e in seen] == ["bstore.vm.spawn_start", "bstore.vm.spawn_stop",
                                      "bstore.vm.stop_start", "bstore.vm.stop_error"]
    assert set(e.name for e in seen[:3]) <= set(KNOWN_EVENTS)


def test_known_events_follow_the_seed() -> None:
    for name in ("bstore.reconcile.stop", "bstore.git.pull", "bstore.git.clone_start",
                 "bstore.code.purge", "bstore.cluster.node_up", "bstore.health.check"):
        assert name in KNOWN_EVENTS
    assert all(n.startswith("bstore.") for n in KNOWN_EVENTS)


def test_thread_safety_under_concurrent_emit_and_attach() -> None:
    bus = EventBus()
    ring = EventRing(capacity=100_000)
    bus.attach("*", ring)
    errors: list[BaseException] = []

    def emitter(n: int) -> None:
        try:
            for i in range(500):
                bus.emit(f"bstore.t{n}.e", {"i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def churner() -> None:
        for _ in range(200):
            bus.detach(bus.attach("bstore", lambda e: None))

    threads = [threading.Thread(target=emitter, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=churner))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = ring.recent()
    assert len(got) == 2000
    assert len({e.seq for e in got}) == 2000
    for n in range(4):
        assert [e.measurements["i"] for e in got if e.name == f"bstore.t{n}.e"] == list(
            range(500))


def test_handler_may_emit_and_attach_without_deadlock() -> None:
    bus = EventBus()
    seen = collect(bus, "bstore.inner")

    def reentrant(event: Event) -> None:
        bus.attach("bstore.never", lambda e: None)
        bus.emit("bstore.inner", source=event.name)

    bus.attach("bstore.outer", reentrant)
    bus.emit("bstore.outer")
    assert [e.metadata["source"] for e in seen] == ["bstore.outer"]


def test_ring_is_bounded_and_filters() -> None:
    bus = EventBus()
    ring = EventRing(capacity=3)
    bus.attach("*", ring)
    for name in ("bstore.a.x", "bstore.b.x", "bstore.a.y", "bstore.a.z", "bstore.b.y"):
        bus.emit(name)
    assert len(ring) == 3
    assert [e.name for e in ring.recent()] == ["bstore.a.y", "bstore.a.z", "bstore.b.y"]
    assert [e.name for e in ring.recent(prefix="bstore.a")] == ["bstore.a.y", "bstore.a.z"]
    last = ring.recent()[-1].seq
    assert ring.recent(after_seq=last) == []
    assert [e.name for e in ring.recent(limit=1)] == ["bstore.b.y"]
    assert ring.recent(limit=0) == []
    with pytest.raises(EventError, match="capacity 0"):
        EventRing(0)


def test_json_lines_sink_to_file_with_redaction(tmp_path: Path) -> None:
    bus = EventBus()
    path = tmp_path / "logs" / "events.jsonl"
    sink = JsonLinesSink(path)
    bus.attach("bstore", sink)
    bus.emit("bstore.git.pull", {"duration": 3.0}, repo="https://h/x.git",
             api_token="hunter2", error=ValueError("bad"), paths=(Path("/a"), "b"))
    bus.emit("bstore.reconcile.stop", status="synced")
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["name"] == "bstore.git.pull"
    assert first["measurements"] == {"duration": 3.0}
    assert first["metadata"]["repo"] == "https://h/x.git"
    assert first["metadata"]["api_token"] == "<redacted>"
    assert first["metadata"]["error"] == {"type": "ValueError", "message": "bad"}
    assert first["metadata"]["paths"] == ["/a", "b"]
    assert first["time"].endswith("+00:00")
    assert "hunter2" not in path.read_text()
    assert json.loads(lines[1])["metadata"] == {"status": "synced"}


def test_json_lines_sink_rotates(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(path, max_bytes=300)
    bus = EventBus()
    bus.attach("*", sink)
    for i in range(10):
        bus.emit("bstore.health.check", app="a" * 20, n=i)
    sink.close()
    rotated = path.with_name("events.jsonl.1")
    assert rotated.exists()
    assert path.stat().st_size <= 300 + 200  # bounded: at most one line past the limit
    every = [json.loads(line)["metadata"]["n"]
             for line in rotated.read_text().splitlines() + path.read_text().splitlines()]
    assert every == sorted(every) and every[-1] == 9


def test_json_lines_sink_to_stream() -> None:
    stream = io.StringIO()
    bus = EventBus()
    bus.attach("*", JsonLinesSink(stream))
    bus.emit("bstore.code.load", app="x", modules=["a", "b"])
    assert json.loads(stream.getvalue())["metadata"] == {"app": "x", "modules": ["a", "b"]}


def test_json_lines_sink_unwritable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(EventError, match="cannot open event log"):
        JsonLinesSink(tmp_path / "file" / "events.jsonl")


def test_module_level_api_uses_the_default_bus() -> None:
    seen: list[Event] = []
    handle = events.attach("bstore.test_module_api", seen.append)
    try:
        events.emit("bstore.test_module_api.ping", {"n": 1}, who="test")
        with events.span("bstore.test_module_api.work"):
            pass
    finally:
        assert events.detach(handle)
    events.emit("bstore.test_module_api.after")
    assert [e.name for e in seen] == ["bstore.test_module_api.ping",
                                      "bstore.test_module_api.work.start",
                                      "bstore.test_module_api.work.stop"]
