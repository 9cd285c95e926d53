"""Ed25519 signing keys and path signatures (Nix's key and signature text forms).

Text forms (docs: "Binary cache")::

    secret key file   <name>:<base64 of 32-byte seed + 32-byte public key>\\n   (mode 0600)
    public key line   <name>:<base64 of the 32-byte public key>
    signature         <name>:<base64 of the 64-byte ed25519 signature>

A path is signed over its *fingerprint*, one ASCII line that names everything a receiver
must not be lied to about::

    1;<full store path>;<mcid>;<nar_size>;<full reference paths, sorted, comma-separated>

The store path's digest already commits to its kind and hash, and the MCID to every
byte of the tree, so the fingerprint covers the whole contents. The deriver is not
signed (as in Nix): it is informational.

A :class:`TrustedKeys` set accepts a path when at least ``threshold`` distinct trusted
keys signed it (``k`` of ``n``; 1 by default).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bstore.errors import BstoreError
from bstore.store.paths import StorePath

__all__ = [
    "FINGERPRINT_VERSION",
    "PublicKey",
    "SecretKey",
    "SignatureError",
    "SigningKeyError",
    "TrustedKeys",
    "fingerprint",
    "generate_key",
    "load_secret_key",
    "write_key_pair",
]

FINGERPRINT_VERSION = "1"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class SigningKeyError(BstoreError):
    """A key file or key line that is malformed or unusable."""


class SignatureError(BstoreError):
    """A path whose signatures do not satisfy the trusted keys."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise SigningKeyError(f"{what}: {text[:20]!r}... is not base64 of {size} bytes")
    return raw


def _split(text: str, what: str) -> tuple[str, str]:
    name, sep, rest = text.strip().partition(":")
    if not sep or not _NAME_RE.fullmatch(name):
        raise SigningKeyError(f"{what} {text.strip()[:40]!r} is not '<name>:<base64>'",
                        hint="key names are letters, digits, '.', '_' and '-'")
    return name, rest


