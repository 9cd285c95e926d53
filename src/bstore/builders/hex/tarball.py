"""Hex package tarballs (``/tarballs/<name>-<version>.tar``): verify, then unpack.

The outer tarball is an uncompressed tar of exactly four files:

``VERSION``           ``3`` (the only format accepted)
``CHECKSUM``          upper-case hex SHA-256 of VERSION + metadata.config + contents.tar.gz
``metadata.config``   Erlang terms ``{<<"key">>, Value}.`` (name, version, app, requirements...)
``contents.tar.gz``   the package files

Order of checks, so nothing unverified is ever unpacked: the SHA-256 of the whole
tarball against the registry's ``outer_checksum``; then the outer structure; then the
inner checksum against ``CHECKSUM`` (and the registry's ``inner_checksum``); then the
metadata (its name and version must be the ones asked for); only then is
``contents.tar.gz`` extracted, with :mod:`bstore.builders.safe_tar` and its caps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from bstore.builders.download import DEFAULT_POLICY, DownloadPolicy, fetch_bytes
from bstore.builders.hex.errors import TarballError, VersionError
from bstore.builders.hex.protobuf import Release
from bstore.builders.hex.registry import fetch_package
from bstore.builders.hex.repos import HexRepo, validate_package_name
from bstore.builders.hex.versions import Version
from bstore.builders.safe_tar import ExtractLimits, ExtractReport, UnsafeArchiveError, extract_bytes
from bstore.errors import BstoreError
from bstore.specs.terms import Term, decode_source, parse

#: hex_core's defaults: 16 MiB per tarball, 128 MiB unpacked.
MAX_TARBALL_SIZE = 16 * 1024 * 1024
CONTENTS_LIMITS = ExtractLimits(
    max_members=50_000, max_member_size=128 * 1024 * 1024, max_total_size=128 * 1024 * 1024
)
_PARTS = ("VERSION", "CHECKSUM", "metadata.config", "contents.tar.gz")
# The three small parts are tiny in every real package; cap them before reading.
_SMALL_PART_CAP = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HexTarball:
    """A verified and unpacked package."""

    name: str
    version: str
    outer_checksum: str
    inner_checksum: str
    metadata: dict[str, Term]
    contents: ExtractReport

    @property
    def app(self) -> str:
        """The OTP application name (metadata ``app``, else the package name)."""
        app = self.metadata.get("app")
        return app.decode("utf-8") if isinstance(app, bytes) else self.name


def check_outer_checksum(data: bytes, expected: bytes, *, source: str) -> str:
    """Hex SHA-256 of ``data`` if it equals ``expected`` (the registry's outer checksum)."""
    actual = hashlib.sha256(data).digest()
    if actual != expected:
        raise TarballError(
            f"hex tarball {source!r} has sha256 {actual.hex()}, but the registry says "
            f"{expected.hex()}",
            hint="the tarball was altered or the mirror is stale; it was not unpacked",
        )
    return actual.hex()


def split_outer(data: bytes, *, source: str) -> dict[str, bytes]:
    """The four parts of an outer tarball, refusing anything else in it."""
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name not in _PARTS:
                    raise TarballError(
                        f"hex tarball {source!r} has an unexpected member {member.name!r}"
                    )
                if not member.isreg():
                    raise TarballError(
                        f"hex tarball {source!r}: member {member.name!r} is not a regular file"
                    )
                if member.name in parts:
                    raise TarballError(f"hex tarball {source!r} has {member.name!r} twice")
                if member.name != "contents.tar.gz" and member.size > _SMALL_PART_CAP:
                    raise TarballError(
                        f"hex tarball {source!r}: {member.name!r} is {member.size} bytes"
                    )
                handle = tar.extractfile(member)
                assert handle is not None
                parts[member.name] = handle.read()
    except tarfile.TarError as exc:
        raise TarballError(f"hex tarball {source!r} is not a tar archive: {exc}") from exc
    for required in _PARTS:
        if required not in parts:
            raise TarballError(
                f"hex tarball {source!r} has no {required!r}",
                hint="hex tarballs hold VERSION, CHECKSUM, metadata.config and contents.tar.gz",
            )
    version = parts["VERSION"].strip()
    if version != b"3":
        raise TarballError(
            f"hex tarball {source!r} has format VERSION {version.decode('latin-1')!r}, not '3'",
            hint="only hex tarball format 3 is supported",
        )
    return parts


def check_inner_checksum(parts: dict[str, bytes], expected: bytes | None, *, source: str) -> str:
    """Verify CHECKSUM (and the registry's inner checksum, if given); returns it as hex."""
    digest = hashlib.sha256(
        parts["VERSION"] + parts["metadata.config"] + parts["contents.tar.gz"]
    ).digest()
    declared = parts["CHECKSUM"].strip().decode("latin-1")
    if declared.upper() != digest.hex().upper():
        raise TarballError(
            f"hex tarball {source!r}: CHECKSUM {declared!r} does not match its contents "
            f"({digest.hex().upper()})"
        )
    if expected and expected != digest:
        raise TarballError(
            f"hex tarball {source!r}: inner checksum {digest.hex()} differs from the "
            f"registry's {expected.hex()}"
        )
    return digest.hex()


def parse_metadata(data: bytes, *, source: str) -> dict[str, Term]:
    """``metadata.config`` as a dict of its binary keys (decoded) to their values."""
    label = f"{source}!metadata.config"
    try:
        terms = parse(decode_source(data, label), label)
    except BstoreError as exc:
        raise TarballError(f"hex tarball {source!r}: metadata.config: {exc.message}") from exc
    out: dict[str, Term] = {}
    for term in terms:
        if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[0], bytes)):
            raise TarballError(
                f"hex tarball {source!r}: metadata.config entry {term!r} is not "
                '{<<"key">>, Value}'
            )
        out[term[0].decode("utf-8", "replace")] = term[1]
    return out


