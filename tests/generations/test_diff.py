"""Diff of two generations built from real outputs with erlc-compiled modules."""

from __future__ import annotations

from genhelpers import build, make_output, spec

from bstore.generations.diff import Change, diff_generations, render_diff
from bstore.generations.generation import AppBuild, make_manifest
from bstore.specs.terms.model import Atom
from bstore.store.local import LocalStore

Beams = dict[int, dict[str, bytes]]


def test_diff_of_real_generations(store: LocalStore, beams: Beams) -> None:
    v1, v2 = beams[1], beams[2]
    old = make_manifest(store, [
        build(store, "web", "1.0", {"web": v1["web"], "web_util": v1["web_util"]},
              env={"port": 80, "debug": Atom("true")}),
        build(store, "db", "1.0", {"db": v1["db"]}),
        build(store, "core", "2.0", {"core": v1["core"]}),
        build(store, "gone", "0.1", {"api": v1["api"]}),
    ])
    new = make_manifest(store, [
        # same version, one module recompiled with another body, env changed
        build(store, "web", "1.0", {"web": v2["web"], "web_util": v1["web_util"]},
              env={"port": 81}),
        build(store, "db", "1.1", {"db": v2["db"]}),
        build(store, "core", "1.9", {"core": v1["core"]}),
        build(store, "api", "0.1", {"api": v2["api"]}),
    ])
    diffs = {d.name: d for d in diff_generations(old, new)}
    web = diffs["web"]
    assert web.change is Change.CHANGED and web.rebuilt and web.reconfigured
    assert web.modules_changed == ("web",)  # web_util's .beam is byte-identical
    assert (web.env_set, web.env_unset) == (("port",), ("debug",))
    assert diffs["db"].change is Change.UPGRADED and diffs["db"].modules_changed == ("db",)
    assert diffs["core"].change is Change.DOWNGRADED
    assert diffs["core"].modules_changed == ()
    assert diffs["gone"].change is Change.REMOVED
    assert diffs["api"].change is Change.ADDED and diffs["api"].modules_added == ("api",)
    text = render_diff(list(diffs.values()), "1", "2")
    assert "rebuilt/reconfigured web 1.0" in text
    assert "    modules changed: web" in text
    assert "upgraded db 1.0 -> 1.1" in text and "downgraded core 2.0 -> 1.9" in text
    assert "added api 0.1" in text and "removed gone 0.1" in text
    assert "env unset: debug" in text


def test_priv_change_and_identical(store: LocalStore, beams: Beams) -> None:
    mods = {"web": beams[1]["web"]}
    a = AppBuild(spec("web", "1.0"), make_output(store, "web", "1.0", mods, priv="one"))
    b = AppBuild(spec("web", "1.0"), make_output(store, "web", "1.0", mods, priv="two"))
    [d] = diff_generations(make_manifest(store, [a]), make_manifest(store, [b]))
    assert d.change is Change.CHANGED and d.rebuilt and d.modules_changed == ()
    [same] = diff_generations(make_manifest(store, [a]), make_manifest(store, [a]))
    assert same.change is Change.UNCHANGED
    assert "no app changed" in render_diff([same], "1", "1")
