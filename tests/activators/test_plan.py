"""The pure activation plan: every action kind, ordering, drift, blocking, rendering;
and the dry-run activator through the entry-point loader."""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generations"))
from genhelpers import fake_entry, fake_output

from bstore.activators.base import (
    ENTRY_POINT_GROUP,
    ActivatorContext,
    ActivatorError,
    available_activators,
    load_activator,
)
from bstore.activators.dryrun import DryRunActivator
from bstore.activators.plan import (
    Action,
    ActionKind,
    AppStatus,
    RunningState,
    blocked_by,
    mark_blocked,
    plan,
    plan_to_json,
    render_plan,
)
from bstore.generations.manifest import AppEntry, GenerationManifest
from bstore.specs.terms.model import Atom


def gen(*apps: Any) -> GenerationManifest:
    return GenerationManifest.of(list(apps))


def one(old: AppEntry | None, new: AppEntry | None,
        running: dict[str, RunningState] | None = None) -> Action:
    """The plan's action for the single app of a one-app change."""
    actions = plan(gen(old) if old else None, gen(new) if new else gen(), running)
    [action] = actions
    return action


WEB = fake_entry("web", "1.0", modules={"web": "a", "web_util": "b"}, env={"port": 80})
DEP = fake_output("cowboy", "2.10")
OTHER_DEP = fake_output("cowboy", "2.11")


def rebuilt_identical(entry: Any) -> Any:
    out = fake_output(entry.name, entry.version, "other build")
    return dataclasses.replace(entry, output=out, closure=(out,))


CASES: list[tuple[str, Any, Any, ActionKind, str]] = [
    ("new app", None, WEB, ActionKind.START, "new app"),
    ("removed app", WEB, None, ActionKind.STOP, "removed"),
    ("version", WEB, fake_entry("web", "1.1", modules={"web": "a", "web_util": "b"},
                                env={"port": 80}), ActionKind.RESTART, "version 1.0 -> 1.1"),
    ("source", WEB, fake_entry("web", "1.0", modules={"web": "a", "web_util": "b"},
                               env={"port": 80}, ref="main"), ActionKind.RESTART,
     "source changed"),
    ("closure", fake_entry("web", deps=[DEP]), fake_entry("web", deps=[OTHER_DEP]),
     ActionKind.RESTART, "dependency closure changed"),
    ("priv files", fake_entry("web", resources="p1"), fake_entry("web", resources="p2"),
     ActionKind.RESTART, "files other than modules changed"),
    ("module added", fake_entry("web", modules={"web": "a"}),
     fake_entry("web", modules={"web": "a", "extra": "x"}), ActionKind.RESTART,
     "modules added or removed"),
    ("isolation", fake_entry("web"), fake_entry("web", vm=True), ActionKind.RESTART,
     "isolation embedded -> vm"),
    ("vm_config", fake_entry("web", vm=True), fake_entry("web", vm=True, vm_memory=512),
     ActionKind.RESTART, "vm_config changed"),
    ("module body", WEB, fake_entry("web", "1.0", modules={"web": "a2", "web_util": "b"},
                                    env={"port": 80}), ActionKind.RELOAD,
     "1 module(s) changed"),
    ("env only", WEB, fake_entry("web", "1.0", modules={"web": "a", "web_util": "b"},
                                 env={"port": 81, "debug": Atom("true")}),
     ActionKind.RECONFIGURE, "env: set debug, port"),
    ("env unset", WEB, fake_entry("web", "1.0", modules={"web": "a", "web_util": "b"}),
     ActionKind.RECONFIGURE, "env: unset port"),
    ("same", WEB, WEB, ActionKind.KEEP, ""),
    ("byte-identical rebuild", WEB, rebuilt_identical(WEB), ActionKind.KEEP,
     "rebuilt, byte-identical"),
    ("health only", fake_entry("web"), fake_entry("web", health_port=8080), ActionKind.KEEP,
     "health check changed"),
]


