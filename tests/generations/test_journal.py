"""The activation journal: a real process SIGKILLed at every step of a switch leaves the
profile on one whole generation, and recovery finishes or reverts the switch."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from genhelpers import build, run_python

from bstore.generations.generation import load_generation, make_manifest
from bstore.generations.journal import (
    CRASH_POINTS,
    JournalError,
    Outcome,
    Step,
    read_journal,
    recover,
)
from bstore.generations.profiles import GenerationLink, Profile
from bstore.generations.switch import commit_generation, rollback
from bstore.store.local import LocalStore

Beams = dict[int, dict[str, bytes]]

_CHILD = """
from pathlib import Path
from bstore.store.local import LocalStore
from bstore.generations.manifest import parse_manifest
from bstore.generations.profiles import Profile
from bstore.generations.switch import commit_generation, rollback

root, op, manifest_file, marker = {args}

def hook(old, new):
    with open(marker, "a") as f:
        f.write(f"{{old.number if old else None}}->{{new.number}}\\n")

with LocalStore.open(Path(root)) as st:
    prof = Profile(st)
    if op == "commit":
        commit_generation(prof, parse_manifest(Path(manifest_file).read_bytes()), hook=hook)
    else:
        rollback(prof, hook=hook)
print("done")
"""


def _child(root: Path, op: str, manifest_file: Path, marker: Path, crash: str | None
           ) -> int:
    args = repr((str(root), op, str(manifest_file), str(marker)))
    env = {"BSTORE_CRASH_AT": crash} if crash else None
    proc = run_python(_CHILD.format(args=args), root, env)
    if crash is None:
        assert proc.returncode == 0, proc.stderr
    return proc.returncode


def _setup(root: Path, tmp_path: Path, beams: Beams) -> Path:
    """Generations 1 and 2 (current); a manifest for a third written to a file."""
    with LocalStore.open(root) as store:
        prof = Profile(store)
        db = build(store, "db", "1.0", {"db": beams[1]["db"]})
        for v in (1, 2):
            web = build(store, "web", "1.0", {"web": beams[v]["web"]}, depends_on=["db"])
            commit_generation(prof, make_manifest(store, [web, db]))
        web3 = build(store, "web", "1.1", {"web": beams[2]["web"]}, depends_on=["db"])
        path = tmp_path / "gen3.json"
        path.write_bytes(make_manifest(store, [web3, db]).to_bytes())
        # the new generation's outputs are rooted as a build would root them
        store.add_root(web3.output, "web3")
    return path


def _whole_generation(store: LocalStore, prof: Profile) -> int:
    current = prof.current_number()
    assert current is not None
    load_generation(store, prof.get(current).store_path)  # complete and valid
    return current


@pytest.mark.parametrize(("op", "point"), [
    *(("commit", p) for p in CRASH_POINTS),
    # a rollback writes no new link, so it has no gen-after-link step
    *(("rollback", p) for p in CRASH_POINTS if p != "gen-after-link"),
])
def test_kill_at_each_step(root: Path, tmp_path: Path, beams: Beams, op: str,
                           point: str) -> None:
    manifest_file = _setup(root, tmp_path, beams)
    marker = tmp_path / "activated"
    rc = _child(root, op, manifest_file, marker, point)
    assert rc == -signal.SIGKILL
    to = 3 if op == "commit" else 1
    switched = point in ("gen-after-switch", "gen-after-activate")
    with LocalStore.open(root) as store:
        prof = Profile(store)
        # the profile names one whole generation: the old one or the new one
        assert _whole_generation(store, prof) == (to if switched else 2)
        journal = read_journal(prof)
        assert journal is not None and (journal.from_number, journal.to_number) == (2, to)
        if point == "gen-after-switch":
            assert journal.step is Step.SWITCHED
            # without an activator nothing is finished and the journal stays
            pending = recover(prof)
            assert pending.outcome is Outcome.PENDING
            assert "needs its activation finished" in pending.describe()
            assert read_journal(prof) is not None
        finished: list[tuple[int | None, int]] = []

        def finish(old: GenerationLink | None, new: GenerationLink) -> None:
            finished.append((old.number if old else None, new.number))

        result = recover(prof, finish)
        assert result.outcome is (Outcome.FINISHED if switched else Outcome.REVERTED)
        # After the switch, recovery runs the activation again, even one that had
        # completed (activators plan against what runs: a completed one does nothing).
        assert finished == ([(2, to)] if switched else [])
        assert read_journal(prof) is None
        assert prof.current_number() == (to if switched else 2)
        # a link written before the kill is removed when the switch is reverted
        assert prof.numbers() == ([1, 2, 3] if op == "commit" and switched else [1, 2])
        assert not [n for n in os.listdir(prof.dir) if n.startswith(".")]
        # activation ran in the killed process exactly when it got past it
        ran = marker.read_text().splitlines() if marker.exists() else []
        assert ran == ([f"2->{to}"] if point == "gen-after-activate" else [])
    # and the next operation runs normally
    _child(root, "commit", manifest_file, marker, None)
    with LocalStore.open(root) as store:
        prof = Profile(store)
        assert read_journal(prof) is None
        _whole_generation(store, prof)


def test_next_operation_recovers_first(root: Path, tmp_path: Path, beams: Beams) -> None:
    manifest_file = _setup(root, tmp_path, beams)
    marker = tmp_path / "activated"
    assert _child(root, "commit", manifest_file, marker, "gen-after-switch") == -9
    # a rollback in a new process first finishes the interrupted activation (2 -> 3)
    # through its own hook, then rolls back 3 -> 2
    _child(root, "rollback", manifest_file, marker, None)
    assert marker.read_text().splitlines() == ["2->3", "3->2"]
    with LocalStore.open(root) as store:
        assert Profile(store).current_number() == 2


def test_failed_activation_switches_back(root: Path, tmp_path: Path, beams: Beams) -> None:
    _setup(root, tmp_path, beams)
    with LocalStore.open(root) as store:
        prof = Profile(store)

        def refuse(old: GenerationLink | None, new: GenerationLink) -> None:
            raise RuntimeError("app web did not become healthy")

        with pytest.raises(RuntimeError, match="healthy"):
            rollback(prof, hook=refuse)
        assert prof.current_number() == 2 and read_journal(prof) is None


@pytest.mark.parametrize(("content", "message"), [
    (b"{", "is not valid JSON"),
    (b'{"schema": "bstore-journal/1"}', "is not a bstore-journal/1 record"),
    (b'{"schema": "bstore-journal/1", "profile": "default", "operation": "switch",'
     b' "from": 0, "from_path": null, "to": 2, "to_path": "x", "new_link": true,'
     b' "activate": false, "step": "prepared", "pid": 1}', "generation number 0"),
])
def test_corrupt_journal(root: Path, tmp_path: Path, beams: Beams, content: bytes,
                         message: str) -> None:
    _setup(root, tmp_path, beams)
    with LocalStore.open(root) as store:
        prof = Profile(store)
        prof.journal_path.write_bytes(content)
        with pytest.raises(JournalError) as info:
            rollback(prof)
        assert message in info.value.message and "default.journal" in info.value.message
        assert prof.current_number() == 2


def test_journal_disagreeing_with_profile(root: Path, tmp_path: Path, beams: Beams) -> None:
    manifest_file = _setup(root, tmp_path, beams)
    assert _child(root, "commit", manifest_file, tmp_path / "m", "gen-after-link") == -9
    with LocalStore.open(root) as store:
        prof = Profile(store)
        prof.set_current(1)  # someone switched by hand meanwhile
        with pytest.raises(JournalError, match="records a switch 2 -> 3, but profile"
                           " 'default' is at generation 1"):
            recover(prof)
        assert prof.current_number() == 1


def test_leftover_temp_links_are_removed(root: Path, tmp_path: Path, beams: Beams) -> None:
    _setup(root, tmp_path, beams)
    with LocalStore.open(root) as store:
        prof = Profile(store)
        os.symlink("default-1-link", prof.dir / ".tmp-default-deadbeef")
        assert recover(prof).outcome is Outcome.NONE
        assert not (prof.dir / ".tmp-default-deadbeef").is_symlink()


def test_switch_without_activator_over_a_pending_one(root: Path, tmp_path: Path,
                                                    beams: Beams) -> None:
    manifest_file = _setup(root, tmp_path, beams)
    assert _child(root, "commit", manifest_file, tmp_path / "m", "gen-after-switch") == -9
    with LocalStore.open(root) as store:
        prof = Profile(store)
        # no activator to finish it: the pending journal is replaced by this switch's
        result = rollback(prof)
        assert result.recovered.outcome is Outcome.PENDING
        assert prof.current_number() == 2 and read_journal(prof) is None


@pytest.mark.parametrize("torn", [b"", b"\0" * 512])
def test_journal_torn_by_a_power_loss_is_dropped(root: Path, tmp_path: Path, beams: Beams,
                                                 torn: bytes) -> None:
    # Written and renamed but its data never reached the disk: the power loss that did
    # it also ended every node, which boot into the generation the profile names.
    _setup(root, tmp_path, beams)
    with LocalStore.open(root) as store:
        prof = Profile(store)
        prof.journal_path.write_bytes(torn)
        ran: list[int] = []
        assert recover(prof, lambda old, new: ran.append(new.number)).outcome is Outcome.NONE
        assert ran == [] and not prof.journal_path.exists()
        rollback(prof)
        assert prof.current_number() == 1


def test_journal_that_is_a_symlink(root: Path, tmp_path: Path, beams: Beams) -> None:
    _setup(root, tmp_path, beams)
    with LocalStore.open(root) as store:
        prof = Profile(store)
        os.symlink("/etc/passwd", prof.journal_path)
        with pytest.raises(JournalError, match=r"default\.journal': it is a symlink"):
            rollback(prof)
        assert prof.current_number() == 2
