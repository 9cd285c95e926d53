"""Symlink containment checks that resolve through the real filesystem.

A lexical check of each link on its own (``manifest.symlink_escapes``) cannot see
chains: ``l -> .`` and ``y -> l/..`` are each harmless-looking, yet ``y`` resolves to
the parent of the tree. After a tree is written, every link is resolved with
``realpath`` and must land inside the tree's root.
"""

from __future__ import annotations

import os
from pathlib import Path


def find_escaping_link(root: Path | str) -> tuple[str, str] | None:
    """The first symlink under ``root`` that resolves outside it, as (relpath, target)."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            resolved = os.path.realpath(path)
            if os.path.commonpath([real_root, resolved]) != real_root:
                return os.path.relpath(path, root), os.readlink(path)
    return None
