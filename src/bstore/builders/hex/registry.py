"""Signed registry entries (``/packages/<name>``) of the Hex repository v2 protocol.

A registry resource is gzip(``Signed{payload, signature}``), the signature being
RSA PKCS#1 v1.5 over the SHA-512 of the payload with the repository's key. A verified
payload is only trusted for what it says about itself: its ``name`` and ``repository``
must be exactly the package and repository that were asked for, or a validly signed
entry for ``other_pkg`` (or from another repository with the same key) could be served
in its place.

:func:`decode_package` is pure (bytes in, :class:`Package` out);
:func:`fetch_package` adds the HTTP GET through an injected ``httpx.Client``.
:func:`encode_signed` is the inverse, used to build test repositories and mirrors.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from collections.abc import Callable, Mapping

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from bstore.builders.download import DEFAULT_POLICY, DownloadPolicy, fetch_bytes
from bstore.builders.hex.errors import ProtobufError, RegistryError
from bstore.builders.hex.protobuf import Package, Signed
from bstore.builders.hex.repos import HexRepo, validate_package_name

#: Largest registry entry accepted, compressed and uncompressed. The biggest hexpm
#: entries (thousands of releases) are a few hundred KiB unpacked.
MAX_REGISTRY_SIZE = 16 * 1024 * 1024


def gunzip_capped(data: bytes, *, cap: int, source: str) -> bytes:
    """Decompress one gzip member, failing once the output would pass ``cap`` bytes."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error as exc:
        raise RegistryError(f"registry entry {source!r} is not valid gzip: {exc}") from exc
    if len(out) > cap or inflater.unconsumed_tail:
        raise RegistryError(f"registry entry {source!r} unpacks to more than {cap} bytes")
    if not inflater.eof:
        raise RegistryError(f"registry entry {source!r} is truncated gzip")
    return out


def verify_signed(data: bytes, repo: HexRepo, *, source: str) -> bytes:
    """The payload of a gzipped ``Signed`` resource, if ``repo``'s key signed it."""
    raw = gunzip_capped(data, cap=MAX_REGISTRY_SIZE, source=source)
    try:
        signed = Signed.decode(raw)
    except ProtobufError as exc:
        raise RegistryError(f"registry entry {source!r} is malformed: {exc.message}") from exc
    try:
        repo.public_key().verify(
            signed.signature, signed.payload, padding.PKCS1v15(), hashes.SHA512()
        )
    except InvalidSignature as exc:
        raise RegistryError(
            f"registry entry {source!r} has a bad signature for hex repository {repo.name!r}",
            hint="the entry was tampered with, or the repository's public key is wrong",
        ) from exc
    return signed.payload


def decode_package(data: bytes, repo: HexRepo, package: str, *, source: str) -> Package:
    """Verify and decode a ``/packages/<package>`` resource fetched from ``repo``."""
    validate_package_name(package)
    payload = verify_signed(data, repo, source=source)
    try:
        entry = Package.decode(payload)
    except ProtobufError as exc:
        raise RegistryError(f"registry entry {source!r} is malformed: {exc.message}") from exc
    if entry.name != package:
        raise RegistryError(
            f"registry entry {source!r} is signed for package {entry.name!r}, not {package!r}",
            hint="the repository served another package's entry; do not trust it",
        )
    if entry.repository != repo.name:
        raise RegistryError(
            f"registry entry {source!r} is signed for repository {entry.repository!r}, "
            f"not {repo.name!r}",
            hint="the entry comes from another repository; check the configured URL and key",
        )
    return entry


def fetch_package(
    client: httpx.Client,
    repo: HexRepo,
    package: str,
    *,
    policy: DownloadPolicy = DEFAULT_POLICY,
) -> Package:
    """GET, verify and decode ``/packages/<package>`` of ``repo``."""
    url = repo.package_url(package)
    capped = dataclasses.replace(policy, max_size=min(policy.max_size, MAX_REGISTRY_SIZE))
    return decode_package(fetch_bytes(client, url, policy=capped), repo, package, source=url)


def package_lookup(
    client: httpx.Client,
    repos: Mapping[str, HexRepo],
    *,
    policy: DownloadPolicy = DEFAULT_POLICY,
) -> Callable[[str, str], Package]:
    """A ``lookup(repository, package)`` for :func:`bstore.builders.hex.resolve.resolve`
    that fetches and verifies each entry once."""
    cache: dict[tuple[str, str], Package] = {}

    def lookup(repository: str, package: str) -> Package:
        key = (repository, package)
        if key not in cache:
            cache[key] = fetch_package(client, repos[repository], package, policy=policy)
        return cache[key]

    return lookup


def encode_signed(payload: bytes, private_key: RSAPrivateKey) -> bytes:
    """gzip(``Signed``) of ``payload`` signed with ``private_key`` (the server side)."""
    signature = private_key.sign(payload, padding.PKCS1v15(), hashes.SHA512())
    return gzip.compress(Signed(payload, signature).encode(), mtime=0)
