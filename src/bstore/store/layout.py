"""The state root on disk and the checks made before anything in it is trusted.

::

    <root>/
      store/<digest>-<name>   immutable store paths (files 0444/0555, dirs 0555, mtime 1)
      db.sqlite               valid paths, MCIDs, references, manifests, signatures (WAL)
      profiles/  gcroots/     symlinks that keep store paths alive (GC roots)
      tmp/                    staging dirs, named <owner token>-<label>-<random>
      locks/                  gc.lock, paths/<bucket>.lock, temproots/<owner token>
      links/                  content-addressed hardlink targets of ``store optimise``

Everything lives on one filesystem so staging dirs can be renamed into ``store/`` and
``links/`` entries hardlinked into store paths.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from bstore.errors import BstoreError

#: Sub-directories of the root and their modes. ``tmp`` is private because staged trees
#: are not yet verified; the rest is world-readable like a Nix store.
SUBDIRS: dict[str, int] = {
    "store": 0o755,
    "profiles": 0o755,
    "gcroots": 0o755,
    "tmp": 0o700,
    "locks": 0o755,
    "links": 0o755,
}


class StoreError(BstoreError):
    """The store's layout, database or locks are unusable."""


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """Absolute paths of everything under one state root (pure; no I/O)."""

    root: Path

    def __post_init__(self) -> None:
        if not self.root.is_absolute():
            raise StoreError(f"store root {str(self.root)!r} is not an absolute path")

    @property
    def store_dir(self) -> Path:
        """Where store paths live; its string is part of every store path's digest."""
        return self.root / "store"

    @property
    def db_path(self) -> Path:
        """The SQLite database."""
        return self.root / "db.sqlite"

    @property
    def tmp_dir(self) -> Path:
        """Staging area (same filesystem as the store)."""
        return self.root / "tmp"

    @property
    def locks_dir(self) -> Path:
        """Lock files."""
        return self.root / "locks"

    @property
    def temproots_dir(self) -> Path:
        """One lock-protected file per live process listing its temporary roots."""
        return self.root / "locks" / "temproots"

    @property
    def path_locks_dir(self) -> Path:
        """Per-path lock buckets."""
        return self.root / "locks" / "paths"

    @property
    def gc_lock(self) -> Path:
        """Held exclusively by GC, shared by anyone about to rely on a path."""
        return self.root / "locks" / "gc.lock"

    @property
    def profiles_dir(self) -> Path:
        """Profile links (GC roots)."""
        return self.root / "profiles"

    @property
    def gcroots_dir(self) -> Path:
        """Explicit GC root links."""
        return self.root / "gcroots"

    @property
    def links_dir(self) -> Path:
        """Hardlink targets of ``store optimise``."""
        return self.root / "links"


def check_root(root: Path) -> None:
    """Refuse a root that is a symlink, not a directory, or group/world-writable.

    A writable-by-others root would let another user swap store paths under us; a symlink
    would make the store dir's string (part of every digest) depend on where it points.
    """
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot inspect store root {str(root)!r}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(
            f"store root {str(root)!r} is a symlink (to {os.readlink(root)!r})",
            hint="pass the real directory with --root (or $BSTORE_ROOT)",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(
            f"store root {str(root)!r} is not a directory",
            hint="pass a directory with --root (or $BSTORE_ROOT)",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(
            f"store root {str(root)!r} is writable by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"run: chmod go-w {str(root)!r}",
        )


def create_dirs(layout: StoreLayout) -> None:
    """Create the root and its sub-directories with their modes (umask-independent)."""
    try:
        if not layout.root.exists():
            layout.root.mkdir(parents=True, mode=0o755, exist_ok=True)
            os.chmod(layout.root, 0o755)
        for name, mode in SUBDIRS.items():
            path = layout.root / name
            if not path.exists():
                path.mkdir(mode=mode, exist_ok=True)
                os.chmod(path, mode)
        for path in (layout.temproots_dir, layout.path_locks_dir):
            path.mkdir(exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the store layout under {str(layout.root)!r}: {exc.strerror}",
            hint="check the permissions of the parent directory",
        ) from exc


def store_is_empty(layout: StoreLayout) -> bool:
    """Whether ``store/`` is missing or has no store paths in it."""
    try:
        with os.scandir(layout.store_dir) as it:
            return not any(not e.name.startswith(".") for e in it)
    except FileNotFoundError:
        return True
