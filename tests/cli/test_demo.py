"""``bstore demo`` for real: a subprocess builds the example apps from local git repos,
reconciles them into a host node and a VM, upgrades, rolls a broken release back and
quarantines it; its ``--json`` summary says what happened, and nothing is left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bstore.demo import templates as t

TOOLS = ("git", "erl", "erlc", "rebar3", "mix", "elixir")

needs_tools = pytest.mark.skipif(any(shutil.which(x) is None for x in TOOLS),
                                 reason="needs git, Erlang/OTP, rebar3 and Elixir")


def bstore_argv() -> list[str]:
    """The installed ``bstore`` console script of this interpreter (else the module)."""
    script = Path(sys.executable).parent / "bstore"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from bstore.cli.main import main; main()"]


def bstore(*args: str, env: dict[str, str] | None = None, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*bstore_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def beam_processes(marker: str) -> list[str]:
    """Command lines of running BEAM emulators that mention ``marker`` (a state root)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv).decode("utf-8", "replace")
        if argv and "beam" in Path(argv[0].decode("utf-8", "replace")).name \
                and marker in line:
            found.append(line)
    return found


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, under /tmp: the nodes' control sockets live below it (108-byte limit).
    base = Path(tempfile.mkdtemp(prefix="bsd", dir="/tmp"))
    yield base / "w"
    if (base / "w" / "bstore.toml").is_file():
        profile = t_profile(base / "w")
        bstore("--root", str(base / "w" / "state"), "node", "stop", "-p", profile)
    shutil.rmtree(base, ignore_errors=True)


def t_profile(work: Path) -> str:
    for line in (work / "bstore.toml").read_text().splitlines():
        if line.startswith("profile"):
            return str(json.loads(line.split("=", 1)[1]))
    raise AssertionError("no profile in bstore.toml")


