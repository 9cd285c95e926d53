"""Check that a staged tree has a vouched-for manifest's shape without re-reading files.

A caller that wrote a tree under ``tmp/`` itself, hashing every file's bytes as it wrote
them (the binary cache, the mesh, the archive importer), already knows each file's
blake3. Re-reading the whole tree in :meth:`LocalStore.register_tree` would only repeat
that. :func:`check_tree_shape` still walks the tree with ``lstat`` and checks everything
but the file contents: entry names and types, sizes, executable bits, that no entry is
missing or extra, symlink targets (read and hashed: they are tiny), escaping links and
files hardlinked from outside the tree. File contents are taken from the manifest: the
caller vouches for contents it wrote itself under ``tmp/`` (a directory only this
process's staging writes into).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection

import blake3

from bstore.store.manifest import (
    EntryType,
    InvalidTreeError,
    Manifest,
    ManifestEntry,
    escaping_link_error,
    tree_os_error,
    validate_entry_path,
)
from bstore.store.symlinks import find_escaping_link, symlink_escapes

__all__ = ["check_tree_shape"]


def check_tree_shape(root: str | os.PathLike[str], manifest: Manifest, *,
                     allowed_link_roots: Collection[str] = ()) -> None:
    """Raise :class:`InvalidTreeError` unless the tree at ``root`` is ``manifest``'s tree
    in everything but file contents (which are not read: see the module docstring)."""
    root_b = os.fsencode(root)
    shown_root = os.fsdecode(root_b)
    expected = {e.path: e for e in manifest.entries}
    allowed = frozenset(os.fsencode(r) for r in allowed_link_roots)
    links: dict[bytes, bytes] = {}
    link_counts: dict[tuple[int, int], list[int]] = {}
    seen: set[bytes] = set()

    def check(abs_path: bytes, rel: bytes, st: os.stat_result) -> EntryType:
        want = expected.get(rel)
        shown = rel.decode("utf-8", "backslashreplace") or "."
        if want is None:
            raise InvalidTreeError(f"{shown_root}: entry {shown!r} is not in the manifest",
                                   hint="the staged tree has more than was fetched")
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            got = ManifestEntry(rel, EntryType.DIRECTORY, 0, None)
        elif stat.S_ISLNK(mode):
            target = os.readlink(abs_path)
            if symlink_escapes(rel, target, allowed):
                raise escaping_link_error(shown_root, rel, target, "points outside the tree")
            links[rel] = target
            got = ManifestEntry(rel, EntryType.SYMLINK, len(target),
                                blake3.blake3(target).hexdigest())
        elif stat.S_ISREG(mode):
            kind = EntryType.EXECUTABLE if mode & stat.S_IXUSR else EntryType.FILE
            got = ManifestEntry(rel, kind, st.st_size, want.blake3_hex)
            if st.st_nlink > 1:
                link_counts.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0])[1] += 1
        else:
            raise InvalidTreeError(f"{shown_root}: {shown!r} is not a directory, regular file"
                                   " or symlink")
        if got != want:
            raise InvalidTreeError(
                f"{shown_root}: entry {shown!r} is {got.type.value} of {got.size} bytes,"
                f" the manifest says {want.type.value} of {want.size} bytes"
                + (" (link target differs)" if got.type is EntryType.SYMLINK else ""),
                hint="the staged tree is not what was fetched")
        seen.add(rel)
        return got.type

    try:
        root_st = os.lstat(root_b)
    except OSError as exc:
        raise tree_os_error(exc, shown_root, b"") from exc
    if check(root_b, b"", root_st) is EntryType.DIRECTORY:
        stack: list[bytes] = [b""]
        while stack:
            rel_dir = stack.pop()
            abs_dir = root_b + b"/" + rel_dir if rel_dir else root_b
            try:
                with os.scandir(abs_dir) as it:
                    children = [(e.name, e.stat(follow_symlinks=False)) for e in it]
                for name, child_st in children:
                    rel = rel_dir + b"/" + name if rel_dir else name
                    if check(abs_dir + b"/" + name, validate_entry_path(rel),
                             child_st) is EntryType.DIRECTORY:
                        stack.append(rel)
            except OSError as exc:
                raise tree_os_error(exc, shown_root, rel_dir) from exc
    if len(seen) != len(expected):
        missing = min(set(expected) - seen)
        raise InvalidTreeError(
            f"{shown_root}: {len(expected) - len(seen)} manifest entries are missing from"
            f" the staged tree (e.g. {missing.decode('utf-8', 'backslashreplace')!r})",
            hint="the staged tree is not what was fetched")
    for (_dev, _ino), (nlink, inside) in link_counts.items():
        if inside < nlink:
            raise InvalidTreeError(
                f"{shown_root}: a file in the tree is hardlinked from outside it"
                f" ({nlink} links, {inside} inside)",
                hint="stage files as fresh copies")
    escaping = find_escaping_link(links, allowed)
    if escaping is not None:
        raise escaping_link_error(shown_root, *escaping)

