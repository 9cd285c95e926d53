"""Two hosts on one machine share builds through host A's signed binary cache (issue 7).

Host A reconciles a GitOps repo (real git, file:// URLs) whose apps are built from real
erlc sources, and serves its store with ``bstore cache serve --key``: both are separate
``bstore`` processes in A's mount namespace. Host B runs ``bstore reconcile`` (a separate
process) on the same repo with A, behind a byte-counting proxy, as substituter and A's key
trusted: it compiles nothing. After a one-module upgrade on A, B downloads only the
changed files. With A's server stopped, or A's key not trusted, B builds by itself.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import blake3
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "builders"))
import sample_apps
from cachehelpers import namespaces_work
from gitrepos import GitRemote
from realise_helpers import COMPILER_RUN_MARKER, counting_toolchain, git_repo, git_spec
from recohelpers import git_spec_text
from twohosts import (
    CountingProxy,
    TwoHosts,
    change_module,
    config_toml,
    many_module_app,
)

from bstore.activation import realise_builder
from bstore.store.cache.format import blob_key
from bstore.store.cache.server import ServeOptions, StoreCacheServer
from bstore.store.local import LocalStore
from bstore.store.manifest import scan_tree
from bstore.store.signing import generate_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("erlc") is None, reason="needs Erlang/OTP (erlc)"),
]
needs_namespaces = pytest.mark.skipif(
    not namespaces_work(), reason="needs unshare -m: store paths name their store dir, so"
    " the two hosts must see their stores at the same path")

#: Modules of the big app: a one-module upgrade must move a small share of it.
MODULES = 40

Run = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass
class World:
    hosts: TwoHosts
    specs: GitRemote
    big: Path
    small: Path
    public_key: str
    secret_file: str
    a_config: Path
    tmp: Path
    server_url: str


def compiler_runs(root: Path) -> int:
    """Compiler runs recorded in the build logs under the state ``root`` (the shims
    write a marker into every build log)."""
    logs = root / "logs"
    if not logs.is_dir():
        return 0
    return sum(p.read_text(errors="replace").count(COMPILER_RUN_MARKER)
               for p in logs.glob("*.log"))


def reconcile(run: Run, config: Path) -> dict[str, Any]:
    """One ``bstore reconcile`` pass (JSON); it must end synced."""
    res = run("-v", "--json", "reconcile", "--config", str(config))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    out: dict[str, Any] = json.loads(res.stdout)
    out["stderr"] = res.stderr
    return out


def store_paths(out: dict[str, Any]) -> dict[str, str]:
    return {name: app["store_path"] for name, app in out["status"]["apps"].items()}


def a_real(world: World, full: str) -> Path:
    """Where host A keeps the store path ``full`` (A's root is mounted elsewhere)."""
    return world.hosts.a_dir / Path(full).relative_to(world.hosts.root)


def app_files(root: Path) -> dict[str, bytes]:
    """The files of an app output under ``lib/<app>-<vsn>/`` (the version directory left
    out, so two versions compare file by file)."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
             if p.is_file()}
    assert all(rel.startswith("lib/") for rel in files), sorted(files)
    return {rel.split("/", 2)[2]: data for rel, data in files.items()}


def b_config(world: World, name: str, substituters: tuple[str, ...],
             trusted: tuple[str, ...]) -> Path:
    path = world.tmp / f"{name}.toml"
    path.write_text(config_toml(world.specs.url, substituters=substituters, trusted=trusted))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("two-hosts")
    # Both hosts use the same compiler shims: the compiler's path is in every derivation.
    toolchain, _counter = counting_toolchain(tmp / "tools")
    path = f"{Path(toolchain.erlc).parent}:/usr/local/bin:/usr/bin:/bin"
    root = tmp / "host" / "root"
    a_dir = tmp / "a-root"
    root.mkdir(parents=True)
    a_dir.mkdir()
    hosts = TwoHosts(root, a_dir, path)
    big = many_module_app(tmp / "src", "bigapp", MODULES)
    small = git_repo(sample_apps.erlc_app(tmp / "src", "plainapp"))
    specs = GitRemote(tmp / "specs")
    specs.commit({"apps/bigapp/app.yaml": git_spec_text("bigapp", "1.0.0", big.as_uri()),
                  "apps/plainapp/app.yaml": git_spec_text("plainapp", "1.0.0",
                                                          small.as_uri())})
    specs.push()
    res = hosts.run_a("--json", "key", "generate", "host-a", "--dir", str(tmp / "keys"))
    assert res.returncode == 0, res.stderr
    key = json.loads(res.stdout)
    a_config = tmp / "a.toml"
    a_config.write_text(config_toml(specs.url))
    first = reconcile(hosts.run_a, a_config)
    assert sorted(first["result"]["built"]) == ["bigapp-1.0.0", "plainapp-1.0.0"]
    assert compiler_runs(a_dir) > 0, "host A must really compile (the shims count)"
    _proc, url = hosts.serve_a("--key", key["secret_file"])
    try:
        yield World(hosts, specs, big, small, key["public_key"], key["secret_file"],
                    a_config, tmp, url)
    finally:
        hosts.stop_all()


@needs_namespaces
def test_b_builds_nothing_then_fetches_only_the_changed_module(world: World) -> None:
    hosts = world.hosts
    hosts.reset_b()
    a_status = reconcile(hosts.run_a, world.a_config)  # idempotent: A's current state
    parts = urlsplit(world.server_url)
    with CountingProxy((parts.hostname or "", parts.port or 0)) as proxy:
        config = b_config(world, "b", (proxy.url,), (world.public_key,))
        out = reconcile(hosts.run_b, config)
        assert compiler_runs(hosts.root) == 0, out["stderr"]
        assert out["result"]["built"] == []
        labels = sorted(Path(p).name.split("-", 1)[1]
                        for p in store_paths(a_status).values())
        assert sorted(out["result"]["substituted"]) == labels
        assert out["result"]["cache_errors"] == []
        assert store_paths(out) == store_paths(a_status)
        assert {a["status"] for a in out["status"]["apps"].values()} == {"running"}
        with LocalStore.open(hosts.root) as store:
            for full in store_paths(out).values():
                sp = store.parse_path(full)
                assert store.is_valid(sp)
                assert scan_tree(store.real_path(sp)).mcid == store.query_info(sp).mcid
                assert scan_tree(a_real(world, full)).mcid == store.query_info(sp).mcid
        first_bytes = proxy.received
        assert first_bytes > 0

        # One-module upgrade on A: a new source commit, the app's version bumped.
        old_path = store_paths(out)["bigapp"]
        change_module(world.big, "bigapp", 7, 2)
        world.specs.commit({"apps/bigapp/app.yaml": git_spec_text(
            "bigapp", "1.0.1", world.big.as_uri())}, "bigapp 1.0.1")
        world.specs.push()
        up_a = reconcile(hosts.run_a, world.a_config)
        assert up_a["result"]["built"] == ["bigapp-1.0.1"]
        new_path = store_paths(up_a)["bigapp"]
        old_files = app_files(a_real(world, old_path))
        new_files = app_files(a_real(world, new_path))
        changed = sorted(k for k, v in new_files.items() if old_files.get(k) != v)
        # The module, and the .app file that carries the version.
        assert changed == ["ebin/bigapp.app", "ebin/bigapp_m7.beam"]

        proxy.reset()
        up_b = reconcile(hosts.run_b, config)
        assert compiler_runs(hosts.root) == 0, up_b["stderr"]
        assert up_b["result"]["built"] == []
        assert up_b["result"]["substituted"] == ["bigapp-1.0.1"]
        assert store_paths(up_b) == store_paths(up_a)
        with LocalStore.open(hosts.root) as store:
            sp = store.parse_path(new_path)
            assert store.is_valid(sp)
            app_size = store.query_info(sp).nar_size
            assert app_files(store.real_path(sp)) == new_files
        received = proxy.received
        requests = list(proxy.requests)
    blobs = sorted(r for r in requests if r.startswith("GET /blobs/"))
    assert blobs == sorted(f"GET /{blob_key(blake3.blake3(new_files[k]).hexdigest())}"
                           for k in changed)
    digest = Path(new_path).name.split("-", 1)[0]
    others = sorted(r.rsplit("/", 1)[0] if r.startswith("GET /manifests/") else r
                    for r in requests if not r.startswith("GET /blobs/"))
    assert others == ["GET /cache-info", "GET /manifests", f"GET /meta/{digest}.meta"]
    print(f"\ntwo hosts: first substitution {first_bytes} bytes; one-module upgrade of"
          f" a {MODULES}-module app of {app_size} bytes moved {received} bytes"
          f" ({100 * received / app_size:.2f} %), {len(blobs)} blobs")
    assert received <= 0.05 * app_size


@needs_namespaces
def test_b_builds_when_a_is_down_or_untrusted(world: World) -> None:
    hosts = world.hosts
    a_status = reconcile(hosts.run_a, world.a_config)
    want = store_paths(a_status)
    labels = sorted(Path(p).name.split("-", 1)[1] for p in want.values())
    proc, dead_url = hosts.serve_a("--key", world.secret_file)
    hosts.stop(proc)  # A's (second) server is down: its port refuses connections

    # The dead cache first, A's live one next: every path still comes from A (and the
    # text report says so).
    hosts.reset_b()
    config = b_config(world, "b-dead-live", (dead_url, world.server_url),
                      (world.public_key,))
    res = hosts.run_b("reconcile", "--config", str(config))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert compiler_runs(hosts.root) == 0, res.stderr
    lines = res.stdout.splitlines()
    substituted = [line.split(": ", 1)[1].split(", ") for line in lines
                   if line.startswith("substituted: ")]
    assert [sorted(names) for names in substituted] == [labels], res.stdout
    assert any(line.startswith("cache: ") and dead_url in line for line in lines), \
        res.stdout
    assert not any(line.startswith("built: ") for line in lines), res.stdout
    with LocalStore.open(hosts.root) as store:
        assert all(store.is_valid(store.parse_path(full)) for full in want.values())

    # Only the dead cache: built locally, the error reported, the pass synced.
    hosts.reset_b()
    out = reconcile(hosts.run_b, b_config(world, "b-dead", (dead_url,), (world.public_key,)))
    assert compiler_runs(hosts.root) > 0
    assert sorted(out["result"]["built"]) == labels
    assert out["result"]["substituted"] == []
    assert any(dead_url in e for e in out["result"]["cache_errors"]), out["result"]
    assert store_paths(out) == want

    # A's live cache, but B trusts another key of the same name: refused, built locally.
    hosts.reset_b()
    other = generate_key("host-a").public_key.to_text()
    out = reconcile(hosts.run_b, b_config(world, "b-untrusted", (world.server_url,),
                                          (other,)))
    assert compiler_runs(hosts.root) > 0
    assert sorted(out["result"]["built"]) == labels
    assert out["result"]["substituted"] == []
    errors = " | ".join(out["result"]["cache_errors"])
    assert "signature by host-a does not verify" in errors, errors
    assert store_paths(out) == want
    with LocalStore.open(hosts.root) as store:
        for full in want.values():
            assert store.is_valid(store.parse_path(full))
            assert store.query_info(store.parse_path(full)).signatures == ()


def connections_to(port: int) -> int:
    """TCP connections this process holds open to 127.0.0.1:``port`` (client side)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            inodes.add(f"socket:[{fields[9]}]")
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            held += os.readlink(f"/proc/self/fd/{fd}") in inodes
        except OSError:
            continue  # closed meanwhile
    return held


def test_a_building_pass_closes_its_cache_connections(tmp_path: Path) -> None:
    # A cache of another store dir: the pass connects, reads cache-info, refuses it and
    # builds. Its connection must be closed when the pass ends, not at the next garbage
    # collection (a daemon would keep one per pass).
    other = tmp_path / "other"
    LocalStore.open(other).close()
    server = StoreCacheServer(other, ServeOptions())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = int(urlsplit(server.url).port or 0)
    project = git_repo(sample_apps.erlc_app(tmp_path / "src", "plainapp"))
    spec = git_spec("plainapp", "1.0.0", project, "main")
    key = generate_key("host-a").public_key.to_text()
    try:
        with LocalStore.open(tmp_path / "b") as store:
            build = realise_builder(store, substituters=[server.url], trusted_keys=[key])
            gc.disable()
            try:
                outcome = build([spec])
                held = connections_to(port)
            finally:
                gc.enable()
    finally:
        server.shutdown()
        thread.join(10)
    assert set(outcome.builds) == {"plainapp"} and outcome.built == ("plainapp-1.0.0",)
    assert outcome.substituted == ()
    assert any("store dir" in e and server.url in e for e in outcome.cache_errors), \
        outcome.cache_errors
    assert held == 0
