"""compose_status: what a pass saw becomes the status users read (pure)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generations"))

from genhelpers import fake_entry

from bstore.activators.plan import AppStatus as Observed
from bstore.activators.plan import RunningState
from bstore.generations.manifest import AppEntry, GenerationManifest
from bstore.gitops.report import PassView, compose_status
from bstore.gitops.status import AppState, State, Status


def _manifest(*names: str) -> GenerationManifest:
    entries = []
    for name in names:
        made = fake_entry(name, "1.0")
        assert isinstance(made, AppEntry)
        entries.append(made)
    return GenerationManifest.of(entries, {})


def _compose(view: PassView) -> Status:
    return compose_status(view, Status(profile="p"), full_path=str, node_of=lambda _e: None)


def _running(name: str, reason: str | None = None, healthy: bool | None = True) -> RunningState:
    return RunningState(name, Observed.RUNNING, "1.0", healthy, None, reason)


def test_information_about_a_healthy_app_is_a_note_not_an_error() -> None:
    view = PassView("p", _manifest("worker"), {"worker": _running("worker", "node up")},
                    tip="c" * 40, applied="c" * 40, generation=1)
    app = _compose(view).apps["worker"]
    assert app.last_error is None and app.note == "node up"


def test_a_failed_app_keeps_its_reason_as_error() -> None:
    view = PassView("p", _manifest("worker"),
                    {"worker": RunningState("worker", Observed.FAILED, "1.0", False, None,
                                            "oom")},
                    tip=None, applied=None, generation=1)
    status = _compose(view)
    assert status.apps["worker"].last_error == "oom"
    assert status.state is State.DEGRADED


def test_after_a_rollback_a_blocked_dependent_is_not_reported_failed() -> None:
    quarantine = {"commit": "d" * 40, "reason": "counter: health check failed"}
    view = PassView(
        "p", _manifest("counter", "hello"),
        {"counter": _running("counter"), "hello": _running("hello")},
        tip="d" * 40, applied="c" * 40, generation=2, quarantine=quarantine,
        activation_failed={"counter": "health check failed: HTTP 500",
                           "hello": "dependency 'counter' failed"},
        activation_blocked=frozenset({"hello"}))
    status = _compose(view)
    assert status.apps["counter"].last_error == "health check failed: HTTP 500"
    assert status.apps["hello"].last_error is None
    assert status.apps["hello"].note == "not changed: dependency 'counter' failed"
    text = status.render()
    assert text.count("counter: health check failed") == 1  # said once, not three times
    assert status.error is not None  # scripts still find the reason in JSON
    assert status.apps["hello"].status is AppState.RUNNING
