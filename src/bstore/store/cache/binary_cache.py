"""A binary cache on a backend: query verified metadata, fetch paths, push closures.

Receiving one path (:meth:`BinaryCache.fetch`)::

    meta/<digest>.meta → strict parse → store dir / path match → trusted signatures
      → manifest (hash = MCID) → tree staged under tmp/ (local files reused, the rest
      downloaded and hashed) → register_tree(expected_mcid=…): valid only if all agrees

Sending (:meth:`BinaryCache.push`) writes blobs first, then the manifest, a flush, and
the metadata last, so a reader that sees the metadata finds everything it names.

:class:`Substituters` is the ordered list of caches a store substitutes from (lower
``Priority`` first, then configuration order), with a negative-lookup cache and errors
collected instead of raised; :func:`substitute` is the one call the realiser needs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import blake3

from bstore.errors import BstoreError
from bstore.store.archive_meta import PathMeta
from bstore.store.cache.backend import (
    CacheBackend,
    CacheError,
    CacheMissing,
    CachePolicy,
    CacheUnavailable,
    HttpCache,
    open_backend,
)
from bstore.store.cache.format import (
    CACHE_INFO_KEY,
    MAX_META_BYTES,
    CacheFormatError,
    CacheInfo,
    CacheMeta,
    blob_key,
    manifest_key,
    meta_key,
)
from bstore.store.cache.transfer import (
    BlobError,
    FetchStats,
    LocalBlobs,
    compress,
    fetch_manifest,
    run_all,
    stage_tree,
)
from bstore.store.local import LocalStore
from bstore.store.manifest import EntryType, Manifest
from bstore.store.paths import StorePath
from bstore.store.signing import SecretKey, TrustedKeys

_log = logging.getLogger("bstore.cache")


def path_cache_meta(store: LocalStore, sp: StorePath, manifest: Manifest,
                    key: SecretKey | None = None) -> CacheMeta:
    """The cache metadata of the valid path ``sp`` (signed by ``key`` too, if given)."""
    info = store.query_info(sp)
    meta = CacheMeta(PathMeta(
        store_dir=str(store.store_dir), path=sp, kind=info.kind, hash_hex=info.hash_hex,
        mcid=info.mcid, nar_size=info.nar_size, references=info.references,
        deriver=info.deriver, signatures=tuple(sorted(set(info.signatures)))),
        manifest_size=len(manifest.to_bytes()))
    if key is not None:
        meta = meta.with_signatures((key.sign(meta.fingerprint()),))
    return meta


@dataclass
class PushReport:
    """What :meth:`BinaryCache.push` did."""

    paths: list[StorePath] = field(default_factory=list)
    skipped: list[StorePath] = field(default_factory=list)
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0


class BinaryCache:
    """One cache (a backend plus its ``cache-info``)."""

    def __init__(self, backend: CacheBackend, policy: CachePolicy | None = None) -> None:
        self.backend = backend
        self.policy = policy or CachePolicy()
        self._info: CacheInfo | None = None

    @classmethod
    def open(cls, url: str, policy: CachePolicy | None = None, *,
             token: str | None = None) -> BinaryCache:
        """The cache at ``url`` (``file:///dir`` or ``http(s)://…``)."""
        return cls(open_backend(url, policy, token=token), policy)

    @property
    def url(self) -> str:
        """The cache's URL."""
        return self.backend.url

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()

    def info(self) -> CacheInfo:
        """The cache's ``cache-info`` (read once)."""
        if self._info is None:
            where = self.backend.where(CACHE_INFO_KEY)
            self._info = CacheInfo.from_bytes(self.backend.read(CACHE_INFO_KEY, 4096), where)
        return self._info

    def init(self, store_dir: str, priority: int = 50) -> None:
        """Create ``cache-info`` if missing; refuse a cache for another store dir."""
        if self.backend.exists(CACHE_INFO_KEY):
            if self.info().store_dir != store_dir:
                raise CacheError(
                    f"cache {self.url} is for store dir {self.info().store_dir!r}, not"
                    f" {store_dir!r}", hint="use a cache made for this store dir")
            return
        self.backend.put(CACHE_INFO_KEY, CacheInfo(store_dir, priority).to_bytes())
        self._info = CacheInfo(store_dir, priority)

    # -- receiving ----------------------------------------------------------------------

    def query(self, sp: StorePath, store_dir: str, trusted: TrustedKeys) -> CacheMeta:
        """The cache's metadata for ``sp``, parsed and verified (store dir, path,
        signatures); :class:`CacheMissing` if the cache lacks it."""
        if self.info().store_dir != store_dir:
            raise CacheError(f"cache {self.url} is for store dir {self.info().store_dir!r},"
                             f" this store's is {store_dir!r}",
                             hint="paths name their store dir; use a cache for this one")
        key = meta_key(sp)
        where = self.backend.where(key)
        cached = CacheMeta.from_bytes(self.backend.read(key, MAX_META_BYTES), where)
        meta = cached.meta
        if meta.path != sp or meta.store_dir != store_dir:
            raise CacheFormatError(f"{where} describes {meta.full_path}, not"
                                   f" {store_dir}/{sp}",
                                   hint="the cache serves another path's metadata")
        trusted.check(meta.fingerprint(), meta.signatures, f"{meta.full_path} from {where}")
        return cached

    def fetch(self, store: LocalStore, cached: CacheMeta, local: LocalBlobs | None = None,
              progress: Callable[[int, int], None] | None = None) -> FetchStats:
        """Fetch the verified ``cached`` path's tree and register it (references must be
        valid already). Nothing is registered unless every byte matches the signed MCID."""
        meta = cached.meta
        manifest = fetch_manifest(self.backend, meta.mcid, cached.manifest_size)
        if manifest.nar_size != meta.nar_size:
            raise BlobError(f"{meta.full_path}: manifest has {manifest.nar_size} bytes of"
                            f" contents, the metadata says {meta.nar_size}")
        with store.staging_dir("substitute") as stage:
            tree = stage / "tree"
            stats = stage_tree(self.backend, cached, manifest, tree, local,
                               self._workers(), progress)
            sp = store.register_tree(
                tree, meta.path.name, kind=meta.kind, hash_hex=meta.hash_hex,
                references=meta.references, deriver=meta.deriver, expected_mcid=meta.mcid,
                signatures=meta.signatures, manifest=manifest)
        if sp != meta.path:  # pragma: no cover - CacheMeta checks the path's hash
            raise CacheError(f"{meta.full_path} registered as {sp}")
        store.add_temp_root(sp)
        if local is not None:
            local.add(store.real_path(sp), manifest)
        return stats

    # -- sending ------------------------------------------------------------------------

    def push(self, store: LocalStore, paths: Iterable[StorePath], *,
             key: SecretKey | None = None, priority: int = 50,
             progress: Callable[[StorePath], None] | None = None) -> PushReport:
        """Upload ``paths`` and their closure (signed by ``key`` if given); paths whose
        metadata the cache already has are skipped."""
        paths = list(paths)
        for sp in paths:
            store.add_temp_root(sp)
        order = store.closure(paths)
        self.init(str(store.store_dir), priority)
        report = PushReport()
        for sp in order:
            if self.backend.exists(meta_key(sp)):
                report.skipped.append(sp)
                continue
            if progress is not None:
                progress(sp)
            manifest = store.query_manifest(sp)
            meta = path_cache_meta(store, sp, manifest, key)
            self._push_blobs(store, sp, manifest, report)
            data = manifest.to_bytes()
            self.backend.put(manifest_key(meta.meta.mcid), compress(data))
            self.backend.flush()
            self.backend.put(meta_key(sp), meta.to_bytes())
            report.paths.append(sp)
        return report

    def _push_blobs(self, store: LocalStore, sp: StorePath, manifest: Manifest,
                    report: PushReport) -> None:
        root = os.fsencode(store.real_path(sp))
        seen: dict[str, tuple[bytes, EntryType, int]] = {}
        for e in manifest.files():
            if e.blake3_hex is not None and e.blake3_hex not in seen:
                seen[e.blake3_hex] = (root + b"/" + e.path if e.path else root, e.type, e.size)

        def upload(item: tuple[str, tuple[bytes, EntryType, int]]) -> int:
            digest, (path, etype, size) = item
            key = blob_key(digest)
            if self.backend.exists(key):
                return -1
            try:
                if etype is EntryType.SYMLINK:
                    data = os.readlink(path)
                elif size < 1 << 20:
                    # os-level: a BufferedReader per small file costs more than its read
                    # (one read(2) returns a small regular file whole).
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        data = os.read(fd, size + 1)
                    finally:
                        os.close(fd)
                else:
                    with open(path, "rb") as fh:
                        data = fh.read(size + 1)
                # Re-hashed: a damaged store file must not reach the cache under the
                # name of the contents it was supposed to have.
                got = blake3.blake3(data, max_threads=blake3.blake3.AUTO
                                    if len(data) >= 1 << 24 else 1).hexdigest()
            except OSError as exc:
                raise CacheError(f"cannot read {os.fsdecode(path)!r}: {exc.strerror}"
                                 ) from exc
            if got != digest or len(data) != size:
                raise CacheError(
                    f"refusing to upload {os.fsdecode(path)!r}: its contents no longer match"
                    f" the store's record (blake3 {got})",
                    hint="run `bstore store verify --check-contents --repair`")
            blob = compress(data)
            self.backend.put(key, blob)
            return len(blob)

        lock = threading.Lock()

        def one(item: tuple[str, tuple[bytes, EntryType, int]]) -> None:
            sent = upload(item)
            if sent >= 0:
                with lock:
                    report.blobs_uploaded += 1
                    report.bytes_uploaded += sent

        run_all(one, list(seen.items()), self._workers())

    def _workers(self) -> int:
        # A local directory is CPU-bound (zstd, blake3): one thread per core. HTTP waits
        # on the network: the policy's concurrency.
        if isinstance(self.backend, HttpCache):
            return self.policy.parallel
        return min(self.policy.parallel, os.cpu_count() or 1)


# -- substituters -----------------------------------------------------------------------

@dataclass
class SubstituteReport:
    """The outcome of substituting some paths: what came from where, and every error."""

    fetched: list[tuple[StorePath, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    local_files: int = 0
    downloaded_files: int = 0
    downloaded_bytes: int = 0


class Substituters:
    """Ordered caches with fallback, a negative-lookup cache and collected errors.

    Caches are tried by ``Priority`` (lower first), ties in the given order. A cache
    that is unreachable is skipped for ``policy.negative_ttl`` seconds; "cache X lacks
    path P" is remembered as long. Errors never raise out of :meth:`substitute`.
    """

    def __init__(self, urls: Sequence[str], trusted: TrustedKeys, *,
                 policy: CachePolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 caches: Sequence[BinaryCache] | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.policy = policy or CachePolicy()
        self.progress = progress
        self.trusted = trusted
        self._clock = clock
        self._caches: list[BinaryCache] = list(caches or [])
        self._negative: dict[tuple[str, str], float] = {}
        self._down: dict[str, float] = {}
        self.report = SubstituteReport()
        for url in urls:
            try:
                self._caches.append(BinaryCache.open(url, self.policy))
            except BstoreError as exc:
                self._error(f"substituter {url!r}: {exc.message}")

    def close(self) -> None:
        """Release every cache."""
        for cache in self._caches:
            cache.close()

    def _error(self, message: str) -> None:
        _log.warning("%s", message)
        self.report.errors.append(message)

    def _maybe_down(self, cache: BinaryCache, exc: BstoreError) -> None:
        # A cache that timed out or crawled once will likely do it again: skip it for
        # a while instead of making every following path wait for its timeouts.
        if isinstance(exc, CacheUnavailable):
            self._down[cache.url] = self._clock() + self.policy.negative_ttl

    def _ordered(self) -> list[BinaryCache]:
        now = self._clock()
        usable: list[tuple[int, int, BinaryCache]] = []
        for i, cache in enumerate(self._caches):
            if self._down.get(cache.url, 0.0) > now:
                continue
            try:
                usable.append((cache.info().priority, i, cache))
            except BstoreError as exc:
                self._down[cache.url] = now + self.policy.negative_ttl
                self._error(f"substituter {cache.url} is skipped: {exc.message}")
        return [c for _, _, c in sorted(usable, key=lambda t: (t[0], t[1]))]

    def _find(self, store: LocalStore, sp: StorePath
              ) -> Iterator[tuple[BinaryCache, CacheMeta]]:
        """Verified metadata of ``sp`` from each cache in turn (lazily: a later cache is
        only asked when the earlier ones did not deliver)."""
        for cache in self._ordered():
            neg = (cache.url, str(sp))
            if self._negative.get(neg, 0.0) > self._clock():
                continue
            try:
                meta = cache.query(sp, str(store.store_dir), self.trusted)
            except CacheMissing:
                self._negative[neg] = self._clock() + self.policy.negative_ttl
                continue
            except BstoreError as exc:
                self._error(f"{cache.url}: refusing {store.full_path(sp)}: {exc.message}")
                self._maybe_down(cache, exc)
                continue
            yield cache, meta

    def substitute(self, store: LocalStore, sp: StorePath) -> bool:
        """Make ``sp`` and its references valid from the caches; ``False`` when some
        path of the closure is in no cache or no cache gives it intact."""
        local = LocalBlobs(store)
        return self._substitute(store, sp, local, set())

    def _substitute(self, store: LocalStore, sp: StorePath, local: LocalBlobs,
                    visiting: set[StorePath]) -> bool:
        if store.is_valid(sp):
            store.add_temp_root(sp)
            return True
        if sp in visiting:
            self._error(f"reference cycle through {sp}")
            return False
        visiting.add(sp)
        try:
            for cache, meta in self._find(store, sp):
                if not all(self._substitute(store, r, local, visiting)
                           for r in meta.meta.references if r != sp):
                    return False
                if self.progress is not None:
                    self.progress(f"fetching {meta.full_path} from {cache.url}")
                try:
                    stats = cache.fetch(store, meta, local)
                except BstoreError as exc:
                    self._error(f"{cache.url}: cannot substitute {meta.full_path}:"
                                f" {exc.message}")
                    self._maybe_down(cache, exc)
                    continue
                self.report.fetched.append((sp, cache.url))
                self.report.local_files += stats.local_files
                self.report.downloaded_files += stats.downloaded_files
                self.report.downloaded_bytes += stats.downloaded_bytes
                return True
            return False
        finally:
            visiting.discard(sp)


def substitute(store: LocalStore, path: StorePath, substituters: Sequence[str] | Substituters,
               trusted_keys: Sequence[str] | TrustedKeys) -> bool:
    """Fetch, verify and register ``path`` and its reference closure from the first cache
    (by priority) that has each of them intact and signed by a trusted key.

    ``substituters`` are cache URLs (``Config.substituters``) or a :class:`Substituters`
    to reuse its negative cache across calls; ``trusted_keys`` are ``name:base64`` lines
    (``Config.trusted_public_keys``) or a :class:`TrustedKeys`. Returns ``True`` when
    ``path`` is valid afterwards. Never raises for cache trouble: errors are logged and
    kept in ``Substituters.report.errors`` — the caller falls back to building.
    """
    if isinstance(substituters, Substituters):
        return substituters.substitute(store, path)
    trusted = trusted_keys if isinstance(trusted_keys, TrustedKeys) \
        else TrustedKeys.parse(trusted_keys)
    subs = Substituters(substituters, trusted)
    try:
        return subs.substitute(store, path)
    finally:
        subs.close()
