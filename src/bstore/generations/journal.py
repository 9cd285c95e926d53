"""The activation journal: the intent of a switch, so a killed bstore can be finished
or undone by the next one.

``<root>/profiles/<p>.journal`` (JSON, schema :data:`JOURNAL_SCHEMA`) is written
atomically (temp file + ``rename``) before a switch touches any link, its ``step``
advanced as the switch goes, and removed when the switch (and its activation) is
complete::

    prepared  -> link written (<p>-<M>-link, for a new generation)
              -> switched   (profile link renamed to <p>-<M>-link)
              -> activation (the activation hook runs)
              -> journal removed

After a ``kill -9`` at any point the profile still names one whole generation (each link
is replaced by ``rename``). :func:`recover` then looks at where the profile points:

- at the journal's *from* generation: the switch never happened — remove the new link
  it may have written, drop the journal (**reverted**);
- at the *to* generation: the switch happened — run the activation again through the
  ``finish`` callback (activations are plans against what runs, so re-running one that
  had completed does nothing), then drop the journal (**finished**); without a callback
  the journal stays and the result says activation is **pending**.

Durability. The journal guards against bstore being killed, and a killed process loses
nothing it wrote: so writing the journal needs no fsync. What a power loss must not undo
is the switch a command reported done: the switch's fsync of ``profiles/`` (:mod:`.switch`).
A power loss ends every node too, and nodes boot into whatever generation the profile
names, so a journal lost or torn by it (empty or zero-filled: written, renamed, not yet on
disk) recorded nothing that is still to do; :func:`recover` drops it.

Crash points (``BSTORE_CRASH_AT``, see :mod:`bstore.store.crash`): :data:`CRASH_POINTS`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bstore.errors import BstoreError
from bstore.generations.profiles import GenerationLink, Profile
from bstore.store.paths import InvalidStorePath, StorePath

JOURNAL_SCHEMA = "bstore-journal/1"
#: Journals are a few hundred bytes; refuse to parse anything much bigger.
_MAX_JOURNAL_BYTES = 64 * 1024

#: Where a switch can be killed, in order (``BSTORE_CRASH_AT=<name>``).
CRASH_POINTS = (
    "gen-after-journal",    # intent recorded, no link touched
    "gen-after-link",       # <p>-<M>-link written, profile still at N
    "gen-after-switch",     # profile at M, activation not run
    "gen-after-activate",   # activation done, journal not yet removed
)


class JournalError(BstoreError):
    """A journal that cannot be read, or that disagrees with the profile."""


class Step(StrEnum):
    """How far a journaled switch got (recorded before each next action)."""

    PREPARED = "prepared"
    SWITCHED = "switched"


class Outcome(StrEnum):
    """What :func:`recover` did."""

    NONE = "none"
    REVERTED = "reverted"
    FINISHED = "finished"
    PENDING = "pending-activation"


@dataclass(frozen=True)
class Journal:
    """One interrupted (or running) switch of a profile from ``from_number`` (``None``:
    the first switch) to ``to_number``. ``new_link``: the switch creates ``to``'s link.
    ``activate``: an activation belongs to the switch."""

    profile: str
    operation: str
    from_number: int | None
    from_path: StorePath | None
    to_number: int
    to_path: StorePath
    new_link: bool
    activate: bool
    step: Step
    pid: int

    def to_bytes(self) -> bytes:
        """The journal file's bytes."""
        return json.dumps({
            "schema": JOURNAL_SCHEMA, "profile": self.profile, "operation": self.operation,
            "from": self.from_number,
            "from_path": None if self.from_path is None else str(self.from_path),
            "to": self.to_number, "to_path": str(self.to_path), "new_link": self.new_link,
            "activate": self.activate, "step": self.step.value, "pid": self.pid,
        }, sort_keys=True).encode() + b"\n"


def _parse(data: bytes, source: str) -> Journal:
    def bad(what: str) -> JournalError:
        return JournalError(f"journal {source!r}: {what}",
                            hint="inspect the profile (bstore generations), then remove the"
                            " journal file by hand")

    if len(data) > _MAX_JOURNAL_BYTES:
        raise bad(f"is {len(data)} bytes, too big for a journal")
    try:
        d: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"is not valid JSON ({exc})") from exc
    keys = {"schema", "profile", "operation", "from", "from_path", "to", "to_path",
            "new_link", "activate", "step", "pid"}
    if not isinstance(d, dict) or set(d) != keys or d["schema"] != JOURNAL_SCHEMA:
        raise bad(f"is not a {JOURNAL_SCHEMA} record")

    def number(v: Any, optional: bool) -> int | None:
        if v is None and optional:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"generation number {v!r} is not a positive integer")
        return v

    try:
        to_number = number(d["to"], False)
        assert to_number is not None
        from_path = None if d["from_path"] is None else StorePath.parse(str(d["from_path"]))
        return Journal(str(d["profile"]), str(d["operation"]), number(d["from"], True),
                       from_path, to_number, StorePath.parse(str(d["to_path"])),
                       d["new_link"] is True, d["activate"] is True, Step(d["step"]),
                       int(d["pid"]))
    except (InvalidStorePath, ValueError, TypeError) as exc:
        raise bad(str(exc)) from exc


