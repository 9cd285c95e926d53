"""The binary cache layout: object keys, ``cache-info`` and signed path metadata (pure).

A cache is a tree of objects (docs: "Binary cache")::

    cache-info                              BstoreCache: 1 / StoreDir: ... / Priority: N
    meta/<digest>.meta                      signed path metadata, one per store path
    manifests/<mcid hex>.manifest.zst       the path's canonical manifest (zstd)
    blobs/<2 hex>/<64 hex>.zst              one file's contents (or link target), zstd,
                                            named by the blake3 of the plain contents
    mcid/<mcid>                             (servers only) a manifest by MCID, for mesh

Every key a cache is asked for is built here from validated values and checked again by
:func:`check_key`, so no hostile name (``../``, absolute, NUL) ever becomes a file path
or URL. Manifests and blobs are content-addressed: a reader re-hashes what it gets.

Path metadata is the export block (:mod:`bstore.store.archive_meta`) plus what a cache
needs, strictly ordered and parsed with line-numbered errors::

    StorePath: <store_dir>/<digest>-<name>
    Kind: <source|output|generation>       unsigned, bound by the digest
    Hash: blake3:<64 hex>                  unsigned, bound by the digest
    MCID: mcid1-manifest-blake3-<64 hex>   signed
    NarSize: <bytes>                       signed
    References: <base name> ...            signed (sorted)
    Deriver: <text>                        optional, unsigned, informational
    Compression: zstd                      unsigned, must be zstd
    ManifestSize: <bytes>                  unsigned, checked against the manifest
    Sig: <name>:<base64>                   zero or more, sorted
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bstore.errors import BstoreError
from bstore.store.layout import StoreError
from bstore.store.manifest import Mcid, validate_mcid
from bstore.store.paths import PathKind, StorePath, make_store_path
from bstore.store.signing import fingerprint

CACHE_VERSION = "1"
CACHE_INFO_KEY = "cache-info"
#: A metadata object bigger than this is hostile (thousands of references fit easily).
MAX_META_BYTES = 1 << 20
#: The canonical manifest of a tree at the path limit with a million entries.
MAX_MANIFEST_BYTES = 256 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIG_RE = re.compile(r"[\x21-\x7e]{1,1024}")
_DERIVER_RE = re.compile(r"[\x21-\x7e]{1,400}")
_KEY_RE = re.compile(
    r"cache-info"
    r"|meta/[0-9a-df-np-sv-z]{32}\.meta"
    r"|manifests/[0-9a-f]{64}\.manifest\.zst"
    r"|mcid/mcid1-manifest-blake3-[0-9a-f]{64}"
    r"|blobs/([0-9a-f]{2})/([0-9a-f]{64})\.zst"
)
_META_KEYS = ("StorePath", "Kind", "Hash", "MCID", "NarSize", "References", "Deriver",
              "Compression", "ManifestSize", "Sig")
_REQUIRED = ("StorePath", "Kind", "Hash", "MCID", "NarSize", "References", "Compression",
             "ManifestSize")


class CacheFormatError(StoreError):
    """A cache object (key, cache-info, metadata) that is malformed or contradicts itself."""


def check_key(key: str) -> str:
    """Return ``key`` if it is one of the layout's object names, else raise."""
    match = _KEY_RE.fullmatch(key)
    if not match or (match.group(1) is not None and match.group(1) != match.group(2)[:2]):
        raise CacheFormatError(
            f"refusing cache object key {key[:100]!r}: not a cache object name",
            hint="keys are cache-info, meta/<digest>.meta, manifests/<hex>.manifest.zst or"
            " blobs/<2 hex>/<64 hex>.zst; nothing else (no '..', no absolute paths)",
        )
    return key


def meta_key(path: StorePath) -> str:
    """Where a store path's metadata lives."""
    return check_key(f"meta/{path.digest}.meta")


def manifest_key(mcid: Mcid) -> str:
    """Where the manifest with content id ``mcid`` lives."""
    return check_key(f"manifests/{validate_mcid(mcid).rpartition('-')[2]}.manifest.zst")


