"""The errors of the Hex fetcher, one tree under :class:`HexError`.

::

    HexError
    ├── ProtobufError        a registry payload that is not valid protobuf for its message
    ├── RegistryError        a registry entry that is unsigned, forged, or for something else
    ├── TarballError         a package tarball that fails its checksum or structure checks
    ├── VersionError         a version or requirement that is not valid Hex syntax
    ├── LockError            a rebar.lock / mix.lock that cannot be read
    └── ResolutionError      no set of versions satisfies every requirement
"""

from __future__ import annotations

from bstore.errors import BstoreError


class HexError(BstoreError):
    """A failure of the Hex fetcher."""


class ProtobufError(HexError):
    """Bytes that do not decode as the expected registry message."""


class RegistryError(HexError):
    """A registry entry that cannot be trusted or used."""


class TarballError(HexError):
    """A package tarball that fails verification."""


class VersionError(HexError):
    """An invalid version or version requirement."""


class LockError(HexError):
    """A lock file that cannot be parsed."""


class ResolutionError(HexError):
    """Dependencies whose requirements cannot all be satisfied."""
