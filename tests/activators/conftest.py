"""Fixtures shared by the activator tests: the compiled agent, the test-app compiler,
and an epmd of the module's own on a random loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from acthelpers import AppCompiler, Epmd

from bstore.activators.agent_build import compile_agent


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
