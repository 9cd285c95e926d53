"""The persisted status: round trip, atomic replacement, counts, rendering, bad files."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from bstore.gitops.status import (
    AppState,
    AppStatus,
    State,
    Status,
    StatusError,
    read_status,
    status_path,
    write_status,
)


def _status(n: int = 3) -> Status:
    apps = {f"a{i}": AppStatus(f"a{i}", "1.0", AppState.RUNNING, store_path=f"/s/x-a{i}-1.0",
                               isolation="embedded", node="bstore_p@127.0.0.1",
                               healthy=i != 1, since="2026-01-01T00:00:00Z")
            for i in range(n)}
    apps["bad"] = AppStatus("bad", None, AppState.FAILED, last_error="bad/app.yaml:1:1: oops")
    return Status(State.DEGRADED, "p", last_commit="c" * 40, generation=4, apps=apps,
                  quarantine={"commit": "d" * 40, "reason": "web: unhealthy"},
                  notes=("manual deploy of web reverted to the repository",))


def test_missing_file_is_initializing(tmp_path: Path) -> None:
    status = read_status(tmp_path, "p")
    assert status.state is State.INITIALIZING and status.profile == "p"
    assert status.app_count == 0 and status.healthy_count == 0


def test_round_trip_and_counts(tmp_path: Path) -> None:
    status = _status()
    write_status(tmp_path, status)
    back = read_status(tmp_path)
    assert back == status
    assert back.app_count == 4 and back.healthy_count == 2
    data = json.loads(status_path(tmp_path).read_text())
    assert data["state"] == "degraded" and data["healthy_count"] == 2
    assert data["apps"]["bad"]["last_error"] == "bad/app.yaml:1:1: oops"
    assert sorted(os.listdir(tmp_path)) == ["status.json"]  # no temp file left behind


def test_render_says_why() -> None:
    text = _status().render()
    assert "state: degraded" in text and "generation: 4" in text
    assert "quarantined: commit dddddddddddd: web: unhealthy" in text
    assert "not retried until the repository tip changes" in text
    assert "error: bad/app.yaml:1:1: oops" in text
    assert "a1" in text and "UNHEALTHY" in text


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    write_status(tmp_path, _status(1))
    stop = threading.Event()
    seen: list[int] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            write_status(tmp_path, _status(1 + n % 50))
            n += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(200):
            seen.append(read_status(tmp_path).app_count)
    finally:
        stop.set()
        t.join()
    assert all(2 <= c <= 51 for c in seen)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not a bstore status file"),
    (b'{"state": "dancing"}', "'dancing' is not a valid State"),
    (b'["a list"]', "is not a bstore status file"),
    (b'{"state": "synced", "apps": {"x": {"name": "x", "status": "zombie"}}}',
     "'zombie' is not a valid AppState"),
])
def test_bad_status_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    status_path(tmp_path).write_bytes(content)
    with pytest.raises(StatusError) as info:
        read_status(tmp_path)
    assert message in info.value.message
    assert str(status_path(tmp_path)) in info.value.message
    assert "remove it" in (info.value.hint or "")


def test_invalid_values_cannot_be_built() -> None:
    with pytest.raises(StatusError, match="'weird' is not an AppState"):
        AppStatus("x", "1", "weird")  # type: ignore[arg-type]
    with pytest.raises(StatusError, match="is not a State"):
        Status("synced")  # type: ignore[arg-type]
