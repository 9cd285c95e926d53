"""Fixtures shared by the activator tests: the compiled agent, the test-app compiler,
and an epmd of the module's own on a random loopback port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from acthelpers import AppCompiler, Epmd, short_root

from bstore.activators.agent_build import compile_agent
from bstore.store.local import LocalStore


@pytest.fixture(scope="session")
def agent_ebin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent, compiled once per test process."""
    return compile_agent(tmp_path_factory.mktemp("agent"))


@pytest.fixture(scope="session")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> AppCompiler:
    """Test apps compiled with erlc, shared (and cached) by every module."""
    return AppCompiler(tmp_path_factory.mktemp("apps"))


@pytest.fixture(scope="module")
def epmd() -> Iterator[Epmd]:
    """An epmd on a random loopback port for this module's distributed nodes."""
    daemon = Epmd()
    old = os.environ.get("ERL_EPMD_PORT")
    os.environ["ERL_EPMD_PORT"] = str(daemon.port)
    yield daemon
    if old is None:
        del os.environ["ERL_EPMD_PORT"]
    else:
        os.environ["ERL_EPMD_PORT"] = old
    daemon.stop()


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A short state root (agent socket paths stay short), with an empty HOME and no
    cookie in the environment: bstore generates the profile's cookie itself."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("RELEASE_COOKIE", "ERLANG_COOKIE"):
        monkeypatch.delenv(var, raising=False)
    path = short_root()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(root: Path) -> Iterator[LocalStore]:
    with LocalStore.open(root) as st:
        yield st


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Where the test apps write what they observe."""
    d = tmp_path / "obs"
    d.mkdir()
    return d
