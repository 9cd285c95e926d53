"""LocalStore: opening, adding, registering, querying, repairing."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest
from storehelpers import check_consistent, db_rows, snapshot, write_tree

from bstore.store.db import PathNotValidError
from bstore.store.layout import StoreError
from bstore.store.local import LocalStore
from bstore.store.manifest import InvalidTreeError, Mcid, compute_mcid, scan_tree
from bstore.store.paths import InvalidStorePath, PathKind, StorePath, make_store_path

# -- opening --------------------------------------------------------------------------------


def test_open_creates_layout(store_root: Path) -> None:
    with LocalStore.open(store_root) as st:
        assert st.store_dir == store_root / "store"
    for sub in ("store", "profiles", "gcroots", "tmp", "locks", "links"):
        assert (store_root / sub).is_dir()
    assert stat.S_IMODE(store_root.stat().st_mode) == 0o755
    conn = sqlite3.connect(store_root / "db.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _symlinked(tmp_path: Path, root: Path) -> Path:
    LocalStore.open(root).close()
    link = tmp_path / "link"
    link.symlink_to(root)
    return link


def _world_writable(tmp_path: Path, root: Path) -> Path:
    LocalStore.open(root).close()
    root.chmod(0o777)
    return root


def _group_writable(tmp_path: Path, root: Path) -> Path:
    root.mkdir()
    root.chmod(0o775)
    return root


def _empty_db(tmp_path: Path, root: Path) -> Path:
    LocalStore.open(root).close()
    (root / "db.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        (root / f"db.sqlite{suffix}").unlink(missing_ok=True)
    return root


def _corrupt_db(tmp_path: Path, root: Path) -> Path:
    LocalStore.open(root).close()
    (root / "db.sqlite").write_bytes(b"this is not sqlite" * 100)
    return root


def _foreign_db(tmp_path: Path, root: Path) -> Path:
    root.mkdir()
    sqlite3.connect(root / "db.sqlite").execute("CREATE TABLE other (x)").connection.commit()
    return root


def _missing_db_nonempty_store(tmp_path: Path, root: Path) -> Path:
    with LocalStore.open(root) as st:
        src = write_tree(tmp_path / "t", {"f": "x"})
        st.add_path(src)
    (root / "db.sqlite").unlink()
    return root


def _moved(tmp_path: Path, root: Path) -> Path:
    LocalStore.open(root).close()
    moved = tmp_path / "moved"
    root.rename(moved)
    return moved


@pytest.mark.parametrize(
    ("prepare", "message", "hint"),
    [
        (_symlinked, "is a symlink", "real directory"),
        (_world_writable, "writable by group or others (mode 0777)", "chmod go-w"),
        (_group_writable, "writable by group or others (mode 0775)", "chmod go-w"),
        (_empty_db, "is empty", "backup"),
        (_corrupt_db, "is corrupt", "backup"),
        (_foreign_db, "is not a bstore database", "backup"),
        (_missing_db_nonempty_store, "holds store paths but the database", "will not create"),
        (_moved, "belongs to store dir", "move the root back"),
    ],
)
def test_open_refuses_bad_roots(tmp_path: Path, prepare, message: str, hint: str) -> None:  # type: ignore[no-untyped-def]
    root = prepare(tmp_path, tmp_path / "root")
    before = sorted(os.listdir(root)) if root.is_dir() else None
    with pytest.raises(StoreError) as info:
        LocalStore.open(root)
    assert message in info.value.message
    assert str(root) in info.value.message or "db.sqlite" in info.value.message
    assert info.value.hint is not None and hint in info.value.hint
    if before is not None:
        assert sorted(os.listdir(root)) == before  # nothing created or repaired


def test_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        LocalStore.open(tmp_path / "none", create=False)
    assert not (tmp_path / "none" / "db.sqlite").exists()


# -- add ------------------------------------------------------------------------------------


def test_add_tree_is_canonical(store: LocalStore, sample_tree: Path) -> None:
    sp = store.add_path(sample_tree)
    assert sp.name == "sample"
    real = store.real_path(sp)
    info = store.query_info(sp)
    assert info.mcid == compute_mcid(sample_tree) == compute_mcid(real)
    assert info.kind is PathKind.SOURCE
    assert sp == make_store_path(PathKind.SOURCE, info.mcid.rpartition("-")[2],
                                 str(store.store_dir), "sample")
    for dirpath, dirnames, filenames in os.walk(real):
        for name in [".", *dirnames, *filenames]:
            st = (Path(dirpath) / name).lstat()
            assert st.st_mtime_ns == 1_000_000_000, name
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                assert mode == 0o555
            elif stat.S_ISREG(st.st_mode):
                assert mode == (0o555 if name == "run" else 0o444), name
    assert os.readlink(real / "bin" / "link") == "run"
    assert (real / "lib" / "sub" / "deep.txt").read_text() == "deep\n"
    assert os.listdir(store.layout.tmp_dir) == []
    check_consistent(store)


def test_add_single_file(store: LocalStore, tmp_path: Path) -> None:
    f = tmp_path / "tool.sh"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o700)
    sp = store.add_path(f, name="tool")
    real = store.real_path(sp)
    assert real.is_file() and stat.S_IMODE(real.stat().st_mode) == 0o555
    assert store.query_manifest(sp).entries[0].type.value == "x"


def test_readd_writes_nothing(store: LocalStore, sample_tree: Path) -> None:
    sp = store.add_path(sample_tree)
    before = snapshot(store.root)
    rows = db_rows(store.root)
    wal = (store.root / "db.sqlite-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    # Same content, different metadata and location: still the same path.
    copy = tmp_path_copy = sample_tree.parent / "again" / "sample"
    shutil.copytree(sample_tree, copy, symlinks=True)
    os.utime(tmp_path_copy / "README", (5, 5))
    tmp_mtime = store.layout.tmp_dir.stat().st_mtime_ns
    assert store.add_path(copy) == sp
    assert snapshot(store.root) == before
    assert store.layout.tmp_dir.stat().st_mtime_ns == tmp_mtime  # not even staged
    assert db_rows(store.root) == rows
    assert (wal.stat().st_size if wal.exists() else 0) == wal_size


def test_add_same_content_other_name_is_other_path(store: LocalStore, sample_tree: Path
                                                   ) -> None:
    a = store.add_path(sample_tree)
    b = store.add_path(sample_tree, name="other")
    assert a != b and store.query_info(a).mcid == store.query_info(b).mcid


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "is empty"),
        (".hidden", "starts with '.'"),
        ("a/b", "contains '/'"),
        ("sp ace", "contains ' '"),
        ("x" * 212, "more than 211"),
    ],
)
def test_add_bad_name(store: LocalStore, sample_tree: Path, name: str, message: str) -> None:
    with pytest.raises(InvalidStorePath, match=message):
        store.add_path(sample_tree, name=name)
    assert store.valid_paths() == []


def test_add_default_name_invalid_suggests_name(store: LocalStore, tmp_path: Path) -> None:
    f = tmp_path / "has space"
    f.write_text("x")
    with pytest.raises(InvalidStorePath) as info:
        store.add_path(f)
    assert "'has space' contains ' '" in info.value.message
    assert info.value.hint is not None and "--name" in info.value.hint


def test_add_missing_source(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidTreeError, match="no such file"):
        store.add_path(tmp_path / "nope")


# -- register_tree --------------------------------------------------------------------------


def _stage(st: LocalStore, label: str, spec: dict[str, object]) -> Path:
    # A staging dir that outlives the with block, as the importer's would until it
    # calls register_tree; register_tree consumes it.
    path = st.layout.tmp_dir / f"{st.temp_roots.token}-{label}"
    st.temp_roots.ensure()
    write_tree(path, spec)  # type: ignore[arg-type]
    return path


def test_register_output_with_references(store: LocalStore, sample_tree: Path) -> None:
    dep = store.add_path(sample_tree)
    with store.staging_dir("build") as d:
        out = write_tree(d / "out", {"bin": {"app*": "run"}, "weird": {"f": "x"}})
        (out / "weird" / "f").chmod(0o600)
        os.utime(out / "weird", (99, 99))
        sp = store.register_tree(out, "app-1.0", kind=PathKind.OUTPUT, hash_hex="ab" * 32,
                                 references=[dep], deriver="app.drv", signatures=["k:sig"])
        assert not out.exists()
    info = store.query_info(sp)
    assert sp == make_store_path(PathKind.OUTPUT, "ab" * 32, str(store.store_dir), "app-1.0")
    assert info.references == (dep,) and info.deriver == "app.drv"
    assert info.signatures == ("k:sig",) and info.kind is PathKind.OUTPUT
    real = store.real_path(sp)
    assert stat.S_IMODE((real / "weird" / "f").stat().st_mode) == 0o444
    assert (real / "weird").stat().st_mtime_ns == 1_000_000_000
    assert store.referrers(dep) == [sp]
    assert store.closure([sp]) == [dep, sp]
    check_consistent(store)


def test_register_missing_reference_registers_nothing(store: LocalStore) -> None:
    ghost = StorePath.parse("0" * 32 + "-ghost")
    staged = _stage(store, "out", {"f": "x"})
    with pytest.raises(PathNotValidError) as info:
        store.register_tree(staged, "out", kind=PathKind.OUTPUT, hash_hex="cd" * 32,
                            references=[ghost])
    assert f"'{ghost}'" in info.value.message and "not valid" in info.value.message
    assert store.valid_paths() == []
    assert os.listdir(store.store_dir) == [] and os.listdir(store.layout.tmp_dir) == []


def test_register_expected_mcid_mismatch(store: LocalStore) -> None:
    staged = _stage(store, "imp", {"f": "x"})
    wrong = Mcid("mcid1-manifest-blake3-" + "0" * 64)
    with pytest.raises(InvalidTreeError, match="expected mcid1-manifest-blake3-0000"):
        store.register_tree(staged, "imp", kind=PathKind.SOURCE, expected_mcid=wrong)
    assert store.valid_paths() == [] and os.listdir(store.layout.tmp_dir) == []


def test_register_source_matches_add(store: LocalStore, sample_tree: Path) -> None:
    staged = _stage(store, "imp", {})
    shutil.rmtree(staged)
    shutil.copytree(sample_tree, staged, symlinks=True)
    mcid = compute_mcid(sample_tree)
    sp = store.register_tree(staged, "sample", kind=PathKind.SOURCE, expected_mcid=mcid)
    assert store.add_path(sample_tree) == sp


def test_register_output_needs_hash(store: LocalStore) -> None:
    staged = _stage(store, "o", {"f": "x"})
    with pytest.raises(StoreError, match="needs hash_hex"):
        store.register_tree(staged, "o", kind=PathKind.OUTPUT)


def test_register_outside_tmp_refused(store: LocalStore, sample_tree: Path) -> None:
    with pytest.raises(StoreError, match="is not under"):
        store.register_tree(sample_tree, "x", kind=PathKind.SOURCE)
    assert sample_tree.exists()


def test_register_already_valid_discards_staged(store: LocalStore, sample_tree: Path) -> None:
    sp = store.add_path(sample_tree)
    staged = _stage(store, "dup", {})
    shutil.rmtree(staged)
    shutil.copytree(sample_tree, staged, symlinks=True)
    before = snapshot(store.root)
    del before[str(staged.relative_to(store.root))]
    before = {k: v for k, v in before.items() if not k.startswith("tmp/")}
    assert store.register_tree(staged, "sample", kind=PathKind.SOURCE) == sp
    assert snapshot(store.root) == before


# -- queries --------------------------------------------------------------------------------


def test_parse_path_forms(store: LocalStore, sample_tree: Path, tmp_path: Path) -> None:
    sp = store.add_path(sample_tree)
    full = str(store.real_path(sp))
    assert store.parse_path(full) == sp
    assert store.parse_path(full + "/bin/run") == sp
    assert store.parse_path(str(sp)) == sp
    link = tmp_path / "result"
    link.symlink_to(full)
    assert store.parse_path(str(link)) == sp
    with pytest.raises(InvalidStorePath, match="is not in the store"):
        store.parse_path("/etc/passwd")
    with pytest.raises(InvalidStorePath, match="not a store path base name"):
        store.parse_path("nonsense")


def test_query_unknown_path(store: LocalStore) -> None:
    ghost = StorePath.parse("1" * 32 + "-ghost")
    with pytest.raises(PathNotValidError, match=f"'{ghost}' is not a valid path"):
        store.query_info(ghost)
    with pytest.raises(PathNotValidError):
        store.closure([ghost])
    assert not store.is_valid(ghost)


def test_closure_order_is_deterministic(store: LocalStore, tmp_path: Path) -> None:
    def output(name: str, refs: list[StorePath]) -> StorePath:
        with store.staging_dir(name) as d:
            t = write_tree(d / "t", {"n": name})
            digest = name.encode().hex().ljust(64, "0")[:64]
            return store.register_tree(t, name, kind=PathKind.OUTPUT, hash_hex=digest,
                                       references=refs)

    base = output("base", [])
    left = output("left", [base])
    right = output("right", [base])
    top = output("top", [left, right])
    closure = store.closure([top])
    assert closure[0] == base and closure[-1] == top
    assert set(closure[1:3]) == {left, right}
    assert closure == store.closure([top, left])
    assert sorted(store.referrers(base), key=str) == sorted([left, right], key=str)
    assert store.valid_paths() == sorted([base, left, right, top], key=str)


def test_add_signatures(store: LocalStore, sample_tree: Path) -> None:
    sp = store.add_path(sample_tree)
    store.add_signatures(sp, ["b:2", "a:1"])
    store.add_signatures(sp, ["a:1"])
    assert store.query_info(sp).signatures == ("a:1", "b:2")


def test_query_manifest_roundtrip(store: LocalStore, sample_tree: Path) -> None:
    sp = store.add_path(sample_tree)
    assert store.query_manifest(sp) == scan_tree(sample_tree)


# -- repair ---------------------------------------------------------------------------------


def test_replace_path_repairs(store: LocalStore, sample_tree: Path) -> None:
    sp = store.add_path(sample_tree)
    real = store.real_path(sp)
    (real / "lib").chmod(0o755)
    (real / "lib" / "a.beam").chmod(0o644)
    (real / "lib" / "a.beam").write_bytes(b"damaged")
    staged = _stage(store, "repair", {})
    shutil.rmtree(staged)
    shutil.copytree(sample_tree, staged, symlinks=True)
    store.replace_path(sp, staged)
    assert (real / "lib" / "a.beam").read_bytes() == b"\x00\x01binary"
    assert stat.S_IMODE(real.stat().st_mode) == 0o555
    check_consistent(store)
    assert os.listdir(store.layout.tmp_dir) == []


def test_replace_path_refuses_wrong_content(store: LocalStore, sample_tree: Path) -> None:
    sp = store.add_path(sample_tree)
    staged = _stage(store, "repair", {"other": "content"})
    with pytest.raises(InvalidTreeError, match="the store recorded"):
        store.replace_path(sp, staged)
    check_consistent(store)


def test_staging_dir_removed(store: LocalStore) -> None:
    with store.staging_dir("x y/z") as d:
        assert d.parent == store.layout.tmp_dir and d.name.startswith(store.temp_roots.token)
        write_tree(d, {"a": {"b": "c"}})
        (d / "a").chmod(0o555)
    assert not d.exists()


# -- batches, hash, S2 helpers --------------------------------------------------------------


def test_add_paths_batch(store: LocalStore, tmp_path: Path, sample_tree: Path) -> None:
    srcs = [write_tree(tmp_path / f"s{i}", {"f": str(i)}) for i in range(5)]
    single = store.add_path(srcs[0])
    batch = store.add_paths([(s, None) for s in srcs] + [(sample_tree, "x"), (srcs[1], None)])
    assert batch[0] == single and batch[1] == batch[-1]
    assert batch == [store.add_path(s) for s in srcs] + [batch[5], batch[1]]
    assert len(store.valid_paths()) == 6
    assert os.listdir(store.layout.tmp_dir) == []
    check_consistent(store)


def test_add_paths_is_all_or_nothing(store: LocalStore, tmp_path: Path) -> None:
    good = write_tree(tmp_path / "good", {"f": "x"})
    bad = write_tree(tmp_path / "bad", {"f": "x"})
    os.mkfifo(bad / "fifo")
    with pytest.raises(InvalidTreeError, match="'fifo' is a FIFO"):
        store.add_paths([(good, None), (bad, None)])
    assert store.valid_paths() == [] and os.listdir(store.store_dir) == []
    assert os.listdir(store.layout.tmp_dir) == []


def test_root_symlink_refused(store: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to("target")
    with pytest.raises(InvalidTreeError, match=r"symlink '\.' -> 'target' points outside"):
        store.add_path(tmp_path / "link")
    assert store.valid_paths() == []


def test_hash_hex_recorded(store: LocalStore, sample_tree: Path) -> None:
    src = store.add_path(sample_tree)
    info = store.query_info(src)
    assert info.hash_hex == info.mcid.rpartition("-")[2]
    with store.staging_dir("o") as d:
        out = store.register_tree(write_tree(d / "t", {"a": "b"}), "o", kind=PathKind.OUTPUT,
                                  hash_hex="ef" * 32)
    assert store.query_info(out).hash_hex == "ef" * 32
    assert make_store_path(PathKind.OUTPUT, "ef" * 32, str(store.store_dir), "o") == out


def test_dangling_references_and_relink(store: LocalStore, sample_tree: Path) -> None:
    dep = store.add_path(sample_tree)
    with store.staging_dir("o") as d:
        out = store.register_tree(write_tree(d / "t", {"a": "b"}), "o", kind=PathKind.OUTPUT,
                                  hash_hex="ef" * 32, references=[dep])
    assert store.db.dangling_references() == []
    # Someone deletes the row behind the store's back (sqlite3 CLI: foreign keys off).
    conn = sqlite3.connect(store.layout.db_path)
    dep_id = conn.execute("SELECT id FROM paths WHERE path = ?", (str(dep),)).fetchone()[0]
    conn.execute("DELETE FROM paths WHERE id = ?", (dep_id,))
    conn.commit()
    conn.close()
    assert store.db.dangling_references() == [(str(out), dep_id)]
    with pytest.raises(PathNotValidError, match="cannot relink"):
        store.db.relink_references(out, [dep])
    store.add_path(sample_tree)  # re-registered under a new row id
    store.db.relink_references(out, [dep])
    assert store.db.dangling_references() == []
    assert store.query_info(out).references == (dep,)


def test_root_through_symlinked_parent_is_one_store(tmp_path: Path, sample_tree: Path) -> None:
    real_parent = tmp_path / "real"
    real_parent.mkdir()
    (tmp_path / "alias").symlink_to(real_parent)
    with LocalStore.open(tmp_path / "alias" / "root") as st:
        sp = st.add_path(sample_tree)
        assert st.store_dir == real_parent / "root" / "store"
    with LocalStore.open(real_parent / "root") as st:
        assert st.valid_paths() == [sp]
