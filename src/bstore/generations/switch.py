"""Switching a profile: to a new generation, back to an earlier one, and deleting old ones.

Every switch runs under the profile lock and the journal (:mod:`.journal`): first an
interrupted earlier switch is finished or reverted, then the intent is recorded, the
links are replaced (temp symlink + ``rename``), the optional activation hook runs, and
the journal is removed.

Durability: a switch fsyncs ``profiles/`` once, on a background thread as soon as the
profile link is renamed, so the activation does not wait behind the disk; the switch
waits for it before it returns. A power loss before that ends every node as well, and
they boot into whichever whole generation the profile names; the journal needs no fsync
of its own (:mod:`.journal`, "Durability"), not even its removal: brought back by a power
loss, it names a switch whose activation recovery runs again and finds done. Undoing a
failed activation is made durable before the error goes up. A new generation's link is
made durable before the profile points at it.

The hook is how the layer above (activators) takes part without this layer knowing about
it: it receives the old and new generation links; if it raises, the profile is switched
back to the old generation and the error is re-raised (re-activating the old generation
is the caller's decision; a new generation's link stays, to be inspected, switched to or
deleted).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from bstore.background import in_background
from bstore.generations.generation import load_generation, write_generation
from bstore.generations.journal import (
    FinishActivation,
    Journal,
    Outcome,
    Recovery,
    Step,
    clear_journal,
    recover,
    write_journal,
)
from bstore.generations.manifest import GenerationManifest
from bstore.generations.profiles import GenerationLink, Profile, ProfileError, select_deletions
from bstore.store.crash import crash_point
from bstore.store.paths import StorePath

#: The activation hook: ``(old generation or None, new generation)``; raise to refuse.
ActivationHook = Callable[[GenerationLink | None, GenerationLink], None]


@dataclass(frozen=True)
class SwitchResult:
    """Where a switch left the profile. ``reused``: the content was the current
    generation's, nothing was switched; ``recovered``: what recovery did first."""

    previous: GenerationLink | None
    current: GenerationLink
    reused: bool
    recovered: Recovery


def _switch(profile: Profile, operation: str, target: StorePath, number: int | None,
            hook: ActivationHook | None, recovered: Recovery) -> SwitchResult:
    """Journaled switch to ``target`` (a new link when ``number`` is None)."""
    old = profile.current()
    new_link = number is None
    to_number = number if number is not None else (max(profile.numbers(), default=0) + 1)
    # Recovery decides from where the current link points, not from PREPARED vs
    # SWITCHED: with no link to write in between, one journal write is enough.
    journal = Journal(profile.name, operation, old.number if old else None,
                      old.store_path if old else None, to_number, target, new_link,
                      hook is not None, Step.PREPARED if new_link else Step.SWITCHED,
                      os.getpid())
    # Recovery removed any earlier journal, unless it left one pending for an activator.
    write_journal(profile, journal, first=recovered.outcome is not Outcome.PENDING)
    crash_point("gen-after-journal")
    if new_link:
        # Durable before the profile may point at it.
        profile.write_generation_link(to_number, target)
        crash_point("gen-after-link")
        write_journal(profile, _step(journal, Step.SWITCHED))
    profile.set_current(to_number, sync=False)
    synced = in_background(profile.sync)
    crash_point("gen-after-switch")
    new = profile.get(to_number)
    if hook is not None:
        try:
            hook(old, new)
        except BaseException:
            synced.result()
            if old is not None:
                profile.set_current(old.number, sync=False)
            clear_journal(profile)
            raise
        crash_point("gen-after-activate")
    synced.result()
    clear_journal(profile, sync=False)
    return SwitchResult(old, new, False, recovered)


def _step(journal: Journal, step: Step) -> Journal:
    return Journal(journal.profile, journal.operation, journal.from_number, journal.from_path,
                   journal.to_number, journal.to_path, journal.new_link, journal.activate,
                   step, journal.pid)


def commit_generation(profile: Profile, manifest: GenerationManifest, *,
                      hook: ActivationHook | None = None,
                      finish: FinishActivation | None = None) -> SwitchResult:
    """Write ``manifest`` as a generation and make it the profile's current one.

    Identical content reuses the current generation (no new number, no hook). ``finish``
    completes an interrupted earlier activation found by recovery (default: ``hook``).
    """
    target = write_generation(profile.store, manifest)
    with profile.locked():
        recovered = recover(profile, finish or hook)
        current = profile.current()
        if current is not None and current.store_path == target:
            return SwitchResult(current, current, True, recovered)
        return _switch(profile, "switch", target, None, hook, recovered)


def switch_to_number(profile: Profile, number: int, *, hook: ActivationHook | None = None,
                     finish: FinishActivation | None = None,
                     operation: str = "rollback") -> SwitchResult:
    """Make the existing generation ``number`` current (``bstore activate --generation``,
    ``bstore rollback --to``)."""
    with profile.locked():
        recovered = recover(profile, finish or hook)
        return _switch_existing(profile, number, hook, recovered, operation)


def _switch_existing(profile: Profile, number: int, hook: ActivationHook | None,
                     recovered: Recovery, operation: str) -> SwitchResult:
    target = profile.get(number)
    current = profile.current()
    if current is not None and current.number == number:
        return SwitchResult(current, current, True, recovered)
    # A damaged generation is refused before any link changes.
    load_generation(profile.store, target.store_path)
    return _switch(profile, operation, target.store_path, number, hook, recovered)


def rollback(profile: Profile, to: int | None = None, *, hook: ActivationHook | None = None,
             finish: FinishActivation | None = None) -> SwitchResult:
    """Switch back to generation ``to``, or to the highest one below the current."""
    with profile.locked():
        recovered = recover(profile, finish or hook)
        if to is None:
            current = profile.current_number()
            if current is None:
                raise ProfileError(f"profile {profile.name!r} has no generation yet",
                                   hint="create one with bstore activate")
            to = profile.previous_number(current)
            if to is None:
                raise ProfileError(f"generation {current} is the oldest of profile"
                                   f" {profile.name!r}; there is nothing to roll back to",
                                   hint="list generations with bstore generations")
        return _switch_existing(profile, to, hook, recovered, "rollback")


def delete_generations(profile: Profile, *, keep: int | None = None,
                       older_than: timedelta | None = None,
                       now: datetime | None = None) -> list[int]:
    """Delete the links of old generations (never the current one); return their numbers.

    The store paths stay until ``bstore store gc`` finds them unreachable.
    """
    with profile.locked():
        pending = recover(profile)
        if pending.outcome is Outcome.PENDING:
            raise ProfileError(f"profile {profile.name!r} has an unfinished activation",
                               hint="finish it first (bstore activate)")
        gens = profile.generations()
        doomed = select_deletions(gens, profile.current_number(), keep=keep,
                                  older_than=older_than, now=now)
        for number in doomed:
            profile.remove_generation_link(number)
        return doomed
