"""Signed registry entries: decoded from a real served repository, forgeries refused."""

from __future__ import annotations

import contextlib
import gzip
import hashlib

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hexrepo import ServedHexRepo, public_pem
from hypothesis import given, settings
from hypothesis import strategies as st
from localhttp import Route

from bstore.builders.download import DownloadError, DownloadPolicy
from bstore.builders.hex.errors import ProtobufError, RegistryError
from bstore.builders.hex.protobuf import (
    Dependency,
    Names,
    Package,
    Release,
    Retirement,
    Signed,
    Versions,
    VersionsEntry,
    iter_fields,
)
from bstore.builders.hex.registry import decode_package, fetch_package, gunzip_capped
from bstore.builders.hex.repos import HEXPM, HexRepo, Repos, validate_package_name

FAST = DownloadPolicy(read_timeout=2, retries=0)


def test_dependency_wire_bytes_are_standard_protobuf() -> None:
    # Field 1 "a" and field 2 "~> 1.0", each as tag, length, bytes; optional true as varint.
    dep = Dependency("a", "~> 1.0", optional=True)
    assert dep.encode() == bytes.fromhex("0a0161") + b"\x12\x06~> 1.0" + b"\x18\x01"
    assert Dependency.decode(dep.encode()) == dep


def test_messages_round_trip() -> None:
    release = Release(
        "1.2.3-rc.1",
        b"\x01" * 32,
        (Dependency("x", ">= 1.0.0", app="x_app", repository="hexpm"),),
        Retirement(2, "CVE"),
        b"\x02" * 32,
    )
    package = Package("pkg", "hexpm", (release,))
    assert Package.decode(package.encode()) == package
    assert Retirement(2).reason_name == "security"
    assert Retirement(99).reason_name == "reason-99"
    names = Names("hexpm", ("a", "b"))
    assert Names.decode(names.encode()) == names
    versions = Versions("hexpm", (VersionsEntry("a", ("1.0.0", "1.1.0"), (1,)),))
    assert Versions.decode(versions.encode()) == versions


def test_unknown_fields_are_skipped() -> None:
    # Field 6 (security advisories), a fixed64 field 9 and a fixed32 field 10 are ignored.
    extra = b"\x32\x03abc" + b"\x49" + b"\0" * 8 + b"\x55" + b"\0" * 4
    release = Release("1.0.0", b"", ())
    assert Release.decode(release.encode() + extra) == release


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x0a\x05ab", "field 1 claims 5 bytes, only 2 left"),
        (b"\x0a", "truncated varint"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x08" + b"\xff" * 11, "varint longer than 10 bytes"),
        (b"\x0a\x02\xff\xfe", "field 'version' is not valid UTF-8"),
        (b"\x08\x01", "field 'version' has the wrong wire type"),
        (b"\x12\x00", "required field 'version' is missing"),
        (b"\x00", "field number 0"),
    ],
)
def test_malformed_protobuf(data: bytes, message: str) -> None:
    with pytest.raises(ProtobufError, match=message):
        Release.decode(data)


def test_iter_fields_reports_every_kind() -> None:
    data = b"\x08\x96\x01" + b"\x12\x01x" + b"\x1d\x01\x00\x00\x00"
    assert list(iter_fields(data, "T")) == [(1, 0, 150), (2, 2, b"x"), (3, 5, 1)]


def test_fetch_package_from_served_repository(
    hex_repo: ServedHexRepo, http_client: httpx.Client
) -> None:
    package = fetch_package(http_client, hex_repo.repo, "hexa_mid", policy=FAST)
    assert (package.name, package.repository) == ("hexa_mid", "testrepo")
    assert [r.version for r in package.releases] == ["1.0.0", "1.1.0"]
    release = package.releases[1]
    assert release.dependencies == (Dependency("hexa_leaf", "~> 1.1"),)
    tarball = hex_repo.builder.release("hexa_mid", "1.1.0").tarball()
    assert release.outer_checksum == hashlib.sha256(tarball).digest()
    # The same bytes are on disk, as a static mirror would hold them.
    on_disk = (hex_repo.root / "packages/hexa_mid").read_bytes()
    assert decode_package(on_disk, hex_repo.repo, "hexa_mid", source="disk") == package


