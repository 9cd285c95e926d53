"""``bstore node start|stop|status|logs``: a real host node booted from the profile's
current generation, outliving the command, stopped gracefully."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "activators"))
from acthelpers import AppCompiler, AppDef, generation, read_state, short_root

from bstore.activators.hostnode import HostNode
from bstore.cli.main import cli
from bstore.generations.profiles import Profile
from bstore.generations.switch import commit_generation
from bstore.store.local import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erl") is None, reason="needs Erlang/OTP"),
]


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_root()
    yield path
    HostNode(path, "default").stop()
    HostNode(path, "empty").stop()
    shutil.rmtree(path, ignore_errors=True)


def run(root: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--root", str(root), *args], catch_exceptions=False)


def test_node_lifecycle_from_the_current_generation(root: Path, tmp_path: Path) -> None:
    work = tmp_path / "obs"
    work.mkdir()
    with LocalStore.open(root) as store:
        manifest = generation(store, AppCompiler(tmp_path / "apps"), work,
                              [AppDef("alpha"), AppDef("beta", depends_on=("alpha",))])
        commit_generation(Profile(store, "default"), manifest)

    result = run(root, "node", "start", "--no-distribution")
    assert result.exit_code == 0, result.output
    assert "started: alpha, beta" in result.output
    # The node outlived the command and runs the generation's code.
    assert read_state(work, "beta")[1] == 1

    result = run(root, "--json", "node", "status")
    data = json.loads(result.output)
    assert data["running"] and data["agent_ok"]
    assert {n: (a["status"], a["version"]) for n, a in data["apps"].items()} == {
        "alpha": ("running", "1.0.0"), "beta": ("running", "1.0.0")}

    result = run(root, "node", "start")
    assert result.exit_code == 0 and "runs (pid" in result.output  # already running: kept

    assert "--- bstore: starting" in run(root, "node", "logs").output

    result = run(root, "node", "stop")
    assert result.exit_code == 0
    assert "host node of profile default: graceful" in result.output
    result = run(root, "node", "status")
    assert "host node of profile default: not running" in result.output
    assert "alpha" in result.output and "host node not running" in result.output
    assert "host node of profile default: not running" in run(root, "node", "stop").output


def test_node_start_without_a_generation(root: Path) -> None:
    result = run(root, "node", "start", "--profile", "empty", "--no-distribution")
    assert result.exit_code == 0, result.output
    assert "host node of profile empty runs (pid" in result.output
    assert "started:" not in result.output
    assert run(root, "node", "stop", "-p", "empty").exit_code == 0


@pytest.mark.parametrize(("args", "message"), [
    (("node", "logs", "--app", "../../etc"), "'../../etc' is not a valid application name"),
    (("node", "status", "--profile", "../x"), "profile name '../x' is not valid"),
])
def test_bad_names_are_refused(root: Path, args: tuple[str, ...], message: str) -> None:
    result = CliRunner().invoke(cli, ["--root", str(root), *args])
    assert result.exit_code != 0
    assert message in result.output, result.output
