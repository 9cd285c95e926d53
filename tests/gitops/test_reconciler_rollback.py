"""Reconciler.rollback: a manual rollback through the pipeline that leaves status.json
saying what now runs (and that the next pass would re-apply the tip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recohelpers import World, app_files, spec_yaml

from bstore.generations.profiles import ProfileError
from bstore.gitops.reconciler import STATE_FILE, ReconcileBusy
from bstore.gitops.status import AppState, State, read_status


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _two_generations(world: World) -> str:
    world.push(app_files(web=spec_yaml("web"), db=spec_yaml("db")))
    assert world.reconciler.reconcile_once().ok
    tip = world.push(app_files(web=spec_yaml("web", "2.0.0"), db=spec_yaml("db")))
    assert world.reconciler.reconcile_once().ok
    assert world.versions() == {"web": "2.0.0", "db": "1.0.0"}
    return tip


def test_rollback_rewrites_the_status_from_what_now_runs(world: World) -> None:
    tip = _two_generations(world)
    result = world.reconciler.rollback()
    assert result.ok and result.generation == 1, result.to_json()
    assert world.versions() == {"web": "1.0.0", "db": "1.0.0"}
    status = read_status(world.reconciler.gitops_dir)
    assert status.generation == 1 and status.apps["web"].version == "1.0.0"
    assert status.apps["web"].status is AppState.RUNNING
    assert status.apps["web"].note is not None and "manual rollback" in status.apps["web"].note
    assert status.apps["db"].note is None  # kept, not touched by the rollback
    assert any("rolled back by hand to generation 1" in n and tip[:12] in n
               and "suspended" in n for n in status.notes), status.notes
    manual = json.loads((world.reconciler.gitops_dir / STATE_FILE).read_text())["manual"]
    assert manual["web"]["op"] == "rollback" and manual["web"]["generation"] == 1
    # The next pass follows git again: the tip comes back and the note says so.
    again = world.reconciler.reconcile_once()
    assert again.state is State.SYNCED and world.versions()["web"] == "2.0.0"
    after = read_status(world.reconciler.gitops_dir)
    assert "manual rollback of web reverted to the repository" in after.notes


def test_rollback_to_a_number(world: World) -> None:
    _two_generations(world)
    assert world.reconciler.rollback(1).ok
    assert world.reconciler.rollback(2).ok and world.versions()["web"] == "2.0.0"
    assert read_status(world.reconciler.gitops_dir).generation == 2


@pytest.mark.parametrize(("to", "message"), [
    (None, "profile 'p' has no generation before 1 to roll back to"),
    (7, "7"),
])
def test_rollback_without_a_target_is_a_profile_error(world: World, to: int | None,
                                                      message: str) -> None:
    world.push(app_files(web=spec_yaml("web")))
    assert world.reconciler.reconcile_once().ok
    with pytest.raises(ProfileError) as info:
        world.reconciler.rollback(to)
    assert message in info.value.message
    assert world.versions() == {"web": "1.0.0"}


def test_rollback_does_not_wait_behind_a_pass_when_asked(world: World) -> None:
    _two_generations(world)
    with world.reconciler.locked(), pytest.raises(ReconcileBusy):
        world.make().rollback(wait=False)
    assert world.versions()["web"] == "2.0.0"
