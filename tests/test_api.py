"""The Python API: ``bstore.status()``, ``reconcile()``, ``sync()``, the state getters,
manual operations, and the reconciler loop, against a real specs repo (fast builder
double, dry-run activator); ``import bstore`` stays light."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "gitops"))
from recohelpers import World, app_files, spec_yaml

import bstore
from bstore import api
from bstore.gitops.reconciler import ReconcileError
from bstore.gitops.status import State


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    api._reconciler = w.reconciler  # what configure() sets, with the test doubles
    yield w
    api.stop_reconciler()
    api._reconciler = None


def test_import_bstore_is_light() -> None:
    code = ("import sys, bstore\n"
            "heavy = [m for m in ('pygit2', 'httpx', 'bstore.api', 'bstore.gitops.reconciler')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(bstore.reconcile) and 'bstore.api' in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        bstore.nonsense  # noqa: B018


def test_the_module_functions(world: World, tmp_path: Path) -> None:
    commit = world.push(app_files(web=spec_yaml("web"), db=spec_yaml("db")))
    assert bstore.status().state is State.INITIALIZING
    synced = bstore.sync()
    assert synced.commit == commit and world.versions() == {}
    assert bstore.status().state is State.READY
    assert bstore.status().tip_commit == commit
    assert sorted(bstore.get_desired_state()) == ["db", "web"]
    result = bstore.reconcile()
    assert result.state is State.SYNCED and result.commit == commit
    assert bstore.status().app_count == 2
    assert bstore.get_app_status("web").version == "1.0.0"
    assert sorted(bstore.get_current_state()) == ["db", "web"]
    with pytest.raises(ReconcileError, match="no app named 'nope'"):
        bstore.get_app_status("nope")
    spec = tmp_path / "extra.yaml"
    spec.write_text(spec_yaml("extra", "0.1.0"))
    assert bstore.deploy(spec).ok
    assert world.versions()["extra"] == "0.1.0"
    assert bstore.upgrade("web", "1.1.0").ok and world.versions()["web"] == "1.1.0"
    assert bstore.remove("extra").ok and "extra" not in world.versions()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nversion: [\n")
    with pytest.raises(api.ApiError, match="is invalid"):
        bstore.deploy(bad)
    bstore.reconcile()
    assert world.versions() == {"web": "1.0.0", "db": "1.0.0"}


def test_start_and_stop_the_reconciler(world: World) -> None:
    world.push(app_files(web=spec_yaml("web")))
    daemon = bstore.start_reconciler(api=False)
    try:
        with pytest.raises(api.ApiError, match="already running"):
            bstore.start_reconciler(api=False)
        deadline = time.monotonic() + 30
        while bstore.status().state is not State.SYNCED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bstore.status().state is State.SYNCED
        assert daemon is not None
    finally:
        assert bstore.stop_reconciler() is True
    assert bstore.stop_reconciler() is False
    assert world.versions() == {"web": "1.0.0"}  # apps keep running
