"""Profiles: numbered generation links and the one link that says which is current.

::

    <root>/profiles/<p>             -> <p>-<N>-link              (relative; the current one)
    <root>/profiles/<p>-<N>-link    -> <root>/store/<digest>-generation
    <root>/profiles/<p>.journal        an interrupted switch (bstore.generations.journal)

Every link is written as a temporary symlink next to its final name, renamed over it
(``rename(2)`` is atomic) and made durable with an fsync of ``profiles/``, so a reader or
a crash sees the old link or the new one, never neither. Every generation link is a GC
root (the store's GC treats every symlink under ``profiles/`` that leads into the store
as one). Changes to one profile are serialised by ``locks/profile-<p>.lock``.

Links are untrusted on read: a profile link must name a generation link of the same
profile, a generation link must point at ``<store>/<digest>-generation``; anything else is
a :class:`ProfileError` naming the link, and nothing is changed.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bstore.errors import BstoreError
from bstore.generations.generation import GENERATION_NAME
from bstore.store import atomic
from bstore.store.local import LocalStore
from bstore.store.locks import held
from bstore.store.paths import InvalidStorePath, StorePath

DEFAULT_PROFILE = "default"
_PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
#: Numbers are written without leading zeros, so each has exactly one link name.
_NUMBER = r"(?:[1-9][0-9]{0,17})"
_TMP_PREFIX = ".tmp-"


class ProfileError(BstoreError):
    """A profile or generation link that is missing, malformed or points elsewhere."""


def validate_profile_name(name: str) -> str:
    """Return ``name`` if it can name a profile (its links must not look like another
    profile's generation links, nor its journal)."""
    if (not _PROFILE_RE.fullmatch(name) or re.fullmatch(rf".*-{_NUMBER}-link", name)
            or name.endswith(".journal")):
        raise ProfileError(f"profile name {name!r} is not usable",
                           hint="use letters, digits, '_', '.', '-' (at most 64), not ending"
                           " in -<number>-link or .journal")
    return name


@dataclass(frozen=True, slots=True)
class GenerationLink:
    """One numbered generation of a profile: its link, store path and link time."""

    number: int
    store_path: StorePath
    created: datetime
    link: Path


class Profile:
    """The links of one profile in a store. Cheap to create; reads the disk on demand."""

    def __init__(self, store: LocalStore, name: str = DEFAULT_PROFILE) -> None:
        self.store = store
        self.name = validate_profile_name(name)
        self.dir = store.layout.profiles_dir
        self.link = self.dir / self.name
        self.journal_path = self.dir / f"{self.name}.journal"
        self._gen_re = re.compile(rf"{re.escape(self.name)}-({_NUMBER})-link")
        self._check_dir()

    def _check_dir(self) -> None:
        try:
            st = os.lstat(self.dir)
        except OSError as exc:
            raise ProfileError(f"cannot inspect profiles dir {str(self.dir)!r}: {exc.strerror}"
                               ) from exc
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise ProfileError(f"profiles dir {str(self.dir)!r} is {what}",
                               hint="it must be a real directory in the state root; move it"
                               " away and restore the profile links into a new one")

    # -- locking ---------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this profile's lock (switches, rollbacks, deletions take it)."""
        lock = self.store.layout.locks_dir / f"profile-{self.name}.lock"
        with held(lock, exclusive=True, timeout=self.store.lock_timeout,
                  what=f"the lock of profile {self.name!r}"):
            yield

    # -- reading ---------------------------------------------------------------------------

    def link_name(self, number: int) -> str:
        """``<p>-<N>-link``."""
        return f"{self.name}-{number}-link"

    def _read_gen_link(self, number: int) -> GenerationLink:
        path = self.dir / self.link_name(number)
        try:
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        except FileNotFoundError:
            raise self._missing(number) from None
        except OSError as exc:
            raise ProfileError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
        if target is None:
            raise ProfileError(f"generation link {str(path)!r} is not a symlink",
                               hint="move the file away; profiles/ holds only links")
        prefix = str(self.store.store_dir) + os.sep
        base = target[len(prefix):] if target.startswith(prefix) else ""
        try:
            sp = StorePath.parse(base)
        except InvalidStorePath:
            sp = None
        if sp is None or sp.name != GENERATION_NAME:
            raise ProfileError(
                f"generation link {str(path)!r} points to {target!r}, not to a generation in"
                f" the store {str(self.store.store_dir)!r}",
                hint="remove that link (rm) and switch to a good generation")
        return GenerationLink(number, sp, datetime.fromtimestamp(st.st_mtime, UTC), path)

    def _missing(self, number: int) -> ProfileError:
        existing = ", ".join(str(n) for n in self.numbers()) or "none"
        return ProfileError(f"profile {self.name!r} has no generation {number}"
                            f" (existing: {existing})",
                            hint="list them with bstore generations")

    def numbers(self) -> list[int]:
        """Generation numbers present, ascending."""
        found = []
        with os.scandir(self.dir) as it:
            for entry in it:
                m = self._gen_re.fullmatch(entry.name)
                if m:
                    found.append(int(m.group(1)))
        return sorted(found)

    def generations(self) -> list[GenerationLink]:
        """Every generation link, ascending by number (each one checked)."""
        return [self._read_gen_link(n) for n in self.numbers()]

    def get(self, number: int) -> GenerationLink:
        """Generation ``number`` (a :class:`ProfileError` listing the existing ones if absent)."""
        return self._read_gen_link(number)

    def current_number(self) -> int | None:
        """The number the profile link names, or ``None`` before the first switch."""
        try:
            st = os.lstat(self.link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ProfileError(f"cannot read {str(self.link)!r}: {exc.strerror}") from exc
        target = os.readlink(self.link) if stat.S_ISLNK(st.st_mode) else None
        m = self._gen_re.fullmatch(target) if target is not None else None
        if m is None:
            shown = "not a symlink" if target is None else f"a link to {target!r}"
            raise ProfileError(
                f"profile link {str(self.link)!r} is {shown}, not <{self.name}>-<N>-link",
                hint=f"point it at a generation: bstore rollback --to N --profile {self.name}")
        return int(m.group(1))

    def current(self) -> GenerationLink | None:
        """The current generation, checked; ``None`` before the first switch."""
        number = self.current_number()
        return None if number is None else self._read_gen_link(number)

    def previous_number(self, before: int) -> int | None:
        """The highest existing number below ``before`` (numbers may have gaps)."""
        lower = [n for n in self.numbers() if n < before]
        return lower[-1] if lower else None

    # -- writing ---------------------------------------------------------------------------

    def _replace_link(self, name: str, target: str, *, sync: bool = True) -> None:
        tmp = self.dir / f"{_TMP_PREFIX}{self.name}-{secrets.token_hex(6)}"
        try:
            os.symlink(target, tmp)
            os.rename(tmp, self.dir / name)
        except OSError as exc:
            raise ProfileError(f"cannot write link {str(self.dir / name)!r}: {exc.strerror}"
                               ) from exc
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        if sync:
            self.sync()

    def sync(self) -> None:
        """Make every link change in ``profiles/`` so far durable (fsync of the directory)."""
        atomic.fsync_path(self.dir)

    def write_generation_link(self, number: int, sp: StorePath) -> Path:
        """Create ``<p>-<number>-link`` → the generation ``sp`` (durable on return)."""
        if not self.store.is_valid(sp):
            raise ProfileError(f"generation {self.store.full_path(sp)!r} is not a valid path")
        self._replace_link(self.link_name(number), self.store.full_path(sp))
        return self.dir / self.link_name(number)

    def set_current(self, number: int, *, sync: bool = True) -> None:
        """Point the profile at generation ``number`` (which must exist; atomic; durable on
        return unless ``sync`` is false, when the caller runs :meth:`sync` later)."""
        self._read_gen_link(number)
        self._replace_link(self.name, self.link_name(number), sync=sync)

    def remove_generation_link(self, number: int) -> None:
        """Delete generation ``number``'s link (never the current one; durable)."""
        if number == self.current_number():
            raise ProfileError(f"generation {number} is the current one of profile"
                               f" {self.name!r}; it is never deleted",
                               hint="switch to another generation first")
        try:
            os.unlink(self.dir / self.link_name(number))
        except FileNotFoundError:
            return
        atomic.fsync_path(self.dir)

    def clean_temp_links(self) -> list[str]:
        """Remove temporary links a killed process left behind; return their names."""
        removed = []
        prefix = f"{_TMP_PREFIX}{self.name}-"
        with os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.startswith(prefix) and entry.is_symlink():
                    os.unlink(entry.path)
                    removed.append(entry.name)
        if removed:
            atomic.fsync_path(self.dir)
        return removed


# -- deletion policy (pure) ----------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``1w2d``, ``90m``, ``45s`` → a duration."""
    cleaned = text.strip().lower()
    parts = _DURATION_RE.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise ProfileError(f"duration {text!r} is not understood",
                           hint="use numbers with s, m, h, d or w, e.g. 30d or 1w2d")
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))


def select_deletions(gens: Sequence[GenerationLink], current: int | None, *,
                     keep: int | None = None, older_than: timedelta | None = None,
                     now: datetime | None = None) -> list[int]:
    """Numbers to delete: not the current one, not among the ``keep`` newest, and (with
    ``older_than``) linked more than that long before ``now``."""
    if keep is None and older_than is None:
        raise ProfileError("say which generations to delete",
                           hint="use --keep N or --older-than D")
    if keep is not None and keep < 1:
        raise ProfileError(f"--keep {keep} would keep nothing",
                           hint="keep at least 1 (the current generation is always kept)")
    now = now or datetime.now(UTC)
    newest = sorted((g.number for g in gens), reverse=True)
    kept = set(newest[:keep]) if keep is not None else set()
    return [g.number for g in gens
            if g.number != current and g.number not in kept
            and (older_than is None or g.created < now - older_than)]
