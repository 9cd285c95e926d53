"""Fixtures for generation tests: a fresh store, and beams compiled once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from genhelpers import compile_variants

from bstore.store.local import LocalStore


@pytest.fixture(scope="session")
def beams(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, bytes]]:
    """``{1: {module: beam}, 2: {...}}``: the same modules compiled with two bodies."""
    return compile_variants(tmp_path_factory.mktemp("beams"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The state root of the test's store."""
    return tmp_path / "root"


@pytest.fixture
def store(root: Path) -> Iterator[LocalStore]:
    """A fresh, open store."""
    with LocalStore.open(root) as st:
        yield st
