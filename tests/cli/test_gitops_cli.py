"""``bstore reconcile|sync|plan|status|deploy|remove|upgrade`` through click's runner, with
a real specs repo, apps built from git sources by the realiser, and the dry-run
activator; configuration from a file, ``$BSTORE_CONFIG`` and flags."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gitops"))
from gitrepos import GitRemote
from recohelpers import erlc_git_app, git_spec_text

from bstore.cli.main import cli

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("erlc") is None, reason="needs Erlang/OTP"),
]


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "state"
        self.specs = GitRemote(tmp / "specs")
        self.hello = erlc_git_app(tmp / "src", "hello")
        self.config = tmp / "bstore.toml"
        self.config.write_text(f'repo_url = "{self.specs.url}"\nprofile = "cli"\n'
                               'activator = "dry-run"\n')

    def run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(cli, ["--root", str(self.root), *args], env=env,
                                  catch_exceptions=False)

    def json(self, *args: str, code: int = 0, env: dict[str, str] | None = None) -> Any:
        result = self.run("--json", *args, env=env)
        assert result.exit_code == code, result.output + result.stderr
        return json.loads(result.stdout)

    def push_hello(self, version: str, extra: str = "") -> str:
        commit = self.specs.commit({"apps/hello/app.yaml": git_spec_text(
            "hello", version, self.hello.as_uri(), extra=extra)})
        self.specs.push()
        return commit


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_reconcile_status_plan_and_sync(env: Env) -> None:
    commit = env.push_hello("1.0.0")
    out = env.json("reconcile", "--config", str(env.config))
    assert out["result"]["state"] == "synced" and out["result"]["commit"] == commit
    assert out["status"]["apps"]["hello"]["version"] == "1.0.0"
    status = env.json("status", "--config", str(env.config))
    assert status["state"] == "synced" and status["app_count"] == 1
    assert status["last_commit"] == commit
    one = env.json("status", "hello", "--config", str(env.config))
    assert one["name"] == "hello" and one["store_path"].endswith("-hello-1.0.0")
    # plan after a commit: what would be built (not in the store yet), what restarts
    env.push_hello("1.1.0", extra="env: {greeting: hi}\n")
    plan = env.json("plan", "--config", str(env.config))
    change = plan["changes"][0]
    assert (change["kind"], change["from_version"], change["to_version"]) == \
        ("upgrade", "1.0.0", "1.1.0")
    assert change["in_store"] is False and plan["build"] == ["hello"]
    assert plan["restart"] == ["hello"]
    human = env.run("plan", "--config", str(env.config))
    assert "upgrade     hello 1.0.0 -> 1.1.0 [build]" in human.stdout
    assert "would restart: hello" in human.stdout
    # the alias applies it
    out = env.json("sync", "--config", str(env.config))
    assert out["status"]["apps"]["hello"]["version"] == "1.1.0"
    # now the output is in the store: nothing to build. (A fresh dry-run activator runs
    # nothing, so the plan would only start the app again: drift.)
    again = env.json("plan", "--config", str(env.config))
    assert again["build"] == [] and again["changes"][0]["kind"] == "heal"
    assert again["changes"][0]["reasons"] == ["drift: not running"]


def test_config_from_environment_and_flags(env: Env) -> None:
    env.push_hello("1.0.0")
    out = env.json("reconcile", "--profile", "other",
                   env={"BSTORE_CONFIG": str(env.config)})
    assert out["status"]["profile"] == "other"
    assert (env.root / "gitops" / "other" / "status.json").is_file()
    assert not (env.root / "gitops" / "cli").exists()


def test_unreachable_repo_exits_1_with_the_reason(env: Env) -> None:
    env.push_hello("1.0.0")
    env.json("reconcile", "--config", str(env.config))
    missing = (env.tmp / "gone.git").as_uri()
    result = env.run("reconcile", "--config", str(env.config), "--repo-url", missing)
    assert result.exit_code == 1
    assert "state: error" in result.stdout and "cannot sync" in result.stdout


def test_bad_config_names_the_key_and_file(env: Env) -> None:
    env.config.write_text(f'repo_url = "{env.specs.url}"\nreconcile_intervall = 5\n')
    result = env.run("status", "--config", str(env.config))
    assert result.exit_code == 1
    assert "unknown config key 'reconcile_intervall'" in result.stderr
    assert str(env.config) in result.stderr


def test_deploy_upgrade_remove(env: Env) -> None:
    env.push_hello("1.0.0")
    env.json("reconcile", "--config", str(env.config))
    spec = env.tmp / "extra" / "app.yaml"
    spec.parent.mkdir()
    world = erlc_git_app(env.tmp / "src", "world")
    spec.write_text(git_spec_text("world", "0.1.0", world.as_uri()))
    out = env.json("deploy", str(spec), "--config", str(env.config))
    assert out["ok"] is True
    status = env.json("status", "--config", str(env.config))
    assert status["apps"]["world"]["version"] == "0.1.0"
    assert "the next reconcile reverts it" in status["apps"]["world"]["note"]
    up = env.json("upgrade", "hello", "1.0.1", "--config", str(env.config))
    assert up["ok"] is True
    assert env.json("status", "hello", "--config", str(env.config))["version"] == "1.0.1"
    gone = env.json("remove", "world", "--config", str(env.config))
    assert gone["ok"] is True
    result = env.run("remove", "nope", "--config", str(env.config))
    assert result.exit_code == 1 and "app 'nope' is not deployed" in result.stderr
    bad = env.tmp / "bad" / "app.yaml"
    bad.parent.mkdir()
    bad.write_text("name: bad\nversion: [\n")
    result = env.run("deploy", str(bad), "--config", str(env.config))
    assert result.exit_code == 1 and "is invalid" in result.stderr
    # the next reconcile reverts the manual changes to the repository
    out = env.json("reconcile", "--config", str(env.config))
    assert set(out["status"]["apps"]) == {"hello"}
    assert out["status"]["apps"]["hello"]["version"] == "1.0.0"


def test_a_pass_in_another_process_is_not_run_alongside(env: Env) -> None:
    from bstore.gitops.config import load_config
    from bstore.gitops.reconciler import Reconciler

    env.push_hello("1.0.0")
    holder = Reconciler(load_config(env.config), env.root)
    bstore = str(Path(sys.executable).with_name("bstore"))
    argv = [bstore, "--root", str(env.root), "reconcile", "--no-wait", "--config",
            str(env.config)]
    with holder.locked():
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "reconcile already running for profile 'cli'" in proc.stderr
    assert "hint: wait for it to finish" in proc.stderr
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "state: synced" in proc.stdout
