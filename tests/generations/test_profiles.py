"""Generations from real store paths: create, switch, reuse, rollback, delete, GC, and
hostile profile state."""

from __future__ import annotations

import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from genhelpers import build, make_output, spec

from bstore.generations.generation import (
    AppBuild,
    GenerationError,
    code_path,
    generation_path,
    load_generation,
    make_manifest,
)
from bstore.generations.manifest import ManifestError
from bstore.generations.profiles import Profile, ProfileError, parse_duration
from bstore.generations.switch import commit_generation, delete_generations, rollback
from bstore.generations.switch import switch_to_number as switch_to
from bstore.specs.terms.model import Atom
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore

Beams = dict[int, dict[str, bytes]]


def _web(beams: Beams, v: int, version: str = "1.0.0", **kw: object) -> dict[str, bytes]:
    return {"web": beams[v]["web"], "web_util": beams[v]["web_util"]}


def _three_generations(store: LocalStore, beams: Beams) -> tuple[Profile, list[AppBuild]]:
    db = build(store, "db", "3.0", {"db": beams[1]["db"]})
    prof = Profile(store, "default")
    builds = []
    for v, version in ((1, "1.0.0"), (2, "1.0.0"), (2, "1.1.0")):
        web = build(store, "web", version, _web(beams, v), depends_on=["db"])
        builds.append(web)
        commit_generation(prof, make_manifest(store, [web, db], commit=f"c{v}{version}"))
    return prof, builds


def test_create_switch_list(store: LocalStore, beams: Beams) -> None:
    web = build(store, "web", "1.0.0", _web(beams, 1), depends_on=["db"],
                env={"port": 8080})
    dep = make_output(store, "cowboy", "2.10", {"core": beams[1]["core"]})
    db = AppBuild(spec("db", "3.0"), make_output(store, "db", "3.0", {"db": beams[1]["db"]},
                                                  references=[dep]))
    manifest = make_manifest(store, [web, db], commit="abc")
    prof = Profile(store)
    result = commit_generation(prof, manifest)
    assert not result.reused and result.previous is None
    assert result.current.number == 1
    assert os.readlink(prof.link) == "default-1-link"
    sp = result.current.store_path
    assert sp == generation_path(store, manifest)
    assert os.readlink(prof.dir / "default-1-link") == store.full_path(sp)
    # the generation references the outputs, so its closure holds the dependency too
    closure = {str(p) for p in store.closure([sp])}
    assert {str(web.output), str(db.output), str(dep)} <= closure
    loaded = load_generation(store, sp)
    assert loaded == manifest and loaded.commit == "abc"
    app = loaded.apps["db"]
    assert app.closure == (dep, db.output)
    assert set(loaded.apps["web"].modules) == {"web", "web_util"}
    assert loaded.apps["web"].env == {Atom("port"): 8080}
    dirs = code_path(store, loaded)
    assert sorted(d.name for d in dirs) == ["cowboy-2.10", "db-3.0", "web-1.0.0"]
    assert all((d / "ebin").is_dir() for d in dirs)
    lib = store.real_path(sp) / "lib"
    assert sorted(os.listdir(lib)) == ["cowboy-2.10", "db-3.0", "web-1.0.0"]
    assert (lib / "web-1.0.0" / "ebin" / "web.beam").read_bytes() == beams[1]["web"]
    # The links lead into paths the generation references, so GC keeps them.
    assert set(store.query_info(sp).references) >= {dep, db.output}
    [listed] = prof.generations()
    assert listed.number == 1 and listed.store_path == sp
    assert abs(listed.created - datetime.now(UTC)) < timedelta(minutes=5)


def test_identical_content_reuses_current(store: LocalStore, beams: Beams) -> None:
    web = build(store, "web", "1.0.0", _web(beams, 1))
    prof = Profile(store)
    first = commit_generation(prof, make_manifest(store, [web], commit="one"))
    again = commit_generation(prof, make_manifest(store, [web], commit="two",
                                                  created=datetime(2030, 1, 1, tzinfo=UTC)))
    assert again.reused and again.current.number == 1
    assert prof.numbers() == [1]
    assert again.current.store_path == first.current.store_path
    # the recorded metadata is the first writer's
    assert load_generation(store, again.current.store_path).commit == "one"


