"""The pure activation plan: every action kind, ordering, drift, blocking, rendering;
and the dry-run activator through the entry-point loader."""

from __future__ import annotations

import dataclasses
import inspect
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
    _app_action,
    _full_action,
    _unchanged_action,
    blocked_by,
    mark_blocked,
    plan,
    plan_to_json,
    render_plan,
)
from bstore.generations.manifest import (
    AppEntry,
    GenerationManifest,
    ManifestError,
    dependency_order,
)
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


# -- the unchanged-app fast path against the full rules --------------------------------------

def _web(**kw: Any) -> Any:
    base: dict[str, Any] = {"modules": {"web": "a", "web_util": "b"}, "env": {"port": 80},
                            "depends_on": ["db"]}
    return fake_entry("web", kw.pop("version", "1.0"), **{**base, **kw})


SAME_BUILD = _web()
#: (label, old, new, whether the fast path may answer): each pair is planned against every
#: running state of RUNNING_STATES, by plan's own path and by the full rules alone.
FAST_PATH_CASES: list[tuple[str, Any, Any, bool]] = [
    ("unchanged", SAME_BUILD, _web(), True),
    ("unchanged, other origin and commit", SAME_BUILD,
     dataclasses.replace(_web(), origin="apps/web.config", commit="c0ffee"), True),
    ("env value changed", SAME_BUILD, _web(env={"port": 81}), False),
    ("env key added", SAME_BUILD, _web(env={"port": 80, "debug": Atom("true")}), False),
    ("env key removed", SAME_BUILD, _web(env={}), False),
    ("env 80 -> 80.0 (== but not =:=)", SAME_BUILD, _web(env={"port": 80.0}), False),
    ("version", SAME_BUILD, _web(version="1.1"), False),
    ("module body", SAME_BUILD, _web(modules={"web": "a2", "web_util": "b"}), False),
    ("rebuilt byte-identical", SAME_BUILD, rebuilt_identical(SAME_BUILD), False),
    ("health changed", SAME_BUILD, _web(health_port=8080), False),
    ("depends_on changed", SAME_BUILD, _web(depends_on=["db", "cache"]), False),
    ("source resolved elsewhere", SAME_BUILD, dataclasses.replace(
        _web(), source=dataclasses.replace(SAME_BUILD.source, resolved="abc123")), False),
]

_OTHER_BUILD = "x" * 32 + "-web-1.0"
RUNNING_STATES: list[tuple[str, RunningState | None]] = [
    ("not running", None),
    ("running", RunningState("web", AppStatus.RUNNING, "1.0", output=str(SAME_BUILD.output))),
    ("running, unchecked", RunningState("web", AppStatus.RUNNING)),
    ("running, healthy", RunningState("web", AppStatus.RUNNING, "1.0", healthy=True)),
    ("starting", RunningState("web", AppStatus.STARTING, "1.0")),
    ("stopped", RunningState("web", AppStatus.STOPPED, "1.0", reason="by hand")),
    ("failed", RunningState("web", AppStatus.FAILED, "1.0", reason="oom")),
    ("other version", RunningState("web", AppStatus.RUNNING, "0.9")),
    ("other output", RunningState("web", AppStatus.RUNNING, "1.0", output=_OTHER_BUILD)),
    ("unhealthy", RunningState("web", AppStatus.RUNNING, "1.0", healthy=False)),
]


@pytest.mark.parametrize(("label", "old", "new", "fast"), FAST_PATH_CASES,
                         ids=[c[0] for c in FAST_PATH_CASES])
