"""Store path values: pure, no I/O.

A store path is ``<store_dir>/<digest>-<name>``. The digest is 32 characters of Nix's
base32 alphabet over the first 160 bits of a blake3 hash of a domain-separated
fingerprint ``"<kind>:blake3:<hex>:<store_dir>:<name>"`` (DESIGN.md, "Identities").
Domain separation by kind and store dir means the same content added as a source and
produced as a build output never collide, and a path is only meaningful in its store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NewType

import blake3

from bstore.errors import BstoreError

#: Nix's base32 alphabet: digits and lowercase letters without e, o, u, t
#: (chosen by Nix to avoid accidental words; we keep it so paths look familiar).
NIX_BASE32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_BASE32_INDEX = {c: i for i, c in enumerate(NIX_BASE32_ALPHABET)}
#: One regex match instead of a per-character loop: every path read back from the
#: database (GC, closures, listings) is parsed through this.
_DIGEST_RE = re.compile(f"[{NIX_BASE32_ALPHABET}]{{32}}")

#: 160 bits → 32 base32 characters.
DIGEST_BYTES = 20
DIGEST_CHARS = 32
#: Same limit as Nix: keeps ``<digest>-<name>`` under common 255-byte filename limits.
MAX_NAME_LENGTH = 211

_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")

Digest = NewType("Digest", str)


class InvalidStorePath(BstoreError):
    """A store path, digest or name that is not valid."""


class PathKind(StrEnum):
    """What a store path's digest was computed over."""

    SOURCE = "source"  # fixed output: the MCID of the content
    OUTPUT = "output"  # the derivation hash
    GENERATION = "generation"  # a generation's manifest


def nix_base32_encode(data: bytes) -> str:
    """Encode bytes in Nix's base32 (least significant 5-bit group last, like Nix)."""
    length = (len(data) * 8 - 1) // 5 + 1
    chars = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        chars.append(NIX_BASE32_ALPHABET[c & 0x1F])
    return "".join(chars)


def nix_base32_decode(text: str) -> bytes:
    """Decode Nix base32; raises :class:`InvalidStorePath` on a bad character or length."""
    size = len(text) * 5 // 8
    if nix_base32_encode(bytes(size)).__len__() != len(text):
        raise InvalidStorePath(f"base32 string {text!r} has an impossible length {len(text)}")
    out = bytearray(size)
    for n, ch in enumerate(reversed(text)):
        digit = _BASE32_INDEX.get(ch)
        if digit is None:
            raise InvalidStorePath(f"invalid base32 character {ch!r} in {text!r}")
        bit = n * 5
        i, j = divmod(bit, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < size:
            out[i + 1] |= carry
        elif carry:
            raise InvalidStorePath(f"base32 string {text!r} does not decode to {size} bytes")
    return bytes(out)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid store path name, else raise with the reason."""
    if not name:
        raise InvalidStorePath("store path name is empty", hint="give the path a name")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidStorePath(
            f"store path name {name[:40]!r}... is {len(name)} characters long,"
            f" more than {MAX_NAME_LENGTH}",
            hint="use a shorter --name",
        )
    if name.startswith("."):
        raise InvalidStorePath(
            f"store path name {name!r} starts with '.'",
            hint="names may not start with a dot",
        )
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise InvalidStorePath(
            f"store path name {name!r} contains {bad!r}",
            hint="names may contain only letters, digits and + - . _ ? =",
        )
    return name


def validate_digest(digest: str) -> Digest:
    """Return ``digest`` as a :data:`Digest` if it is 32 Nix-base32 characters."""
    if len(digest) != DIGEST_CHARS or not _DIGEST_RE.fullmatch(digest):
        raise InvalidStorePath(f"{digest!r} is not a 32-character Nix base32 digest")
    return Digest(digest)


@dataclass(frozen=True, slots=True)
class StorePath:
    """The base name ``<digest>-<name>`` of a store path, independent of any store dir."""

    digest: Digest
    name: str

    def __post_init__(self) -> None:
        validate_digest(self.digest)
        validate_name(self.name)

    def __str__(self) -> str:
        return f"{self.digest}-{self.name}"

    @classmethod
    def parse(cls, base_name: str) -> StorePath:
        """Parse ``<digest>-<name>`` (a bare base name, no directory)."""
        if "/" in base_name:
            raise InvalidStorePath(f"{base_name!r} is not a store path base name (contains '/')")
        if len(base_name) < DIGEST_CHARS + 2 or base_name[DIGEST_CHARS] != "-":
            raise InvalidStorePath(
                f"{base_name!r} is not a store path base name",
                hint="expected <32-character digest>-<name>",
            )
        return cls(Digest(base_name[:DIGEST_CHARS]), base_name[DIGEST_CHARS + 1 :])


def fingerprint(kind: PathKind, hash_hex: str, store_dir: str, name: str) -> str:
    """The domain-separated string whose blake3 gives a store path digest."""
    return f"{kind.value}:blake3:{hash_hex}:{store_dir}:{name}"


def make_store_path(kind: PathKind, hash_hex: str, store_dir: str, name: str) -> StorePath:
    """Compute the store path for content (or a derivation) with blake3 hex ``hash_hex``."""
    validate_name(name)
    if not re.fullmatch(r"[0-9a-f]{64}", hash_hex):
        raise InvalidStorePath(f"{hash_hex!r} is not a 64-character lowercase blake3 hex digest")
    full = blake3.blake3(fingerprint(kind, hash_hex, store_dir, name).encode()).digest()
    return StorePath(Digest(nix_base32_encode(full[:DIGEST_BYTES])), name)
