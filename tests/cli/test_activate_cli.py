"""``bstore activate``: build an apps directory (real erlc builds from git sources), make a
generation, switch and activate it; ``--generation N``; refusals. The real command in a
subprocess finishes an activation a kill interrupted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gitops"))
from recohelpers import erlc_git_app, git_spec_text

from bstore.cli.main import cli
from bstore.events import EventBus
from bstore.generations.generation import load_generation
from bstore.generations.journal import read_journal
from bstore.generations.profiles import Profile
from bstore.store.local import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erlc") is None, reason="needs Erlang/OTP"),
]


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    hello = erlc_git_app(tmp_path / "src", "hello")
    world = erlc_git_app(tmp_path / "src", "world")
    d = tmp_path / "apps"
    for name, src in (("hello", hello), ("world", world)):
        (d / name).mkdir(parents=True)
        (d / name / "app.yaml").write_text(git_spec_text(name, "1.0.0", src.as_uri()))
    return d


def run(root: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--root", str(root), *args], catch_exceptions=False)


def as_json(result: Result, code: int = 0) -> Any:
    assert result.exit_code == code, result.output + result.stderr
    return json.loads(result.stdout)


def versions(root: Path, profile: str = "default") -> tuple[int | None, dict[str, str]]:
    with LocalStore.open(root) as store:
        current = Profile(store, profile).current()
        if current is None:
            return None, {}
        manifest = load_generation(store, current.store_path)
        return current.number, {n: a.version for n, a in manifest.apps.items()}


def test_activate_builds_switches_and_reuses(tmp_path: Path, apps: Path) -> None:
    root = tmp_path / "state"
    out = as_json(run(root, "activate", str(apps), "--activator", "dry-run", "--json"))
    assert out["ok"] is True and out["generation"] == 1 and out["previous"] is None
    assert sorted(a["app"] for a in out["actions"] if a["kind"] == "start") == \
        ["hello", "world"]
    assert versions(root) == (1, {"hello": "1.0.0", "world": "1.0.0"})
    again = as_json(run(root, "activate", str(apps), "--activator", "dry-run", "--json"))
    assert again["reused"] is True and again["generation"] == 1
    (apps / "hello" / "app.yaml").write_text(
        (apps / "hello" / "app.yaml").read_text().replace("1.0.0", "1.1.0"))
    human = run(root, "activate", str(apps), "--activator", "dry-run")
    assert human.exit_code == 0, human.output
    assert "generation 1 -> 2 (activated)" in human.stdout
    assert versions(root)[1]["hello"] == "1.1.0"
    back = as_json(run(root, "activate", "--generation", "1", "--activator", "dry-run",
                       "--json"))
    assert back["ok"] is True and back["generation"] == 1 and back["previous"] == 2
    assert versions(root) == (1, {"hello": "1.0.0", "world": "1.0.0"})


def test_failed_activation_rolls_back_to_the_previous_generation(tmp_path: Path,
                                                                  apps: Path) -> None:
    from bstore.activation import Pipeline
    from bstore.activators.base import ActivatorContext
    from bstore.activators.dryrun import DryRunActivator
    from bstore.specs.directory import load_apps_dir

    root = tmp_path / "state"
    as_json(run(root, "activate", str(apps), "--activator", "dry-run", "--json"))
    (apps / "hello" / "app.yaml").write_text(
        (apps / "hello" / "app.yaml").read_text().replace("1.0.0", "3.0.0"))
    bus = EventBus()
    names: list[str] = []
    bus.attach("bstore.rollback", lambda e: names.append(e.name))
    with LocalStore.open(root) as store:
        # the dry-run activator's 'fail' option makes hello's action fail
        act = DryRunActivator(ActivatorContext(root, "default", {"fail": "hello"}))
        pipeline = Pipeline(store, "default", act, events=bus)
        outcome = pipeline.build(list(load_apps_dir(apps).specs.values()))
        result = pipeline.activate(outcome.builds.values())
    assert not result.ok and result.rolled_back_to == 1 and result.attempted == 2
    assert "hello" in result.failed and "activation of generation 2 failed" in (
        result.error or "")
    assert names == ["bstore.rollback.start", "bstore.rollback.stop"]
    assert versions(root) == (1, {"hello": "1.0.0", "world": "1.0.0"})


@pytest.mark.parametrize("args, message", [
    (["--generation", "99"], "99"),
    (["APPS", "--generation", "1"], "give an apps directory or --generation N, not both"),
    (["--activator", "nope", "APPS"], "no activator named 'nope'"),
])
def test_refusals(tmp_path: Path, apps: Path, args: list[str], message: str) -> None:
    root = tmp_path / "state"
    argv = [str(apps) if a == "APPS" else a for a in args]
    if "--activator" not in argv:
        argv += ["--activator", "dry-run"]
    result = run(root, "activate", *argv)
    assert result.exit_code == 1
    assert message in result.stderr


def test_invalid_spec_switches_nothing(tmp_path: Path, apps: Path) -> None:
    root = tmp_path / "state"
    (apps / "broken").mkdir()
    (apps / "broken" / "app.yaml").write_text("name: broken\nversion: [\n")
    result = run(root, "activate", str(apps), "--activator", "dry-run")
    assert result.exit_code == 1
    assert "1 app spec(s)" in result.stderr and "broken" in result.stderr
    assert "nothing was switched" in result.stderr
    assert versions(root) == (None, {})


def test_killed_activation_is_finished_by_the_next_activate(tmp_path: Path,
                                                            apps: Path) -> None:
    root = tmp_path / "state"
    as_json(run(root, "activate", str(apps), "--activator", "dry-run", "--json"))
    (apps / "hello" / "app.yaml").write_text(
        (apps / "hello" / "app.yaml").read_text().replace("1.0.0", "1.5.0"))
    bstore = str(Path(sys.executable).with_name("bstore"))
    env = {**os.environ, "BSTORE_CRASH_AT": "gen-after-switch"}
    proc = subprocess.run([bstore, "--root", str(root), "activate", str(apps),
                           "--activator", "dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    with LocalStore.open(root) as store:
        assert read_journal(Profile(store, "default")) is not None
    env.pop("BSTORE_CRASH_AT")
    proc = subprocess.run([bstore, "--root", str(root), "activate", "--generation", "2",
                           "--activator", "dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "interrupted switch 1 -> 2" in proc.stderr + proc.stdout
    with LocalStore.open(root) as store:
        assert read_journal(Profile(store, "default")) is None
    assert versions(root) == (2, {"hello": "1.5.0", "world": "1.0.0"})


@pytest.mark.slow
def test_activate_with_the_embedded_activator_rolls_back_an_unhealthy_app(
        apps: Path) -> None:
    from bstore.activators.base import ActivatorContext
    from bstore.activators.embedded import EmbeddedActivator

    root = Path(tempfile.mkdtemp(prefix="bsc", dir="/tmp"))  # agent socket paths stay short
    opts = ["-o", "distribution=off", "-o", "health_settle=0.2"]
    try:
        out = as_json(run(root, "activate", str(apps), *opts, "--json"))
        assert out["ok"] is True and out["generation"] == 1
        node = EmbeddedActivator(ActivatorContext(root, "default", {"distribution": "off"}))
        state = node.current_state()
        assert {n: s.status.value for n, s in state.items()} == {"hello": "running",
                                                                 "world": "running"}
        spec = apps / "hello" / "app.yaml"
        spec.write_text(spec.read_text().replace("1.0.0", "2.0.0")
                        + "health: {type: tcp, port: 1, timeout: 1000}\n")
        failed = run(root, "activate", str(apps), *opts)
        assert failed.exit_code == 1
        assert "generation 2 FAILED; rolled back to 1" in failed.stdout
        assert "hello:" in failed.stdout
        assert node.current_state()["hello"].version == "1.0.0"
        assert node.current_state()["hello"].status.value == "running"
        assert versions(root) == (1, {"hello": "1.0.0", "world": "1.0.0"})
        bad = run(root, "activate", str(apps), "-o", "novalue")
        assert bad.exit_code == 1 and "'novalue' is not KEY=VALUE" in bad.stderr
    finally:
        EmbeddedActivator(ActivatorContext(root, "default", {"distribution": "off"})).shutdown()
        shutil.rmtree(root, ignore_errors=True)
