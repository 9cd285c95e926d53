"""The demo's work dir: local git repositories (real ``git``), free loopback ports, and
small HTTP/TCP clients to show what the apps answer.

Layout under the work dir::

    sources/counter/   sources/hello_ex/   sources/worker/    the apps' git repositories
    gitops/                                                   the GitOps repo (apps/…)
    bstore.toml                                               bstore's configuration
    state/                                                    bstore's state root
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import httpx

from bstore.errors import BstoreError


class DemoError(BstoreError):
    """Something the demo needs is missing or did not behave (names what and where)."""


#: git runs with no user or system configuration, so a user's hooks, signing or
#: templates never change what the demo does; the identity is the demo's own.
_GIT_IDENTITY = {"GIT_AUTHOR_NAME": "bstore demo", "GIT_AUTHOR_EMAIL": "demo@bstore.invalid",
                 "GIT_COMMITTER_NAME": "bstore demo",
                 "GIT_COMMITTER_EMAIL": "demo@bstore.invalid",
                 "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                 "GIT_TERMINAL_PROMPT": "0"}


class GitRepo:
    """A git working repository on branch ``main`` that the demo commits to."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def url(self) -> str:
        """Its ``file://`` URL."""
        return self.path.absolute().as_uri()

    def git(self, *args: str) -> str:
        """Run ``git -C <repo> args`` and return its stdout."""
        git = shutil.which("git")
        if git is None:
            raise DemoError("git is not installed", hint="apt-get install git")
        env = {**os.environ, **_GIT_IDENTITY}
        try:
            done = subprocess.run([git, "-C", str(self.path), *args], env=env,
                                  capture_output=True, text=True, check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DemoError(f"git {' '.join(args)} in {self.path} failed: {exc}") from exc
        if done.returncode != 0:
            raise DemoError(f"git {' '.join(args)} in {self.path} failed:"
                            f" {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    @classmethod
    def create(cls, path: Path) -> GitRepo:
        """A new empty repository at ``path`` (branch ``main``)."""
        path.mkdir(parents=True, exist_ok=True)
        repo = cls(path)
        repo.git("init", "-q", "-b", "main")
        return repo

    def commit(self, files: Mapping[str, str], message: str, *, tag: str | None = None
               ) -> str:
        """Write ``files`` (relative path → text), commit them, optionally tag the commit;
        returns the commit id."""
        for rel, text in files.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        if tag is not None:
            self.git("tag", tag)
        return self.git("rev-parse", "HEAD").strip()


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that nothing listens on right now."""
    sockets: list[socket.socket] = []
    try:
        # Held open together, so the kernel hands out distinct ports.
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_get(port: int, path: str = "/") -> tuple[int | None, str]:
    """``GET http://127.0.0.1:<port><path>``: (status, body) or (None, why)."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return response.status_code, response.text.strip()


def tcp_ping(port: int) -> str:
    """Send ``ping`` to 127.0.0.1:<port> and return the answer line (or why not)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as conn:
            conn.sendall(b"ping\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return f"no answer: {exc.strerror or exc}"
    return data.decode("utf-8", "replace").strip()
