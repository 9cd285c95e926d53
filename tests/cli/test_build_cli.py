"""``bstore build`` and ``bstore log``: an apps directory built through the CLI (click's
runner and a real subprocess on a pseudo-terminal), JSON output with the pinned
resolution, no-op rebuilds, failures with --keep-going, kept logs."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "builders"))

import realise_helpers as rh
import sample_apps
from hexrepo import HexRepoBuilder, default_chain, new_key
from localhttp import LocalServer

from bstore.cli.main import cli
from bstore.store.local import LocalStore

pytestmark = pytest.mark.integration

CHAIN_APP = {
    "rebar.config": "{deps, [{hexa_top, \"~> 0.1\"}]}.\n",
    "src/chainapp.app.src": (
        '{application, chainapp, [{description, "c"}, {vsn, "0.0.0"},\n'
        "  {registered, []}, {applications, [kernel, stdlib, hexa_top]}]}.\n"
    ),
    "src/chainapp.erl": "-module(chainapp).\n-export([run/0]).\nrun() -> hexa_top:chain().\n",
}


def write_spec(apps: Path, name: str, version: str, source: dict[str, str]) -> None:
    (apps / name).mkdir(parents=True, exist_ok=True)
    (apps / name / "app.json").write_text(json.dumps(
        {"name": name, "version": version, "source": source}))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[LocalServer, HexRepoBuilder]]:
    builder = default_chain(HexRepoBuilder(new_key(), name="hexpm"))
    with LocalServer() as server:
        builder.serve(server)
        yield server, builder


@pytest.fixture
def setup(tmp_path: Path, served: tuple[LocalServer, HexRepoBuilder]) -> dict[str, Path | str]:
    server, builder = served
    repos = tmp_path / "repos"
    plain = rh.git_repo(sample_apps.erlc_app(repos))
    chain = repos / "chainapp"
    for rel, text in CHAIN_APP.items():
        (chain / rel).parent.mkdir(parents=True, exist_ok=True)
        (chain / rel).write_text(text)
    rh.git_repo(chain)
    apps = tmp_path / "apps"
    write_spec(apps, "plainapp", "1.0.0", {"type": "git", "url": plain.as_uri(),
                                           "ref": rh.git(plain, "rev-parse", "HEAD")})
    write_spec(apps, "chainapp", "0.1.0", {"type": "git", "url": chain.as_uri(), "ref": "main"})
    url, sha = rh.serve_release(server, "relapp", "3.0.0")
    write_spec(apps, "relapp", "3.0.0", {"type": "release", "url": url, "sha256": sha})
    key = tmp_path / "hexpm.pem"
    key.write_text(builder.public_key_pem)
    return {"apps": apps, "root": tmp_path / "root", "key": key, "url": server.base_url,
            "repos": repos}


def bstore(setup: dict[str, Path | str], *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(cli, ["--root", str(setup["root"]), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def hex_args(setup: dict[str, Path | str]) -> list[str]:
    return ["--hex-repo", "hexpm", str(setup["url"]), str(setup["key"])]


def test_build_json_noop_and_log(setup: dict[str, Path | str]) -> None:
    code, out, err = bstore(setup, "build", str(setup["apps"]), "-j", "2", "--json",
                            *hex_args(setup))
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"] is True
    apps = report["apps"]
    assert {n: a["state"] for n, a in apps.items()} == {
        "chainapp": "built", "plainapp": "built", "relapp": "built"}
    assert [(p["package"], p["version"]) for p in apps["chainapp"]["resolution"]] == [
        ("hexa_leaf", "1.1.0"), ("hexa_mid", "1.1.0"), ("hexa_top", "0.1.0")]
    for app in apps.values():
        assert Path(app["output"]).is_dir()
    assert sorted(report["built"]) == ["chainapp-0.1.0", "hexa_leaf-1.1.0", "hexa_mid-1.1.0",
                                       "hexa_top-0.1.0", "plainapp-1.0.0", "relapp-3.0.0"]

    # Human output, again: nothing to do, and each app's output path.
    code, out, err = bstore(setup, "build", str(setup["apps"]), *hex_args(setup))
    assert code == 0, err
    lines = out.splitlines()
    for name in ("chainapp", "plainapp", "relapp"):
        assert f"{name} {apps[name]['output']}" in lines
    assert lines[-1] == "0 built, 6 already valid, 0 failed"
    # Not a terminal: plain progress lines on stderr.
    assert "[6/6]" in err and "\x1b[" not in err

    code, out, _ = bstore(setup, "log", "plainapp")
    assert code == 0 and "building plainapp-1.0.0" in out and "erlc" in out
    code, out2, _ = bstore(setup, "log", apps["plainapp"]["output"])
    assert code == 0 and out2 == out
    code, _, err = bstore(setup, "log", "nosuchapp")
    assert code == 1 and "no build log for 'nosuchapp'" in err


def test_failure_keep_going_exit_code(setup: dict[str, Path | str]) -> None:
    broken = sample_apps.erlc_app(Path(setup["repos"]), "brokenapp")
    (broken / "src/brokenapp.erl").write_text("-module(brokenapp).\noops(\n")
    rh.git_repo(broken)
    write_spec(Path(setup["apps"]), "brokenapp", "1.0.0",
               {"type": "git", "url": broken.as_uri(), "ref": "main"})
    code, out, err = bstore(setup, "build", str(setup["apps"]), "--keep-going",
                            *hex_args(setup))
    assert code == 1
    assert "brokenapp failed: building brokenapp-1.0.0 (derivation" in out
    assert "brokenapp.erl:2" in out  # the log tail names the compiler error
    assert "full log: bstore log brokenapp" in err
    for name in ("chainapp", "plainapp", "relapp"):
        assert any(line.startswith(f"{name} /") for line in out.splitlines()), out
    code, log, _ = bstore(setup, "log", "brokenapp")
    assert code == 0 and "syntax error" in log


def test_unknown_hex_repository_key_file(setup: dict[str, Path | str]) -> None:
    code, _, err = bstore(setup, "build", str(setup["apps"]), "--hex-repo", "hexpm",
                          "http://127.0.0.1:1", str(Path(setup["root"]) / "missing.pem"))
    assert code == 1 and "cannot read the public key of hex repository 'hexpm'" in err


def test_live_progress_on_a_terminal(setup: dict[str, Path | str]) -> None:
    """A real ``bstore build`` whose stderr is a pseudo-terminal redraws its lines."""
    apps = Path(setup["apps"])
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bstore.cli.main import main; main()",
         "--root", str(setup["root"]), "build", str(apps / "plainapp")],
        stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert "building plainapp-1.0.0" in screen
    assert "\x1b[" in screen and "[1/1] derivations done" in screen
    assert out.decode().startswith("plainapp /")


def test_ctrl_c_kills_running_builds(tmp_path: Path) -> None:
    project = sample_apps.erlc_app(tmp_path / "repos", "slowapp")
    (project / "Makefile").write_text(
        "PROJECT = slowapp\napp:: wait\nwait:\n\techo started-waiting\n\tsleep 120\n"
        "include erlang.mk\n")
    (project / "erlang.mk").write_text(sample_apps.ERLANG_MK_SUBSET)
    rh.git_repo(project)
    apps = tmp_path / "apps"
    write_spec(apps, "slowapp", "1.0.0", {"type": "git", "url": project.as_uri(), "ref": "main"})
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bstore.cli.main import main; main()",
         "--root", str(root), "build", str(apps)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list((root / "logs").glob("*.log")) if (root / "logs").is_dir() else []
        if logs and "started-waiting" in logs[0].read_text(errors="replace"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert b"interrupted: stopping the running builds" in err
    assert b"slowapp failed: building slowapp-1.0.0" in out
    with LocalStore.open(root) as store:
        assert [p.name for p in store.valid_paths()] == ["slowapp-1.0.0-source"]
    assert os.listdir(root / "tmp") == []


def test_invalid_spec_fails_the_run_but_not_the_others(setup: dict[str, Path | str]) -> None:
    apps = Path(setup["apps"])
    (apps / "badspec").mkdir()
    (apps / "badspec" / "app.json").write_text('{"name": "badspec", "version": 1}')
    code, out, err = bstore(setup, "build", str(apps / "plainapp"), str(apps / "badspec"),
                            "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert report["apps"]["plainapp"]["state"] == "built"
    assert any("badspec" in p["file"] for p in report["problems"])
    assert "badspec/app.json" in err


def test_build_substitutes_from_a_cache_given_on_the_command_line(tmp_path: Path) -> None:
    """`bstore copy --to` on one host, `bstore build --substituter` on an empty one."""
    project = rh.git_repo(sample_apps.erlc_app(tmp_path / "src", "plainapp"))
    apps = tmp_path / "apps"
    write_spec(apps, "plainapp", "1.0.0",
               {"type": "git", "url": project.as_uri(), "ref": "main"})
    root = tmp_path / "root"
    runner = CliRunner()

    def bstore(*args: str) -> dict[str, object]:
        result = runner.invoke(cli, ["--root", str(root), "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    first = bstore("build", str(apps))
    out = first["apps"]["plainapp"]["output"]  # type: ignore[index]
    key = bstore("key", "generate", "host-a", "--dir", str(tmp_path / "keys"))
    cache = (tmp_path / "cache").as_uri()
    bstore("copy", "--to", cache, "--key", str(tmp_path / "keys" / "host-a.secret"), out)
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    public = key["public_key"] if "public_key" in key else key["public"]
    second = bstore("build", str(apps), "--substituter", cache, "--trusted-key", str(public))
    assert second["built"] == []
    assert second["substituted"] == ["plainapp-1.0.0"]
    with LocalStore.open(root) as store:
        assert store.is_valid(store.parse_path(out))  # type: ignore[arg-type]
