"""A minimal protobuf wire-format codec for the Hex registry v2 messages.

Only what the registry needs: varints, length-delimited fields and skipping of
fixed32/fixed64 fields; groups (wire types 3 and 4) are refused. Unknown fields are
skipped, as protobuf requires, so newer registries (e.g. security advisories on a
release) still decode. The messages follow the ``hexpm/specifications`` registry schema:

=============  ==============================================================
``Signed``     1 payload (bytes), 2 signature (bytes)
``Package``    1 releases (Release, repeated), 2 name, 3 repository
``Release``    1 version, 2 inner_checksum (bytes), 3 dependencies (repeated),
               4 retired (RetirementStatus), 5 outer_checksum (bytes)
``Retirement`` 1 reason (enum), 2 message
``Dependency`` 1 package, 2 requirement, 3 optional (bool), 4 app, 5 repository
``Names``      1 packages (repeated {1 name}), 2 repository
``Versions``   1 packages (repeated {1 name, 2 versions, 3 retired packed int32}),
               2 repository
=============  ==============================================================

Encoding is deterministic (fields in number order), which the test repository uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from bstore.builders.hex.errors import ProtobufError

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# A varint never needs more than 10 bytes for 64 bits.
_MAX_VARINT_BYTES = 10


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    result = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise ProtobufError(f"{what}: truncated varint at byte {pos}")
        byte = data[pos + i]
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return result, pos + i + 1
    raise ProtobufError(f"{what}: varint longer than 10 bytes at byte {pos}")


def iter_fields(data: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field number, wire type, value)``; value is an int or the field's bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos, what)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufError(f"{what}: field number 0 at byte {pos}")
        if wire == _VARINT:
            value, pos = _read_varint(data, pos, what)
            yield number, wire, value
        elif wire == _LEN:
            length, pos = _read_varint(data, pos, what)
            if pos + length > len(data):
                raise ProtobufError(
                    f"{what}: field {number} claims {length} bytes, only {len(data) - pos} left"
                )
            yield number, wire, data[pos : pos + length]
            pos += length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > len(data):
                raise ProtobufError(f"{what}: truncated fixed field {number}")
            yield number, wire, int.from_bytes(data[pos : pos + size], "little")
            pos += size
        else:
            raise ProtobufError(f"{what}: unsupported wire type {wire} for field {number}")


def _text(value: int | bytes, what: str, field: str) -> str:
    if not isinstance(value, bytes):
        raise ProtobufError(f"{what}: field {field!r} has the wrong wire type")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtobufError(f"{what}: field {field!r} is not valid UTF-8") from exc


def _blob(value: int | bytes, what: str, field: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtobufError(f"{what}: field {field!r} has the wrong wire type")
    return value


def _int(value: int | bytes, what: str, field: str) -> int:
    if not isinstance(value, int):
        raise ProtobufError(f"{what}: field {field!r} has the wrong wire type")
    return value


def _required(value: object, what: str, field: str) -> None:
    if value is None:
        raise ProtobufError(f"{what}: required field {field!r} is missing")


# --- encoding -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # protobuf encodes negative int32/int64 as 10-byte varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _str_field(number: int, text: str) -> bytes:
    return _len_field(number, text.encode("utf-8"))


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | _VARINT) + _varint(value)


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signed:
    """A registry resource: a payload and the repository's signature over it."""

    payload: bytes
    signature: bytes

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        return _len_field(1, self.payload) + _len_field(2, self.signature)

    @classmethod
    def decode(cls, data: bytes) -> Signed:
        """Parse a ``Signed`` message."""
        payload: bytes | None = None
        signature: bytes | None = None
        for number, _, value in iter_fields(data, "Signed"):
            if number == 1:
                payload = _blob(value, "Signed", "payload")
            elif number == 2:
                signature = _blob(value, "Signed", "signature")
        _required(payload, "Signed", "payload")
        _required(signature, "Signed", "signature")
        assert payload is not None and signature is not None
        return cls(payload, signature)


@dataclass(frozen=True, slots=True)
class Dependency:
    """One dependency of a release."""

    package: str
    requirement: str
    optional: bool = False
    app: str | None = None
    repository: str | None = None

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        out = _str_field(1, self.package) + _str_field(2, self.requirement)
        if self.optional:
            out += _int_field(3, 1)
        if self.app is not None:
            out += _str_field(4, self.app)
        if self.repository is not None:
            out += _str_field(5, self.repository)
        return out

    @classmethod
    def decode(cls, data: bytes) -> Dependency:
        """Parse a ``Dependency`` message."""
        w = "Dependency"
        package = requirement = app = repository = None
        optional = False
        for number, _, value in iter_fields(data, w):
            if number == 1:
                package = _text(value, w, "package")
            elif number == 2:
                requirement = _text(value, w, "requirement")
            elif number == 3:
                optional = bool(_int(value, w, "optional"))
            elif number == 4:
                app = _text(value, w, "app")
            elif number == 5:
                repository = _text(value, w, "repository")
        _required(package, w, "package")
        _required(requirement, w, "requirement")
        assert package is not None and requirement is not None
        return cls(package, requirement, optional, app, repository)


@dataclass(frozen=True, slots=True)
class Retirement:
    """Why a release was retired (``reason`` is the raw enum value: new ones may appear)."""

    reason: int
    message: str | None = None

    REASONS = ("other", "invalid", "security", "deprecated", "renamed")

    @property
    def reason_name(self) -> str:
        """The reason as a word (``"security"``), or ``"reason-<n>"`` for unknown values."""
        if 0 <= self.reason < len(self.REASONS):
            return self.REASONS[self.reason]
        return f"reason-{self.reason}"

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        out = _int_field(1, self.reason)
        if self.message is not None:
            out += _str_field(2, self.message)
        return out

    @classmethod
    def decode(cls, data: bytes) -> Retirement:
        """Parse a ``RetirementStatus`` message."""
        reason: int | None = None
        message = None
        for number, _, value in iter_fields(data, "RetirementStatus"):
            if number == 1:
                reason = _int(value, "RetirementStatus", "reason")
            elif number == 2:
                message = _text(value, "RetirementStatus", "message")
        return cls(reason or 0, message)


