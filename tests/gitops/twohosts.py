"""Helpers for the two-host GitOps test: an erlc app of many modules in its own git repo,
``bstore`` runs as host A (in its mount namespace) or host B, and a byte-counting TCP
proxy that sits between host B and host A's cache server.

Store paths name their store dir, so both hosts use the same root path: host B owns it,
host A's state is bind-mounted over it in a private mount namespace for every process
that acts as A (see ``tests/store/cachehelpers.py``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "builders"))
from cachehelpers import as_host_a, start_server, stop_server
from realise_helpers import commit_all, git_repo
from storehelpers import BSTORE


def module_source(app: str, i: int, variant: int = 1) -> str:
    """Module ``<app>_m<i>`` of a realistic size (a 5.5 KB ``.beam``: sixteen functions
    with clauses, guards, funs and literals); ``variant`` changes one function's body."""
    funs = [f"f() -> {{{app}_m{i}, {variant}}}.",
            f"g(X) -> lists:map(fun(Y) -> Y * {i} + X end, lists:seq(1, 40))."]
    names = ["f/0", "g/1"]
    for j in range(14):
        names.append(f"h{j}/2")
        funs.append(
            f"h{j}(A, B) ->\n    case A of\n"
            f"        {{get, K}} when is_atom(K) -> maps:get(K, B, {{missing_{j}, {i}}});\n"
            f"        {{put, K, V}} -> maps:put(K, {{V, {j}, {i}}}, B);\n"
            f"        {{log, Msg}} -> io_lib:format(\"{app}_m{i} h{j}: ~p (~p)~n\", [Msg, B]);\n"
            f"        N when is_integer(N), N > {j} ->\n"
            f"            lists:foldl(fun(E, Acc) -> E * Acc + {j} end, N,"
            f" lists:seq(1, {i % 7 + j}));\n"
            f"        _ -> {{error, {{badarg, ?MODULE, h{j}, A}}}}\n    end.")
    return f"-module({app}_m{i}).\n-export([{', '.join(names)}]).\n" + "\n".join(funs) + "\n"


def many_module_app(root: Path, name: str, modules: int) -> Path:
    """A plain erlc OTP app (``src/*.erl`` + ``.app.src``, no build tool) of ``modules``
    modules, committed in its own git repository; returns the project directory."""
    d = root / name
    (d / "src").mkdir(parents=True)
    (d / "src" / f"{name}.app.src").write_text(
        f'{{application, {name}, [{{description, "many modules"}}, {{vsn, "0.0.0-src"}},\n'
        "  {modules, []}, {registered, []}, {applications, [kernel, stdlib]}]}.\n")
    for i in range(modules):
        (d / "src" / f"{name}_m{i}.erl").write_text(module_source(name, i))
    return git_repo(d)


def change_module(project: Path, name: str, i: int, variant: int) -> str:
    """Change one module's body and commit; returns the commit id."""
    (project / "src" / f"{name}_m{i}.erl").write_text(module_source(name, i, variant))
    return commit_all(project, f"change {name}_m{i}")


def config_toml(repo_url: str, *, substituters: tuple[str, ...] = (),
                trusted: tuple[str, ...] = ()) -> str:
    """A bstore.toml for a dry-run profile following ``repo_url``."""
    def arr(items: tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{s}"' for s in items) + "]"
    return (f'repo_url = "{repo_url}"\nprofile = "p"\nactivator = "dry-run"\n'
            f"substituters = {arr(substituters)}\ntrusted_public_keys = {arr(trusted)}\n")


@dataclass
class TwoHosts:
    """Host B at ``root``; host A's state in ``a_dir``, mounted at ``root`` for A's
    processes. ``path`` is the ``$PATH`` both use (the same compiler shims: the
    compiler's path is part of every derivation)."""

    root: Path
    a_dir: Path
    path: str
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("BSTORE_") and k not in ("http_proxy", "https_proxy",
                                                            "HTTP_PROXY", "HTTPS_PROXY")}
        return {**env, "PATH": self.path}

    def _as_a(self, argv: list[str]) -> list[str]:
        return as_host_a(self.a_dir, self.root, argv)

    def _bstore(self, *args: str) -> list[str]:
        return [*BSTORE, "--root", str(self.root), *args]

    def run_a(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``bstore --root ROOT args`` as host A (a separate process)."""
        return subprocess.run(self._as_a(self._bstore(*args)), capture_output=True,
                              text=True, timeout=300, check=False, env=self._env())

    def run_b(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``bstore --root ROOT args`` as host B (a separate process)."""
        return subprocess.run(self._bstore(*args), capture_output=True, text=True,
                              timeout=300, check=False, env=self._env())

    def serve_a(self, *args: str) -> tuple[subprocess.Popen[str], str]:
        """Start ``bstore cache serve`` as host A; returns the process and its URL."""
        proc, url = start_server(self._as_a(self._bstore("cache", "serve", *args)),
                                 env=self._env())
        self.servers.append(proc)
        return proc, url

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Stop one server this object started (by its own process handle)."""
        stop_server(proc)
        if proc in self.servers:
            self.servers.remove(proc)

    def stop_all(self) -> None:
        """Stop every server still running."""
        for proc in list(self.servers):
            self.stop(proc)

    def reset_b(self) -> None:
        """Empty host B (the directory stays: it is A's mount point)."""
        from bstore.store.atomic import remove_tree

        for child in list(self.root.iterdir()):
            remove_tree(child)


_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT) (\S+) HTTP/1\.[01]\r\n")


class CountingProxy:
    """A TCP proxy on 127.0.0.1 to ``upstream`` (``host:port``) that counts the bytes
    it relays to the client and records the request targets the client sent (enough for
    plain HTTP/1.1 GET/HEAD, which is all a substituter sends)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.received = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the proxy."""
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget the counts so far."""
        with self._lock:
            self.received = 0
            self.requests.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()  # upstream down: the client sees the connection drop
            return

        def pump(src: socket.socket, dst: socket.socket, down: bool) -> None:
            pending = b""
            try:
                while data := src.recv(65536):
                    if down:
                        with self._lock:
                            self.received += len(data)
                    else:
                        pending += data
                        for m in _REQUEST.finditer(pending):
                            with self._lock:
                                self.requests.append(f"{m[1].decode()} {m[2].decode()}")
                        pending = pending[pending.rfind(b"\r\n") + 2:] if b"\r\n" in \
                            pending else pending
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        up = threading.Thread(target=pump, args=(client, server, False), daemon=True)
        up.start()
        pump(server, client, True)
        up.join(10)
        client.close()
        server.close()

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
