"""Hex package tarballs: verified before unpacking, hostile variants refused cleanly."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest
from hexrepo import ServedHexRepo, outer_tarball, tar_bytes
from localhttp import Route

from bstore.builders.download import DownloadError, DownloadPolicy
from bstore.builders.hex.errors import TarballError
from bstore.builders.hex.protobuf import Release
from bstore.builders.hex.registry import fetch_package
from bstore.builders.hex.tarball import fetch_tarball, unpack_tarball
from bstore.specs.terms import Atom

FAST = DownloadPolicy(read_timeout=2, retries=0)


def release_of(hex_repo: ServedHexRepo, client: httpx.Client, name: str, version: str) -> Release:
    package = fetch_package(client, hex_repo.repo, name, policy=FAST)
    return next(r for r in package.releases if r.version == version)


def test_fetch_and_unpack_a_real_package(
    hex_repo: ServedHexRepo, http_client: httpx.Client, tmp_path: Path
) -> None:
    release = release_of(hex_repo, http_client, "hexa_mid", "1.1.0")
    dest = tmp_path / "src"
    got = fetch_tarball(http_client, hex_repo.repo, "hexa_mid", release, dest, policy=FAST)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "rebar.config",
        "src/hexa_mid.app.src",
        "src/hexa_mid.erl",
    ]
    assert got.outer_checksum == release.outer_checksum.hex()  # type: ignore[union-attr]
    assert got.inner_checksum == release.inner_checksum.hex()
    assert got.metadata["name"] == b"hexa_mid"
    assert got.metadata["requirements"] == [
        (
            b"hexa_leaf",
            [
                (b"app", b"hexa_leaf"),
                (b"optional", Atom("false")),
                (b"requirement", b"~> 1.1"),
                (b"repository", b"hexpm"),
            ],
        )
    ]
    assert got.app == "hexa_mid"
    assert got.contents.members == 3


@pytest.mark.skipif(shutil.which("erlc") is None, reason="erlc is not installed")
@pytest.mark.integration
def test_unpacked_package_compiles_with_erlc(
    hex_repo: ServedHexRepo, http_client: httpx.Client, tmp_path: Path
) -> None:
    release = release_of(hex_repo, http_client, "hexa_leaf", "1.1.0")
    dest = tmp_path / "leaf"
    fetch_tarball(http_client, hex_repo.repo, "hexa_leaf", release, dest, policy=FAST)
    out = tmp_path / "ebin"
    out.mkdir()
    subprocess.run(["erlc", "-o", str(out), str(dest / "src/hexa_leaf.erl")], check=True)
    assert (out / "hexa_leaf.beam").is_file()


def _metadata(name: str = "hexa_leaf", version: str = "1.0.0") -> bytes:
    return f'{{<<"name">>,<<"{name}">>}}.\n{{<<"version">>,<<"{version}">>}}.\n'.encode()


def _contents(files: dict[str, bytes] | None = None) -> bytes:
    return tar_bytes(files or {"src/hexa_leaf.erl": b"-module(hexa_leaf).\n"}, gz=True)


class _Zeros:
    """A file of ``size`` zero bytes that is never held in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def _bomb() -> bytes:
    # Three 60 MiB members: each under the member cap, together over the 128 MiB total.
    raw = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for i in range(3):
            info = tarfile.TarInfo(f"src/zeros{i}")
            info.size = 60 * 1024 * 1024
            tar.addfile(info, _Zeros(info.size))
    return raw.getvalue()


HOSTILE: list[tuple[str, bytes | None, str]] = [
    ("version-2", outer_tarball(b"2", _metadata(), _contents()), "format VERSION '2', not '3'"),
    (
        "missing-checksum",
        tar_bytes(
            {"VERSION": b"3", "metadata.config": _metadata(), "contents.tar.gz": _contents()},
            gz=False,
        ),
        "has no 'CHECKSUM'",
    ),
    (
        "wrong-checksum",
        outer_tarball(b"3", _metadata(), _contents(), checksum=b"AB" * 32),
        "CHECKSUM 'ABAB",
    ),
    (
        "extra-member",
        tar_bytes(
            {
                "VERSION": b"3",
                "CHECKSUM": b"00",
                "metadata.config": _metadata(),
                "contents.tar.gz": _contents(),
                "../evil": b"x",
            },
            gz=False,
        ),
        "unexpected member '../evil'",
    ),
    (
        "other-package",
        outer_tarball(b"3", _metadata(name="hexa_evil"), _contents()),
        "metadata name is b'hexa_evil', expected 'hexa_leaf'",
    ),
    (
        "other-version",
        outer_tarball(b"3", _metadata(version="9.9.9"), _contents()),
        "metadata version is b'9.9.9', expected '1.0.0'",
    ),
    (
        "bad-metadata",
        outer_tarball(b"3", b'{<<"name">>, <<"x">>', _contents()),
        "metadata.config",
    ),
    (
        "escaping-contents",
        outer_tarball(b"3", _metadata(), _contents({"../../escape.erl": b"x"})),
        "contents.tar.gz': member '../../escape.erl' contains '..'",
    ),
    (
        "absolute-contents",
        outer_tarball(b"3", _metadata(), _contents({"/etc/x": b"x"})),
        "member '/etc/x' has an absolute path",
    ),
    ("bomb", None, "unpacks to more than 134217728 bytes"),
    ("not-a-tar", b"<html>503</html>" * 100, "is not a tar archive"),
]


