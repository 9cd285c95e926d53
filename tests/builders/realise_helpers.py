"""Helpers for the realise/sources/CLI build tests: real git repos, specs, a hex repository
named ``hexpm`` (so it stands in for hex.pm, as a mirror would), release tarballs, and a
toolchain whose compilers count their runs."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import sample_apps
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hexrepo import HexRepoBuilder, default_chain
from localhttp import LocalServer, Route

from bstore.builders.hex.repos import HexRepo, Repos
from bstore.builders.toolchain import Toolchain, probe_toolchain
from bstore.specs.model import AppSpec, IconSpec, SourceSpec, SourceType

COUNTED_TOOLS = ("erlc", "rebar3", "mix", "make")
COMPILER_RUN_MARKER = "BSTORE-TEST-COMPILER-RUN"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent",
}


def git(repo: Path, *args: str) -> str:
    """Run real git in ``repo``; returns stdout."""
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, check=True)
    return proc.stdout.strip()


def git_repo(project: Path) -> Path:
    """Make ``project`` (a directory of files) a git repository with one commit on
    ``main``; returns it."""
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "initial")
    return project


def commit_all(project: Path, message: str) -> str:
    """Commit everything in ``project``; returns the new commit id."""
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", message)
    return git(project, "rev-parse", "HEAD")


def spec(name: str, version: str, source: SourceSpec) -> AppSpec:
    """An app spec with defaults."""
    return AppSpec(name=name, version=version, source=source, icon=IconSpec.identicon(name))


def git_spec(name: str, version: str, repo: Path, ref: str | None) -> AppSpec:
    """An app spec for the git repository ``repo`` at ``ref``."""
    return spec(name, version, SourceSpec(SourceType.GIT, ref=ref, url=repo.as_uri()))


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A gzipped tar of ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def release_files(name: str, version: str) -> dict[str, bytes]:
    """A tiny prebuilt release tree (the realiser copies it as-is)."""
    return {
        f"{name}-{version}/lib/{name}-{version}/ebin/{name}.app":
            f'{{application,{name},[{{vsn,"{version}"}},{{modules,[]}}]}}.\n'.encode(),
        f"{name}-{version}/releases/{version}/start_erl.data": f"14.0 {version}\n".encode(),
    }


def serve_release(server: LocalServer, name: str, version: str,
                  behaviour: str = "ok") -> tuple[str, str]:
    """Publish a release tarball; returns ``(url, sha256)`` of the genuine bytes."""
    data = tar_gz(release_files(name, version))
    path = f"/releases/{name}-{version}.tar.gz"
    server.routes[path] = Route(data, behaviour=behaviour)
    return server.url(path), hashlib.sha256(data).hexdigest()


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def hexpm_builder(key: RSAPrivateKey, tmp: Path) -> HexRepoBuilder:
    """A repository named ``hexpm``: the hexa chain, plus ``greeter`` (rebar3, Erlang)
    and ``exdep`` (mix, Elixir) published from the sample apps."""
    builder = default_chain(HexRepoBuilder(key, name="hexpm"))
    src = tmp / "hexsrc"
    builder.add("greeter", "1.0.0", files=read_tree(sample_apps.greeter_dep(src)))
    builder.add("exdep", "0.2.0", files=read_tree(sample_apps.elixir_dep(src)))
    return builder


@dataclass
class HexWorld:
    """A served ``hexpm`` stand-in and the client-side configuration for it."""

    builder: HexRepoBuilder
    server: LocalServer

    @property
    def repo(self) -> HexRepo:
        """Client config of the served repository."""
        return HexRepo("hexpm", self.server.base_url, self.builder.public_key_pem)

    @property
    def repos(self) -> Repos:
        """Repos where ``hexpm`` is the local stand-in."""
        return Repos([self.repo])

    def publish(self) -> None:
        """(Re)publish every route after the builder changed."""
        self.builder.serve(self.server)


def counting_toolchain(base: Path) -> tuple[Toolchain, Path]:
    """A toolchain whose erlc/rebar3/mix/make are shims that append their name to a
    counter file before running the real tool; returns it and the counter file.

    Use it with an unisolated sandbox (the sandbox makes everything outside the work
    dir read-only, which would stop the shims from counting).
    """
    shims = base / "shims"
    shims.mkdir(parents=True)
    counter = base / "compiler-runs.txt"
    counter.write_text("")
    real = probe_toolchain()
    for tool in ("erl", "elixir", "erlc", "rebar3", "mix", "make"):
        path = getattr(real, tool)
        if path is None:
            continue
        shim = shims / tool
        if tool in COUNTED_TOOLS:
            # The marker also lands in the build log (the sandbox sends stderr there),
            # which counts runs even where the sandbox makes the counter file read-only.
            shim.write_text(f'#!/bin/sh\necho "{COMPILER_RUN_MARKER} {tool}" >&2\n'
                            f'echo {tool} >> "{counter}" 2>/dev/null\nexec "{path}" "$@"\n')
            shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        else:
            shim.symlink_to(path)
    toolchain = probe_toolchain(f"{shims}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    counter.write_text("")  # the probe itself ran rebar3/elixir
    return toolchain, counter


def runs(counter: Path) -> list[str]:
    """The compiler runs the shims recorded."""
    return counter.read_text().split()


def logged_runs(root: Path) -> int:
    """Compiler runs recorded in the kept build logs under the state ``root``."""
    return sum(p.read_text(errors="replace").count(COMPILER_RUN_MARKER)
               for p in (root / "logs").glob("*.log"))
