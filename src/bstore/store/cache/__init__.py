"""Signed binary caches: layout, backends, fetch/push, substitution.

Public API (see docs in each module)::

    BinaryCache.open(url).push(store, paths, key=...)        upload closures
    BinaryCache.open(url).query(path, store_dir, trusted)    verified metadata
    substitute(store, path, substituters, trusted_keys)      fetch + verify + register
"""

from bstore.store.cache.backend import (
    CacheAuthError,
    CacheBackend,
    CacheError,
    CacheMissing,
    CachePolicy,
    CacheTooLarge,
    CacheUnavailable,
    FileCache,
    HttpCache,
    open_backend,
)
from bstore.store.cache.binary_cache import (
    BinaryCache,
    PushReport,
    SubstituteReport,
    Substituters,
    path_cache_meta,
    substitute,
)
from bstore.store.cache.format import CacheFormatError, CacheInfo, CacheMeta
from bstore.store.cache.transfer import BlobError, FetchStats, LocalBlobs

__all__ = [
    "BinaryCache", "BlobError", "CacheAuthError", "CacheBackend", "CacheError",
    "CacheFormatError", "CacheInfo", "CacheMeta", "CacheMissing", "CachePolicy",
    "CacheTooLarge", "CacheUnavailable", "FetchStats", "FileCache", "HttpCache", "LocalBlobs",
    "PushReport", "SubstituteReport", "Substituters", "open_backend", "path_cache_meta",
    "substitute",
]