@dataclass(frozen=True, slots=True)
class Release:
    """One published version of a package."""

    version: str
    inner_checksum: bytes
    dependencies: tuple[Dependency, ...] = ()
    retired: Retirement | None = None
    outer_checksum: bytes | None = None

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        out = _str_field(1, self.version) + _len_field(2, self.inner_checksum)
        for dep in self.dependencies:
            out += _len_field(3, dep.encode())
        if self.retired is not None:
            out += _len_field(4, self.retired.encode())
        if self.outer_checksum is not None:
            out += _len_field(5, self.outer_checksum)
        return out

    @classmethod
    def decode(cls, data: bytes) -> Release:
        """Parse a ``Release`` message."""
        w = "Release"
        version: str | None = None
        inner: bytes | None = None
        outer: bytes | None = None
        retired: Retirement | None = None
        deps: list[Dependency] = []
        for number, _, value in iter_fields(data, w):
            if number == 1:
                version = _text(value, w, "version")
            elif number == 2:
                inner = _blob(value, w, "inner_checksum")
            elif number == 3:
                deps.append(Dependency.decode(_blob(value, w, "dependencies")))
            elif number == 4:
                retired = Retirement.decode(_blob(value, w, "retired"))
            elif number == 5:
                outer = _blob(value, w, "outer_checksum")
        _required(version, w, "version")
        assert version is not None
        return cls(version, inner or b"", tuple(deps), retired, outer)


@dataclass(frozen=True, slots=True)
class Package:
    """The registry entry of one package: every release with its dependencies."""

    name: str
    repository: str
    releases: tuple[Release, ...] = ()

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        out = b"".join(_len_field(1, r.encode()) for r in self.releases)
        return out + _str_field(2, self.name) + _str_field(3, self.repository)

    @classmethod
    def decode(cls, data: bytes) -> Package:
        """Parse a ``Package`` message."""
        w = "Package"
        name: str | None = None
        repository: str | None = None
        releases: list[Release] = []
        for number, _, value in iter_fields(data, w):
            if number == 1:
                releases.append(Release.decode(_blob(value, w, "releases")))
            elif number == 2:
                name = _text(value, w, "name")
            elif number == 3:
                repository = _text(value, w, "repository")
        _required(name, w, "name")
        _required(repository, w, "repository")
        assert name is not None and repository is not None
        return cls(name, repository, tuple(releases))


@dataclass(frozen=True, slots=True)
class Names:
    """The ``/names`` index: every package name of a repository."""

    repository: str
    packages: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        out = b"".join(_len_field(1, _str_field(1, n)) for n in self.packages)
        return out + _str_field(2, self.repository)

    @classmethod
    def decode(cls, data: bytes) -> Names:
        """Parse a ``Names`` message."""
        repository: str | None = None
        names: list[str] = []
        for number, _, value in iter_fields(data, "Names"):
            if number == 1:
                pkg_name: str | None = None
                for sub, _, subvalue in iter_fields(_blob(value, "Names", "packages"), "Names"):
                    if sub == 1:
                        pkg_name = _text(subvalue, "Names", "packages.name")
                _required(pkg_name, "Names", "packages.name")
                assert pkg_name is not None
                names.append(pkg_name)
            elif number == 2:
                repository = _text(value, "Names", "repository")
        _required(repository, "Names", "repository")
        assert repository is not None
        return cls(repository, tuple(names))


@dataclass(frozen=True, slots=True)
class VersionsEntry:
    """One package in the ``/versions`` index."""

    name: str
    versions: tuple[str, ...] = ()
    retired: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Versions:
    """The ``/versions`` index: every package with its version strings."""

    repository: str
    packages: tuple[VersionsEntry, ...] = ()

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        out = b""
        for entry in self.packages:
            body = _str_field(1, entry.name) + b"".join(_str_field(2, v) for v in entry.versions)
            if entry.retired:
                body += _len_field(3, b"".join(_varint(i) for i in entry.retired))
            out += _len_field(1, body)
        return out + _str_field(2, self.repository)

    @classmethod
    def decode(cls, data: bytes) -> Versions:
        """Parse a ``Versions`` message (``retired`` packed or not)."""
        w = "Versions"
        repository: str | None = None
        entries: list[VersionsEntry] = []
        for number, _, value in iter_fields(data, w):
            if number == 1:
                entries.append(_decode_versions_entry(_blob(value, w, "packages")))
            elif number == 2:
                repository = _text(value, w, "repository")
        _required(repository, w, "repository")
        assert repository is not None
        return cls(repository, tuple(entries))


def _decode_versions_entry(data: bytes) -> VersionsEntry:
    w = "VersionsPackage"
    name: str | None = None
    versions: list[str] = []
    retired: list[int] = []
    for number, _, value in iter_fields(data, w):
        if number == 1:
            name = _text(value, w, "name")
        elif number == 2:
            versions.append(_text(value, w, "versions"))
        elif number == 3:
            if isinstance(value, int):
                retired.append(value)
            else:
                pos = 0
                while pos < len(value):
                    index, pos = _read_varint(value, pos, w)
                    retired.append(index)
    _required(name, w, "name")
    assert name is not None
    return VersionsEntry(name, tuple(versions), tuple(retired))
