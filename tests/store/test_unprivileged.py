"""The store as an ordinary user: read-only (0555) directories must still be renamed
into the store, collected, optimised and repaired. Root ignores permission bits, so when
the suite runs as root this test forks a child that drops to ``nobody`` first."""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from pathlib import Path

import pytest
from storehelpers import SAMPLE, check_consistent, write_tree

from bstore.store.atomic import remove_tree
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore
from bstore.store.optimise import optimise_store

NOBODY = 65534


def _scenario(base: Path) -> None:
    src = write_tree(base / "src", {**SAMPLE, "copy": {**SAMPLE}})
    with LocalStore.open(base / "root") as st:
        sp = st.add_path(src)
        other = st.add_path(write_tree(base / "other", {"x": {"y": "z"}}))
        assert optimise_store(st).files_linked > 0
        check_consistent(st)
        # repair swaps a 0555 tree out of store/
        with st.staging_dir("repair") as d:
            shutil.copytree(src, d / "t", symlinks=True)
            st.replace_path(sp, d / "t")
        check_consistent(st)
        st.add_root(sp, "keep")
    with LocalStore.open(base / "root") as st:
        assert collect_garbage(st).deleted == (other,)
        (st.layout.gcroots_dir / "keep").unlink()
        assert collect_garbage(st).deleted == (sp,)
        assert os.listdir(st.store_dir) == [] and os.listdir(st.layout.tmp_dir) == []
    (base / "done").write_text(str(os.geteuid()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_store_as_unprivileged_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        base = tmp_path / "u"
        base.mkdir()
        _scenario(base)
        return
    # pytest's tmp dirs sit below a 0700 dir of root's: use a fresh dir right in /tmp.
    base = Path(tempfile.mkdtemp(prefix="bstore-unpriv-"))
    try:
        os.chown(base, NOBODY, NOBODY)
        _run_as_nobody(base)
    finally:
        remove_tree(base)


def _run_as_nobody(base: Path) -> None:
    pid = os.fork()
    if pid == 0:  # child: drop privileges, run, report through the exit code
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            _scenario(base)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged run failed (see stderr)"
    assert (base / "done").read_text() == str(NOBODY)
