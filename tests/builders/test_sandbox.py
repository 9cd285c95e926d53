"""The build sandbox with real processes: env whitelist, empty HOME, no network, no
writes outside the work dir, deadline and cancel kill the whole process group."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from netprobe import accepted, listening_socket

from bstore.builders.sandbox import (
    BASE_ENV,
    LOG_TAIL_LINES,
    NO_ISOLATION,
    BuildError,
    Isolation,
    Sandbox,
    _child_source,
    detect_isolation,
    probe_isolation,
    read_log_tail,
)

PY = sys.executable

needs_netns = pytest.mark.skipif(
    not detect_isolation().network,
    reason=f"no network namespace on this host: {detect_isolation().reason}",
)
needs_mountns = pytest.mark.skipif(
    not detect_isolation().filesystem,
    reason=f"no mount namespace on this host: {detect_isolation().reason}",
)
ISOLATIONS = [
    pytest.param(None, id="detected"),
    pytest.param(NO_ISOLATION, id="unisolated"),
]


def _sandbox(tmp_path: Path, *, timeout: float = 60, isolation: Isolation | None = None,
             cancel: threading.Event | None = None) -> Sandbox:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return Sandbox(work_dir=work, log_path=tmp_path / "logs" / "build.log", timeout=timeout,
                   tool_dirs=("/usr/bin",), isolation=isolation, cancel=cancel)


def _py(code: str) -> list[str]:
    return [PY, "-I", "-c", code]


def _last_json(log: Path) -> object:
    lines = [line for line in log.read_text().splitlines() if line.startswith("JSON:")]
    return json.loads(lines[-1][5:])


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    sock, port = listening_socket()
    yield sock, port
    sock.close()


def test_environment_is_the_whitelist_and_home_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BSTORE_SECRET_TOKEN", "s3cr3t")
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("ERL_FLAGS", "+S 64")
    sb = _sandbox(tmp_path)
    sb.run(_py("import os, json; print('JSON:' + json.dumps({'env': dict(os.environ),"
               " 'home': os.listdir(os.environ['HOME'])}))"), cwd=sb.work_dir,
           env={"EXTRA_FROM_SPEC": "x y"})
    seen = _last_json(sb.log_path)
    assert isinstance(seen, dict)
    env = seen["env"]
    assert seen["home"] == []
    assert "BSTORE_SECRET_TOKEN" not in env and "TERM" not in env
    expected = {**BASE_ENV, "EXTRA_FROM_SPEC": "x y", "HOME": str(sb.home),
                "TMPDIR": str(sb.tmp), "PATH": "/usr/bin:/usr/local/bin:/bin"}
    # The interpreter may add LC_CTYPE when it coerces the locale; nothing else.
    env.pop("LC_CTYPE", None)
    assert env == expected
    assert env["ERL_FLAGS"] == "" and env["ERL_COMPILER_OPTIONS"] == "[deterministic]"
    assert env["MIX_ENV"] == "prod" and env["HEX_OFFLINE"] == "1"


@needs_netns
def test_network_is_unreachable_inside(
    tmp_path: Path, listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    sb = _sandbox(tmp_path)
    code = (f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=3);"
            "print('CONNECTED')")
    with pytest.raises(BuildError) as err:
        sb.run(_py(code), cwd=sb.work_dir, step="connect")
    assert "build step 'connect' failed with exit status 1" in err.value.message
    assert "CONNECTED" not in err.value.log_tail.splitlines()
    assert "Network is unreachable" in err.value.log_tail  # what the child got
    assert not accepted(sock)


def test_without_isolation_the_same_connect_succeeds(
    tmp_path: Path, listener: tuple[socket.socket, int]
) -> None:
    # The control: proves the connect above would reach the listener if allowed.
    sock, port = listener
    sb = _sandbox(tmp_path, isolation=NO_ISOLATION)
    sb.run(_py(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3)"),
           cwd=sb.work_dir)
    assert accepted(sock)


@needs_mountns
def test_writes_outside_the_work_dir_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    sb = _sandbox(tmp_path)
    sb.run(_py("open('inside.txt', 'w').write('ok')"), cwd=sb.work_dir)
    assert (sb.work_dir / "inside.txt").read_text() == "ok"
    with pytest.raises(BuildError) as err:
        sb.run(_py(f"open({str(outside)!r}, 'w').write('escaped')"), cwd=sb.work_dir)
    assert "Read-only file system" in err.value.log_tail
    assert not outside.exists()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_timeout_kills_the_whole_process_group(
    tmp_path: Path, isolation: Isolation | None
) -> None:
    marker = f"bstore-test-{uuid.uuid4().hex}"
    code = ("import subprocess, sys, time;"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {marker!r}]);"
            "print('child started', flush=True); time.sleep(300)")
    sb = _sandbox(tmp_path, timeout=2, isolation=isolation)
    with pytest.raises(BuildError) as err:
        sb.run(_py(code), cwd=sb.work_dir, step="sleepy")
    assert "build step 'sleepy' timed out after 2s and was killed" in err.value.message
    assert "child started" in err.value.log_tail
    assert err.value.log_path == sb.log_path
    assert not _processes_with(marker)


def test_cancel_kills_the_command(tmp_path: Path) -> None:
    cancel = threading.Event()
    sb = _sandbox(tmp_path, cancel=cancel)
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    try:
        with pytest.raises(BuildError) as err:
            sb.run(_py("import time; print('waiting', flush=True); time.sleep(300)"),
                   cwd=sb.work_dir, step="waiter")
    finally:
        timer.cancel()
    assert "build step 'waiter' was cancelled and killed" in err.value.message
    assert "waiting" in err.value.log_tail


def test_deadline_covers_all_steps(tmp_path: Path) -> None:
    sb = _sandbox(tmp_path, timeout=1)
    sb.deadline -= 5  # as if earlier steps had used the whole budget
    with pytest.raises(BuildError) as err:
        sb.run(["true"], cwd=sb.work_dir, step="late")
    assert "timed out after 1s before step 'late'" in err.value.message


def test_failure_carries_log_path_and_tail(tmp_path: Path) -> None:
    sb = _sandbox(tmp_path)
    code = "import sys; [print(f'line {i}') for i in range(100)]; sys.exit(3)"
    with pytest.raises(BuildError) as err:
        sb.run(_py(code), cwd=sb.work_dir, step="noisy")
    exc = err.value
    assert "build step 'noisy' failed with exit status 3" in exc.message
    assert exc.log_path == sb.log_path and exc.hint is not None
    assert str(sb.log_path) in exc.hint
    tail = exc.log_tail.splitlines()
    assert tail[-1] == "line 99" and len(tail) == LOG_TAIL_LINES
    assert "line 99" in exc.message  # the tail is shown with the error
    assert "line 0\n" in sb.log_path.read_text()  # the full log is kept


def test_shell_metacharacters_are_plain_arguments(tmp_path: Path) -> None:
    hostile = ["$(touch pwned)", "; touch pwned2", "`touch pwned3`", "a'b\"c", "*", "&& id"]
    sb = _sandbox(tmp_path)
    sb.run(_py("import sys, json; print('JSON:' + json.dumps(sys.argv[1:]))") + hostile,
           cwd=sb.work_dir)
    assert _last_json(sb.log_path) == hostile
    assert not any(p.name.startswith("pwned") for p in sb.work_dir.rglob("*"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "invalid build command []"),
        (["echo", "a\0b"], "invalid build command ['echo', 'a\\x00b']"),
    ],
)
def test_invalid_commands_are_refused(tmp_path: Path, argv: list[str], message: str) -> None:
    sb = _sandbox(tmp_path)
    with pytest.raises(BuildError) as err:
        sb.run(argv, cwd=sb.work_dir)
    assert message in err.value.message


def test_missing_program_is_a_build_error(tmp_path: Path) -> None:
    sb = _sandbox(tmp_path, isolation=NO_ISOLATION)
    with pytest.raises(BuildError) as err:
        sb.run(["/nonexistent/rebar3", "compile"], cwd=sb.work_dir, step="rebar3")
    assert "cannot start step 'rebar3' ('/nonexistent/rebar3')" in err.value.message


@pytest.mark.parametrize("timeout", [0, -1.5])
def test_timeout_must_be_positive(tmp_path: Path, timeout: float) -> None:
    with pytest.raises(ValueError, match="build timeout must be positive"):
        _sandbox(tmp_path, timeout=timeout)


def test_isolation_values_are_consistent() -> None:
    with pytest.raises(ValueError, match="needs an unshare prefix"):
        Isolation(network=True)
    with pytest.raises(ValueError, match="needs a mount namespace"):
        Isolation(prefix=("/usr/bin/unshare", "--net", "--"), network=True, filesystem=True)
    detected = detect_isolation()
    assert detect_isolation() is detected  # probed once per process
    assert detected.to_dict()["network"] == detected.network


def test_read_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"".join(f"l{i}\n".encode() for i in range(10)) + b"\xff bad utf8\n")
    assert read_log_tail(log, lines=2) == "l9\n\ufffd bad utf8"
    assert read_log_tail(tmp_path / "missing.log") == ""


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists()
    or not Path("/usr/bin/python3").exists(),
    reason="needs root (to drop to nobody with setpriv) and /usr/bin/python3",
)
def test_the_user_namespace_variant_works_for_an_unprivileged_user() -> None:
    # What a non-root bstore gets: `unshare --map-root-user ...` plus the mount child.
    # Run exactly that as uid 65534 (the system python: the venv may live under /root),
    # in a directory that user can reach (pytest's tmp dirs are private to root).
    base = Path(tempfile.mkdtemp(prefix="bstore-userns-"))
    try:
        _run_as_nobody(base)
    finally:
        shutil.rmtree(base)


def _run_as_nobody(base: Path) -> None:
    work = base / "work"
    work.mkdir()
    base.chmod(0o777)
    work.chmod(0o777)
    outside = base / "outside.txt"
    argv = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/unshare", "--map-root-user", "--net", "--mount", "--pid", "--fork",
            "--kill-child", "--mount-proc", "--",
            "/usr/bin/python3", "-I", "-S", "-c", _child_source(), "--rw", str(work), "--",
            "/usr/bin/python3", "-c",
            "import socket, sys\n"
            "open('inside.txt', 'w').write('ok')\n"
            "try:\n    open(sys.argv[1], 'w')\n"
            "except OSError as e:\n    print('write:', e.strerror)\n"
            "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
            "except OSError as e:\n    print('connect:', e.strerror)\n",
            str(outside)]
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60,
                          check=False)
    if "Operation not permitted" in proc.stderr and "unshare" in proc.stderr:
        pytest.skip(f"unprivileged user namespaces are disabled here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert (work / "inside.txt").read_text() == "ok"
    assert "write: Read-only file system" in proc.stdout
    assert "connect: Network is unreachable" in proc.stdout
    assert not outside.exists()


def test_no_unshare_means_no_isolation_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bstore.builders.sandbox"):
        iso = probe_isolation(None)
    assert iso == Isolation(reason="unshare (util-linux) is not installed")
    assert "builds run WITHOUT network or filesystem isolation" in caplog.text


def test_a_failing_unshare_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="bstore.builders.sandbox"):
        iso = probe_isolation(str(fake))
    assert not (iso.network or iso.filesystem or iso.pids) and iso.prefix == ()
    assert "Operation not permitted" in iso.reason
    assert "builds run WITHOUT network or filesystem isolation" in caplog.text
    # And a build still runs, unisolated.
    sb = _sandbox(tmp_path, isolation=iso)
    sb.run(["true"], cwd=sb.work_dir)


def test_network_only_when_mounts_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An unshare that refuses --mount but honours --net (some container runtimes).
    fake = tmp_path / "unshare"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = --mount ] && '
                    "{ echo 'unshare: mount namespace: Permission denied' >&2; exit 1; }; "
                    'done\nwhile [ "$1" != -- ]; do shift; done\nshift\nexec "$@"\n')
    fake.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="bstore.builders.sandbox"):
        iso = probe_isolation(str(fake))
    assert iso.network and not iso.filesystem and not iso.pids
    assert "--mount" not in iso.prefix
    assert "builds can write outside their work dir" in caplog.text
    assert "Permission denied" in iso.reason


@needs_mountns
def test_the_mount_child_fails_closed(tmp_path: Path) -> None:
    # If a writable dir cannot be bind-mounted, the build must not run at all.
    iso = detect_isolation()
    missing = tmp_path / "missing"
    proc = subprocess.run(
        [*iso.prefix, PY, "-I", "-S", "-c", _child_source(), "--rw", str(missing), "--",
         PY, "-c", "print('RAN')"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 97
    assert "bstore sandbox:" in proc.stderr and str(missing) in proc.stderr
    assert "RAN" not in proc.stdout
