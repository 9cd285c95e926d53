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

Path metadata is the export block (:mod:`bstore.store.archive_meta`, which validates and
parses it) plus what a cache needs, strictly ordered with line-numbered errors::

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

# MAX_META_BYTES is re-exported: a metadata object bigger than that is hostile.
from bstore.store.archive_meta import MAX_META_BYTES as MAX_META_BYTES
from bstore.store.archive_meta import PathMeta, PathMetaError, decimal
from bstore.store.keyed_block import block_lines
from bstore.store.layout import StoreError
from bstore.store.manifest import Mcid, validate_mcid
from bstore.store.paths import StorePath

CACHE_VERSION = "1"
CACHE_INFO_KEY = "cache-info"
#: The canonical manifest of a tree at the path limit with a million entries.
MAX_MANIFEST_BYTES = 256 << 20
_KEY_RE = re.compile(
    r"cache-info"
    r"|meta/[0-9a-df-np-sv-z]{32}\.meta"
    r"|manifests/[0-9a-f]{64}\.manifest\.zst"
    r"|mcid/mcid1-manifest-blake3-[0-9a-f]{64}"
    r"|blobs/([0-9a-f]{2})/([0-9a-f]{64})\.zst"
)
#: The cache's keys in a path metadata block, after Deriver and before Sig.
_EXTENSION_KEYS = ("Compression", "ManifestSize")


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
        lines = block_lines(data, source, 4096, CacheFormatError)
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


@dataclass(frozen=True, slots=True)
class CacheMeta:
    """Signed metadata of one store path in a cache (see the module docstring).

    The export block (``meta``: the path, its validation, signatures and the line codec
    are :class:`PathMeta`'s) plus the cache's own keys.
    """

    meta: PathMeta
    manifest_size: int

    def __post_init__(self) -> None:
        if not 0 < self.manifest_size <= MAX_MANIFEST_BYTES:
            raise CacheFormatError(f"{self.meta.full_path}: ManifestSize"
                                   f" {self.manifest_size} is out of range")

    @property
    def full_path(self) -> str:
        """``<store_dir>/<digest>-<name>`` (for messages)."""
        return self.meta.full_path

    def fingerprint(self) -> bytes:
        """What signatures cover (:meth:`PathMeta.fingerprint`)."""
        return self.meta.fingerprint()

    def with_signatures(self, sigs: tuple[str, ...]) -> CacheMeta:
        """A copy with ``sigs`` merged into the signatures."""
        return CacheMeta(self.meta.with_signatures(sigs), self.manifest_size)

    def to_bytes(self) -> bytes:
        """The canonical text block."""
        return self.meta.to_bytes(
            (("Compression", "zstd"), ("ManifestSize", str(self.manifest_size))))

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> CacheMeta:
        """Parse a metadata object strictly; errors name ``source`` and the line."""
        try:
            meta, extra = PathMeta.parse(data, source, _EXTENSION_KEYS)
            if extra["Compression"] != "zstd":
                raise CacheFormatError(f"{source}: compression {extra['Compression']!r} is"
                                       " not supported", hint="bstore caches use zstd")
            cache_meta = cls(meta, decimal(extra["ManifestSize"], "ManifestSize", source))
            meta.require_canonical(cache_meta.to_bytes(), data, source)
        except PathMetaError as exc:
            # Callers of the cache see one error class for every malformed cache object.
            raise CacheFormatError(exc.message, hint=exc.hint) from exc
        return cache_meta
