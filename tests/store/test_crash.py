"""Crash safety: ``bstore store add`` (and GC) SIGKILLed at every named crash point."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from storehelpers import SAMPLE, check_consistent, run_bstore, write_tree

from bstore.store.crash import CRASH_POINTS
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_add_killed_at_crash_point(tmp_path: Path, point: str) -> None:
    root = tmp_path / "root"
    tree = write_tree(tmp_path / "tree", SAMPLE)
    first = tmp_path / "first"
    run_bstore(root, "store", "add", str(write_tree(first, {"f": "first"})), check=True)

    crashed = run_bstore(root, "store", "add", str(tree), env={"BSTORE_CRASH_AT": point})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr

    with LocalStore.open(root) as st:
        # Nothing registered is partial; the earlier path is untouched.
        check_consistent(st)
        valid = {str(p) for p in st.valid_paths()}
        assert len(valid) == (2 if point == "after-commit" else 1)
        # Leftovers (staging dir, unregistered store dir) are invisible to readers.
        for name in os.listdir(st.store_dir):
            if name not in valid:
                assert point in ("after-rename", "before-commit")

    verify = run_bstore(root, "store", "verify", "--check-contents")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    again = run_bstore(root, "store", "add", str(tree))
    assert again.returncode == 0, again.stderr
    added = Path(again.stdout.strip())
    assert added.parent == root / "store"
    with LocalStore.open(root) as st:
        check_consistent(st)
        sp = st.parse_path(str(added))
        assert st.is_valid(sp)
        # GC (nothing is rooted) reclaims everything, leftovers included.
        result = collect_garbage(st)
        assert result.stale_temp_roots == 1  # the killed process's file
        assert os.listdir(st.store_dir) == []
        assert os.listdir(st.layout.tmp_dir) == []
        assert os.listdir(st.layout.temproots_dir) == []
        assert st.valid_paths() == []


def test_gc_killed_after_invalidate(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for i in range(3):
        run_bstore(root, "store", "add", str(write_tree(tmp_path / f"t{i}", {"f": str(i)})),
                   check=True)
    crashed = run_bstore(root, "store", "gc", env={"BSTORE_CRASH_AT": "gc-after-invalidate"})
    assert crashed.returncode == -signal.SIGKILL
    with LocalStore.open(root) as st:
        assert st.valid_paths() == []  # invalidated first: no valid path lost its files
        assert len(os.listdir(st.store_dir)) == 3  # files not yet deleted
    done = run_bstore(root, "--json", "store", "gc")
    assert done.returncode == 0, done.stderr
    assert os.listdir(root / "store") == []
    assert '"leftovers"' in done.stdout and str(root / "store") in done.stdout