def test_rollback_and_switch_back(store: LocalStore, beams: Beams) -> None:
    prof, builds = _three_generations(store, beams)
    assert prof.numbers() == [1, 2, 3] and prof.current_number() == 3
    r = rollback(prof)
    assert (r.previous and r.previous.number, r.current.number) == (3, 2)
    assert rollback(prof).current.number == 1
    with pytest.raises(ProfileError, match="generation 1 is the oldest"):
        rollback(prof)
    assert switch_to(prof, 3).current.number == 3
    assert prof.numbers() == [1, 2, 3]  # rollbacks never add numbers
    # a new generation after a rollback gets the next free number
    switch_to(prof, 1)
    db = build(store, "db", "3.1", {"db": beams[2]["db"]})
    res = commit_generation(prof, make_manifest(store, [builds[0], db]))
    assert res.current.number == 4


def test_gap_in_numbers(store: LocalStore, beams: Beams) -> None:
    prof, _ = _three_generations(store, beams)
    delete_generations(prof, keep=3)  # keeps all
    os.unlink(prof.dir / "default-2-link")  # a gap, as --older-than can leave
    with pytest.raises(ProfileError) as info:
        switch_to(prof, 2)
    assert "has no generation 2 (existing: 1, 3)" in info.value.message
    assert prof.current_number() == 3
    assert rollback(prof).current.number == 1  # skips the gap


def test_delete_keep_and_older_than(store: LocalStore, beams: Beams) -> None:
    prof, _ = _three_generations(store, beams)
    switch_to(prof, 1)
    # --keep 1 keeps the newest and, always, the current one
    assert delete_generations(prof, keep=1) == [2]
    assert prof.numbers() == [1, 3]
    old = (datetime.now(UTC) - timedelta(days=40)).timestamp()
    for n in (1, 3):
        os.utime(prof.dir / f"default-{n}-link", (old, old), follow_symlinks=False)
    assert delete_generations(prof, older_than=parse_duration("30d")) == [3]
    assert prof.numbers() == [1] and prof.current_number() == 1
    with pytest.raises(ProfileError, match="--keep 0 would keep nothing"):
        delete_generations(prof, keep=0)
    with pytest.raises(ProfileError, match="'30 days' is not understood"):
        parse_duration("30 days")
    assert parse_duration("1w2d3h") == timedelta(days=9, hours=3)


def test_gc_keeps_generations_and_frees_deleted(root: Path, beams: Beams) -> None:
    with LocalStore.open(root) as store:
        prof, builds = _three_generations(store, beams)
        gens = {g.number: g.store_path for g in prof.generations()}
        outputs = [b.output for b in builds]
    with LocalStore.open(root) as store:  # a fresh handle: no temporary roots
        result = collect_garbage(store)
        assert result.deleted == ()
        for sp in [*gens.values(), *outputs]:
            assert store.is_valid(sp)
        prof = Profile(store)
        switch_to(prof, 3)
        assert delete_generations(prof, keep=1) == [1, 2]
    with LocalStore.open(root) as store:
        freed = {str(p) for p in collect_garbage(store).deleted}
        assert freed == {str(gens[1]), str(gens[2]), str(outputs[0]), str(outputs[1])}
        assert store.is_valid(gens[3]) and store.is_valid(outputs[2])
        assert not store.real_path(outputs[0]).exists()
        load_generation(store, gens[3])


def test_missing_lib_dir_is_refused(store: LocalStore, beams: Beams) -> None:
    out = make_output(store, "web", "1.0.0", _web(beams, 1))
    with pytest.raises(GenerationError, match=re.escape("has no 'lib/web-2.0' directory")):
        make_manifest(store, [AppBuild(spec("web", "2.0"), out)])


def test_conflicting_lib_dirs_are_refused(store: LocalStore, beams: Beams) -> None:
    a = AppBuild(spec("web", "1.0.0"), make_output(store, "web", "1.0.0", _web(beams, 1),
                                                    extra_lib=("jsx", "3.1")))
    b = AppBuild(spec("api", "1.0"), make_output(store, "api", "1.0", {"api": beams[1]["api"]},
                                                  extra_lib=("jsx", "3.1")))
    with pytest.raises(GenerationError, match=re.escape("lib/jsx-3.1 comes from two store paths")):
        make_manifest(store, [a, b])


