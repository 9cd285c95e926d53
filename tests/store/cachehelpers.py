"""Helpers for binary-cache tests: two hosts on one machine, real trees, hostile servers.

Store paths name their store dir, so two hosts must see the same root path. Host B is
the test process at ``root``; host A's state lives elsewhere and is bind-mounted at
``root`` in a private mount namespace (``unshare -m``) for every process that acts as
host A (its ``bstore cache serve``, its ``bstore store add``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from storehelpers import BSTORE

from bstore.store.atomic import remove_tree
from bstore.store.local import LocalStore


def namespaces_work() -> bool:
    """Whether this process may create a mount namespace and bind-mount in it."""
    if shutil.which("unshare") is None:
        return False
    try:
        res = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt && true"],
                             capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def as_host_a(a_dir: Path, root: Path, argv: list[str]) -> list[str]:
    """``argv`` run in a private mount namespace with ``a_dir`` bind-mounted at ``root``."""
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", str(a_dir), str(root), *argv]


def start_server(argv: list[str], env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[str], str]:
    """Start ``bstore cache serve`` (``argv``); return the process and the URL it prints.
    If it does not start, it is stopped and AssertionError carries what it said."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        said = proc.stderr.read() if proc.stderr else ""
        stop_server(proc)
        raise AssertionError(f"cache serve did not start: {line!r} {said}")
    return proc, line.strip().rsplit(" ", 1)[1]


def stop_server(proc: subprocess.Popen[str]) -> None:
    """Stop a server the test started (by its own process handle) and close its pipes."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def write_many(base: Path, count: int, prefix: str = "f", size: int = 300) -> Path:
    """A tree of ``count`` small distinct files in a few directories."""
    for i in range(count):
        d = base / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{prefix}{i}.txt").write_bytes((f"{prefix} {i} ".encode() * size)[:size])
    (base / "bin").mkdir(exist_ok=True)
    (base / "bin" / "run").write_text("#!/bin/sh\necho run\n")
    (base / "bin" / "run").chmod(0o755)
    os.symlink("run", base / "bin" / "link")
    (base / "empty").write_bytes(b"")
    return base


def erlang_app(base: Path, modules: int, version: int = 1, changed: int | None = None) -> Path:
    """An OTP-style ``ebin`` tree of ``modules`` modules compiled with the real erlc;
    module ``changed`` gets a different body (a one-module upgrade)."""
    src = base.with_name(base.name + "-src")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for i in range(modules):
        body = f"f() -> {{m{i}, {2 if i == changed else 1}}}."
        (src / f"m{i}.erl").write_text(
            f"-module(m{i}).\n-export([f/0, g/1]).\n{body}\n"
            f"g(X) -> lists:map(fun(Y) -> Y * {i} + X end, lists:seq(1, 50)).\n")
    ebin = base / "ebin"
    ebin.mkdir(parents=True, exist_ok=True)
    subprocess.run(["erlc", "+deterministic", "-o", str(ebin),
                    *sorted(str(p) for p in src.glob("*.erl"))],
                   check=True, capture_output=True, timeout=300)
    mods = ", ".join(f"m{i}" for i in range(modules))
    (ebin / "app.app").write_text(
        f'{{application, app, [{{vsn, "{version}"}}, {{modules, [{mods}]}}]}}.\n')
    shutil.rmtree(src)
    return base


@dataclass
class Hosts:
    """Host A (``a_dir``, seen at ``root`` only inside its namespace) and host B (``root``)."""

    root: Path
    a_dir: Path
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    @classmethod
    def create(cls, base: Path, build_a: Callable[[LocalStore], None]) -> Hosts:
        """Build A's store at the shared root with ``build_a``, then move it aside and
        leave an empty directory for B."""
        root = base / "host" / "root"
        with LocalStore.open(root) as st:
            build_a(st)
        a_dir = base / "a-root"
        os.rename(root, a_dir)
        root.mkdir(mode=0o755)
        return cls(root, a_dir)

    def _ns(self, argv: list[str]) -> list[str]:
        return as_host_a(self.a_dir, self.root, argv)

    def run_a(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``bstore --root ROOT args`` as host A."""
        return subprocess.run(self._ns([*BSTORE, "--root", str(self.root), *args]),
                              capture_output=True, text=True, timeout=300, check=False)

    def serve_a(self, *args: str) -> str:
        """Start ``bstore cache serve`` as host A; return its URL."""
        proc, url = start_server(self._ns([*BSTORE, "--root", str(self.root), "cache",
                                           "serve", *args]))
        self.servers.append(proc)
        return url

    def reset_b(self) -> None:
        """Empty host B (keep the directory: it is A's mount point elsewhere)."""
        for child in list(self.root.iterdir()):
            remove_tree(child)

    def stop(self) -> None:
        """Stop every server this object started (by its own process handle)."""
        for proc in self.servers:
            stop_server(proc)
        self.servers.clear()


class _ObjHandler(BaseHTTPRequestHandler):
    server: _ObjServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        key = self.path.lstrip("/")
        behaviour = self.server.behaviours.get(key, "ok")
        file = self.server.directory / key
        if ".." in key or not file.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.server.overrides.get(key, file.read_bytes())
        self.send_response(200)
        try:
            if behaviour == "endless" and not head:
                self.send_header("Connection", "close")
                self.end_headers()
                deadline = time.monotonic() + 20  # bounded: 20 s or 256 MiB
                for _ in range(4096):
                    if time.monotonic() > deadline or self.server.stop_event.is_set():
                        break
                    self.wfile.write(b"\0" * 65536)
                    self.server.count(65536)
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if behaviour == "drip":
                for byte in body[:30]:  # bounded: 30 bytes, one per second at most
                    if self.server.stop_event.wait(1.0):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    self.server.count(1)
                self.close_connection = True
                return
            self.wfile.write(body)
            self.server.count(len(body))
        except (BrokenPipeError, ConnectionResetError):
            return


class _ObjServer(ThreadingHTTPServer):
    daemon_threads = True
    directory: Path
    behaviours: dict[str, str]
    overrides: dict[str, bytes]
    stop_event: threading.Event
    sent: int
    lock: threading.Lock

    def count(self, n: int) -> None:
        with self.lock:
            self.sent += n


class ObjectServer:
    """Serves a cache directory over HTTP on 127.0.0.1, with per-key misbehaviour
    (``endless``, ``drip``) and byte overrides; counts the body bytes it sent."""

    def __init__(self, directory: Path) -> None:
        self._srv = _ObjServer(("127.0.0.1", 0), _ObjHandler)
        self._srv.directory = directory
        self._srv.behaviours = {}
        self._srv.overrides = {}
        self._srv.stop_event = threading.Event()
        self._srv.sent = 0
        self._srv.lock = threading.Lock()
        self._thread = threading.Thread(target=self._srv.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def behaviours(self) -> dict[str, str]:
        """key → behaviour."""
        return self._srv.behaviours

    @property
    def overrides(self) -> dict[str, bytes]:
        """key → bytes served instead of the file."""
        return self._srv.overrides

    @property
    def sent(self) -> int:
        """Body bytes sent so far."""
        return self._srv.sent

    @property
    def url(self) -> str:
        """Base URL."""
        host, port = self._srv.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> ObjectServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._srv.stop_event.set()
        self._srv.shutdown()
        self._srv.server_close()
