"""Nodes bstore starts see the installed Elixir's applications on ERL_LIBS (a mix-built
app needs the ``elixir`` application at run time), and only when Elixir is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bstore.activators.base import ActivatorContext
from bstore.activators.vm import elixir_lib_dir, node_environment


def env_of(root: Path) -> dict[str, str]:
    return node_environment(ActivatorContext(root, "p"), root / "home")


@pytest.mark.skipif(shutil.which("elixir") is None, reason="needs Elixir")
@pytest.mark.parametrize("existing", [None, "/opt/libs", "/opt/a:/opt/b"])
def test_elixir_libs_are_added_after_what_was_there(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    existing: str | None) -> None:
    if existing is None:
        monkeypatch.delenv("ERL_LIBS", raising=False)
    else:
        monkeypatch.setenv("ERL_LIBS", existing)
    lib = elixir_lib_dir()
    assert lib is not None and (lib / "elixir" / "ebin" / "elixir.app").is_file()
    parts = env_of(tmp_path)["ERL_LIBS"].split(os.pathsep)
    assert parts == [*(existing.split(":") if existing else []), str(lib)]


@pytest.mark.skipif(shutil.which("elixir") is None, reason="needs Elixir")
def test_elixir_libs_are_not_added_twice(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lib = elixir_lib_dir()
    monkeypatch.setenv("ERL_LIBS", f"{lib}")
    assert env_of(tmp_path)["ERL_LIBS"] == str(lib)


@pytest.mark.parametrize("layout", ["no elixir", "elixir without its lib dir"])
def test_no_elixir_no_erl_libs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               layout: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if layout != "no elixir":
        fake = bin_dir / "elixir"
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("ERL_LIBS", raising=False)
    assert elixir_lib_dir() is None
    assert "ERL_LIBS" not in env_of(tmp_path)