def check_metadata(metadata: dict[str, Term], name: str, version: str, *, source: str) -> None:
    """The metadata must describe the package and version that were asked for."""
    for key, want in (("name", name), ("version", version)):
        got = metadata.get(key)
        if got != want.encode("utf-8"):
            raise TarballError(
                f"hex tarball {source!r}: metadata {key} is {got!r}, expected {want!r}",
                hint="the tarball belongs to another package or version",
            )


def unpack_tarball(
    data: bytes,
    dest: Path,
    *,
    name: str,
    version: str,
    outer_checksum: bytes,
    inner_checksum: bytes | None = None,
    source: str,
    limits: ExtractLimits = CONTENTS_LIMITS,
) -> HexTarball:
    """Verify a tarball's bytes (outer checksum first) and unpack its contents into ``dest``.

    ``dest`` must be absent or empty; on failure nothing is left in it.
    """
    outer = check_outer_checksum(data, outer_checksum, source=source)
    parts = split_outer(data, source=source)
    inner = check_inner_checksum(parts, inner_checksum, source=source)
    metadata = parse_metadata(parts["metadata.config"], source=source)
    check_metadata(metadata, name, version, source=source)
    try:
        report = extract_bytes(
            parts["contents.tar.gz"], dest, label=f"{source}!contents.tar.gz", limits=limits
        )
    except UnsafeArchiveError as exc:
        raise TarballError(exc.message, hint=exc.hint) from exc
    return HexTarball(name, version, outer, inner, metadata, report)


def fetch_tarball(
    client: httpx.Client,
    repo: HexRepo,
    name: str,
    release: Release,
    dest: Path,
    *,
    policy: DownloadPolicy = DEFAULT_POLICY,
    limits: ExtractLimits = CONTENTS_LIMITS,
) -> HexTarball:
    """Download ``<name>-<release.version>.tar`` from ``repo`` and unpack it into ``dest``.

    The release must come from a verified registry entry: its ``outer_checksum`` is what
    makes the download trustworthy, so a release without one is refused.
    """
    validate_package_name(name)
    version = str(Version.parse(release.version))
    url = repo.tarball_url(name, version)
    if not release.outer_checksum:
        raise TarballError(
            f"registry entry for {name} {version} in {repo.name!r} has no outer checksum",
            hint="the repository is too old for verified downloads (registry v2 with "
            "outer_checksum is required)",
        )
    capped = dataclasses.replace(policy, max_size=min(policy.max_size, MAX_TARBALL_SIZE))
    data = fetch_bytes(client, url, policy=capped)
    return unpack_tarball(
        data,
        dest,
        name=name,
        version=version,
        outer_checksum=release.outer_checksum,
        inner_checksum=release.inner_checksum or None,
        source=url,
        limits=limits,
    )


def fetch_release(
    client: httpx.Client,
    repo: HexRepo,
    name: str,
    version: str,
    dest: Path,
    *,
    policy: DownloadPolicy = DEFAULT_POLICY,
    limits: ExtractLimits = CONTENTS_LIMITS,
) -> HexTarball:
    """Fetch the signed registry entry of ``name``, then its ``version`` into ``dest``.

    The one call a fetcher needs: registry signature, name and repository checks, then
    the tarball checks of :func:`unpack_tarball`.
    """
    wanted = Version.parse(version)
    package = fetch_package(client, repo, name, policy=policy)
    for release in package.releases:
        try:
            if Version.parse(release.version) == wanted:
                return fetch_tarball(
                    client, repo, name, release, dest, policy=policy, limits=limits
                )
        except VersionError:
            continue
    raise TarballError(
        f"hex package {name!r} has no version {version} in repository {repo.name!r}",
        hint="available: " + ", ".join(r.version for r in package.releases[-10:]),
    )
