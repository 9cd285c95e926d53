"""Real processes racing: two adds of one content, a busy database or GC lock, and GC
running while an add has not yet rooted its path."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import time
from pathlib import Path

from storehelpers import SAMPLE, check_consistent, popen_bstore, run_bstore, write_tree

from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore


def _wait_reached(release: Path, proc: subprocess.Popen[str]) -> None:
    reached = Path(f"{release}.reached")
    deadline = time.monotonic() + 60
    while not reached.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the paused process never reached its point"
        time.sleep(0.02)


def _pause_env(release: Path, point: str) -> dict[str, str]:
    return {"BSTORE_PAUSE_AT": point, "BSTORE_PAUSE_FILE": str(release)}


def test_two_adds_of_same_content_one_writes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = write_tree(tmp_path / "tree", SAMPLE)
    run_bstore(root, "store", "hash", str(tree), check=True)
    release = tmp_path / "release"
    # A holds the path's lock between rename and commit ...
    a = popen_bstore(root, "store", "add", str(tree), env=_pause_env(release, "after-rename"))
    _wait_reached(release, a)
    written = [n for n in os.listdir(root / "store")]
    assert len(written) == 1
    inode = (root / "store" / written[0]).stat().st_ino
    # ... so B, adding the same content, must wait for it.
    b = popen_bstore(root, "store", "add", str(tree))
    time.sleep(0.5)
    assert b.poll() is None, "B finished while A still held the path lock"
    release.touch()
    out_a, err_a = a.communicate(timeout=60)
    out_b, err_b = b.communicate(timeout=60)
    assert a.returncode == 0 and b.returncode == 0, (err_a, err_b)
    assert out_a == out_b == f"{root / 'store' / written[0]}\n"
    # B found A's path valid and wrote nothing into store/.
    assert os.listdir(root / "store") == written
    assert (root / "store" / written[0]).stat().st_ino == inode
    assert os.listdir(root / "tmp") == []
    with LocalStore.open(root) as st:
        assert len(st.valid_paths()) == 1
        check_consistent(st)


def test_simultaneous_adds_agree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = {f"d{i}": {f"f{j}": f"{i}-{j}" * 100 for j in range(20)} for i in range(10)}
    tree = write_tree(tmp_path / "tree", spec)  # type: ignore[arg-type]
    run_bstore(root, "store", "hash", str(tree), check=True)
    procs = [popen_bstore(root, "store", "add", str(tree)) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _ in outs}) == 1
    with LocalStore.open(root) as st:
        assert len(st.valid_paths()) == 1
        check_consistent(st)
    assert os.listdir(root / "tmp") == []


def test_busy_database_gives_store_locked(tmp_path: Path) -> None:
    root = tmp_path / "root"
    LocalStore.open(root).close()
    tree = write_tree(tmp_path / "tree", SAMPLE)
    holder = sqlite3.connect(root / "db.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = run_bstore(root, "store", "add", str(tree),
                            env={"BSTORE_LOCK_TIMEOUT": "0.3"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 1
    assert "error: store locked: database" in result.stderr
    assert "still busy after 0.3 s" in result.stderr and "hint:" in result.stderr
    assert os.listdir(root / "store") == [] and os.listdir(root / "tmp") == []
    assert run_bstore(root, "store", "add", str(tree)).returncode == 0


def test_gc_lock_held_gives_store_locked(tmp_path: Path) -> None:
    root = tmp_path / "root"
    LocalStore.open(root).close()
    tree = write_tree(tmp_path / "tree", SAMPLE)
    fd = os.open(root / "locks" / "gc.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = run_bstore(root, "--json", "store", "add", str(tree),
                            env={"BSTORE_LOCK_TIMEOUT": "0.3"})
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert '"error": "StoreLockedError"' in result.stderr
    assert "store locked: the GC lock" in result.stderr


def test_gc_during_add_keeps_new_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    LocalStore.open(root).close()
    tree = write_tree(tmp_path / "tree", SAMPLE)
    release = tmp_path / "release"
    # The add has registered its path but nothing roots it yet (no gcroots link).
    adder = popen_bstore(root, "store", "add", str(tree), env=_pause_env(release, "after-commit"))
    _wait_reached(release, adder)
    gc = run_bstore(root, "--json", "store", "gc")
    assert gc.returncode == 0, gc.stderr
    assert '"deleted": []' in gc.stdout
    release.touch()
    out, err = adder.communicate(timeout=60)
    assert adder.returncode == 0, err
    path = Path(out.strip())
    assert path.is_dir()
    with LocalStore.open(root) as st:
        assert st.is_valid(st.parse_path(str(path)))
        check_consistent(st)
        # The adder has exited: its temp root is gone and the path is garbage now.
        assert collect_garbage(st).deleted == (st.parse_path(str(path)),)


def test_gc_during_staging_keeps_staging_dir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    LocalStore.open(root).close()
    tree = write_tree(tmp_path / "tree", SAMPLE)
    release = tmp_path / "release"
    adder = popen_bstore(root, "store", "add", str(tree), env=_pause_env(release, "after-stage"))
    _wait_reached(release, adder)
    staged = os.listdir(root / "tmp")
    assert len(staged) == 1
    gc = run_bstore(root, "store", "gc")
    assert gc.returncode == 0, gc.stderr
    assert os.listdir(root / "tmp") == staged  # a live process's staging dir is kept
    release.touch()
    out, err = adder.communicate(timeout=60)
    assert adder.returncode == 0, err
    with LocalStore.open(root) as st:
        check_consistent(st)
        assert [st.full_path(p) for p in st.valid_paths()] == [out.strip()]


def test_gc_removes_stale_temp_roots_of_killed_process(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = write_tree(tmp_path / "tree", SAMPLE)
    killed = run_bstore(root, "store", "add", str(tree), env={"BSTORE_CRASH_AT": "after-commit"})
    assert killed.returncode == -9
    assert len(os.listdir(root / "locks" / "temproots")) == 1
    gc = run_bstore(root, "--json", "store", "gc")
    assert gc.returncode == 0, gc.stderr
    assert '"stale_temp_roots": 1' in gc.stdout
    assert os.listdir(root / "locks" / "temproots") == []
    assert os.listdir(root / "store") == []


def test_concurrent_first_use_creates_one_database(tmp_path: Path) -> None:
    root = tmp_path / "root"
    trees = [write_tree(tmp_path / f"t{i}", {"f": str(i)}) for i in range(4)]
    procs = [popen_bstore(root, "store", "add", str(t)) for t in trees]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    with LocalStore.open(root) as st:
        # every add landed in the one database that survived
        assert sorted(st.full_path(p) for p in st.valid_paths()) == \
            sorted(o.strip() for o, _ in outs)
        check_consistent(st)