@pytest.mark.parametrize(("label", "old", "new", "kind", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_action_kinds(label: str, old: Any, new: Any, kind: ActionKind, reason: str) -> None:
    action = one(old, new)
    assert action.kind is kind, action
    assert action.app == "web"
    if reason:
        assert any(reason in r for r in action.reasons), action.reasons
    else:
        assert action.reasons == ()
    json.dumps(action.to_json())


def test_reload_details_and_env_ride_along() -> None:
    new = fake_entry("web", "1.0", modules={"web": "a2", "web_util": "b2"},
                     env={"port": 81})
    action = one(WEB, new)
    assert action.kind is ActionKind.RELOAD
    assert action.modules == ("web", "web_util")
    assert action.env_set == {Atom("port"): 81}
    assert action.to_json()["env_set_erlang"] == "#{port => 81}"


def test_reconfigure_values() -> None:
    old = fake_entry("web", env={"a": 1, "b": [1, 2], "gone": b"x"})
    new = fake_entry("web", env={"a": 1, "b": [1, 3], "c": {Atom("k"): 1.0}})
    action = one(old, new)
    assert action.kind is ActionKind.RECONFIGURE
    assert action.env_set == {Atom("b"): [1, 3], Atom("c"): {Atom("k"): 1.0}}
    assert action.env_unset == (Atom("gone"),)
    doc = action.to_json()
    assert doc["env_unset"] == ["gone"]
    assert doc["env_set"] == {"b": [1, 3], "c": {"k": 1.0}}
    # 1 and 1.0 are different Erlang terms: a change
    assert one(fake_entry("web", env={"a": 1}), fake_entry("web", env={"a": 1.0})).kind \
        is ActionKind.RECONFIGURE


@pytest.mark.parametrize(("state", "kind", "reason"), [
    (None, ActionKind.START, "not running (drift)"),
    (RunningState("web", AppStatus.FAILED, "1.0", reason="oom"), ActionKind.START,
     "failed: oom (drift)"),
    (RunningState("web", AppStatus.STOPPED), ActionKind.START, "stopped (drift)"),
    (RunningState("web", AppStatus.RUNNING, "1.0", healthy=False), ActionKind.RESTART,
     "running but unhealthy (drift)"),
    (RunningState("web", AppStatus.RUNNING, "0.9"), ActionKind.RESTART,
     "running version 0.9, not 1.0 (drift)"),
    (RunningState("web", AppStatus.RUNNING, "1.0", output="x" * 32 + "-web-1.0"),
     ActionKind.RESTART, "running code from another build (drift)"),
    (RunningState("web", AppStatus.RUNNING, "1.0", healthy=True), ActionKind.KEEP, ""),
])
def test_drift_healing(state: RunningState | None, kind: ActionKind, reason: str) -> None:
    running = {} if state is None else {"web": state}
    action = one(WEB, WEB, running)
    assert action.kind is kind
    assert (reason in action.reasons) if reason else action.reasons == ()


def test_stray_running_app_is_stopped() -> None:
    running = {"web": RunningState("web", AppStatus.RUNNING, "1.0"),
               "ghost": RunningState("ghost", AppStatus.RUNNING, "0.1")}
    actions = plan(gen(WEB), gen(WEB), running)
    assert [(a.kind, a.app) for a in actions] == [(ActionKind.STOP, "ghost"),
                                                  (ActionKind.KEEP, "web")]
    assert "running but not in the generation (drift)" in actions[0].reasons


def _chain(version: str, names: tuple[str, ...]) -> list[Any]:
    # each app depends on the one before it
    return [fake_entry(n, version, depends_on=[names[i - 1]] if i else [])
            for i, n in enumerate(names)]


def test_ordering_with_dependency_chains() -> None:
    # old: x <- y <- z (removed), a <- b <- c ; new: c upgraded, d new depending on c
    old = gen(*_chain("1.0", ("x", "y", "z")), *_chain("1.0", ("a", "b", "c")))
    a, b, _c = _chain("1.0", ("a", "b", "c"))
    new_c = fake_entry("c", "2.0", depends_on=["b"])
    d = fake_entry("d", "1.0", depends_on=["c"])
    early = fake_entry("aa", "1.0")  # new, no dependencies: placed by name
    actions = plan(old, gen(a, b, new_c, d, early))
    assert [(x.kind.value, x.app) for x in actions] == [
        ("stop", "z"), ("stop", "y"), ("stop", "x"),
        ("keep", "a"), ("start", "aa"), ("keep", "b"), ("restart", "c"), ("start", "d")]
    assert actions[-1].depends_on == ("c",)
    assert actions[0].depends_on == ("y",)


def test_blocked_apps() -> None:
    a, b, c = _chain("1.0", ("a", "b", "c"))
    free = fake_entry("free")
    new = gen(a, b, c, free)
    actions = plan(None, new)
    assert blocked_by(new, {"a": "crashed"}) == {
        "b": "dependency 'a' failed: crashed",
        "c": "dependency 'b' is blocked (dependency 'a' failed: crashed)"}
    marked = mark_blocked(actions, {"a": "crashed"})
    kinds = {x.app: (x.kind, x.reasons) for x in marked}
    assert kinds["a"][0] is ActionKind.START  # the failed one itself is reported by apply
    assert kinds["b"] == (ActionKind.BLOCKED, ("dependency 'a' failed: crashed",))
    assert kinds["c"] == (ActionKind.BLOCKED, ("dependency 'b' is blocked",))
    assert kinds["free"][0] is ActionKind.START
    text = render_plan(marked)
    assert "blocked     b" in text and "dependency 'a' failed: crashed" in text


def test_rendering_and_json() -> None:
    old = gen(WEB, fake_entry("db", "1.0"), fake_entry("gone", "0.1"))
    new = gen(fake_entry("web", "1.0", modules={"web": "a9", "web_util": "b"},
                         env={"port": 80}),
              fake_entry("db", "1.1"), fake_entry("api", "2.0", vm=True))
    actions = plan(old, new)
    text = render_plan(actions, "plan 1 -> 2")
    lines = text.splitlines()
    assert lines[0] == "plan 1 -> 2:"
    assert any(ln.split()[:2] == ["stop", "gone"] for ln in lines)
    assert any("restart" in ln and "db" in ln and "1.0 -> 1.1" in ln for ln in lines)
    assert any("reload" in ln and "modules web" in ln for ln in lines)
    assert any("start" in ln and "api" in ln and "[vm]" in ln for ln in lines)
    assert lines[-1].strip() == "1 stop, 1 start, 1 restart, 1 reload"
    doc = json.loads(json.dumps(plan_to_json(actions)))
    assert [d["kind"] for d in doc] == ["stop", "start", "restart", "reload"]
    assert doc[3]["modules"] == ["web"]
    assert render_plan([]) == "activation plan: nothing to do (no apps)"


def test_action_value_checks() -> None:
    with pytest.raises(ValueError, match="lists modules"):
        Action(ActionKind.START, "web", "1.0", modules=("web",))
    with pytest.raises(ValueError, match="changes env"):
        Action(ActionKind.RESTART, "web", "1.0", env_unset=(Atom("x"),))


def test_dry_run_activator_via_loader(tmp_path: Path) -> None:
    lines: list[str] = []
    ctx = ActivatorContext(tmp_path, "default", {"fail": "a"}, echo=lines.append)
    assert "dry-run" in available_activators()
    # registered in pyproject.toml (the installed metadata), not only as a built-in
    assert "dry-run" in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    activator = load_activator("dry-run", ctx)
    assert isinstance(activator, DryRunActivator)
    a, b, _c = _chain("1.0", ("a", "b", "c"))
    free = fake_entry("free")
    new = gen(a, b, _c, free)
    actions = activator.plan(None, new)
    assert [x.kind for x in actions] == [ActionKind.START] * 4
    result = activator.apply(actions)
    assert not result.ok
    assert result.failed == {"a": "failed (dry-run option fail)",
                             "b": "dependency 'a' failed: failed (dry-run option fail)",
                             "c": "dependency 'b' is blocked"}
    assert lines == ["dry-run: start free"]
    assert activator.health("free").healthy and not activator.health("a").healthy
    # the simulated state now drives drift healing: 'a' failed, so it is started again
    again = {x.app: x.kind for x in activator.plan(new, new)}
    assert again == {"a": ActionKind.START, "b": ActionKind.START, "c": ActionKind.START,
                     "free": ActionKind.KEEP}


def test_unknown_activator(tmp_path: Path) -> None:
    with pytest.raises(ActivatorError) as info:
        load_activator("warp-drive", ActivatorContext(tmp_path, "default"))
    assert "no activator named 'warp-drive'" in info.value.message
    assert "dry-run" in (info.value.hint or "") and ENTRY_POINT_GROUP in (info.value.hint or "")


def test_running_old_version_during_upgrade_is_not_drift() -> None:
    new = fake_entry("web", "1.1", modules={"web": "a", "web_util": "b"}, env={"port": 80})
    running = {"web": RunningState("web", AppStatus.RUNNING, "1.0", healthy=True,
                                   output=str(WEB.output))}
    action = one(WEB, new, running)
    assert action.kind is ActionKind.RESTART and action.reasons == ("version 1.0 -> 1.1",)


@pytest.mark.parametrize(("new", "kind", "reasons"), [
    (fake_entry("web", "1.1", modules={"web": "a", "web_util": "b"}, env={"port": 80}),
     ActionKind.KEEP, ("already running the new build",)),
    (fake_entry("web", "1.0", modules={"web": "a2", "web_util": "b"}, env={"port": 81}),
     ActionKind.RECONFIGURE, ("already running the new build", "env: set port")),
])
def test_rerun_after_interrupted_activation(new: AppEntry, kind: ActionKind,
                                            reasons: tuple[str, ...]) -> None:
    # the killed activation had already brought the new build up
    running = {"web": RunningState("web", AppStatus.RUNNING, new.version,
                                   output=str(new.output))}
    action = one(WEB, new, running)
    assert (action.kind, action.reasons) == (kind, reasons)
    fresh = fake_entry("api", "0.1")
    state = {"api": RunningState("api", AppStatus.RUNNING, "0.1", output=str(fresh.output))}
    assert one(None, fresh, state).kind is ActionKind.KEEP
    unhealthy = {"web": dataclasses.replace(running["web"], healthy=False)}
    assert one(WEB, new, unhealthy).kind is ActionKind.RESTART
