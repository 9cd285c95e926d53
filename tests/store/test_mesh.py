"""Mesh fetch by MCID: a real cache server as the good peer, hostile peers that lie."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from cachehelpers import ObjectServer, write_many
from storehelpers import check_consistent, invoke

from bstore import events
from bstore.store.cache.format import blob_key
from bstore.store.cache.server import ServeOptions, StoreCacheServer
from bstore.store.cache.transfer import compress
from bstore.store.local import LocalStore
from bstore.store.manifest import MANIFEST_HEADER, scan_tree
from bstore.store.mesh import MeshError, PeerScores, fetch_mcid


@dataclass
class Peer:
    url: str
    mcid: str
    tree: Path
    manifest: bytes
    one_file: bytes


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    tmp = tmp_path_factory.mktemp("mesh-peer")
    tree = write_many(tmp / "tree", 30, "mesh")
    with LocalStore.open(tmp / "peer-root") as st:
        sp = st.add_path(tree, "shared")
        mcid = st.query_info(sp).mcid
        manifest = st.query_manifest(sp).to_bytes()
    server = StoreCacheServer(tmp / "peer-root", ServeOptions())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Peer(server.url, mcid, tree, manifest, (tree / "d2" / "mesh2.txt").read_bytes())
    finally:
        server.shutdown()
        thread.join(10)


def _liar(tmp: Path, p: Peer, *, manifest: bytes | None = None, wrong_blob: bool = False
          ) -> Path:
    """A directory an ObjectServer serves as a peer that lies."""
    d = tmp / "liar"
    (d / "mcid").mkdir(parents=True)
    (d / "mcid" / p.mcid).write_bytes(compress(manifest if manifest is not None
                                               else p.manifest))
    if wrong_blob:
        # Every blob right but one, so the lie is what fails (not a missing file).
        for e in scan_tree(p.tree).files():
            assert e.blake3_hex is not None
            src = p.tree / os.fsdecode(e.path)
            data = os.readlink(src).encode() if src.is_symlink() else src.read_bytes()
            (d / blob_key(e.blake3_hex)).parent.mkdir(parents=True, exist_ok=True)
            (d / blob_key(e.blake3_hex)).write_bytes(compress(data))
        key = blob_key(blake3.blake3(p.one_file).hexdigest())
        (d / key).write_bytes(compress(b"X" * len(p.one_file)))
    return d


def test_fetch_from_good_peer_with_events(peer: Peer, store: LocalStore) -> None:
    seen: list[events.Event] = []
    handle = events.attach("bstore.mesh", seen.append)
    try:
        sp, used, stats = fetch_mcid(store, peer.mcid, [peer.url], name="shared")
    finally:
        events.detach(handle)
    assert used == peer.url and stats.downloaded_files > 0
    assert store.query_info(sp).mcid == peer.mcid
    assert (store.real_path(sp) / "d2" / "mesh2.txt").read_bytes() == peer.one_file
    assert [e.name for e in seen] == ["bstore.mesh.fetch_start", "bstore.mesh.fetch_stop"]
    assert seen[1].metadata["result"] == "ok" and seen[1].metadata["mcid"] == peer.mcid
    check_consistent(store)


@pytest.mark.parametrize("kind, message", [
    ("wrong-blob", "hashes to blake3"),
    ("wrong-manifest", "manifest hashes to"),
    ("missing", "does not exist (HTTP 404)"),
])
def test_lying_peer_is_skipped_and_scored_down(peer: Peer, store: LocalStore, tmp_path: Path,
                                               kind: str, message: str) -> None:
    if kind == "wrong-blob":
        d = _liar(tmp_path, peer, wrong_blob=True)
    elif kind == "wrong-manifest":
        d = _liar(tmp_path, peer, manifest=peer.manifest.replace(b"mesh", b"hsem", 1))
    else:
        d = tmp_path / "empty"
        d.mkdir()
    scores = PeerScores()
    with ObjectServer(d) as liar:
        with pytest.raises(MeshError, match=re.escape(message)) as err:
            fetch_mcid(store, peer.mcid, [liar.url], scores=scores)
        assert liar.url in err.value.message
        assert store.valid_paths() == []
        sp, used, _ = fetch_mcid(store, peer.mcid, [liar.url, peer.url], scores=scores)
    assert used == peer.url
    assert scores.scores[liar.url] < 0 < scores.scores[peer.url]
    assert scores.ranked([liar.url, peer.url]) == [peer.url, liar.url]
    assert store.query_info(sp).mcid == peer.mcid


def test_hostile_manifest_with_traversal_is_refused(store: LocalStore, tmp_path: Path) -> None:
    evil = MANIFEST_HEADER + b"d 0 - 0:\n" + b"f 4 " + b"a" * 64 + b" 11:../../etc/x\n"
    mcid = "mcid1-manifest-blake3-" + blake3.blake3(evil).hexdigest()
    d = tmp_path / "evil"
    (d / "mcid").mkdir(parents=True)
    (d / "mcid" / mcid).write_bytes(compress(evil))
    with ObjectServer(d) as srv, pytest.raises(MeshError, match=r"'\.\.' component"):
        fetch_mcid(store, mcid, [srv.url])
    assert not (tmp_path.parent / "etc").exists()
    assert store.valid_paths() == []


def test_no_peers(store: LocalStore, peer: Peer) -> None:
    seen: list[events.Event] = []
    handle = events.attach("bstore.mesh.fetch_stop", seen.append)
    try:
        with pytest.raises(MeshError, match="no mesh peers configured"):
            fetch_mcid(store, peer.mcid, [])
    finally:
        events.detach(handle)
    assert seen[0].metadata["result"] == "error"


def test_cli_mesh_fetch(peer: Peer, store_root: Path) -> None:
    res = invoke(store_root, "--json", "mesh", "fetch", peer.mcid, "--peer", peer.url,
                 "--name", "shared")
    assert res.exit_code == 0, res.output
    assert '"peer": "' + peer.url in res.output
    bad = invoke(store_root, "mesh", "fetch", "mcid1-nope", "--peer", peer.url)
    assert bad.exit_code == 1 and "is not a content id" in bad.output