@pytest.mark.integration
@pytest.mark.slow
@needs_tools
def test_demo_runs_the_main_job_end_to_end(workdir: Path) -> None:
    done = bstore("demo", "--workdir", str(workdir), "--json")
    assert done.returncode == 0, done.stderr
    s: dict[str, Any] = json.loads(done.stdout)
    # The story went to stderr, numbered.
    for n in range(1, 6):
        assert f"[{n}/5]" in done.stderr
    root = s["root"]
    assert Path(root) == workdir / "state"
    ports = s["ports"]

    deploy = s["deploy"]
    assert deploy["state"] == "synced"
    assert deploy["generation"] == 1
    assert sorted(deploy["started"]) == ["counter", "hello_ex", "worker"]
    assert {n: (a["version"], a["status"], a["healthy"]) for n, a in deploy["apps"].items()} \
        == {"counter": ("1.0.0", "running", True), "hello_ex": ("0.1.0", "running", True),
            "worker": ("0.1.0", "running", True)}
    assert deploy["apps"]["worker"]["isolation"] == "vm"
    assert deploy["apps"]["counter"]["isolation"] == "embedded"
    assert deploy["counter_response"].startswith(t.COUNTER_V1.greeting)
    assert "counter 1.0.0" in deploy["counter_response"]
    assert deploy["worker_response"].startswith("pong from ")
    assert "(1 scheduler(s))" in deploy["worker_response"]

    up = s["upgrade"]
    assert up["state"] == "synced" and up["generation"] == 2
    assert up["actions"] == {"counter": "restart"}  # only the counter was touched
    assert up["restarted"] == ["counter"]
    assert [(c["name"], c["kind"]) for c in up["plan"]] == [("counter", "upgrade")]
    assert up["apps"]["counter"]["version"] == "1.1.0"
    assert up["counter_response"].startswith(t.COUNTER_V2.greeting)
    assert "counter 1.1.0" in up["counter_response"]

    broken = s["broken"]
    assert broken["quarantined"] is True and broken["state"] == "degraded"
    assert broken["attempted_generation"] == 3 and broken["rolled_back_to"] == 2
    assert "HTTP 500" in broken["failed"]["counter"]
    assert broken["quarantine"]["commit"] == broken["commit"]
    assert "HTTP 500" in broken["quarantine"]["reason"]
    assert "quarantined" in broken["status_error"]
    assert broken["retry"] == "quarantined"
    assert broken["apps"]["counter"]["version"] == "1.1.0"
    assert broken["apps"]["counter"]["status"] == "running"
    assert "counter 1.1.0" in broken["counter_response"]  # the previous version answers

    status = s["status"]
    assert status["state"] == "degraded" and status["generation"] == 2
    assert status["profile"] == s["profile"]
    assert status["last_commit"] == up["commit"]
    assert sorted(status["apps"]) == ["counter", "hello_ex", "worker"]
    gens = s["generations"]
    assert [g["number"] for g in gens] == [1, 2, 3]
    assert [g["current"] for g in gens] == [False, True, False]
    assert [g["apps"]["counter"] for g in gens] == ["1.0.0", "1.1.0", "1.2.0"]
    assert gens[2]["commit"] == broken["commit"]

    # Stopped at the end: no VM of the demo's root runs, the apps' ports are closed.
    assert s["running"] is False
    assert beam_processes(root) == []
    for port in (ports["counter"], ports["worker"]):
        with pytest.raises(OSError):
            __import__("socket").create_connection(("127.0.0.1", port), timeout=2).close()

    # What the demo tells the user to run works on what it left behind.
    config = str(workdir / "bstore.toml")
    shown = bstore("--root", root, "--json", "status", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "degraded"
    listed = bstore("--root", root, "--json", "generations", "-p", s["profile"])
    assert [g["number"] for g in json.loads(listed.stdout)["generations"]] == [1, 2, 3]
    # The specs repository and the app sources are real git repositories.
    log = subprocess.run(["git", "-C", str(workdir / "gitops"), "log", "--format=%s"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert log == ["upgrade counter to 1.2.0", "upgrade counter to 1.1.0",
                   "deploy counter, hello_ex and worker"]


@pytest.mark.integration
@pytest.mark.slow
@needs_tools
def test_keep_running_leaves_the_node_up_until_node_stop(workdir: Path) -> None:
    done = bstore("demo", "--workdir", str(workdir), "--keep-running")
    assert done.returncode == 0, done.stderr
    # Plain lines when stdout is not a terminal: no escape sequences.
    assert "\x1b[" not in done.stdout
    assert "[5/5]" in done.stdout and "still running" in done.stdout
    root = str(workdir / "state")
    profile = t_profile(workdir)
    assert f"node stop -p {profile}" in done.stdout
    assert len(beam_processes(root)) == 2  # the host node and the worker's VM

    node = bstore("--root", root, "--json", "node", "status", "-p", profile)
    data = json.loads(node.stdout)
    assert data["running"] is True
    assert {n: (a["status"], a["version"]) for n, a in data["apps"].items()} == {
        "counter": ("running", "1.1.0"), "hello_ex": ("running", "0.1.0"),
        "worker": ("running", "0.1.0")}

    stopped = bstore("--root", root, "node", "stop", "-p", profile)
    assert stopped.returncode == 0, stopped.stderr
    assert beam_processes(root) == []

    # Booted again from the current generation: the Elixir app finds its runtime too.
    started = bstore("--root", root, "--json", "node", "start", "-p", profile)
    assert started.returncode == 0, started.stdout + started.stderr
    data = json.loads(started.stdout)
    assert (sorted(data["started"]), data["failed"]) == (["counter", "hello_ex", "worker"], {})
    assert bstore("--root", root, "node", "stop", "-p", profile).returncode == 0
    assert beam_processes(root) == []


@pytest.mark.parametrize(("setup", "code", "message"), [
    # A directory holding something: the demo never writes into it.
    ("not-empty", 1, "is not empty"),
    # A regular file where the work dir should be.
    ("file", 2, "is a file"),
    # A work dir that cannot be created (its parent is a file).
    ("under-a-file", 1, "Not a directory"),
])
def test_workdir_must_be_a_new_or_empty_directory(tmp_path: Path, setup: str, code: int,
                                                  message: str) -> None:
    work = tmp_path / "w"
    if setup == "file":
        work.write_text("mine\n")
        kept = work
    elif setup == "under-a-file":
        kept = work
        work.write_text("mine\n")
        work = work / "sub"
    else:
        work.mkdir()
        kept = work / "notes.txt"
        kept.write_text("mine\n")
    done = bstore("demo", "--workdir", str(work))
    assert done.returncode == code
    assert message in done.stderr
    if setup == "under-a-file":
        assert f"error: the demo failed in '{work}': Not a directory" in done.stderr
        assert "Traceback" not in done.stderr
    if setup == "not-empty":
        assert f"error: work dir '{work}' is not empty" in done.stderr
        assert "hint: give --workdir a new or empty directory" in done.stderr
    assert kept.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


@pytest.mark.parametrize("missing", ["rebar3", "mix", "git"])
def test_a_missing_tool_is_named_with_its_package(tmp_path: Path, missing: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if tool != missing and found is not None:
            (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir)}
    done = bstore("demo", "--workdir", str(tmp_path / "w"), env=env)
    assert done.returncode == 1
    assert f"the demo needs {missing}" in done.stderr
    package = {"rebar3": "rebar3", "mix": "elixir", "git": "git"}[missing]
    assert f"apt-get install {package}" in done.stderr
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
