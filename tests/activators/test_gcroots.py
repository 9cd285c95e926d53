"""GC roots of running code (:mod:`bstore.activators.gcroots`) against a real store and
its real GC: what they keep, how they are replaced, and the names they refuse."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bstore.activators.gcroots import RunningRoots, RunningRootsError
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore
from bstore.store.paths import PathKind, StorePath


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _outputs(root: Path, tmp_path: Path, *names: str) -> list[StorePath]:
    """Register one output per name with a store that is closed afterwards (so its
    temporary roots do not keep them alive)."""
    out = []
    with LocalStore.open(root) as store:
        for i, name in enumerate(names):
            src = tmp_path / f"src-{name}"
            (src / "ebin").mkdir(parents=True)
            (src / "ebin" / f"{name}.beam").write_bytes(name.encode() * 10)
            with store.staging_dir("t") as stage:
                shutil.copytree(src, stage / "out")
                out.append(store.register_tree(stage / "out", name, kind=PathKind.OUTPUT,
                                               hash_hex=f"{i:02x}" * 32, references=[]))
    return out


def _gc(root: Path) -> set[str]:
    with LocalStore.open(root) as store:
        return {str(p) for p in collect_garbage(store).deleted}


def test_nested_roots_keep_outputs_until_removed(root: Path, tmp_path: Path) -> None:
    a1, a2, b1 = _outputs(root, tmp_path, "a-1", "a-2", "b-1")
    roots = RunningRoots(root, "prod")
    roots.set("host", "alpha", str(a1))
    roots.set("vm", "beta", str(b1))
    assert roots.read("host") == {"alpha": str(a1)} and roots.read("vm") == {"beta": str(b1)}
    # gcroots/nodes/prod/{host,vm}/<app>: the store's GC follows the nested links.
    assert (root / "gcroots" / "nodes" / "prod" / "host" / "alpha").is_symlink()
    assert _gc(root) == {str(a2)}

    # Replacing a root (the app moved to another build) frees the old build.
    a3, = _outputs(root, tmp_path, "a-3")
    roots.sync("host", {"alpha": str(a3)})
    assert _gc(root) == {str(a1)}
    roots.clear("host")
    roots.remove("vm", "beta")
    roots.remove("vm", "beta")  # already gone: no error
    assert _gc(root) == {str(a3), str(b1)}
    assert roots.read("host") == {} and roots.read("vm") == {}


def test_prepared_roots_root_both_builds_until_settled(root: Path, tmp_path: Path) -> None:
    a1, a2, a3 = _outputs(root, tmp_path, "a-1", "a-2", "a-3")
    roots = RunningRoots(root, "default")
    roots.set("host", "alpha", str(a1))
    assert roots.prepare("host", "alpha", str(a1)) is None  # already its root
    # Written while the node restarts the app: the old build stays alpha's root, and
    # the GC keeps both (the temporary link is a root of its own).
    prepared = roots.prepare("host", "alpha", str(a2))
    assert prepared is not None
    assert roots.read("host") == {"alpha": str(a1)}
    assert _gc(root) == {str(a3)}
    prepared.commit()  # the restart worked
    assert roots.read("host") == {"alpha": str(a2)}
    assert os.listdir(root / "gcroots" / "nodes" / "default" / "host") == ["alpha"]
    a1b, a3b = _outputs(root, tmp_path, "a-1b", "a-3b")
    dropped = roots.prepare("host", "alpha", str(a3b))
    assert dropped is not None
    dropped.discard()  # the restart failed before the old code stopped
    dropped.discard()  # already gone: no error
    assert roots.read("host") == {"alpha": str(a2)}
    assert _gc(root) == {str(a1), str(a1b), str(a3b)}


def test_sync_drops_leftover_temp_links(root: Path, tmp_path: Path) -> None:
    a1, = _outputs(root, tmp_path, "a-1")
    roots = RunningRoots(root, "default")
    roots.set("host", "alpha", str(a1))
    # What a process killed between symlink and rename leaves behind.
    os.symlink(str(root / "store" / str(a1)),
               root / "gcroots" / "nodes" / "default" / "host" / ".beta.tmp-0a0b0c0d")
    roots.sync("host", {})
    assert os.listdir(root / "gcroots" / "nodes" / "default" / "host") == []
    assert _gc(root) == {str(a1)}


@pytest.mark.parametrize(("group", "app", "output", "message"), [
    ("host", "alpha", "not-a-store-path", "cannot root 'not-a-store-path' for app 'alpha'"),
    ("host", "../escape", "0" * 32 + "-x", "app name '../escape' cannot name a GC root link"),
    ("host", ".hidden", "0" * 32 + "-x", "app name '.hidden' cannot name a GC root link"),
    ("host", "", "0" * 32 + "-x", "app name '' cannot name a GC root link"),
    ("guests", "alpha", "0" * 32 + "-x", "GC root group 'guests' is not one of"),
])
def test_bad_roots_are_refused(root: Path, group: str, app: str, output: str,
                               message: str) -> None:
    with pytest.raises(RunningRootsError) as err:
        RunningRoots(root, "default").set(group, app, output)
    assert message in err.value.message
    assert not (root / "gcroots" / "nodes" / "default" / "host" / "alpha").exists()
