"""register_tree(manifest=...): the lstat-only fast path still refuses every tree that
is not the vouched manifest's tree in names, types, sizes, exec bits, links."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bstore.store.local import LocalStore
from bstore.store.manifest import InvalidTreeError, scan_tree
from bstore.store.paths import PathKind


def _build(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "run").chmod(0o755)
    (root / "lib").mkdir()
    (root / "lib" / "a.beam").write_bytes(b"A" * 1000)
    (root / "lib" / "empty").write_bytes(b"")
    (root / "link").symlink_to("lib/a.beam")


def _extra(t: Path) -> None:
    (t / "lib" / "extra").write_bytes(b"x")


def _missing(t: Path) -> None:
    (t / "lib" / "empty").unlink()


def _size(t: Path) -> None:
    (t / "lib" / "a.beam").write_bytes(b"A" * 999)


def _exec_bit(t: Path) -> None:
    (t / "lib" / "a.beam").chmod(0o755)


def _link_target(t: Path) -> None:
    (t / "link").unlink()
    (t / "link").symlink_to("lib/empty")


def _type(t: Path) -> None:
    (t / "lib" / "empty").unlink()
    (t / "lib" / "empty").mkdir()


def _escaping(t: Path) -> None:
    (t / "link").unlink()
    (t / "link").symlink_to("../../../../etc/passwd")


def _fifo(t: Path) -> None:
    (t / "lib" / "empty").unlink()
    os.mkfifo(t / "lib" / "empty")


def _outside_hardlink(t: Path) -> None:
    os.link(t / "lib" / "a.beam", t.parent / "outside")


@pytest.mark.parametrize(("tamper", "message"), [
    (_extra, "'lib/extra' is not in the manifest"),
    (_missing, "1 manifest entries are missing from the staged tree (e.g. 'lib/empty')"),
    (_size, "'lib/a.beam' is f of 999 bytes, the manifest says f of 1000 bytes"),
    (_exec_bit, "'lib/a.beam' is x of 1000 bytes, the manifest says f of 1000 bytes"),
    (_link_target, "'link' is l of 9 bytes, the manifest says l of 10 bytes"),
    (_type, "'lib/empty' is d of 0 bytes, the manifest says f of 0 bytes"),
    (_escaping, "symlink 'link' -> '../../../../etc/passwd' points outside the tree"),
    (_fifo, "'lib/empty' is not a directory, regular file or symlink"),
    (_outside_hardlink, "hardlinked from outside it (2 links, 1 inside)"),
])
def test_vouched_manifest_refuses_a_different_tree(
        store: LocalStore, tmp_path: Path, tamper: Callable[[Path], None],
        message: str) -> None:
    src = tmp_path / "src"
    _build(src)
    manifest = scan_tree(src)
    with store.staging_dir("t") as stage:
        tree = stage / "tree"
        _build(tree)
        tamper(tree)
        with pytest.raises(InvalidTreeError) as info:
            store.register_tree(tree, "t", kind=PathKind.SOURCE,
                                expected_mcid=manifest.mcid, manifest=manifest)
    assert message in info.value.message
    assert store.valid_paths() == []
    assert not os.listdir(store.store_dir)


def test_vouched_manifest_must_have_the_expected_mcid(store: LocalStore,
                                                      tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    manifest = scan_tree(src)
    other = scan_tree(src / "lib")
    with store.staging_dir("t") as stage:
        tree = stage / "tree"
        _build(tree)
        with pytest.raises(InvalidTreeError, match="has content id"):
            store.register_tree(tree, "t", kind=PathKind.SOURCE,
                                expected_mcid=other.mcid, manifest=manifest)
    assert store.valid_paths() == []


def test_vouched_manifest_registers_the_same_path_as_a_scan(store: LocalStore,
                                                            tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    manifest = scan_tree(src)
    with store.staging_dir("t") as stage:
        tree = stage / "tree"
        _build(tree)
        sp = store.register_tree(tree, "t", kind=PathKind.SOURCE,
                                 expected_mcid=manifest.mcid, manifest=manifest)
    assert sp == store.add_path(src, "t")
    assert store.query_manifest(sp) == manifest
    assert scan_tree(store.real_path(sp), outside_links_ok=True) == manifest
