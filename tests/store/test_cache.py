"""The signed binary cache through ``file://`` and hostile HTTP servers: host A pushes,
host B substitutes; every lie a cache can tell is caught, nothing is registered, and the
next cache is used."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import blake3
import pytest
import zstandard
from cachehelpers import Hosts, ObjectServer, write_many
from storehelpers import check_consistent, invoke

from bstore.store.cache import (
    BinaryCache,
    CacheFormatError,
    CacheMeta,
    CachePolicy,
    FileCache,
    HttpCache,
    Substituters,
    substitute,
)
from bstore.store.cache.format import blob_key, check_key, meta_key
from bstore.store.cache.transfer import compress
from bstore.store.local import LocalStore
from bstore.store.paths import PathKind, StorePath
from bstore.store.signing import SecretKey, TrustedKeys, generate_key

KEY_A = generate_key("host-a")
EVIL = generate_key("host-a-evil")
TRUSTED = TrustedKeys((KEY_A.public_key,))
FAST = CachePolicy(connect_timeout=2, read_timeout=3, rate_window=1.0, min_rate=2000,
                   negative_ttl=60)


@dataclass
class World:
    """Host A's paths, a good cache, and host B's (shared) root."""

    hosts: Hosts
    lib: StorePath
    app: StorePath
    good: Path
    app_file: bytes  # contents of one file of app


def _build(tmp: Path) -> World:
    lib_tree = write_many(tmp / "lib-src", 40, "lib")
    app_tree = write_many(tmp / "app-src", 25, "app")
    app_file = (app_tree / "d3" / "app3.txt").read_bytes()
    good = tmp / "good-cache"
    holder: dict[str, StorePath] = {}

    def build(st: LocalStore) -> None:
        lib = st.add_path(lib_tree, "lib")
        # An output path that references lib, as a build would register it.
        with st.staging_dir("out") as stage:
            shutil.copytree(app_tree, stage / "out", symlinks=True)
            app = st.register_tree(stage / "out", "app", kind=PathKind.OUTPUT,
                                   hash_hex="7" * 64, references=[lib], deriver="7" * 64)
        cache = BinaryCache.open(f"file://{good}")
        report = cache.push(st, [app], key=KEY_A)
        assert report.paths == [lib, app]
        holder.update(lib=lib, app=app)

    hosts = Hosts.create(tmp, build)
    return World(hosts, holder["lib"], holder["app"], good, app_file)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _build(tmp_path_factory.mktemp("cache-world"))


@pytest.fixture
def b_store(world: World) -> Iterator[LocalStore]:
    world.hosts.reset_b()
    with LocalStore.open(world.hosts.root) as st:
        yield st


def test_push_layout(world: World) -> None:
    names = {str(p.relative_to(world.good)) for p in world.good.rglob("*") if p.is_file()}
    assert "cache-info" in names
    assert f"meta/{world.app.digest}.meta" in names
    assert all(check_key(n) == n for n in names)
    blob = blob_key(blake3.blake3(world.app_file).hexdigest())
    assert zstandard.ZstdDecompressor().decompress((world.good / blob).read_bytes()) == \
        world.app_file
    meta = CacheMeta.from_bytes((world.good / meta_key(world.app)).read_bytes(), "m").meta
    assert meta.references == (world.lib,) and meta.deriver == "7" * 64


def test_substitute_closure_from_file_cache(world: World, b_store: LocalStore) -> None:
    assert substitute(b_store, world.app, [f"file://{world.good}"],
                      [KEY_A.public_key.to_text()])
    assert b_store.is_valid(world.lib) and b_store.is_valid(world.app)
    info = b_store.query_info(world.app)
    assert info.references == (world.lib,) and info.kind is PathKind.OUTPUT
    assert any(s.startswith("host-a:") for s in info.signatures)
    assert (b_store.real_path(world.app) / "d3" / "app3.txt").read_bytes() == world.app_file
    assert os.readlink(b_store.real_path(world.app) / "bin" / "link") == "run"
    check_consistent(b_store)


def test_copy_cli_pulls_and_is_idempotent(world: World, b_store: LocalStore) -> None:
    full = f"{b_store.store_dir}/{world.app}"
    res = invoke(world.hosts.root, "--json", "copy", "--from", f"file://{world.good}", full,
                 "--trusted-key", KEY_A.public_key.to_text())
    assert res.exit_code == 0, res.output
    assert b_store.is_valid(world.app)
    again = invoke(world.hosts.root, "copy", "--from", f"file://{world.good}", full,
                   "--trusted-key", KEY_A.public_key.to_text())
    assert again.exit_code == 0


def test_copy_cli_without_trusted_key_fails_clearly(world: World, b_store: LocalStore,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BSTORE_TRUSTED_PUBLIC_KEYS", raising=False)
    res = invoke(world.hosts.root, "copy", "--from", f"file://{world.good}",
                 f"{b_store.store_dir}/{world.app}")
    assert res.exit_code == 1
    assert "no trusted public keys are configured" in res.output
    assert b_store.valid_paths() == []


# -- hostile caches -------------------------------------------------------------------------

def _meta_path(cache: Path, sp: StorePath) -> Path:
    return cache / meta_key(sp)


def _edit_meta(cache: Path, sp: StorePath, fn: Callable[[str], str]) -> None:
    p = _meta_path(cache, sp)
    p.write_text(fn(p.read_text()))


def _resign(cache: Path, sp: StorePath, key: SecretKey, **changes: object) -> None:
    """Re-sign (after ``changes``) with ``key`` only."""
    p = _meta_path(cache, sp)
    m = CacheMeta.from_bytes(p.read_bytes(), "m")
    m = CacheMeta(replace(m.meta, **changes, signatures=()), m.manifest_size)
    p.write_bytes(m.with_signatures((key.sign(m.fingerprint()),)).to_bytes())


def corrupt_sig(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: re.sub(r"(Sig: host-a:)(.)", lambda m: m.group(1)
                                          + ("B" if m.group(2) == "A" else "A"), t))


def untrusted(w: World, c: Path) -> None:
    _resign(c, w.app, EVIL)


def unsigned(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: "".join(x for x in t.splitlines(True)
                                           if not x.startswith("Sig:")))


def blob_changed(w: World, c: Path) -> None:
    data = bytearray(w.app_file)
    data[5] ^= 0xFF
    (c / blob_key(blake3.blake3(w.app_file).hexdigest())).write_bytes(compress(bytes(data)))
    _resign(c, w.app, KEY_A)


def kind_tampered(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: t.replace("Kind: output", "Kind: source"))


def manifest_size_tampered(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: re.sub(r"ManifestSize: (\d+)",
                                          lambda m: f"ManifestSize: {int(m.group(1)) - 7}", t))


def compression_tampered(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: t.replace("Compression: zstd", "Compression: xz"))


def y_for_x(w: World, c: Path) -> None:
    shutil.copy(_meta_path(c, w.lib), _meta_path(c, w.app))


def refs_dropped(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: re.sub(r"References:.*\n", "References:\n", t))


def zstd_bomb(w: World, c: Path) -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    (c / blob_key(blake3.blake3(w.app_file).hexdigest())).write_bytes(bomb)


def zstd_bomb_no_size(w: World, c: Path) -> None:
    # No declared content size: caught while streaming, one byte past the promise.
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(
        b"\0" * (64 << 20))
    (c / blob_key(blake3.blake3(w.app_file).hexdigest())).write_bytes(bomb)


def traversal_ref(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: re.sub(r"References: \S+", "References: ../../etc/passwd",
                                          t))


def traversal_store_path(w: World, c: Path) -> None:
    _edit_meta(c, w.app, lambda t: re.sub(r"StorePath: \S+", "StorePath: /etc/../../passwd",
                                          t))


HOSTILE = [
    pytest.param(corrupt_sig, "signature by host-a does not verify", id="corrupted-signature"),
    pytest.param(untrusted, "signed by untrusted key host-a-evil", id="untrusted-key"),
    pytest.param(unsigned, "it has no signature", id="no-signature"),
    pytest.param(blob_changed, "hashes to blake3", id="blob-changed-resigned"),
    pytest.param(kind_tampered, "does not match its source hash", id="unsigned-kind"),
    pytest.param(manifest_size_tampered, "manifest promises", id="unsigned-manifest-size"),
    pytest.param(compression_tampered, "compression 'xz' is not supported",
                 id="unsigned-compression"),
    pytest.param(y_for_x, "describes", id="metadata-of-y-for-x"),
    pytest.param(refs_dropped, "signature by host-a does not verify", id="references-dropped"),
    pytest.param(zstd_bomb, "expands to 67108864 bytes, beyond the 300", id="zstd-bomb"),
    pytest.param(zstd_bomb_no_size, "expands beyond the 300 bytes", id="zstd-bomb-unsized"),
    pytest.param(traversal_ref, "is not a store path base name", id="traversal-reference"),
    pytest.param(traversal_store_path, "'passwd' is not a store path base name",
                 id="traversal-store-path"),
]


@pytest.mark.parametrize("tamper, message", HOSTILE)
def test_hostile_file_cache(world: World, b_store: LocalStore, tmp_path: Path,
                            tamper: Callable[[World, Path], None], message: str) -> None:
    bad = tmp_path / "bad-cache"
    shutil.copytree(world.good, bad)
    tamper(world, bad)
    subs = Substituters([f"file://{bad}"], TRUSTED, policy=FAST)
    # The lib is fine in the bad cache; the app is not.
    assert not subs.substitute(b_store, world.app)
    assert not b_store.is_valid(world.app)
    errors = " | ".join(subs.report.errors)
    assert message in errors, errors
    assert str(world.app) in errors
    assert os.listdir(b_store.layout.tmp_dir) == [] or all(
        not (b_store.layout.tmp_dir / n).is_dir() for n in os.listdir(b_store.layout.tmp_dir))
    # Fallback: the same lie first, then a good cache.
    subs = Substituters([f"file://{bad}", f"file://{world.good}"], TRUSTED, policy=FAST)
    assert subs.substitute(b_store, world.app)
    assert (b_store.real_path(world.app) / "d3" / "app3.txt").read_bytes() == world.app_file
    assert message in " | ".join(subs.report.errors)
    check_consistent(b_store)


@pytest.mark.parametrize("key, where", [
    ("../../etc/passwd", "client"), ("/etc/passwd", "client"),
    ("meta/../../../etc/passwd", "client"), ("blobs/aa/../../x.zst", "client"),
    ("blobs/ab/" + "cd" * 32 + ".zst", "client"),  # fan-out dir does not match the hash
    ("meta/" + "e" * 32 + ".meta", "client"),  # 'e' is not in the digest alphabet
])
def test_client_refuses_traversal_keys(tmp_path: Path, key: str, where: str) -> None:
    fc = FileCache(tmp_path)
    hc = HttpCache("http://127.0.0.1:9")  # never contacted: the key is refused first
    try:
        for call in (lambda: fc.get(key, 10), lambda: fc.put(key, b"x"),
                     lambda: hc.get(key, 10), lambda: hc.exists(key)):
            with pytest.raises(CacheFormatError, match="refusing cache object key"):
                call()
    finally:
        hc.close()
    assert not (tmp_path.parent / "x.zst").exists()


@pytest.mark.parametrize("key, behaviour, message", [
    ("meta", "endless", "larger than the"),
    ("blob", "endless", "larger than the"),
    ("meta", "drip", "too slow"),
])
def test_hostile_http_cache_falls_back(world: World, b_store: LocalStore, key: str,
                                       behaviour: str, message: str) -> None:
    target = meta_key(world.app) if key == "meta" else \
        blob_key(blake3.blake3(world.app_file).hexdigest())
    with ObjectServer(world.good) as srv:
        srv.behaviours[target] = behaviour
        subs = Substituters([srv.url], TRUSTED, policy=FAST)
        try:
            assert not subs.substitute(b_store, world.app)
            assert not b_store.is_valid(world.app)
            assert message in " | ".join(subs.report.errors), subs.report.errors
        finally:
            subs.close()
        subs = Substituters([srv.url, f"file://{world.good}"], TRUSTED, policy=FAST)
        try:
            assert subs.substitute(b_store, world.app)
        finally:
            subs.close()
    check_consistent(b_store)


def test_priority_and_negative_cache(world: World, b_store: LocalStore, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    BinaryCache.open(f"file://{empty}").init(str(b_store.store_dir), priority=10)
    subs = Substituters([f"file://{world.good}", f"file://{empty}"], TRUSTED, policy=FAST)
    # The empty cache has the better priority: asked first, misses, remembered.
    assert [c.url for c in subs._ordered()] == [f"file://{empty}", f"file://{world.good}"]
    assert subs.substitute(b_store, world.app)
    assert (f"file://{empty}", str(world.app)) in subs._negative
    assert subs.report.fetched[-1] == (world.app, f"file://{world.good}")


def test_unreachable_cache_is_reported_not_fatal(world: World, b_store: LocalStore) -> None:
    subs = Substituters(["http://127.0.0.1:9", "ftp://nope", f"file://{world.good}"], TRUSTED,
                        policy=FAST)
    assert subs.substitute(b_store, world.app)
    errors = " | ".join(subs.report.errors)
    assert "unsupported cache URL 'ftp://nope'" in errors
    assert "http://127.0.0.1:9 is skipped" in errors


def test_missing_path_returns_false(world: World, b_store: LocalStore) -> None:
    other = StorePath.parse("3" * 32 + "-nothing")
    assert not substitute(b_store, other, [f"file://{world.good}"], TRUSTED)
    assert b_store.valid_paths() == []


def test_cache_for_another_store_dir_is_refused(world: World, tmp_path: Path) -> None:
    with LocalStore.open(tmp_path / "elsewhere") as st:
        subs = Substituters([f"file://{world.good}"], TRUSTED)
        assert not subs.substitute(st, world.app)
        assert "is for store dir" in " | ".join(subs.report.errors)


def test_stalled_cache_is_skipped_for_later_paths(world: World, b_store: LocalStore) -> None:
    with ObjectServer(world.good) as srv:
        srv.behaviours[meta_key(world.app)] = "drip"
        subs = Substituters([srv.url, f"file://{world.good}"], TRUSTED, policy=FAST)
        try:
            assert subs.substitute(b_store, world.app)
            other = StorePath.parse("3" * 32 + "-nothing")
            before = srv.sent
            assert not subs.substitute(b_store, other)
            assert srv.sent == before  # the slow cache was not asked again
            assert [c.url for c in subs._ordered()] == [f"file://{world.good}"]
        finally:
            subs.close()