# -- hostile profile state -------------------------------------------------------------------


def _state(prof: Profile) -> dict[str, str]:
    return {name: os.readlink(prof.dir / name) for name in sorted(os.listdir(prof.dir))
            if os.path.islink(prof.dir / name)}


def test_corrupt_manifest_in_generation(store: LocalStore, beams: Beams) -> None:
    prof, _ = _three_generations(store, beams)
    target = store.real_path(prof.get(1).store_path) / "manifest.json"
    os.chmod(target.parent, 0o755)
    os.chmod(target, 0o644)
    target.write_bytes(target.read_bytes().replace(b'"db"', b'"dc"', 1))
    before = _state(prof)
    with pytest.raises(ManifestError) as info:
        switch_to(prof, 1)
    assert str(target) in info.value.message
    assert _state(prof) == before and not prof.journal_path.exists()
    target.write_bytes(b"{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        load_generation(store, prof.get(1).store_path)


def test_a_checked_manifest_is_reused_until_its_file_changes(store: LocalStore,
                                                              beams: Beams) -> None:
    prof, _ = _three_generations(store, beams)
    sp = prof.get(1).store_path
    first = load_generation(store, sp)
    # Switches read the same immutable manifest again and again: parsed and hashed once.
    assert load_generation(store, sp) is first
    assert switch_to(prof, 1).current.number == 1
    assert load_generation(store, sp) is first
    # A rewritten file (same size, same inode) is read and checked afresh.
    target = store.real_path(sp) / "manifest.json"
    os.chmod(target.parent, 0o755)
    os.chmod(target, 0o644)
    target.write_bytes(target.read_bytes().replace(b'"db"', b'"dc"', 1))
    with pytest.raises(ManifestError) as info:
        load_generation(store, sp)
    assert str(target) in info.value.message


def test_swapped_manifest_does_not_match_path(store: LocalStore, beams: Beams) -> None:
    prof, _ = _three_generations(store, beams)
    one = store.real_path(prof.get(1).store_path) / "manifest.json"
    two = store.real_path(prof.get(2).store_path) / "manifest.json"
    os.chmod(one.parent, 0o755)
    os.chmod(one, 0o644)
    shutil.copyfile(two, one)
    with pytest.raises(ManifestError, match="does not give the store path"):
        load_generation(store, prof.get(1).store_path)


@pytest.mark.parametrize(("target", "message"), [
    ("/etc", "points to '/etc', not to a generation in the store"),
    ("STORE/0123456789abcdfghijklmnpqrsvwxy-web-1.0", "not to a generation"),
    ("../store/x", "not to a generation"),
])
def test_generation_link_outside_store(store: LocalStore, beams: Beams, target: str,
                                       message: str) -> None:
    prof, _ = _three_generations(store, beams)
    os.unlink(prof.dir / "default-2-link")
    os.symlink(target.replace("STORE", str(store.store_dir)), prof.dir / "default-2-link")
    before = _state(prof)
    with pytest.raises(ProfileError) as info:
        switch_to(prof, 2)
    assert message in info.value.message and "default-2-link" in info.value.message
    with pytest.raises(ProfileError, match=message):
        prof.generations()
    assert _state(prof) == before


def test_profile_link_pointing_elsewhere(store: LocalStore, beams: Beams) -> None:
    prof, _ = _three_generations(store, beams)
    os.unlink(prof.link)
    os.symlink(str(store.real_path(prof.get(1).store_path)), prof.link)
    before = _state(prof)
    with pytest.raises(ProfileError, match=r"is a link to .*, not <default>-<N>-link"):
        rollback(prof)
    assert _state(prof) == before


def test_profiles_dir_is_a_symlink(root: Path, tmp_path: Path) -> None:
    with LocalStore.open(root) as store:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        os.rmdir(store.layout.profiles_dir)
        os.symlink(elsewhere, store.layout.profiles_dir)
        with pytest.raises(ProfileError, match=r"profiles dir .* is a symlink"):
            Profile(store)
        assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("name", ["", "-x", "a/b", "web-3-link", "x.journal", "a" * 65])
def test_bad_profile_names(store: LocalStore, name: str) -> None:
    with pytest.raises(ProfileError, match="is not usable"):
        Profile(store, name)
