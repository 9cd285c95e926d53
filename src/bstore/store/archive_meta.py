"""The metadata of one store path as it travels between stores: a pure value and codec.

An export stream carries one such block per path, and the binary cache publishes the
same block, with its own keys before the signatures (:mod:`bstore.store.cache.format`),
next to its blobs, so the codec lives here on its own. The
canonical text form is (docs/formats.md, "Path metadata")::

    StorePath: <store_dir>/<digest>-<name>
    Kind: <source|output|generation>
    Hash: blake3:<64 hex>              what the digest is computed over
    MCID: mcid1-manifest-blake3-<64 hex>
    NarSize: <decimal bytes of contents and link targets>
    References: <base name> ...        sorted, space separated, may be empty
    Deriver: <text>                    opaque, only when there is one
    Sig: <signature>                   zero or more, sorted

Every line ends in ``\\n``; keys appear exactly once and in this order. Decoding is
strict: the block must re-encode to the same bytes, so one path has one encoding and
streams built from it are deterministic. Registration time is local to a store and is
deliberately not part of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bstore.errors import BstoreError
from bstore.store.keyed_block import parse_keyed_lines, render_lines
from bstore.store.layout import StoreError
from bstore.store.manifest import Mcid, validate_mcid
from bstore.store.paths import PathKind, StorePath, make_store_path
from bstore.store.signing import fingerprint

#: Opaque text on one line (a derivation hash, a store path...): no spaces or newlines.
_DERIVER_RE = re.compile(r"[\x21-\x7e]{1,400}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
#: Signatures are opaque here (``<key name>:<base64>`` once signing exists); they only
#: must fit on one line of the block.
_SIG_RE = re.compile(r"[\x21-\x7e]{1,1024}")
#: A block bigger than this is hostile: even thousands of references fit easily.
MAX_META_BYTES = 1 << 20
#: Default cap on the uncompressed size of a stream we import (here, not in archive.py,
#: so the CLI can show it without importing the archive machinery at start-up).
DEFAULT_MAX_BYTES = 64 << 30
#: The keys before any a wrapper adds (the binary cache's), which go between these and Sig.
_KEYS = ("StorePath", "Kind", "Hash", "MCID", "NarSize", "References", "Deriver")
_REQUIRED = _KEYS[:6]


class PathMetaError(StoreError):
    """Path metadata that is malformed or contradicts itself."""


@dataclass(frozen=True, slots=True)
class PathMeta:
    """Everything a store needs to register one path besides its contents.

    ``hash_hex`` is the blake3 the store path digest was computed over (the MCID's hex
    for ``source`` paths, the derivation hash for ``output`` paths), so the receiver can
    recompute the store path instead of trusting it.
    """

    store_dir: str
    path: StorePath
    kind: PathKind
    hash_hex: str
    mcid: Mcid
    nar_size: int
    references: tuple[StorePath, ...] = ()
    #: Opaque: what produced the path (the realiser records its derivation hash).
    deriver: str | None = None
    signatures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        shown = self.full_path
        if not self.store_dir.startswith("/") or "\n" in self.store_dir or \
                self.store_dir.endswith("/"):
            raise PathMetaError(f"{shown}: store dir {self.store_dir!r} is not an absolute path")
        validate_mcid(self.mcid)
        if not _HEX64_RE.fullmatch(self.hash_hex):
            raise PathMetaError(f"{shown}: hash {self.hash_hex!r} is not 64 lowercase hex digits")
        if self.nar_size < 0:
            raise PathMetaError(f"{shown}: negative NarSize {self.nar_size}")
        if self.deriver is not None and not _DERIVER_RE.fullmatch(self.deriver):
            raise PathMetaError(f"{shown}: deriver {self.deriver[:80]!r} is not a derivation id")
        expected = make_store_path(self.kind, self.hash_hex, self.store_dir, self.path.name)
        if expected != self.path:
            raise PathMetaError(
                f"store path {shown} does not match its {self.kind.value} hash"
                f" {self.hash_hex} (expected {self.store_dir}/{expected})",
                hint="the metadata was altered or produced by a broken store",
            )
        if self.kind is PathKind.SOURCE and self.mcid.rpartition("-")[2] != self.hash_hex:
            raise PathMetaError(
                f"source path {shown}: hash {self.hash_hex} is not its MCID {self.mcid}",
                hint="a source path is named by its content; the metadata was altered",
            )
        if list(self.references) != sorted(set(self.references), key=str):
            raise PathMetaError(f"{shown}: references are not sorted and unique")
        for sig in self.signatures:
            if not _SIG_RE.fullmatch(sig):
                raise PathMetaError(f"{shown}: malformed signature {sig[:60]!r}")
        if list(self.signatures) != sorted(set(self.signatures)):
            raise PathMetaError(f"{shown}: signatures are not sorted and unique")

    @property
    def full_path(self) -> str:
        """``<store_dir>/<digest>-<name>``."""
        return f"{self.store_dir}/{self.path}"

    def fingerprint(self) -> bytes:
        """What signatures cover (:func:`bstore.store.signing.fingerprint`)."""
        return fingerprint(self.store_dir, self.path, self.mcid, self.nar_size,
                           self.references)

    def with_signatures(self, sigs: tuple[str, ...]) -> PathMeta:
        """A copy with ``sigs`` merged into the signatures."""
        return replace(self, signatures=tuple(sorted(set(self.signatures) | set(sigs))))

    def to_bytes(self, extensions: Sequence[tuple[str, str]] = ()) -> bytes:
        """The canonical text block (see the module docstring).

        ``extensions`` are ``(key, value)`` lines a wrapper adds (the binary cache's
        ``Compression`` and ``ManifestSize``); they stand after Deriver, before Sig.
        """
        lines = [
            f"StorePath: {self.full_path}",
            f"Kind: {self.kind.value}",
            f"Hash: blake3:{self.hash_hex}",
            f"MCID: {self.mcid}",
            f"NarSize: {self.nar_size}",
            "References:" + "".join(f" {r}" for r in self.references),
        ]
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver}")
        lines.extend(f"{key}: {value}" for key, value in extensions)
        lines.extend(f"Sig: {s}" for s in self.signatures)
        return render_lines(lines)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "path metadata") -> PathMeta:
        """Parse a canonical block strictly; errors name ``source`` and the line."""
        meta, _ = cls.parse(data, source)
        meta.require_canonical(meta.to_bytes(), data, source)
        return meta

    @classmethod
    def parse(cls, data: bytes, source: str,
              extensions: Sequence[str] = ()) -> tuple[PathMeta, dict[str, str]]:
        """Parse a block that also carries the required keys ``extensions`` (in order).

        Returns the metadata and the extensions' raw values. The caller interprets
        those and then checks the whole block with :meth:`require_canonical`.
        """
        keys = _KEYS + tuple(extensions) + ("Sig",)
        fields = parse_keyed_lines(data, source, keys, limit=MAX_META_BYTES,
                                   error=PathMetaError, repeated=("Sig",),
                                   bare=("References",))
        missing = [k for k in _REQUIRED + tuple(extensions) if k not in fields]
        if missing:
            raise PathMetaError(f"{source}: metadata lacks {', '.join(missing)}")
        return cls._from_fields(fields, source), {k: fields[k][0] for k in extensions}

    def require_canonical(self, encoded: bytes, data: bytes, source: str) -> None:
        """Raise unless ``data`` (read from ``source``) is the canonical ``encoded``."""
        if encoded != data:
            raise PathMetaError(
                f"{source}: metadata of {self.full_path} is not in canonical form",
                hint="keys must appear once, in the documented order, with single spaces",
            )

    @classmethod
    def _from_fields(cls, fields: dict[str, list[str]], source: str) -> PathMeta:
        def one(key: str) -> str:
            return fields[key][0]

        store_dir, _, base = one("StorePath").rpartition("/")
        hash_text = one("Hash")
        if not hash_text.startswith("blake3:"):
            raise PathMetaError(f"{source}: Hash {hash_text!r} is not a blake3 hash")
        try:
            kind = PathKind(one("Kind"))
        except ValueError:
            raise PathMetaError(
                f"{source}: unknown path kind {one('Kind')!r}",
                hint="kinds are " + ", ".join(k.value for k in PathKind),
            ) from None
        refs = one("References")
        deriver = fields.get("Deriver", [""])[0]
        try:
            return cls(
                store_dir=store_dir,
                path=StorePath.parse(base),
                kind=kind,
                hash_hex=hash_text.removeprefix("blake3:"),
                mcid=Mcid(one("MCID")),
                nar_size=decimal(one("NarSize"), "NarSize", source),
                references=tuple(StorePath.parse(r) for r in refs.split(" ")) if refs else (),
                deriver=deriver or None,
                signatures=tuple(fields.get("Sig", ())),
            )
        except PathMetaError:
            raise
        except BstoreError as exc:
            raise PathMetaError(f"{source}: {exc.message}", hint=exc.hint) from exc


def decimal(text: str, key: str, source: str) -> int:
    """The size ``text`` of ``key`` as a number (at most 20 digits), else PathMetaError."""
    if not text.isdigit() or len(text) > 20:
        raise PathMetaError(f"{source}: {key} {text!r} is not a number")
    return int(text)