def read_journal(profile: Profile) -> Journal | None:
    """The profile's journal, or ``None`` when no switch was interrupted."""
    path = profile.journal_path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise JournalError(f"cannot read journal {str(path)!r}: {why}",
                           hint="it must be a regular file; remove it by hand") from exc
    try:
        data = os.read(fd, _MAX_JOURNAL_BYTES + 1)
    finally:
        os.close(fd)
    if not data.strip(b"\0"):
        # Torn by a power loss (see the module docstring): nothing to finish or revert.
        return None
    journal = _parse(data, str(path))
    if journal.profile != profile.name:
        raise JournalError(f"journal {str(path)!r} is for profile {journal.profile!r}",
                           hint="remove the journal file by hand")
    return journal


def write_journal(profile: Profile, journal: Journal, *, first: bool = False) -> None:
    """Record ``journal``; not fsynced (see the module docstring, "Durability").

    ``first``: no journal exists (recovery ran under the same lock), so it is created in
    place; a kill between creating and writing it leaves an empty journal, dropped like
    a torn one (nothing was switched yet). Otherwise a temp file is renamed over the
    previous journal, which stays whole until then.
    """
    path = profile.journal_path
    target = path if first else path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, journal.to_bytes())
        finally:
            os.close(fd)
        if not first:
            os.rename(target, path)
    except OSError as exc:
        if not first and os.path.lexists(target):
            os.unlink(target)
        raise JournalError(f"cannot write journal {str(path)!r}: {exc.strerror}",
                           hint="check the permissions of the profiles directory") from exc


def clear_journal(profile: Profile, *, sync: bool = True) -> None:
    """Remove the journal: the switch is complete. ``sync`` (default) makes that, and
    every link change before it, durable."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(profile.journal_path)
    if sync:
        profile.sync()


#: Re-runs an interrupted activation: ``(from generation or None, to generation)``.
FinishActivation = Callable[[GenerationLink | None, GenerationLink], None]


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` found and did."""

    outcome: Outcome
    journal: Journal | None = None

    def describe(self) -> str:
        """One human line."""
        j = self.journal
        if j is None:
            return "no interrupted switch"
        span = f"{j.from_number or 'none'} -> {j.to_number}"
        return {
            Outcome.REVERTED: f"interrupted switch {span} of profile {j.profile!r} reverted",
            Outcome.FINISHED: f"interrupted switch {span} of profile {j.profile!r} finished",
            Outcome.PENDING: f"switch {span} of profile {j.profile!r} needs its activation"
                             " finished (run bstore activate)",
            Outcome.NONE: "no interrupted switch",
        }[self.outcome]


def recover(profile: Profile, finish: FinishActivation | None = None) -> Recovery:
    """Finish or revert an interrupted switch of ``profile`` (see the module docstring).

    The caller holds the profile lock. Leftover temporary links are removed either way.
    """
    profile.clean_temp_links()
    journal = read_journal(profile)
    if journal is None:
        if os.path.lexists(profile.journal_path):
            clear_journal(profile)  # torn by a power loss: nothing to do
        return Recovery(Outcome.NONE)
    current = profile.current_number()
    if current == journal.to_number and profile.get(current).store_path == journal.to_path:
        if journal.activate:
            if finish is None:
                return Recovery(Outcome.PENDING, journal)
            old = None if journal.from_number is None else _existing(profile, journal)
            finish(old, profile.get(journal.to_number))
        clear_journal(profile)
        return Recovery(Outcome.FINISHED, journal)
    if current == journal.from_number:
        if journal.new_link and journal.to_number in profile.numbers():
            link = profile.get(journal.to_number)
            if link.store_path == journal.to_path:
                profile.remove_generation_link(journal.to_number)
        clear_journal(profile)
        return Recovery(Outcome.REVERTED, journal)
    raise JournalError(
        f"journal {str(profile.journal_path)!r} records a switch {journal.from_number} ->"
        f" {journal.to_number}, but profile {profile.name!r} is at generation {current}",
        hint="someone changed the profile by hand; check it with bstore generations and"
        " remove the journal file")


def _existing(profile: Profile, journal: Journal) -> GenerationLink | None:
    assert journal.from_number is not None
    if journal.from_number in profile.numbers():
        return profile.get(journal.from_number)
    return None