def blob_key(blake3_hex: str) -> str:
    """Where the contents with blake3 ``blake3_hex`` live."""
    return check_key(f"blobs/{blake3_hex[:2]}/{blake3_hex}.zst")


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """The ``cache-info`` object: layout version, store dir, priority (lower is preferred)."""

    store_dir: str
    priority: int = 50

    def __post_init__(self) -> None:
        if not self.store_dir.startswith("/") or "\n" in self.store_dir:
            raise CacheFormatError(f"cache store dir {self.store_dir!r} is not absolute")
        if not 0 <= self.priority <= 10000:
            raise CacheFormatError(f"cache priority {self.priority} is not in 0..10000")

    def to_bytes(self) -> bytes:
        """The canonical text."""
        return (f"BstoreCache: {CACHE_VERSION}\nStoreDir: {self.store_dir}\n"
                f"Priority: {self.priority}\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> CacheInfo:
        """Parse strictly; errors name ``source`` and the line."""
        lines = _lines(data, source, 4096)
        want = ("BstoreCache", "StoreDir", "Priority")
        values: dict[str, str] = {}
        for number, line in enumerate(lines, start=1):
            key, sep, value = line.partition(": ")
            if not sep or key not in want or key in values:
                raise CacheFormatError(f"{source}:{number}: unexpected line {line[:80]!r}",
                                       hint="cache-info has BstoreCache, StoreDir, Priority")
            values[key] = value
        if values.get("BstoreCache") != CACHE_VERSION:
            raise CacheFormatError(
                f"{source}: cache layout version {values.get('BstoreCache')!r} is not"
                f" {CACHE_VERSION!r}", hint="is this a bstore binary cache?")
        priority = values.get("Priority", "")
        if "StoreDir" not in values or not priority.isdigit() or len(priority) > 5:
            raise CacheFormatError(f"{source}: needs StoreDir and a numeric Priority")
        return cls(values["StoreDir"], int(priority))


def _lines(data: bytes, source: str, limit: int) -> list[str]:
    if len(data) > limit:
        raise CacheFormatError(f"{source}: {len(data)} bytes is more than the {limit} allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CacheFormatError(f"{source}: not UTF-8 ({exc})") from exc
    if not text.endswith("\n"):
        raise CacheFormatError(f"{source}: does not end in a newline")
    return text[:-1].split("\n")


@dataclass(frozen=True, slots=True)
class CacheMeta:
    """Signed metadata of one store path in a cache (see the module docstring)."""

    store_dir: str
    path: StorePath
    kind: PathKind
    hash_hex: str
    mcid: Mcid
    nar_size: int
    references: tuple[StorePath, ...]
    manifest_size: int
    deriver: str | None = None
    signatures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        shown = self.full_path
        if not self.store_dir.startswith("/") or self.store_dir.endswith("/") or \
                "\n" in self.store_dir:
            raise CacheFormatError(f"{shown}: store dir {self.store_dir!r} is not absolute")
        validate_mcid(self.mcid)
        if not _HEX64.fullmatch(self.hash_hex):
            raise CacheFormatError(f"{shown}: hash {self.hash_hex!r} is not 64 hex digits")
        if self.nar_size < 0 or not 0 < self.manifest_size <= MAX_MANIFEST_BYTES:
            raise CacheFormatError(f"{shown}: NarSize {self.nar_size} or ManifestSize"
                                   f" {self.manifest_size} is out of range")
        expected = make_store_path(self.kind, self.hash_hex, self.store_dir, self.path.name)
        if expected != self.path:
            raise CacheFormatError(
                f"store path {shown} does not match its {self.kind.value} hash"
                f" {self.hash_hex} (expected {self.store_dir}/{expected})",
                hint="the metadata was altered or produced by a broken store")
        if self.kind is PathKind.SOURCE and self.mcid.rpartition("-")[2] != self.hash_hex:
            raise CacheFormatError(f"source path {shown}: hash {self.hash_hex} is not its"
                                   f" MCID {self.mcid}")
        if list(self.references) != sorted(set(self.references), key=str):
            raise CacheFormatError(f"{shown}: references are not sorted and unique")
        if self.deriver is not None and not _DERIVER_RE.fullmatch(self.deriver):
            raise CacheFormatError(f"{shown}: malformed deriver {self.deriver[:60]!r}")
        for sig in self.signatures:
            if not _SIG_RE.fullmatch(sig):
                raise CacheFormatError(f"{shown}: malformed signature {sig[:60]!r}")
        if list(self.signatures) != sorted(set(self.signatures)):
            raise CacheFormatError(f"{shown}: signatures are not sorted and unique")

    @property
    def full_path(self) -> str:
        """``<store_dir>/<digest>-<name>``."""
        return f"{self.store_dir}/{self.path}"

    def fingerprint(self) -> bytes:
        """What signatures cover (:func:`bstore.store.signing.fingerprint`)."""
        return fingerprint(self.store_dir, self.path, self.mcid, self.nar_size,
                           self.references)

    def with_signatures(self, sigs: tuple[str, ...]) -> CacheMeta:
        """A copy with ``sigs`` merged into the signatures."""
        return CacheMeta(self.store_dir, self.path, self.kind, self.hash_hex, self.mcid,
                         self.nar_size, self.references, self.manifest_size, self.deriver,
                         tuple(sorted(set(self.signatures) | set(sigs))))

    def to_bytes(self) -> bytes:
        """The canonical text block."""
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
        lines.append("Compression: zstd")
        lines.append(f"ManifestSize: {self.manifest_size}")
        lines.extend(f"Sig: {s}" for s in self.signatures)
        return "".join(line + "\n" for line in lines).encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> CacheMeta:
        """Parse a metadata object strictly; errors name ``source`` and the line."""
        fields: dict[str, list[str]] = {}
        order: list[str] = []
        for number, line in enumerate(_lines(data, source, MAX_META_BYTES), start=1):
            key, sep, value = line.partition(": ")
            if not sep and line == "References:":
                key, value = "References", ""
            elif not sep or key not in _META_KEYS:
                raise CacheFormatError(f"{source}:{number}: unknown or malformed line"
                                       f" {line[:80]!r}")
            if key != "Sig" and key in fields:
                raise CacheFormatError(f"{source}:{number}: duplicate key {key!r}")
            if order and _META_KEYS.index(key) < _META_KEYS.index(order[-1]):
                raise CacheFormatError(f"{source}:{number}: key {key!r} is out of order",
                                       hint="keys appear in the documented order")
            order.append(key)
            fields.setdefault(key, []).append(value)
        missing = [k for k in _REQUIRED if k not in fields]
        if missing:
            raise CacheFormatError(f"{source}: metadata lacks {', '.join(missing)}")
        meta = cls._from_fields(fields, source)
        if meta.to_bytes() != data:
            raise CacheFormatError(f"{source}: metadata of {meta.full_path} is not in"
                                   " canonical form", hint="single spaces, sorted lists")
        return meta

    @classmethod
    def _from_fields(cls, fields: dict[str, list[str]], source: str) -> CacheMeta:
        def one(key: str) -> str:
            return fields[key][0]

        def number(key: str) -> int:
            text = one(key)
            if not text.isdigit() or len(text) > 20:
                raise CacheFormatError(f"{source}: {key} {text!r} is not a number")
            return int(text)

        if one("Compression") != "zstd":
            raise CacheFormatError(f"{source}: compression {one('Compression')!r} is not"
                                   " supported", hint="bstore caches use zstd")
        hash_text = one("Hash")
        if not hash_text.startswith("blake3:"):
            raise CacheFormatError(f"{source}: Hash {hash_text!r} is not a blake3 hash")
        try:
            kind = PathKind(one("Kind"))
        except ValueError:
            raise CacheFormatError(f"{source}: unknown path kind {one('Kind')!r}") from None
        store_dir, _, base = one("StorePath").rpartition("/")
        refs = one("References")
        try:
            return cls(
                store_dir=store_dir, path=StorePath.parse(base), kind=kind,
                hash_hex=hash_text.removeprefix("blake3:"), mcid=Mcid(one("MCID")),
                nar_size=number("NarSize"),
                references=tuple(StorePath.parse(r) for r in refs.split(" ")) if refs else (),
                manifest_size=number("ManifestSize"),
                deriver=fields["Deriver"][0] if "Deriver" in fields else None,
                signatures=tuple(fields.get("Sig", ())),
            )
        except CacheFormatError:
            raise
        except BstoreError as exc:
            raise CacheFormatError(f"{source}: {exc.message}", hint=exc.hint) from exc
