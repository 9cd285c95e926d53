"""Fixtures for store tests: a fresh store per test and sample trees."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from storehelpers import SAMPLE, write_tree

from bstore.store.atomic import remove_tree
from bstore.store.local import LocalStore


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """Where the test's store lives (not created yet)."""
    return tmp_path / "root"


@pytest.fixture
def store(store_root: Path) -> Iterator[LocalStore]:
    """A fresh, open store."""
    with LocalStore.open(store_root) as st:
        yield st


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    """A small tree with files, an executable, a symlink, an empty file and nesting."""
    return write_tree(tmp_path / "sample", SAMPLE)


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A scratch dir on tmpfs (``/dev/shm``) when there is one, else ``tmp_path``: for
    inputs with very many directories, which are slow to create on some disks."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="bstore-test-", dir=shm))
        try:
            yield path
        finally:
            remove_tree(path)
    else:
        yield tmp_path
