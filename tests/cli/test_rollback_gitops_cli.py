"""``bstore rollback`` with a GitOps config goes through the reconciler, so status.json
says what runs afterwards; without one it only switches (and activates) the profile."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gitops"))
from recohelpers import World, app_files, spec_yaml

from bstore.cli.main import cli
from bstore.gitops.status import read_status


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.delenv("BSTORE_CONFIG", raising=False)
    monkeypatch.delenv("BSTORE_PROFILE", raising=False)
    monkeypatch.delenv("BSTORE_ACTIVATOR", raising=False)
    monkeypatch.chdir(tmp_path)
    w = World(tmp_path)
    w.push(app_files(web=spec_yaml("web")))
    assert w.reconciler.reconcile_once().ok
    w.push(app_files(web=spec_yaml("web", "2.0.0")))
    assert w.reconciler.reconcile_once().ok
    assert read_status(w.reconciler.gitops_dir).generation == 2
    return w


def _config(world: World, path: Path) -> Path:
    path.write_text(f'repo_url = "{world.remote.url}"\nprofile = "p"\n'
                    'activator = "dry-run"\n')
    return path


def _rollback(world: World, *args: str) -> dict[str, object]:
    result = CliRunner().invoke(cli, ["--root", str(world.root), "rollback", "--json", *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize("how", ["--config", "BSTORE_CONFIG", "./bstore.toml"])
def test_rollback_with_a_config_updates_the_status(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    args: list[str] = []
    if how == "--config":
        args = ["--config", str(_config(world, tmp_path / "elsewhere.toml"))]
    elif how == "BSTORE_CONFIG":
        monkeypatch.setenv("BSTORE_CONFIG", str(_config(world, tmp_path / "env.toml")))
    else:
        _config(world, tmp_path / "bstore.toml")
    out = _rollback(world, *args)
    assert out["via"] == "reconciler" and out["from"] == 2 and out["to"] == 1, out
    status = read_status(world.reconciler.gitops_dir)
    assert status.generation == 1 and status.apps["web"].version == "1.0.0"
    assert any("rolled back by hand to generation 1" in n for n in status.notes)


def test_rollback_without_a_config_switches_only(world: World) -> None:
    out = _rollback(world, "--profile", "p", "--activator", "none")
    assert "via" not in out and out["from"] == 2 and out["to"] == 1, out
    # Nothing told the reconciler: this is why a config routes through it.
    assert read_status(world.reconciler.gitops_dir).generation == 2
