"""``store optimise``: identical files across store paths share one inode.

``links/<blake3 hex><f|x>`` is a hardlink to the first verified copy of each file content
(``x`` for executables: the mode is part of the inode). Every other store file with the
same content and kind is replaced by a hardlink to it: link to a temporary name in the
same directory, then ``rename(2)`` over the file, so a reader sees the old or the new
inode, never neither. Contents are re-hashed before a file becomes a ``links/`` entry, so
a damaged file is never spread; the recorded manifest is the source of truth.

Runs under the shared GC lock (GC cannot delete paths or prune ``links/`` meanwhile) and
each path's lock (``replace_path`` cannot swap it meanwhile).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass

from bstore.store.atomic import CANONICAL_MTIME_NS
from bstore.store.local import LocalStore
from bstore.store.locks import gc_shared, path_lock
from bstore.store.manifest import EntryType, hash_file

OptimiseProgress = Callable[[int, int], None]
"""Called as ``(paths done, bytes saved so far)``."""


@dataclass(frozen=True, slots=True)
class OptimiseResult:
    """What ``optimise`` did."""

    files_linked: int
    bytes_saved: int
    damaged: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"files_linked": self.files_linked, "bytes_saved": self.bytes_saved,
                "damaged": list(self.damaged)}


def optimise_store(store: LocalStore, progress: OptimiseProgress | None = None
                   ) -> OptimiseResult:
    """Hardlink identical files of all valid paths; report bytes saved."""
    links_dir = store.layout.links_dir
    linked = 0
    saved = 0
    damaged: list[str] = []
    verified: set[str] = set()
    with gc_shared(store.layout, store.lock_timeout):
        for done, sp in enumerate(store.valid_paths(), 1):
            with path_lock(store.layout, sp, store.lock_timeout):
                manifest = store.query_manifest(sp)
                base = store.real_path(sp)
                for entry in manifest.files():
                    if entry.type is EntryType.SYMLINK or entry.size == 0:
                        continue
                    assert entry.blake3_hex is not None
                    file = os.path.join(os.fsencode(base), entry.path) if entry.path \
                        else os.fsencode(base)
                    key = entry.blake3_hex + ("x" if entry.type is EntryType.EXECUTABLE
                                              else "f")
                    link = os.fsencode(links_dir / key)
                    result = _link_one(file, link, key, entry.blake3_hex, entry.size,
                                       verified, in_dir=bool(entry.path))
                    if result is None:
                        damaged.append(f"{sp}/{entry.shown}")
                    elif result >= 0:
                        linked += 1
                        saved += result
            if progress is not None:
                progress(done, saved)
    return OptimiseResult(linked, saved, tuple(damaged))


def _link_one(file: bytes, link: bytes, key: str, hex_digest: str, size: int,
              verified: set[str], *, in_dir: bool) -> int | None:
    """Link ``file`` to ``link``; bytes saved, -1 if nothing to do, None if damaged."""
    try:
        fst = os.lstat(file)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(fst.st_mode) or fst.st_size != size:
        return None
    try:
        lst = os.lstat(link)
    except FileNotFoundError:
        if hash_file(os.fsdecode(file), size) != hex_digest:
            return None
        try:
            os.link(file, link)
        except OSError as exc:
            if exc.errno in (errno.EMLINK, errno.EEXIST):
                return -1
            raise
        verified.add(key)
        return -1
    if (lst.st_ino, lst.st_dev) == (fst.st_ino, fst.st_dev):
        return -1
    if key not in verified:
        if hash_file(os.fsdecode(link), size) != hex_digest:
            # A damaged links/ entry: drop it; the next run re-creates it from a good copy.
            os.unlink(link)
            return -1
        verified.add(key)
    parent = os.path.dirname(file)
    pst = os.lstat(parent)
    tmp = os.path.join(parent, f".optimise-{secrets.token_hex(6)}".encode())
    # Directories in the store are 0555: open one up just for the swap (a single-file
    # path sits directly in store/, which is writable and keeps its own times).
    if in_dir:
        os.chmod(parent, 0o755)
    try:
        try:
            os.link(link, tmp)
        except OSError as exc:
            if exc.errno == errno.EMLINK:  # the links/ inode is full; keep this copy
                return -1
            raise
        os.rename(tmp, file)
    finally:
        if in_dir:
            os.chmod(parent, stat.S_IMODE(pst.st_mode))
            os.utime(parent, ns=(pst.st_atime_ns, CANONICAL_MTIME_NS))
    return fst.st_blocks * 512 if fst.st_nlink == 1 else 0
