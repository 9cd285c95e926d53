"""GC roots: symlinks under ``profiles/`` and ``gcroots/`` that lead into the store.

A root is any symlink found (recursively, without following directory links) under
either directory whose fully resolved target lies in ``store/``. Resolving the whole
chain makes *indirect* roots work: ``gcroots/result -> /home/u/proj/result -> store/…``
keeps the path alive as long as the user's ``result`` link exists. Dangling links and
links leading elsewhere are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

from bstore.store.layout import StoreLayout
from bstore.store.paths import InvalidStorePath, StorePath


def find_roots(layout: StoreLayout) -> dict[str, StorePath]:
    """``{link path: store path}`` of every root link (pure reads, no locks)."""
    prefix = str(layout.store_dir) + os.sep
    roots: dict[str, StorePath] = {}
    stack = [layout.profiles_dir, layout.gcroots_dir]
    while stack:
        directory = stack.pop()
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if target.startswith(prefix):
                        base = target[len(prefix):].split(os.sep, 1)[0]
                        try:
                            roots[entry.path] = StorePath.parse(base)
                        except InvalidStorePath:
                            continue
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return roots
