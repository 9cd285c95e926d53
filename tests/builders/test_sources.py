"""Fetch strategies into a real store: git (branch, tag, commit), release, hex, mesh; the
identity → store path cache (hits, and dangling or bogus links as mere hints)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import realise_helpers as rh
import sample_apps
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hexrepo import HexRepoBuilder, default_chain
from localhttp import LocalServer

from bstore.builders.fetch_git import GitFetchError
from bstore.builders.hex.errors import RegistryError, TarballError
from bstore.builders.hex.repos import HexRepo, Repos
from bstore.builders.sources import STRATEGIES, Fetcher, MeshUnavailable, SourceError, identity_key
from bstore.specs.model import SourceSpec, SourceType
from bstore.store.local import LocalStore


@pytest.fixture
def fetcher(tmp_path: Path) -> Iterator[Fetcher]:
    with LocalStore.open(tmp_path / "root") as store, httpx.Client(trust_env=False) as client:
        yield Fetcher(store, client)


def test_every_source_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(SourceType)


def test_identity_key_is_canonical() -> None:
    a = identity_key({"type": "git", "url": "u", "commit": "c"})
    assert a == identity_key({"commit": "c", "url": "u", "type": "git"})
    assert a != identity_key({"type": "git", "url": "u", "commit": "d"})
    assert len(a) == 64


@pytest.mark.integration
def test_git_branch_tag_commit_and_cache(fetcher: Fetcher, tmp_path: Path) -> None:
    repo = rh.git_repo(sample_apps.erlc_app(tmp_path / "repos"))
    first = rh.git(repo, "rev-parse", "HEAD")
    rh.git(repo, "tag", "v1")
    (repo / "NEWS").write_text("two\n")
    second = rh.commit_all(repo, "two")
    url = repo.as_uri()

    def get(ref: str | None) -> tuple[str, bool, Path]:
        got = fetcher.fetch(SourceSpec(SourceType.GIT, ref=ref, url=url),
                            name="plainapp", version="1.0.0")
        return got.identity["commit"], got.fetched, fetcher.store.real_path(got.path)

    commit, fetched, tree = get("main")
    assert (commit, fetched) == (second, True)
    assert (tree / "NEWS").read_text() == "two\n" and not (tree / ".git").exists()
    assert get("v1")[:2] == (first, True)
    assert get(first)[:2] == (first, False)  # same identity as the tag: cached
    assert get("main")[:2] == (second, False)
    assert get(None)[:2] == (second, False)  # the default branch
    # A full commit id is an identity on its own: answered without the remote at all.
    os.rename(repo, tmp_path / "gone")
    assert get(first)[:2] == (first, False)
    with pytest.raises(GitFetchError, match=r"cannot fetch file://.*/repos/plainapp"):
        get("main")


@pytest.mark.integration
def test_branch_moves_refetch(fetcher: Fetcher, tmp_path: Path) -> None:
    repo = rh.git_repo(sample_apps.erlc_app(tmp_path / "repos"))
    spec = SourceSpec(SourceType.GIT, ref="main", url=repo.as_uri())
    one = fetcher.fetch(spec, name="plainapp", version="1")
    (repo / "NEWS").write_text("moved\n")
    moved = rh.commit_all(repo, "moved")
    two = fetcher.fetch(spec, name="plainapp", version="1")
    assert two.fetched and two.identity["commit"] == moved and two.path != one.path


def test_release_fetch_cache_and_bogus_links(fetcher: Fetcher, local_server: LocalServer
                                             ) -> None:
    url, sha = rh.serve_release(local_server, "relapp", "1.0.0")
    spec = SourceSpec(SourceType.RELEASE, url=url, sha256=sha)
    got = fetcher.fetch(spec, name="relapp", version="1.0.0")
    tree = fetcher.store.real_path(got.path)
    assert (tree / "relapp-1.0.0/releases/1.0.0/start_erl.data").read_text() == "14.0 1.0.0\n"
    route = local_server.routes["/releases/relapp-1.0.0.tar.gz"]
    assert route.hits == 1
    assert not fetcher.fetch(spec, name="relapp", version="1.0.0").fetched
    assert route.hits == 1
    link = fetcher.cache_dir / identity_key(got.identity)
    assert os.readlink(link) == fetcher.store.full_path(got.path)
    # A dangling link, and one to something that is not a store path, are only hints.
    for target in (str(fetcher.store.store_dir / ("0" * 32 + "-gone")), "/etc/passwd"):
        link.unlink()
        link.symlink_to(target)
        again = fetcher.fetch(spec, name="relapp", version="1.0.0")
        assert again.fetched and again.path == got.path
        assert os.readlink(link) == fetcher.store.full_path(got.path)
    assert route.hits == 3


@pytest.fixture
def hexpm(hex_key: RSAPrivateKey, local_server: LocalServer) -> HexRepo:
    builder = default_chain(HexRepoBuilder(hex_key, name="hexpm"))
    builder.serve(local_server)
    return HexRepo("hexpm", local_server.base_url, builder.public_key_pem)


def leaf_checksums(local_server: LocalServer) -> dict[str, str]:
    data = local_server.routes["/tarballs/hexa_leaf-1.0.0.tar"].body
    return {"outer_checksum": hashlib.sha256(data).hexdigest(), "inner_checksum": ""}


def test_hex_fetch_checks_outer_checksum(fetcher: Fetcher, hexpm: HexRepo,
                                         local_server: LocalServer) -> None:
    fetcher.hex_repos = Repos([hexpm])
    spec = SourceSpec(SourceType.HEX, ref="1.0.0")
    got = fetcher.fetch(spec, name="hexa_leaf", version="1.0.0",
                        extra=leaf_checksums(local_server))
    tree = fetcher.store.real_path(got.path)
    assert (tree / "src/hexa_leaf.erl").is_file()
    assert got.identity["package"] == "hexa_leaf" and got.identity["repository"] == "hexpm"
    before = fetcher.store.valid_paths()
    with pytest.raises(TarballError, match=r"has sha256 .* but the registry says 1111"):
        fetcher.fetch(SourceSpec(SourceType.HEX, ref="1.1.0"), name="hexa_leaf",
                      version="1.1.0", extra={"outer_checksum": "11" * 32})
    with pytest.raises(SourceError, match="no outer checksum"):
        fetcher.fetch(spec, name="hexa_leaf", version="1.1.0")
    assert fetcher.store.valid_paths() == before


def test_hex_unknown_repository(fetcher: Fetcher) -> None:
    with pytest.raises(RegistryError, match="hex repository 'private' is not configured"):
        fetcher.fetch(SourceSpec(SourceType.HEX, ref="1.0.0", repo="private"),
                      name="x", version="1.0.0", extra={"outer_checksum": "00" * 32})


def test_mesh_has_no_peers(fetcher: Fetcher) -> None:
    mcid = "mcid1-manifest-blake3-" + "b" * 64
    with pytest.raises(MeshUnavailable, match=f"mesh source {mcid}: no mesh peers configured"):
        fetcher.fetch(SourceSpec(SourceType.MESH, mcid=mcid), name="m", version="1")
    assert fetcher.store.valid_paths() == []
    assert os.listdir(fetcher.store.root / "tmp") == []
