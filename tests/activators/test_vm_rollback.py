"""VMs after a failed activation: whatever the rollback leaves outside the active
generation is neither running nor desired, so no supervisor brings it back."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acthelpers import AppCompiler, AppDef, Epmd, generation, short_root

from bstore.activation import Pipeline
from bstore.activators.base import ActivatorContext
from bstore.activators.embedded import EmbeddedActivator
from bstore.activators.vm import VmState
from bstore.specs.model import VmConfig
from bstore.store.local import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erl") is None or shutil.which("epmd") is None,
                       reason="needs Erlang/OTP"),
]

OPTIONS = {"health_timeout": "2", "health_settle": "0.5", "restart_backoff": "0.05",
           "restart_burst": "5"}
CRASHING = AppDef("beta", env={"crash_after": 30}, vm=VmConfig())


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent_ebin: Path, epmd: Epmd
        ) -> Iterator[tuple[LocalStore, EmbeddedActivator, AppCompiler, Path]]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    root = short_root()
    work = tmp_path / "obs"
    work.mkdir()
    act = EmbeddedActivator(ActivatorContext(root, "default", OPTIONS), agent_ebin=agent_ebin)
    try:
        with LocalStore.open(root) as store:
            yield store, act, AppCompiler(tmp_path / "apps"), work
    finally:
        act.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _assert_left_alone(act: EmbeddedActivator, app: str) -> None:
    guest = act.vms.guest(app)
    assert not guest.running()
    assert not VmState.read(guest.state_file).desired
    assert app not in act.current_state()
    # Several supervision rounds, past any backoff: nothing is restarted.
    for _ in range(5):
        assert act.supervise_once() == []
        time.sleep(0.1)
    assert not guest.running()


def test_rollback_leaves_the_new_vm_neither_running_nor_desired(
        env: tuple[LocalStore, EmbeddedActivator, AppCompiler, Path]) -> None:
    store, act, compiler, work = env
    pipeline = Pipeline(store, "default", act)
    first = pipeline.activate_manifest(generation(store, compiler, work, [AppDef("alpha")]))
    assert first.ok, first.to_json()
    second = pipeline.activate_manifest(
        generation(store, compiler, work, [AppDef("alpha"), CRASHING]))
    assert not second.ok and second.rolled_back_to == first.generation
    assert "beta" in second.failed
    _assert_left_alone(act, "beta")


def test_failed_first_generation_leaves_its_vm_neither_running_nor_desired(
        env: tuple[LocalStore, EmbeddedActivator, AppCompiler, Path]) -> None:
    store, act, compiler, work = env
    pipeline = Pipeline(store, "default", act)
    result = pipeline.activate_manifest(
        generation(store, compiler, work, [AppDef("alpha"), CRASHING]))
    assert not result.ok and result.rolled_back_to is None and "beta" in result.failed
    _assert_left_alone(act, "beta")


def test_failed_first_generation_is_not_healed_or_booted_back(
        env: tuple[LocalStore, EmbeddedActivator, AppCompiler, Path]) -> None:
    store, act, compiler, work = env
    pipeline = Pipeline(store, "default", act)
    result = pipeline.activate_manifest(
        generation(store, compiler, work, [AppDef("alpha"), CRASHING]))
    assert not result.ok and result.rolled_back_to is None
    # A reconcile pass heals drift of the current generation; the failed one has none.
    healed = pipeline.heal()
    assert not [a for a in healed.actions if a.app == "beta"], healed.to_json()
    _assert_left_alone(act, "beta")
    # The host node dies: the supervision round brings it back without the failed apps.
    record = act.node.read_record()
    assert record is not None
    os.killpg(record.pid, 9)
    deadline = time.monotonic() + 10
    while act.node.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = act.supervise_once()
    assert lines and lines[0].startswith("host node restarted (0 app(s) started"), lines
    _assert_left_alone(act, "beta")


def test_same_content_as_a_failed_first_generation_is_tried_again(
        env: tuple[LocalStore, EmbeddedActivator, AppCompiler, Path]) -> None:
    store, act, compiler, work = env
    pipeline = Pipeline(store, "default", act)
    manifest = generation(store, compiler, work, [AppDef("alpha"), CRASHING])
    assert not pipeline.activate_manifest(manifest).ok
    # Identical content would reuse the current generation without running anything;
    # for a failed one that would report success with nothing running.
    again = pipeline.activate_manifest(manifest)
    assert not again.ok and not again.reused and "beta" in again.failed, again.to_json()
    assert {a.app for a in again.actions} == {"alpha", "beta"}
    _assert_left_alone(act, "beta")
    fixed = pipeline.activate_manifest(generation(store, compiler, work, [AppDef("alpha")]))
    assert fixed.ok and fixed.generation == 2, fixed.to_json()
    assert pipeline.heal().ok and "alpha" in act.current_state()
