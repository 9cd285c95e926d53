"""Two hosts over real HTTP on 127.0.0.1: host A serves its store with ``bstore cache
serve`` (a separate process, signing on the fly), host B pulls with ``bstore copy
--from`` and :func:`substitute`; a one-module upgrade moves only the changed blob."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cachehelpers import Hosts, erlang_app, namespaces_work, write_many
from storehelpers import check_consistent, run_bstore

from bstore.store.cache import Substituters
from bstore.store.local import LocalStore
from bstore.store.manifest import scan_tree
from bstore.store.paths import StorePath
from bstore.store.signing import TrustedKeys, generate_key, write_key_pair

pytestmark = pytest.mark.skipif(not namespaces_work(),
                                reason="needs unshare -m (two hosts share one root path)")

KEY = generate_key("host-a")
TRUSTED = TrustedKeys((KEY.public_key,))


@dataclass
class Net:
    hosts: Hosts
    url: str
    lib: StorePath
    app: StorePath
    work: Path
    key_file: Path


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("http-hosts")
    key_file, _ = write_key_pair(KEY, tmp / "keys")
    lib_tree = write_many(tmp / "lib", 120, "lib")
    app_tree = erlang_app(tmp / "app", 30)
    got: dict[str, StorePath] = {}

    def build(st: LocalStore) -> None:
        got["lib"] = st.add_path(lib_tree, "lib")
        got["app"] = st.add_path(app_tree, "app")

    hosts = Hosts.create(tmp, build)
    url = hosts.serve_a("--key", str(key_file))
    try:
        yield Net(hosts, url, got["lib"], got["app"], tmp, key_file)
    finally:
        hosts.stop()


@pytest.fixture
def b_store(net: Net) -> Iterator[LocalStore]:
    net.hosts.reset_b()
    with LocalStore.open(net.hosts.root) as st:
        yield st


def test_copy_from_server_cli(net: Net, b_store: LocalStore) -> None:
    full = f"{b_store.store_dir}/{net.app}"
    res = run_bstore(net.hosts.root, "--json", "copy", "--from", net.url, full,
                     "--trusted-key", KEY.public_key.to_text())
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["paths"] == [full] and report["failed"] == []
    assert report["downloaded_files"] >= 30 and report["downloaded_bytes"] > 0
    assert b_store.is_valid(net.app)
    assert scan_tree(b_store.real_path(net.app)).mcid == b_store.query_info(net.app).mcid
    check_consistent(b_store)


def test_copy_from_server_refuses_untrusted_signer(net: Net, b_store: LocalStore) -> None:
    other = generate_key("host-a")  # same name, different key
    res = run_bstore(net.hosts.root, "copy", "--from", net.url,
                     f"{b_store.store_dir}/{net.lib}", "--trusted-key",
                     other.public_key.to_text())
    assert res.returncode == 1
    assert "signature by host-a does not verify" in res.stderr
    assert b_store.valid_paths() == []


def test_substitute_then_one_module_upgrade(net: Net, b_store: LocalStore) -> None:
    subs = Substituters([net.url], TRUSTED)
    try:
        assert subs.substitute(b_store, net.app)
        first = subs.report.downloaded_bytes
        # Host A builds version 2: one module changed.
        v2_tree = erlang_app(net.work / "app2", 30, changed=7)
        res = net.hosts.run_a("store", "add", str(v2_tree), "--name", "app")
        assert res.returncode == 0, res.stderr
        v2 = b_store.parse_path(res.stdout.strip().splitlines()[-1])
        assert v2 != net.app
        before = subs.report.downloaded_bytes
        files_before = subs.report.downloaded_files
        assert subs.substitute(b_store, v2)
    finally:
        subs.close()
    moved = subs.report.downloaded_bytes - before
    assert subs.report.downloaded_files - files_before == 1  # only m7.beam
    assert 0 < moved < first * 0.2
    assert (b_store.real_path(v2) / "ebin" / "m7.beam").read_bytes() == \
        (v2_tree / "ebin" / "m7.beam").read_bytes()
    check_consistent(b_store)


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/blobs/../../../../etc/passwd", "/meta/..%2f..%2fetc%2fpasswd",
    "//etc/passwd", "/mcid/../../etc/passwd", "/cache-info/../../../etc/passwd",
    "/blobs/aa/" + "bb" * 32 + ".zst", "/manifests/" + "0" * 64 + ".manifest.zst",
])
def test_server_refuses_traversal(net: Net, path: str) -> None:
    parts = urlsplit(net.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 404
    assert b"root:" not in body


def test_writable_server_needs_token(net: Net, b_store: LocalStore, tmp_path: Path) -> None:
    url = net.hosts.serve_a("--writable", "--token", "s3cret", "--upload-dir",
                            str(net.hosts.root / "uploads"))
    tree = write_many(tmp_path / "new", 5, "new")
    added = b_store.add_path(tree, "fresh")
    full = b_store.full_path(added)
    for token, status in ((None, "401"), ("wrong", "403")):
        args = ["copy", "--to", url, full] + (["--token", token] if token else [])
        res = run_bstore(net.hosts.root, *args, env={"BSTORE_CACHE_TOKEN": ""})
        assert res.returncode == 1
        assert f"HTTP {status}" in res.stderr, res.stderr
    res = run_bstore(net.hosts.root, "--json", "copy", "--to", url, full, "--token", "s3cret")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["paths"] == [str(added)]
    uploads = net.hosts.a_dir / "uploads"
    assert (uploads / "meta" / f"{added.digest}.meta").is_file()
    # The upload is served back: a third host pulls it from A's server.
    net.hosts.reset_b()
    with LocalStore.open(net.hosts.root) as st:
        subs = Substituters([url], TrustedKeys((KEY.public_key,)))
        # Uploaded unsigned: refused by trust, not by transport.
        assert not subs.substitute(st, added)
        assert "it has no signature" in " | ".join(subs.report.errors)
        subs.close()
    shutil.rmtree(uploads)


def test_server_survives_garbage_requests(net: Net) -> None:
    parts = urlsplit(net.url)
    proc = subprocess.run(["sh", "-c", f"printf 'NONSENSE\\r\\n\\r\\n' | timeout 5 "
                           f"bash -c 'cat > /dev/tcp/{parts.hostname}/{parts.port}'"],
                          capture_output=True, timeout=20, check=False)
    assert proc.returncode in (0, 1)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", "/cache-info")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_cli_push_on_a_then_pull_on_b(net: Net, b_store: LocalStore, tmp_path: Path) -> None:
    cache = tmp_path / "pushed"
    full = f"{b_store.store_dir}/{net.app}"
    res = net.hosts.run_a("--json", "copy", "--to", f"file://{cache}", full,
                          "--key", str(net.key_file))
    assert res.returncode == 0, res.stderr
    pushed = json.loads(res.stdout)
    assert pushed["paths"] == [str(net.app)] and pushed["blobs_uploaded"] >= 30
    res = net.hosts.run_a("--json", "copy", "--to", f"file://{cache}", full)
    assert json.loads(res.stdout)["skipped"] == [str(net.app)]
    res = run_bstore(net.hosts.root, "copy", "--from", f"file://{cache}", full,
                     env={"BSTORE_TRUSTED_PUBLIC_KEYS": KEY.public_key.to_text()})
    assert res.returncode == 0, res.stderr
    assert "fetching" in res.stderr
    assert b_store.is_valid(net.app)
