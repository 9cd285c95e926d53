"""Garbage collection: roots, references, temp roots, --dry-run, --max-freed, leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from storehelpers import check_consistent, invoke, write_tree

from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore
from bstore.store.paths import PathKind, StorePath


def _source(st: LocalStore, tmp: Path, name: str, size: int = 10) -> StorePath:
    return st.add_path(write_tree(tmp / name, {"data": name * size}), name=name)


def _output(st: LocalStore, name: str, refs: list[StorePath]) -> StorePath:
    with st.staging_dir(name) as d:
        t = write_tree(d / "t", {"refs": " ".join(st.full_path(r) for r in refs)})
        return st.register_tree(t, name, kind=PathKind.OUTPUT,
                                hash_hex=name.encode().hex().ljust(64, "0")[:64],
                                references=refs)


@pytest.fixture
def graph(store_root: Path, tmp_path: Path) -> dict[str, StorePath]:
    """lib <- app <- (rooted); orphan-dep <- orphan (unrooted); loose (unrooted)."""
    with LocalStore.open(store_root) as st:
        lib = _source(st, tmp_path, "lib")
        app = _output(st, "app", [lib])
        odep = _source(st, tmp_path, "orphan-dep")
        orphan = _output(st, "orphan", [odep])
        loose = _source(st, tmp_path, "loose")
        return {"lib": lib, "app": app, "orphan-dep": odep, "orphan": orphan, "loose": loose}


def _names(paths: tuple[StorePath, ...] | list[StorePath]) -> list[str]:
    return sorted(p.name for p in paths)


def test_gcroots_link_keeps_closure(store_root: Path, graph: dict[str, StorePath]) -> None:
    with LocalStore.open(store_root) as st:
        st.add_root(graph["app"], "app")
        result = collect_garbage(st)
        assert _names(result.deleted) == ["loose", "orphan", "orphan-dep"]
        # referrers before references
        assert result.deleted.index(graph["orphan"]) < result.deleted.index(graph["orphan-dep"])
        assert _names(st.valid_paths()) == ["app", "lib"]
        assert sorted(os.listdir(st.store_dir)) == sorted(str(p) for p in st.valid_paths())
        assert result.bytes_freed > 0
        check_consistent(st)


def test_profile_and_indirect_roots(store_root: Path, graph: dict[str, StorePath],
                                    tmp_path: Path) -> None:
    with LocalStore.open(store_root) as st:
        # profiles/main -> main-1-link -> store path (a generation-style chain)
        gen = st.layout.profiles_dir / "main-1-link"
        gen.symlink_to(st.real_path(graph["orphan"]))
        (st.layout.profiles_dir / "main").symlink_to("main-1-link")
        # gcroots/result -> <user dir>/result -> store path/sub-file (indirect root)
        user_link = tmp_path / "result"
        user_link.symlink_to(st.real_path(graph["loose"]) / "data")
        (st.layout.gcroots_dir / "auto").mkdir()
        (st.layout.gcroots_dir / "auto" / "result").symlink_to(user_link)
        # dangling and foreign links are ignored
        (st.layout.gcroots_dir / "dangling").symlink_to(tmp_path / "nowhere")
        (st.layout.gcroots_dir / "etc").symlink_to("/etc")
        result = collect_garbage(st)
        assert _names(result.deleted) == ["app", "lib"]
        assert _names(st.valid_paths()) == ["loose", "orphan", "orphan-dep"]
        # removing the user's link turns the indirect root off
        user_link.unlink()
        assert _names(collect_garbage(st).deleted) == ["loose"]


def test_temp_roots_of_open_store(store_root: Path, graph: dict[str, StorePath],
                                  tmp_path: Path) -> None:
    other = LocalStore.open(store_root)
    try:
        other.add_temp_root(graph["orphan"])
        with LocalStore.open(store_root) as st:
            assert _names(collect_garbage(st).deleted) == ["app", "lib", "loose"]
    finally:
        other.close()
    with LocalStore.open(store_root) as st:
        assert _names(collect_garbage(st).deleted) == ["orphan", "orphan-dep"]


def test_own_added_paths_survive_own_gc(store: LocalStore, tmp_path: Path) -> None:
    sp = _source(store, tmp_path, "mine")
    assert collect_garbage(store).deleted == ()
    assert store.is_valid(sp)


def test_dry_run_deletes_nothing(store_root: Path, graph: dict[str, StorePath]) -> None:
    with LocalStore.open(store_root) as st:
        before = sorted(os.listdir(st.store_dir))
        result = collect_garbage(st, dry_run=True)
        assert result.dry_run and len(result.deleted) == 5
        assert result.bytes_freed == sum(st.query_info(p).nar_size for p in graph.values())
        assert sorted(os.listdir(st.store_dir)) == before
        assert len(st.valid_paths()) == 5


def test_max_freed_stops_early_and_stays_consistent(store: LocalStore, tmp_path: Path
                                                    ) -> None:
    deps = [_source(store, tmp_path, f"dep{i}", size=5000) for i in range(4)]
    _output(store, "top", deps)
    store.close()
    with LocalStore.open(store.root) as st:
        result = collect_garbage(st, max_freed=6000)
        assert 1 <= len(result.deleted) < 5
        assert result.deleted[0].name == "top"  # nothing may reference a deleted path
        remaining = st.valid_paths()
        for p in remaining:
            for r in st.query_info(p).references:
                assert st.is_valid(r)
        check_consistent(st)


def test_leftovers_reclaimed(store: LocalStore, tmp_path: Path) -> None:
    sp = _source(store, tmp_path, "kept")
    store.add_root(sp, "kept")
    junk = store.store_dir / ("0" * 32 + "-crashed")
    write_tree(junk, {"half": "written"})
    (junk / "half").chmod(0o444)
    junk.chmod(0o555)
    dead_stage = store.layout.tmp_dir / "1-deadbeef0000-add-1234"
    write_tree(dead_stage, {"x": "y"})
    with store.staging_dir("live") as live:
        result = collect_garbage(store)
        assert live.exists()
    assert str(junk) in result.leftovers and str(dead_stage) in result.leftovers
    assert os.listdir(store.store_dir) == [str(sp)]
    assert not dead_stage.exists()


def test_cli_gc_prints_deleted_and_bytes(store_root: Path, graph: dict[str, StorePath]
                                         ) -> None:
    dry = invoke(store_root, "store", "gc", "--dry-run")
    assert dry.exit_code == 0
    assert "would delete 5 paths, would free" in dry.output
    limited = invoke(store_root, "store", "gc", "--max-freed", "1")
    assert limited.exit_code == 0
    assert "deleted 1 paths, freed" in limited.output
    full = invoke(store_root, "store", "gc")
    assert full.exit_code == 0 and "deleted 4 paths" in full.output
    for line in full.stdout.splitlines()[:4]:
        assert line.startswith(str(store_root / "store"))


@pytest.mark.parametrize("size", ["lots", "-5", "1X", ""])
def test_cli_gc_bad_max_freed(store_root: Path, size: str) -> None:
    result = invoke(store_root, "store", "gc", "--max-freed", size)
    assert result.exit_code == 1
    assert f"size {size!r} is not understood" in result.output