@pytest.mark.parametrize(
    ("data", "message"), [(d, m) for _, d, m in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_tarballs_are_refused(tmp_path: Path, data: bytes | None, message: str) -> None:
    # The registry vouches for these exact bytes, so only the structure checks can refuse.
    if data is None:  # built here, not at import: compressing the bomb takes a moment
        data = outer_tarball(b"3", _metadata(), _bomb())
    dest = tmp_path / "out"
    with pytest.raises(TarballError) as info:
        unpack_tarball(
            data,
            dest,
            name="hexa_leaf",
            version="1.0.0",
            outer_checksum=hashlib.sha256(data).digest(),
            source="http://127.0.0.1/tarballs/hexa_leaf-1.0.0.tar",
        )
    assert "'http://127.0.0.1/tarballs/hexa_leaf-1.0.0.tar" in info.value.message
    assert message in info.value.message
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_outer_checksum_is_checked_before_anything_is_read(tmp_path: Path) -> None:
    # Garbage that would fail every later check: the outer checksum must fail first.
    with pytest.raises(TarballError, match=r"has sha256 .* but the registry says 0000"):
        unpack_tarball(
            b"garbage",
            tmp_path / "out",
            name="x",
            version="1.0.0",
            outer_checksum=b"\0" * 32,
            source="t.tar",
        )
    assert not (tmp_path / "out").exists()


def test_served_tarball_differing_from_registry_is_not_unpacked(
    hex_repo: ServedHexRepo, http_client: httpx.Client, tmp_path: Path
) -> None:
    release = release_of(hex_repo, http_client, "hexa_leaf", "1.0.0")
    # A mirror serves another (well-formed) package under this name: sha256 ≠ registry.
    evil = hex_repo.builder.release("hexa_leaf", "1.1.0").tarball()
    hex_repo.server.routes["/tarballs/hexa_leaf-1.0.0.tar"] = Route(evil)
    dest = tmp_path / "out"
    with pytest.raises(TarballError) as info:
        fetch_tarball(http_client, hex_repo.repo, "hexa_leaf", release, dest, policy=FAST)
    assert "/tarballs/hexa_leaf-1.0.0.tar' has sha256" in info.value.message
    assert not dest.exists()


def test_release_without_outer_checksum_is_refused(
    hex_repo: ServedHexRepo, http_client: httpx.Client, tmp_path: Path
) -> None:
    release = Release("1.0.0", b"\0" * 32, (), None, None)
    with pytest.raises(TarballError, match="has no outer checksum"):
        fetch_tarball(http_client, hex_repo.repo, "hexa_leaf", release, tmp_path / "o")


def test_inner_checksum_must_match_registry(tmp_path: Path) -> None:
    data = outer_tarball(b"3", _metadata(), _contents())
    with pytest.raises(TarballError, match="differs from the registry's"):
        unpack_tarball(
            data,
            tmp_path / "out",
            name="hexa_leaf",
            version="1.0.0",
            outer_checksum=hashlib.sha256(data).digest(),
            inner_checksum=b"\1" * 32,
            source="t.tar",
        )


def test_stalled_tarball_download(
    hex_repo: ServedHexRepo, http_client: httpx.Client, tmp_path: Path
) -> None:
    release = release_of(hex_repo, http_client, "hexa_leaf", "1.0.0")
    body = hex_repo.server.routes["/tarballs/hexa_leaf-1.0.0.tar"].body
    hex_repo.server.routes["/tarballs/hexa_leaf-1.0.0.tar"] = Route(body, behaviour="stall")
    policy = DownloadPolicy(read_timeout=0.3, retries=0)
    with pytest.raises(DownloadError, match=r"hexa_leaf-1\.0\.0\.tar' stalled"):
        fetch_tarball(
            http_client, hex_repo.repo, "hexa_leaf", release, tmp_path / "o", policy=policy
        )
    assert not (tmp_path / "o").exists()