def _forge(hex_repo: ServedHexRepo, key: RSAPrivateKey, *, name: str, repository: str) -> bytes:
    payload = hex_repo.builder.package_message(name, repository=repository).encode()
    return hex_repo.builder.signed(payload, key)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("other-key", "has a bad signature for hex repository 'testrepo'"),
        ("other-package", "is signed for package 'hexa_leaf', not 'hexa_mid'"),
        ("other-repository", "is signed for repository 'hexpm', not 'testrepo'"),
        ("flipped-bit", "has a bad signature"),
        ("not-gzip", "is not valid gzip"),
        ("truncated-gzip", "is truncated gzip"),
        ("not-signed", "is malformed"),
    ],
)
def test_forged_registry_entries_are_refused(
    hex_repo: ServedHexRepo,
    http_client: httpx.Client,
    other_hex_key: RSAPrivateKey,
    hex_key: RSAPrivateKey,
    variant: str,
    message: str,
) -> None:
    good = hex_repo.server.routes["/packages/hexa_mid"].body
    if variant == "other-key":
        body = _forge(hex_repo, other_hex_key, name="hexa_mid", repository="testrepo")
    elif variant == "other-package":
        # A genuine, validly signed entry, but for another package.
        body = _forge(hex_repo, hex_key, name="hexa_leaf", repository="testrepo")
    elif variant == "other-repository":
        # Validly signed by the same key, but claiming to come from another repository.
        body = _forge(hex_repo, hex_key, name="hexa_mid", repository="hexpm")
    elif variant == "flipped-bit":
        signed = Signed.decode(gzip.decompress(good))
        payload = bytearray(signed.payload)
        payload[-1] ^= 1
        body = gzip.compress(Signed(bytes(payload), signed.signature).encode())
    elif variant == "not-gzip":
        body = b"plainly not gzip"
    elif variant == "truncated-gzip":
        body = good[: len(good) // 2]
    else:
        body = gzip.compress(b"\x0b\x0b")
    hex_repo.server.routes["/packages/hexa_mid"] = Route(body)
    url = hex_repo.repo.package_url("hexa_mid")
    with pytest.raises(RegistryError) as info:
        fetch_package(http_client, hex_repo.repo, "hexa_mid", policy=FAST)
    assert repr(url) in info.value.message
    assert message in info.value.message


def test_registry_gzip_bomb_is_capped() -> None:
    bomb = gzip.compress(b"\0" * (1 << 20))
    with pytest.raises(RegistryError, match="unpacks to more than 1000 bytes"):
        gunzip_capped(bomb, cap=1000, source="x")


def test_missing_package_is_a_download_error(
    hex_repo: ServedHexRepo, http_client: httpx.Client
) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404 from '.*/packages/nope'"):
        fetch_package(http_client, hex_repo.repo, "nope", policy=FAST)


@pytest.mark.parametrize("name", ["", "A", "1abc", "a/../b", "a b", "a;rm", "../x", "x" * 200])
def test_invalid_package_names_never_become_urls(name: str) -> None:
    with pytest.raises(RegistryError, match="invalid hex package name"):
        validate_package_name(name)
    with pytest.raises(RegistryError):
        HEXPM.package_url(name)


def test_repository_configuration() -> None:
    assert HEXPM.package_url("cowboy") == "https://repo.hex.pm/packages/cowboy"
    assert HEXPM.tarball_url("cowboy", "2.10.0") == "https://repo.hex.pm/tarballs/cowboy-2.10.0.tar"
    assert HEXPM.public_key().key_size == 2048
    repos = Repos([HexRepo("mirror", "http://127.0.0.1:1/", HEXPM.public_key_pem)])
    assert sorted(repos) == ["hexpm", "mirror"]
    assert repos["mirror"].url == "http://127.0.0.1:1"
    with pytest.raises(RegistryError, match="hex repository 'nope' is not configured"):
        repos["nope"]
    with pytest.raises(RegistryError, match="is not a valid PEM public key"):
        HexRepo("bad", "http://127.0.0.1:1", "-----BEGIN PUBLIC KEY-----\nxx\n")
    with pytest.raises(RegistryError, match="unsupported URL"):
        HexRepo("bad", "file:///srv/repo", HEXPM.public_key_pem)
    with pytest.raises(RegistryError, match="invalid hex repository name"):
        HexRepo("Bad Name", "http://127.0.0.1:1", HEXPM.public_key_pem)


def test_public_pem_helper_matches_repo_config(
    hex_repo: ServedHexRepo, hex_key: RSAPrivateKey
) -> None:
    assert hex_repo.repo.public_key_pem == public_pem(hex_key)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_random_bytes_fails_only_with_protobuf_errors(data: bytes) -> None:
    for message in (Signed, Package, Release, Dependency, Names, Versions):
        with contextlib.suppress(ProtobufError):
            message.decode(data)


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=20),
    st.text(max_size=20),
    st.booleans(),
    st.one_of(st.none(), st.text(max_size=10)),
)
def test_dependency_round_trips(
    package: str, requirement: str, optional: bool, app: str | None
) -> None:
    dep = Dependency(package, requirement, optional, app)
    assert Dependency.decode(dep.encode()) == dep
