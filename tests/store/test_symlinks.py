"""Symlink containment: every link must resolve inside its tree or a referenced path."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bstore.store.manifest import InvalidTreeError, scan_tree
from bstore.store.symlinks import find_escaping_link, symlink_escapes

REF = b"0" * 32 + b"-web-1.0"


@pytest.mark.parametrize(
    ("links", "allowed", "escaping"),
    [
        ({b"a": b"b"}, (), None),
        ({b"d/a": b"../b"}, (), None),
        ({b"d/a": b"../../b"}, (), b"d/a"),
        ({b"a": b"/etc/passwd"}, (), b"a"),
        ({b"": b"x"}, (), b""),
        # Each alone stays inside; together y resolves to the tree's parent.
        ({b"l": b".", b"y": b"l/.."}, (), b"y"),
        ({b"x/l": b"..", b"y": b"x/l/.."}, (), b"y"),
        ({b"a": b"b", b"b": b"a"}, (), b"a"),
        # Into a referenced store path, and only there.
        ({b"lib/web": b"../../" + REF + b"/lib/web-1.0"}, (REF,), None),
        ({b"lib/web": b"../../" + REF + b"/lib/web-1.0"}, (), b"lib/web"),
        ({b"lib/web": b"../../" + REF + b"/../other"}, (REF,), b"lib/web"),
        ({b"lib/web": b"../../../etc"}, (REF,), b"lib/web"),
    ],
)
def test_find_escaping_link(
    links: dict[bytes, bytes], allowed: tuple[bytes, ...], escaping: bytes | None
) -> None:
    found = find_escaping_link(links, allowed)
    assert (found[0] if found else None) == escaping


def test_lexical_check_alone_misses_chains() -> None:
    # Why find_escaping_link exists: the per-link check passes both links.
    assert not symlink_escapes(b"l", b".")
    assert not symlink_escapes(b"y", b"l/..")


def test_scan_tree_refuses_a_chain(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    os.symlink(".", tree / "l")
    os.symlink("l/..", tree / "y")
    with pytest.raises(InvalidTreeError, match=re.escape("'y' -> 'l/..' points outside the tree")):
        scan_tree(tree)


def test_scan_tree_allows_links_into_referenced_paths(tmp_path: Path) -> None:
    tree = tmp_path / "gen"
    (tree / "lib").mkdir(parents=True)
    os.symlink(f"../../{REF.decode()}/lib/web-1.0", tree / "lib" / "web-1.0")
    with pytest.raises(InvalidTreeError, match="points outside the tree"):
        scan_tree(tree)
    manifest = scan_tree(tree, allowed_link_roots={REF.decode()})
    assert [e.path for e in manifest.entries] == [b"", b"lib", b"lib/web-1.0"]
