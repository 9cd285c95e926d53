"""Configured Hex repositories: a name, a base URL and the public key that signs it.

The default is the public ``hexpm`` repository with its published RSA key (the one
``hex_core`` ships as its default and https://hex.pm/docs/public_keys lists). Any
mirror or private repository is configured with its own name, URL and key. Names
of packages and versions are validated here before they ever become part of a URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from bstore.builders.download import redact
from bstore.builders.hex.errors import RegistryError
from bstore.builders.hex.versions import Version

#: The public key of the hexpm repository (https://hex.pm/docs/public_keys).
HEXPM_PUBLIC_KEY = """\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEApqREcFDt5vV21JVe2QNB
Edvzk6w36aNFhVGWN5toNJRjRJ6m4hIuG4KaXtDWVLjnvct6MYMfqhC79HAGwyF+
IqR6Q6a5bbFSsImgBJwz1oadoVKD6ZNetAuCIK84cjMrEFRkELtEIPNHblCzUkkM
3rS9+DPlnfG8hBvGi6tvQIuZmXGCxF/73hU0/MyGhbmEjIKRtG6b0sJYKelRLTPW
XgK7s5pESgiwf2YC/2MGDXjAJfpfCd0RpLdvd4eRiXtVlE9qO9bND94E7PgQ/xqZ
J1i2xWFndWa6nfFnRxZmCStCOZWYYPlaxr+FZceFbpMwzTNs4g3d4tLNUcbKAIH4
0wIDAQAB
-----END PUBLIC KEY-----
"""

HEXPM_URL = "https://repo.hex.pm"

# Hex package names: a lowercase letter, then letters, digits and underscores.
_PACKAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,127}")
# Repository names: "hexpm", "hexpm:org", mirrors' own names.
_REPO_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}(?::[a-z0-9][a-z0-9_.-]{0,63})?")


def validate_package_name(name: str) -> str:
    """Return ``name`` if it is a valid Hex package name, else raise :class:`RegistryError`."""
    if not isinstance(name, str) or not _PACKAGE_NAME.fullmatch(name):
        raise RegistryError(
            f"invalid hex package name {name!r}",
            hint="hex package names are lowercase letters, digits and '_', starting with a letter",
        )
    return name


def load_public_key(pem: str, *, repo: str) -> RSAPublicKey:
    """Parse an RSA public key in PEM form; raises :class:`RegistryError` naming ``repo``."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError) as exc:
        raise RegistryError(
            f"public key of hex repository {repo!r} is not a valid PEM public key",
            hint="configure the repository's RSA public key as PEM text",
        ) from exc
    if not isinstance(key, RSAPublicKey):
        raise RegistryError(f"public key of hex repository {repo!r} is not an RSA key")
    return key


@dataclass(frozen=True, slots=True)
class HexRepo:
    """One configured repository."""

    name: str
    url: str
    public_key_pem: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _REPO_NAME.fullmatch(self.name):
            raise RegistryError(f"invalid hex repository name {self.name!r}")
        if not self.url.startswith(("http://", "https://")):
            raise RegistryError(
                f"hex repository {self.name!r} has an unsupported URL {redact(self.url)!r}",
                hint="repository URLs start with http:// or https://",
            )
        object.__setattr__(self, "url", self.url.rstrip("/"))
        load_public_key(self.public_key_pem, repo=self.name)

    def public_key(self) -> RSAPublicKey:
        """The repository's signing key."""
        return load_public_key(self.public_key_pem, repo=self.name)

    def package_url(self, package: str) -> str:
        """URL of the signed registry entry ``/packages/<package>``."""
        return f"{self.url}/packages/{validate_package_name(package)}"

    def tarball_url(self, package: str, version: Version | str) -> str:
        """URL of the package tarball ``/tarballs/<package>-<version>.tar``."""
        parsed = version if isinstance(version, Version) else Version.parse(version)
        return f"{self.url}/tarballs/{validate_package_name(package)}-{parsed}.tar"


HEXPM = HexRepo("hexpm", HEXPM_URL, HEXPM_PUBLIC_KEY)


class Repos(Mapping[str, HexRepo]):
    """The repositories a build may use, by name (``hexpm`` unless replaced)."""

    def __init__(self, repos: Iterable[HexRepo] = (), *, include_hexpm: bool = True) -> None:
        self._repos: dict[str, HexRepo] = {"hexpm": HEXPM} if include_hexpm else {}
        for repo in repos:
            self._repos[repo.name] = repo

    def __getitem__(self, name: str) -> HexRepo:
        try:
            return self._repos[name]
        except KeyError:
            raise RegistryError(
                f"hex repository {name!r} is not configured",
                hint=f"configured repositories: {', '.join(sorted(self._repos)) or 'none'}",
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._repos)

    def __len__(self) -> int:
        return len(self._repos)
