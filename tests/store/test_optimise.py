"""``store optimise``: identical files share an inode; nothing else changes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from storehelpers import check_consistent, invoke, write_tree

from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore
from bstore.store.optimise import optimise_store

BIG = "x" * 50_000


def _tree(tmp: Path, name: str, extra: str) -> Path:
    return write_tree(tmp / name, {"shared.txt": BIG, "tool*": BIG, "own": extra,
                                   "sub": {"shared-too.txt": BIG}})


def test_identical_files_share_inodes(store: LocalStore, tmp_path: Path) -> None:
    a = store.add_path(_tree(tmp_path, "a", "one"))
    b = store.add_path(_tree(tmp_path, "b", "two"))
    single = tmp_path / "single"
    single.write_text(BIG)
    c = store.add_path(single)
    modes_before = {p: stat.S_IMODE(os.lstat(p).st_mode) for p in _all(store)}
    result = optimise_store(store)
    ra, rb, rc = (store.real_path(p) for p in (a, b, c))
    assert (ra / "shared.txt").stat().st_ino == (rb / "shared.txt").stat().st_ino
    assert (ra / "shared.txt").stat().st_ino == (ra / "sub" / "shared-too.txt").stat().st_ino
    assert rc.stat().st_ino == (ra / "shared.txt").stat().st_ino
    # the executable copy has a different mode, so it is its own inode
    assert (ra / "tool").stat().st_ino == (rb / "tool").stat().st_ino
    assert (ra / "tool").stat().st_ino != (ra / "shared.txt").stat().st_ino
    assert (ra / "own").stat().st_ino != (rb / "own").stat().st_ino
    # 7 copies of BIG in 2 kinds -> 5 became links; each freed its blocks
    assert result.files_linked == 5
    assert result.bytes_saved >= 5 * 50_000
    assert {p: stat.S_IMODE(os.lstat(p).st_mode) for p in _all(store)} == modes_before
    for p in _all(store):
        assert os.lstat(p).st_mtime_ns == 1_000_000_000, p
    check_consistent(store)
    again = optimise_store(store)
    assert again.files_linked == 0 and again.bytes_saved == 0


def _all(store: LocalStore) -> list[str]:
    out = []
    for sp in store.valid_paths():
        real = store.real_path(sp)
        out.append(str(real))
        for dirpath, dirnames, filenames in os.walk(real):
            out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return sorted(out)


def test_damaged_file_is_not_spread(store: LocalStore, tmp_path: Path) -> None:
    a = store.add_path(_tree(tmp_path, "a", "one"))
    b = store.add_path(_tree(tmp_path, "b", "two"))
    damaged = store.real_path(a) / "shared.txt"
    damaged.chmod(0o644)
    damaged.write_text("y" * 50_000)
    damaged.chmod(0o444)
    result = optimise_store(store)
    # Depending on which path comes first, the damaged copy is either reported (and left
    # alone) or replaced by a link to the verified good copy; it is never the link target.
    if f"{a}/shared.txt" in result.damaged:
        assert damaged.read_text() == "y" * 50_000
    else:
        assert damaged.read_text() == BIG
    assert (store.real_path(b) / "shared.txt").read_text() == BIG
    assert (store.real_path(b) / "sub" / "shared-too.txt").read_text() == BIG


def test_gc_after_optimise(store: LocalStore, tmp_path: Path) -> None:
    a = store.add_path(_tree(tmp_path, "a", "one"))
    b = store.add_path(_tree(tmp_path, "b", "two"))
    optimise_store(store)
    store.add_root(b, "b")
    store.close()
    with LocalStore.open(store.root) as st:
        result = collect_garbage(st)
        assert result.deleted == (a,)
        check_consistent(st)
        (st.layout.gcroots_dir / "b").unlink()
        collect_garbage(st)
        assert os.listdir(st.layout.links_dir) == []  # no store file shares them any more


def test_cli_optimise(store_root: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert invoke(store_root, "store", "add", str(_tree(tmp_path, name, name))
                      ).exit_code == 0
    result = invoke(store_root, "store", "optimise")
    assert result.exit_code == 0
    assert "linked 4 files, saved" in result.output
    with LocalStore.open(store_root) as st:
        check_consistent(st)
