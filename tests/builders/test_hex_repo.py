"""The test Hex repository itself: real tools accept it and its packages compile."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from hexrepo import ServedHexRepo

from bstore.builders.download import DownloadPolicy
from bstore.builders.hex.errors import TarballError
from bstore.builders.hex.protobuf import Names, Versions
from bstore.builders.hex.registry import verify_signed
from bstore.builders.hex.tarball import fetch_release

FAST = DownloadPolicy(read_timeout=2, retries=0)


def test_repository_layout_on_disk(hex_repo: ServedHexRepo) -> None:
    files = sorted(p.relative_to(hex_repo.root).as_posix() for p in hex_repo.root.rglob("*"))
    assert "names" in files
    assert "packages/hexa_top" in files
    assert "tarballs/hexa_leaf-1.2.0-rc.1.tar" in files
    names = Names.decode(
        verify_signed((hex_repo.root / "names").read_bytes(), hex_repo.repo, source="names")
    )
    assert names == Names("testrepo", ("hexa_leaf", "hexa_mid", "hexa_top"))
    versions = Versions.decode(
        verify_signed((hex_repo.root / "versions").read_bytes(), hex_repo.repo, source="v")
    )
    assert versions.packages[0].versions == ("1.0.0", "1.1.0", "1.2.0-rc.1", "2.0.0")


def test_fetch_release_end_to_end(
    hex_repo: ServedHexRepo, http_client: httpx.Client, tmp_path: Path
) -> None:
    got = fetch_release(
        http_client, hex_repo.repo, "hexa_top", "0.1.0", tmp_path / "top", policy=FAST
    )
    assert (tmp_path / "top/src/hexa_top.erl").read_text().startswith("-module(hexa_top).")
    assert got.metadata["version"] == b"0.1.0"
    with pytest.raises(TarballError, match=r"has no version 9\.0\.0 in repository 'testrepo'"):
        fetch_release(http_client, hex_repo.repo, "hexa_top", "9.0.0", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("rebar3") is None, reason="rebar3 is not installed")
def test_rebar3_builds_an_app_on_the_test_repository(
    hex_repo: ServedHexRepo, tmp_path: Path
) -> None:
    """rebar3 (through hex_core) verifies our signatures and tarballs, compiles every
    package of the chain, and the linked code runs."""
    app = tmp_path / "myapp"
    env = hex_repo.rebar3_app(app, applications="hexa_top",
                              deps='{hexa_top, "0.1.0"}, {hexa_mid, "1.1.0"}')
    (app / "src/myapp.erl").write_text(
        "-module(myapp).\n-export([go/0]).\ngo() -> hexa_top:chain().\n"
    )
    proc = subprocess.run(
        ["rebar3", "compile"], cwd=app, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lib = app / "_build/default/lib"
    apps = sorted(p.name for p in lib.iterdir() if not p.name.startswith("."))
    assert apps == ["hexa_leaf", "hexa_mid", "hexa_top", "myapp"]
    ebins = [str(lib / name / "ebin") for name in apps]
    run = subprocess.run(
        ["erl", "-noshell", "-pa", *ebins, "-eval", 'io:format("~p~n", [myapp:go()]), halt().'],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert run.stdout.strip() == "[hexa_top,hexa_mid,hexa_leaf,hexa_leaf]"
