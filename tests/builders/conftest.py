"""Fixtures for builder tests: local HTTP servers and a signed Hex repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hexrepo import HexRepoBuilder, ServedHexRepo, default_chain, new_key
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


@pytest.fixture(scope="session")
def hex_key() -> RSAPrivateKey:
    """The RSA key of the test Hex repository (made once: key generation is slow)."""
    return new_key()


@pytest.fixture(scope="session")
def other_hex_key() -> RSAPrivateKey:
    """A second RSA key, for entries signed by someone else."""
    return new_key()


@pytest.fixture
def hex_repo(hex_key: RSAPrivateKey, local_server: LocalServer, tmp_path: Path) -> ServedHexRepo:
    """The default package chain (see hexrepo.default_chain) on disk and served locally."""
    builder = default_chain(HexRepoBuilder(hex_key))
    root = builder.write(tmp_path / "hexrepo")
    return ServedHexRepo(builder, local_server, builder.serve(local_server), root)
