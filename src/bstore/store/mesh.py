"""Fetch a tree by content id (MCID) from mesh peers (any ``bstore cache serve``).

A peer answers ``GET /mcid/<mcid>`` with the zstd-compressed canonical manifest and
serves the files as ``/blobs/…``. Nothing from a peer is trusted: the manifest must
hash to the MCID, every file to its manifest entry, and the finished tree is scanned
again when it is registered. A peer that fails (wrong bytes, too slow, unreachable) is
scored down and the next one is tried; peers are tried best score first.

Events: ``bstore.mesh.fetch_start`` (mcid) and ``bstore.mesh.fetch_stop`` (mcid,
result = ``ok`` | ``error``, peer, error).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import blake3

from bstore import events
from bstore.errors import BstoreError
from bstore.store.archive_meta import PathMeta
from bstore.store.cache.backend import CachePolicy, HttpCache
from bstore.store.cache.format import MAX_MANIFEST_BYTES, CacheMeta
from bstore.store.cache.transfer import (
    BlobError,
    FetchStats,
    LocalBlobs,
    decode_capped,
    stage_tree,
)
from bstore.store.local import LocalStore
from bstore.store.manifest import Manifest, Mcid, validate_mcid
from bstore.store.paths import PathKind, StorePath, make_store_path

_log = logging.getLogger("bstore.mesh")


class MeshError(BstoreError):
    """No mesh peer delivered the content of an MCID."""


@dataclass
class PeerScores:
    """How much each peer is trusted to deliver (failures lower it); thread-safe."""

    scores: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ranked(self, peers: Sequence[str]) -> list[str]:
        """``peers`` best first (ties keep the given order)."""
        return sorted(peers, key=lambda p: -self.scores.get(p, 0))

    def good(self, peer: str) -> None:
        """A peer delivered correct content."""
        with self._lock:
            self.scores[peer] = min(self.scores.get(peer, 0) + 1, 10)

    def bad(self, peer: str, penalty: int = 5) -> None:
        """A peer failed or lied."""
        with self._lock:
            self.scores[peer] = self.scores.get(peer, 0) - penalty


#: Scores kept for the life of the process (a daemon learns which peers lie).
DEFAULT_SCORES = PeerScores()


def _manifest_from(peer: HttpCache, mcid: Mcid) -> Manifest:
    """The manifest ``mcid`` names, from ``peer``; its blake3 must be the MCID."""
    key = f"mcid/{mcid}"
    where = peer.where(key)
    # Over the mesh nothing signed says how big the manifest is: the global cap bounds
    # the work and the hash decides.
    data = decode_capped(peer.get(key, MAX_MANIFEST_BYTES), MAX_MANIFEST_BYTES, where)
    got = blake3.blake3(data).hexdigest()
    if got != mcid.rpartition("-")[2]:
        raise BlobError(f"{where}: manifest hashes to {got}, not the requested {mcid}",
                        hint="the peer serves wrong content; it is skipped")
    try:
        return Manifest.from_bytes(data, where)
    except BstoreError as exc:
        raise BlobError(f"{where}: {exc.message}") from exc


def fetch_mcid(store: LocalStore, mcid: str, peers: Sequence[str], *, name: str = "mesh",
               policy: CachePolicy | None = None, scores: PeerScores | None = None,
               ) -> tuple[StorePath, str, FetchStats]:
    """Make the tree with content id ``mcid`` a valid SOURCE path named ``name``,
    fetching from ``peers`` (``http(s)://`` cache servers) as needed.

    Returns (store path, the peer used or ``"local"``, transfer stats). Raises
    :class:`MeshError` listing every peer's failure when none delivered it.
    """
    mcid = validate_mcid(mcid)
    scores = scores or DEFAULT_SCORES
    store_dir = str(store.store_dir)
    sp = make_store_path(PathKind.SOURCE, mcid.rpartition("-")[2], store_dir, name)
    events.emit("bstore.mesh.fetch_start", mcid=mcid)
    if store.is_valid(sp):
        store.add_temp_root(sp)
        events.emit("bstore.mesh.fetch_stop", mcid=mcid, result="ok", peer="local")
        return sp, "local", FetchStats()
    failures: list[str] = []
    local = LocalBlobs(store)
    for url in scores.ranked(list(peers)):
        peer = HttpCache(url, policy)
        try:
            manifest = _manifest_from(peer, mcid)
            meta = CacheMeta(PathMeta(store_dir=store_dir, path=sp, kind=PathKind.SOURCE,
                                      hash_hex=mcid.rpartition("-")[2], mcid=mcid,
                                      nar_size=manifest.nar_size),
                             manifest_size=len(manifest.to_bytes()))
            with store.staging_dir("mesh") as stage:
                tree = stage / "tree"
                stats = stage_tree(peer, meta, manifest, tree, local,
                                   peer.policy.parallel)
                # stage_tree verified every file's blake3 as it wrote it under tmp/.
                got = store.register_tree(tree, name, kind=PathKind.SOURCE,
                                          expected_mcid=mcid, manifest=manifest)
            store.add_temp_root(got)
        except BstoreError as exc:
            scores.bad(url)
            failures.append(f"{url}: {exc.message}")
            _log.warning("mesh peer %s failed for %s: %s", url, mcid, exc.message)
            continue
        finally:
            peer.close()
        scores.good(url)
        events.emit("bstore.mesh.fetch_stop", mcid=mcid, result="ok", peer=url)
        return got, url, stats
    detail = "; ".join(failures) if failures else "no mesh peers configured"
    events.emit("bstore.mesh.fetch_stop", mcid=mcid, result="error", error=detail)
    raise MeshError(f"no mesh peer delivered {mcid}: {detail}",
                    hint="add mesh_peers that have the content, or use another source")
