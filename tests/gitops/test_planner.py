"""The reconcile plan (pure): every field of a spec against the active generation, drift
from the running state, failed specs, ordering, and the rendered/JSON forms."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generations"))
from genhelpers import fake_entry

from bstore.activators.plan import AppStatus, RunningState
from bstore.generations.manifest import AppEntry, GenerationManifest
from bstore.gitops.planner import (
    BuildNeed,
    ChangeKind,
    diff_app,
    plan_reconcile,
    same_build_inputs,
    spec_order,
)
from bstore.specs.model import (
    AppSpec,
    HealthSpec,
    HealthType,
    IconSpec,
    Isolation,
    SourceSpec,
    SourceType,
    VmConfig,
)
from bstore.specs.terms.model import Atom


def spec(name: str, version: str = "1.0", *, env: Mapping[str, Any] | None = None,
         depends_on: Sequence[str] = (), **kw: Any) -> AppSpec:
    return AppSpec(name=name, version=version,
                   source=kw.pop("source", SourceSpec(SourceType.HEX, ref=version)),
                   icon=IconSpec.identicon(name),
                   env={Atom(k): v for k, v in (env or {}).items()},
                   depends_on=tuple(depends_on), **kw)


def entry(name: str, version: str = "1.0", **kw: Any) -> AppEntry:
    made = fake_entry(name, version, **kw)
    assert isinstance(made, AppEntry)
    return made


def manifest(*entries: AppEntry) -> GenerationManifest:
    return GenerationManifest.of(list(entries), {})


@pytest.mark.parametrize("new, kind, reason", [
    (spec("web", "1.0"), ChangeKind.KEEP, None),
    (spec("web", "1.1"), ChangeKind.UPGRADE, "version 1.0 -> 1.1"),
    (spec("web", "1.0", source=SourceSpec(SourceType.GIT, url="file:///r", ref="v1")),
     ChangeKind.UPGRADE, "source changed"),
    (spec("web", env={"port": 8080}), ChangeKind.RECONFIGURE, "env set port"),
    (spec("web", isolation=Isolation.VM, vm_config=VmConfig(memory_limit=64)),
     ChangeKind.RESTART, "isolation embedded -> vm"),
    (spec("web", health=HealthSpec(HealthType.TCP, port=99)), ChangeKind.UPDATE,
     "health changed"),
    (spec("web", depends_on=["db"]), ChangeKind.UPDATE, "depends_on [] -> ['db']"),
])
def test_every_field_is_compared(new: AppSpec, kind: ChangeKind, reason: str | None) -> None:
    got, reasons = diff_app(new, entry("web", "1.0"))
    assert got is kind
    if reason is None:
        assert reasons == []
    else:
        assert reason in reasons


def test_env_removal_and_vm_config_change() -> None:
    old = entry("web", env={"a": 1, "b": 2}, vm=True, vm_memory=256)
    new = spec("web", env={"a": 1}, isolation=Isolation.VM, vm_config=VmConfig(memory_limit=512))
    kind, reasons = diff_app(new, old)
    assert kind is ChangeKind.RESTART
    assert "vm_config changed" in reasons and "env unset b" in reasons


def test_plan_orders_removals_first_then_dependency_order() -> None:
    active = manifest(entry("db"), entry("api", depends_on=["db"]), entry("old"),
                      entry("old_dep"), entry("uses_old", depends_on=["old_dep"]))
    desired = {"db": spec("db", "2.0"), "api": spec("api", depends_on=["db"]),
               "web": spec("web", depends_on=["api"])}
    plan = plan_reconcile(desired, active)
    names = [(c.kind.value, c.name) for c in plan.changes]
    removes = [n for k, n in names if k == "remove"]
    assert set(removes) == {"old", "old_dep", "uses_old"}
    assert removes.index("uses_old") < removes.index("old_dep")
    rest = [n for k, n in names if k != "remove"]
    assert rest == ["db", "api", "web"]
    by = plan.by_name
    assert by["db"].kind is ChangeKind.UPGRADE and by["db"].build is BuildNeed.BUILD
    assert by["api"].kind is ChangeKind.KEEP and by["api"].build is BuildNeed.REUSE
    assert by["web"].kind is ChangeKind.DEPLOY and by["web"].restarts
    assert plan.to_build == ["db", "web"]


def test_drift_heals_crashed_and_unhealthy_apps_and_stops_strays() -> None:
    active = manifest(entry("a"), entry("b"), entry("c"), entry("d"))
    desired = {n: spec(n) for n in "abcd"}
    desired["d"] = spec("d", env={"x": 1})
    running = {"a": RunningState("a", AppStatus.RUNNING, "1.0", healthy=True),
               "b": RunningState("b", AppStatus.FAILED, "1.0", reason="crashed"),
               "c": RunningState("c", AppStatus.RUNNING, "1.0", healthy=False),
               "stray": RunningState("stray", AppStatus.RUNNING, "0.1")}
    plan = plan_reconcile(desired, active, running=running)
    by = plan.by_name
    assert by["a"].kind is ChangeKind.KEEP
    assert by["b"].kind is ChangeKind.HEAL and "drift: failed: crashed" in by["b"].reasons
    assert by["c"].kind is ChangeKind.HEAL and "drift: unhealthy" in by["c"].reasons
    # d is not running at all and its env changed: restarted, not merely reconfigured
    assert by["d"].kind is ChangeKind.RESTART
    assert by["stray"].kind is ChangeKind.REMOVE
    assert "drift" in by["stray"].reasons[0]
    assert plan.needs_heal and plan.needs_generation


def test_failed_specs_keep_their_entry_and_are_never_removed() -> None:
    active = manifest(entry("web", "1.0"), entry("db"))
    plan = plan_reconcile({"db": spec("db")}, active,
                          failed={"web": "web/app.yaml:2:10: bad version",
                                  "new": "new/app.yaml: bad"})
    by = plan.by_name
    assert by["web"].kind is ChangeKind.FAILED and by["web"].build is BuildNeed.REUSE
    assert by["web"].to_version == "1.0" and "keeping 1.0" in by["web"].reasons[0]
    assert by["new"].kind is ChangeKind.FAILED and by["new"].build is BuildNeed.NONE
    assert not any(c.kind is ChangeKind.REMOVE for c in plan.changes)
    assert plan.failed == ["new", "web"]
    assert not plan.needs_generation


def test_nothing_to_do_renders_and_serialises() -> None:
    active = manifest(entry("web"))
    plan = plan_reconcile({"web": spec("web")}, active, commit="ab" * 20)
    assert plan.idle
    assert "nothing to do" in plan.render() and "abababababab" in plan.render()
    data = plan.to_json()
    assert data["changes"][0]["kind"] == "keep" and data["build"] == []


def test_render_lists_builds_and_restarts() -> None:
    plan = plan_reconcile({"web": spec("web", "2.0"), "db": spec("db", env={"k": 1})},
                          manifest(entry("web"), entry("db")))
    text = plan.render()
    assert "upgrade     web 1.0 -> 2.0 [build?]" in text
    assert "would build: web" in text and "would restart: web" in text
    assert "reconfigure db" in text


def test_same_build_inputs() -> None:
    assert same_build_inputs(spec("web", env={"x": 1}), entry("web"))
    assert not same_build_inputs(spec("web", "1.1"), entry("web"))


def test_spec_order_is_dependencies_first_and_deterministic() -> None:
    specs = {"c": spec("c", depends_on=["b"]), "b": spec("b", depends_on=["a"]),
             "a": spec("a"), "z": spec("z")}
    assert spec_order(specs) == ["a", "b", "c", "z"]