def fingerprint(store_dir: str, path: StorePath, mcid: str, nar_size: int,
                references: Iterable[StorePath]) -> bytes:
    """The documented byte string a path's signature covers (see the module docstring)."""
    refs = ",".join(sorted(f"{store_dir}/{r}" for r in references))
    return f"{FINGERPRINT_VERSION};{store_dir}/{path};{mcid};{nar_size};{refs}".encode()


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A named ed25519 public key (``name:base64``)."""

    name: str
    raw: bytes

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise SigningKeyError(f"key name {self.name!r} is not valid")
        if len(self.raw) != 32:
            raise SigningKeyError(f"public key {self.name!r} is {len(self.raw)} bytes, not 32")

    @classmethod
    def from_text(cls, text: str, what: str = "public key") -> PublicKey:
        """Parse ``name:base64`` (e.g. a ``trusted_public_keys`` entry)."""
        name, rest = _split(text, what)
        return cls(name, _unb64(rest, 32, f"{what} {name!r}"))

    def to_text(self) -> str:
        """``name:base64``."""
        return f"{self.name}:{_b64(self.raw)}"

    def verify(self, data: bytes, signature: str) -> bool:
        """Whether ``signature`` (``name:base64``) is this key's valid signature of ``data``."""
        name, _, sig_b64 = signature.partition(":")
        if name != self.name:
            return False
        # cryptography is imported where used: most commands never check a signature
        # and the import costs a command's start-up ~10 ms.
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            sig = base64.b64decode(sig_b64, validate=True)
            Ed25519PublicKey.from_public_bytes(self.raw).verify(sig, data)
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True, slots=True)
class SecretKey:
    """A named ed25519 secret key. ``repr`` never shows the seed."""

    name: str
    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise SigningKeyError(f"key name {self.name!r} is not valid",
                            hint="use letters, digits, '.', '_' and '-', e.g. cache.example-1")
        if len(self.seed) != 32:
            raise SigningKeyError(
                f"secret key {self.name!r} has a {len(self.seed)}-byte seed, not 32")

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)
        return PublicKey(self.name, raw)

    def sign(self, data: bytes) -> str:
        """The signature of ``data`` as ``name:base64``."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        sig = Ed25519PrivateKey.from_private_bytes(self.seed).sign(data)
        return f"{self.name}:{_b64(sig)}"

    def to_text(self) -> str:
        """``name:base64(seed + public key)`` (the secret key file's contents)."""
        return f"{self.name}:{_b64(self.seed + self.public_key.raw)}"

    @classmethod
    def from_text(cls, text: str, what: str = "secret key") -> SecretKey:
        """Parse a secret key file's contents; the embedded public half must match."""
        name, rest = _split(text, what)
        raw = _unb64(rest, 64, f"{what} {name!r}")
        key = cls(name, raw[:32])
        if key.public_key.raw != raw[32:]:
            raise SigningKeyError(f"{what} {name!r}: the public half does not match the seed",
                            hint="the key file is damaged; generate a new key")
        return key


def generate_key(name: str) -> SecretKey:
    """A fresh random key called ``name``."""
    import secrets  # here: the module is slow to import and only key generation needs it

    return SecretKey(name, secrets.token_bytes(32))


def write_key_pair(key: SecretKey, directory: Path) -> tuple[Path, Path]:
    """Write ``<name>.secret`` (0600) and ``<name>.public`` into ``directory`` atomically;
    refuse to overwrite an existing secret key. Returns (secret path, public path)."""
    secret_path = directory / f"{key.name}.secret"
    public_path = directory / f"{key.name}.public"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if secret_path.exists():
            raise SigningKeyError(f"secret key {str(secret_path)!r} already exists",
                            hint="choose another name or --dir; keys are never overwritten")
        for path, text, mode in ((secret_path, key.to_text(), 0o600),
                                 (public_path, key.public_key.to_text(), 0o644)):
            tmp = path.with_name(f".{path.name}.tmp-{os.urandom(4).hex()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            try:
                os.write(fd, (text + "\n").encode())
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise SigningKeyError(f"cannot write key files in {str(directory)!r}: {exc.strerror}"
                        ) from exc
    return secret_path, public_path


def load_secret_key(path: Path) -> SecretKey:
    """Read a secret key file; refuse one readable by group or others."""
    try:
        st = os.stat(path)
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SigningKeyError(f"cannot read secret key {str(path)!r}: {exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(f"secret key {str(path)!r} is accessible by group or others"
                        f" (mode {stat.S_IMODE(st.st_mode):04o})",
                        hint=f"run: chmod 600 {str(path)!r}")
    return SecretKey.from_text(text, f"secret key {str(path)!r}")


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    """The keys a receiver trusts and how many of them must sign (``threshold``)."""

    keys: tuple[PublicKey, ...] = ()
    threshold: int = 1

    def __post_init__(self) -> None:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise SigningKeyError(f"trusted keys name {sorted(names)} twice",
                            hint="each trusted key needs its own name")
        if self.threshold < 1 or (self.keys and self.threshold > len(self.keys)):
            raise SigningKeyError(f"signature threshold {self.threshold} is not between 1 and the"
                            f" {len(self.keys)} trusted keys")

    @classmethod
    def parse(cls, lines: Iterable[str], threshold: int = 1) -> TrustedKeys:
        """From ``name:base64`` lines (e.g. ``Config.trusted_public_keys``)."""
        return cls(tuple(PublicKey.from_text(line, "trusted public key") for line in lines),
                   threshold)

    def check(self, data: bytes, signatures: Iterable[str], what: str) -> list[str]:
        """The names of trusted keys with a valid signature of ``data``; raise
        :class:`SignatureError` (naming ``what``) when fewer than ``threshold`` signed."""
        sigs = list(signatures)
        by_name = {k.name: k for k in self.keys}
        good: list[str] = []
        bad: list[str] = []
        foreign: list[str] = []
        for sig in sigs:
            name = sig.partition(":")[0]
            key = by_name.get(name)
            if key is None:
                foreign.append(name)
            elif key.verify(data, sig):
                if name not in good:
                    good.append(name)
            else:
                bad.append(name)
        if len(good) >= self.threshold:
            return good
        if not self.keys:
            problem = "no trusted public keys are configured"
        elif not sigs:
            problem = "it has no signature"
        else:
            parts = []
            if bad:
                parts.append(f"signature by {', '.join(sorted(set(bad)))} does not verify")
            if foreign:
                parts.append(f"signed by untrusted key {', '.join(sorted(set(foreign)))}")
            if good:
                parts.append(f"only {len(good)} of {self.threshold} required trusted"
                             f" signatures ({', '.join(good)})")
            problem = "; ".join(parts)
        raise SignatureError(
            f"{what} is not signed by a trusted key: {problem}",
            hint="trust the signer's public key (trusted_public_keys / --trusted-key) or"
            " sign the path with `bstore store sign`",
        )
