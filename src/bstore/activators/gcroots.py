"""GC roots for code that runs: what a profile's nodes have loaded stays in the store.

Every generation link is a GC root, but a node can run code no generation link names any
more: ``bstore generations delete --keep 1`` while a VM still runs an older generation,
or a switch whose activation was interrupted. So the activators root what each node runs,
under ``<root>/gcroots/nodes/<profile>/``::

    host/<app>   -> <store>/<output>   each app bstore started in the host node
    vm/<app>     -> <store>/<output>   the app a guest VM runs

An output's references hold its whole dependency closure, and a node's code path points
into the outputs themselves (not through a generation's ``lib/`` links), so rooting the
outputs keeps everything the running code can still load (lazily loaded modules, ``priv``
files). :mod:`bstore.store.roots` follows these nested links. A root is set before the
code starts and removed when its node stops (or the app leaves it), so the window in
which the running code is unrooted is empty: until the activator's root exists, the
generation being activated (a profile link) holds the same paths.

Links are replaced atomically (temp symlink + ``rename``), without an fsync: they root
the code of running processes, and the power loss that could undo a change ends those
processes too (the node that boots again sets its roots anew; a stopped node's are
dropped).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bstore.errors import BstoreError
from bstore.store.paths import InvalidStorePath, StorePath

#: The groups of roots a profile has: the host node's apps and the guest VMs' apps.
GROUPS = ("host", "vm")


class RunningRootsError(BstoreError):
    """A GC root for running code that cannot be written or removed."""


@dataclass(frozen=True)
class PreparedRoot:
    """A root link written under a temporary name (:meth:`RunningRoots.prepare`)."""

    temp: Path
    link: Path
    target: str

    def commit(self) -> None:
        """Make it the app's root (atomically replacing the previous one)."""
        try:
            os.rename(self.temp, self.link)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)
            raise RunningRootsError(f"cannot write GC root {self.link} -> {self.target}: {exc}",
                                    hint="check the permissions of the state directory"
                                    ) from exc

    def discard(self) -> None:
        """Drop it: the app's root stays as it was."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


class RunningRoots:
    """The GC roots of ``profile``'s running code under the state root ``root``."""

    def __init__(self, root: Path, profile: str) -> None:
        self.store_dir = Path(os.path.realpath(Path(root) / "store"))
        self.directory = Path(root) / "gcroots" / "nodes" / profile

    def _group(self, group: str) -> Path:
        if group not in GROUPS:
            raise RunningRootsError(f"GC root group {group!r} is not one of {GROUPS}")
        return self.directory / group

    def read(self, group: str) -> dict[str, str]:
        """App → store path base name of every root in ``group``."""
        out: dict[str, str] = {}
        try:
            entries = list(os.scandir(self._group(group)))
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_symlink():
                continue
            out[entry.name] = os.path.basename(os.readlink(entry.path))
        return out

    def set(self, group: str, app: str, output: str) -> None:
        """Root ``output`` (a store path base name) for ``app`` in ``group``."""
        prepared = self.prepare(group, app, output)
        if prepared is not None:
            prepared.commit()

    def prepare(self, group: str, app: str, output: str) -> PreparedRoot | None:
        """Write the link that will root ``output`` for ``app`` under a temporary name
        (itself a root: GC counts every link here), to become ``app``'s root with one
        ``rename`` (:meth:`PreparedRoot.commit`) once the code it roots runs. None when
        ``app``'s root already is ``output``. Creating the link is the slow part on some
        filesystems; the embedded activator does it while the node restarts the app."""
        try:
            StorePath.parse(output)
        except InvalidStorePath as exc:
            raise RunningRootsError(f"cannot root {output!r} for app {app!r}: {exc.message}",
                                    hint="pass the output's store path base name") from exc
        if not app or "/" in app or app.startswith("."):
            raise RunningRootsError(f"app name {app!r} cannot name a GC root link")
        directory = self._group(group)
        link = directory / app
        target = str(self.store_dir / output)
        try:
            if os.readlink(link) == target:
                return None
        except OSError:
            pass
        tmp = directory / f".{app}.tmp-{secrets.token_hex(4)}"
        try:
            try:
                os.symlink(target, tmp)
            except FileNotFoundError:
                directory.mkdir(parents=True, exist_ok=True)
                os.symlink(target, tmp)
        except OSError as exc:
            raise RunningRootsError(f"cannot write GC root {link} -> {target}: {exc}",
                                    hint="check the permissions of the state directory"
                                    ) from exc
        return PreparedRoot(tmp, link, target)

    def remove(self, group: str, app: str) -> None:
        """Drop ``app``'s root in ``group`` (its node stopped or it left the node)."""
        link = self._group(group) / app
        try:
            os.unlink(link)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RunningRootsError(f"cannot remove GC root {link}: {exc}") from exc

    def sync(self, group: str, wanted: Mapping[str, str]) -> None:
        """Make ``group`` hold exactly ``wanted`` (app → output base name)."""
        have = self.read(group)
        for app, output in wanted.items():
            if have.get(app) != output:
                self.set(group, app, output)
        for app in have:
            if app not in wanted:
                self.remove(group, app)
        directory = self._group(group)
        # Leftover temp links of a process killed between symlink and rename.
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def clear(self, group: str) -> None:
        """Drop every root of ``group`` (its node stopped)."""
        self.sync(group, {})
