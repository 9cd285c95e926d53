"""The realiser asks trusted binary caches before building, and fetches mesh sources
from peers by content id."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import realise_helpers as rh
import sample_apps

from bstore.builders.realise import BuildReport, Realiser
from bstore.builders.sandbox import NO_ISOLATION
from bstore.builders.sources import Fetcher
from bstore.builders.toolchain import Toolchain
from bstore.specs.model import AppSpec, SourceSpec, SourceType
from bstore.store.atomic import remove_tree
from bstore.store.cache.binary_cache import BinaryCache, Substituters
from bstore.store.cache.server import ServeOptions, StoreCacheServer
from bstore.store.local import LocalStore
from bstore.store.signing import TrustedKeys, generate_key


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as c:
        yield c


@pytest.fixture
def tools(tmp_path: Path) -> tuple[Toolchain, Path]:
    # One toolchain for both hosts: the compilers' paths are part of every derivation.
    return rh.counting_toolchain(tmp_path / "tools")


def _realise(root: Path, spec: AppSpec, client: httpx.Client, tools: tuple[Toolchain, Path],
             substituters: Substituters | None = None,
             mesh_peers: tuple[str, ...] = ()
             ) -> tuple[Realiser, tuple[BuildReport, dict[str, object]], list[str]]:
    toolchain, counter = tools
    counter.write_text("")
    with LocalStore.open(root) as store:
        realiser = Realiser(Fetcher(store, client, mesh_peers=mesh_peers),
                            toolchain=toolchain, isolation=NO_ISOLATION,
                            substituters=substituters)
        report = realiser.build([spec], jobs=1)
        outputs = {name: app.output for name, app in report.apps.items()}
        assert report.ok, report.to_json()
        return realiser, (report, outputs), rh.runs(counter)


def test_output_in_a_trusted_cache_is_substituted_not_built(
        tmp_path: Path, client: httpx.Client, tools: tuple[Toolchain, Path]) -> None:
    project = rh.git_repo(sample_apps.erlc_app(tmp_path / "src", "plainapp"))
    spec = rh.git_spec("plainapp", "1.0.0", project, "main")
    root = tmp_path / "host"
    _, (_first, outputs), compiled = _realise(root, spec, client, tools)
    assert compiled, "the first realise must compile"
    key = generate_key("host-a")
    cache_dir = tmp_path / "cache"
    with LocalStore.open(root) as store:
        out = store.parse_path(str(outputs["plainapp"]))
        BinaryCache.open(cache_dir.as_uri()).push(store, [out], key=key)
    # Host B: the same root path (store paths name their store dir), an empty store.
    remove_tree(root)
    subs = Substituters([cache_dir.as_uri()], TrustedKeys.parse([key.public_key.to_text()]))
    realiser, (report, outputs_b), compiled = _realise(root, spec, client, tools,
                                                     substituters=subs)
    assert compiled == []
    assert realiser.builds == []
    assert list(report.substituted) == [out.name]
    assert outputs_b == outputs
    with LocalStore.open(root) as store:
        assert store.is_valid(out)
        assert (store.real_path(out) / "lib" / "plainapp-1.0.0" / "ebin").is_dir()


def test_untrusted_cache_falls_back_to_building(
        tmp_path: Path, client: httpx.Client, tools: tuple[Toolchain, Path]) -> None:
    project = rh.git_repo(sample_apps.erlc_app(tmp_path / "src", "plainapp"))
    spec = rh.git_spec("plainapp", "1.0.0", project, "main")
    root = tmp_path / "host"
    _, (_, outputs), _ = _realise(root, spec, client, tools)
    cache_dir = tmp_path / "cache"
    with LocalStore.open(root) as store:
        out = store.parse_path(str(outputs["plainapp"]))
        BinaryCache.open(cache_dir.as_uri()).push(store, [out], key=generate_key("mallory"))
    remove_tree(root)
    trusted = TrustedKeys.parse([generate_key("host-a").public_key.to_text()])
    subs = Substituters([cache_dir.as_uri()], trusted)
    _, (report, _), compiled = _realise(root, spec, client, tools, substituters=subs)
    assert compiled, "an untrusted signature must not be accepted: build instead"
    assert list(report.substituted) == []
    assert any("untrusted" in e or "not signed by a trusted" in e or "trusted" in e
               for e in subs.report.errors)


def test_mesh_source_is_fetched_from_a_peer(
        tmp_path: Path, client: httpx.Client, tools: tuple[Toolchain, Path]) -> None:
    source = sample_apps.erlc_app(tmp_path / "src", "meshapp")
    peer_root = tmp_path / "peer"
    with LocalStore.open(peer_root) as st:
        mcid = st.query_info(st.add_path(source, "meshapp-src")).mcid
    server = StoreCacheServer(peer_root, ServeOptions())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        spec = rh.spec("meshapp", "0.1.0", SourceSpec(SourceType.MESH, mcid=mcid))
        realiser, (_report, outputs), compiled = _realise(
            tmp_path / "host", spec, client, tools, mesh_peers=(server.url,))
    finally:
        server.shutdown()
        thread.join(10)
    assert compiled and outputs["meshapp"] is not None
    assert realiser.fetcher.fetched == [{"type": "mesh", "mcid": mcid}]