def test_unchanged_fast_path_matches_full_rules(label: str, old: AppEntry, new: AppEntry,
                                                fast: bool) -> None:
    # plan() answers unchanged apps without the full rules; it must never answer otherwise
    states = [*RUNNING_STATES,
              ("running the new build", RunningState("web", AppStatus.RUNNING, new.version,
                                                     output=str(new.output)))]
    for _, state in states:
        for check in (True, False):
            given = state if check else None
            shortcut = _unchanged_action(old, new, given, check)
            assert (shortcut is not None) is fast, (label, state, check)
            full = _full_action(old, new, given, check)
            assert _app_action(old, new, given, check) == full, (label, state, check)
            if shortcut is not None:
                assert shortcut == full, (label, state, check)
            running = {"web": state} if check and state is not None else {} if check else None
            assert plan(gen(old), gen(new), running) == [full], (label, state, check)


def test_plan_of_many_unchanged_apps_matches_full_rules() -> None:
    # a 50-app switch with one app bumped, planned against what runs (some of it drifted)
    names = [f"a{i:02d}" for i in range(1, 51)]

    def app(i: int, version: str = "1.0") -> Any:
        return fake_entry(names[i], version, env={"dir": list(b"/srv/obs"), "n": i},
                          depends_on=[names[i - 1]] if i % 5 else [])

    old = gen(*(app(i) for i in range(50)))
    new = gen(*(app(i, "2.0" if i == 6 else "1.0") for i in range(50)))
    running = {n: RunningState(n, AppStatus.RUNNING, "1.0", output=str(a.output))
               for n, a in old.apps.items()}
    running["a03"] = RunningState("a03", AppStatus.FAILED, "1.0", reason="crashed")
    running["a11"] = dataclasses.replace(running["a11"], healthy=False)
    actions = plan(old, new, running)
    order = dependency_order(new)
    assert actions == [_full_action(old.apps[n], new.apps[n], running[n], True) for n in order]
    kinds = {a.app: a.kind for a in actions if a.kind is not ActionKind.KEEP}
    assert kinds == {"a03": ActionKind.START, "a07": ActionKind.RESTART,
                     "a11": ActionKind.RESTART}


def test_dependency_order_memo_follows_the_structure() -> None:
    # same app names, dependencies turned around: the remembered order must not be reused
    forward = gen(*_chain("1.0", ("a", "b", "c")))
    backward = gen(fake_entry("a", depends_on=["b"]), fake_entry("b", depends_on=["c"]),
                   fake_entry("c"))
    for manifest in (forward, backward, forward, backward):
        assert [x.app for x in plan(None, manifest)] == dependency_order(manifest)
    assert [x.app for x in plan(None, forward)] == ["a", "b", "c"]
    assert [x.app for x in plan(None, backward)] == ["c", "b", "a"]
    cycle = gen(fake_entry("a", depends_on=["b"]), fake_entry("b", depends_on=["a"]))
    for _ in range(2):  # a cycle is refused every time, not remembered as an order
        with pytest.raises(ManifestError, match="dependency cycle: a -> b -> a"):
            plan(None, cycle)


def test_action_init_matches_its_fields() -> None:
    # Action.__init__ is written out for speed: it must take exactly the declared fields
    params = list(inspect.signature(Action.__init__).parameters.values())[1:]
    fields = dataclasses.fields(Action)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        expected = inspect.Parameter.empty if default is dataclasses.MISSING else default
        assert p.default == expected, f.name
    action = Action(ActionKind.RECONFIGURE, "web", "1.0", env_set={Atom("a"): 1})
    assert dataclasses.replace(action, env_unset=(Atom("b"),)).env_unset == (Atom("b"),)
    env = {Atom("a"): 1}
    copied = Action(ActionKind.RELOAD, "web", "1.0", modules=("web",), env_set=env)
    env[Atom("a")] = 2  # the action keeps its own copy
    assert copied.env_set == {Atom("a"): 1}
    assert Action(ActionKind.KEEP, "web", None).env_set == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        copied.kind = ActionKind.KEEP  # type: ignore[misc]
    with pytest.raises(ValueError, match="'keep' is not an ActionKind"):
        Action("keep", "web", "1.0")  # type: ignore[arg-type]
