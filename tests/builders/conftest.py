"""Fixtures for builder tests: local HTTP servers and a signed Hex repository."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from localhttp import LocalServer


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    """A scripted HTTP server on 127.0.0.1 with a free port (see localhttp.Route)."""
    with LocalServer() as server:
        yield server


@pytest.fixture
def http_client() -> Iterator[httpx.Client]:
    """A plain httpx client that never reads proxy settings from the environment."""
    with httpx.Client(trust_env=False) as client:
        yield client
