"""Dependency resolution over registry entries: highest versions, backtracking, locks."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from hexrepo import ServedHexRepo

from bstore.builders.download import DownloadPolicy
from bstore.builders.hex.errors import HexError, ResolutionError
from bstore.builders.hex.locks import parse_rebar_lock
from bstore.builders.hex.protobuf import Dependency, Package, Release, Retirement
from bstore.builders.hex.registry import package_lookup
from bstore.builders.hex.repos import Repos
from bstore.builders.hex.resolve import RegistryLookup, Requested, resolve

Spec = dict[str, dict[str, list[tuple[str, str] | Dependency]]]


def registry(spec: Spec, *, retired: set[tuple[str, str]] | None = None) -> RegistryLookup:
    """An in-memory registry: {package: {version: [deps]}}, every entry in ``hexpm``."""
    retired = retired or set()
    calls: list[tuple[str, str]] = []

    def lookup(repository: str, package: str) -> Package:
        calls.append((repository, package))
        if package not in spec:
            raise ResolutionError(f"no package {package!r} in {repository!r}")
        releases = tuple(
            Release(
                version,
                bytes(32),
                tuple(d if isinstance(d, Dependency) else Dependency(*d) for d in deps),
                Retirement(2, "bad") if (package, version) in retired else None,
                bytes([len(version)]) * 32,
            )
            for version, deps in spec[package].items()
        )
        return Package(package, repository, releases)

    lookup.calls = calls  # type: ignore[attr-defined]
    return lookup


def pins(roots: list[Requested], spec: Spec, **kwargs: object) -> dict[str, str]:
    return resolve(roots, registry(spec), **kwargs).pins()  # type: ignore[arg-type]


CHAIN: Spec = {
    "top": {"0.1.0": [("mid", "~> 1.0"), ("leaf", ">= 1.0.0")]},
    "mid": {"1.0.0": [("leaf", "~> 1.0")], "1.1.0": [("leaf", "~> 1.1")]},
    "leaf": {"1.0.0": [], "1.1.0": [], "1.2.0-rc.1": [], "2.0.0": []},
}


def test_highest_versions_that_satisfy_everything() -> None:
    assert pins([Requested("top", "~> 0.1")], CHAIN) == {
        "top": "0.1.0",
        "mid": "1.1.0",
        "leaf": "1.1.0",
    }


def test_build_order_and_json() -> None:
    result = resolve([Requested("top", "~> 0.1")], registry(CHAIN))
    assert [p.package for p in result.packages] == ["leaf", "mid", "top"]
    top = result.get("top")
    assert top.deps == ("leaf", "mid")
    assert top.to_json() == {
        "package": "top",
        "version": "0.1.0",
        "repository": "hexpm",
        "app": "top",
        "inner_checksum": "00" * 32,
        "outer_checksum": "05" * 32,
        "deps": ["leaf", "mid"],
        "retired": None,
    }
    with pytest.raises(KeyError):
        result.get("nope")


def test_backtracks_out_of_a_dead_end_found_deeper() -> None:
    spec: Spec = {
        "x": {"1.0.0": [], "2.0.0": [("w", "~> 1.0")]},
        "w": {"1.0.0": [("z", "~> 2.0")]},
        "z": {"1.0.0": []},
    }
    assert pins([Requested("x", ">= 1.0.0")], spec) == {"x": "1.0.0"}


def test_backtracks_when_a_later_requirement_rules_out_a_choice() -> None:
    spec: Spec = {
        "x": {"1.0.0": [("z", "~> 1.0")], "2.0.0": [("z", "~> 2.0")]},
        "y": {"1.0.0": [("z", "~> 1.0")]},
        "z": {"1.0.0": [], "1.5.0": [], "2.0.0": []},
    }
    assert pins([Requested("x", ">= 1.0.0"), Requested("y", "1.0.0")], spec) == {
        "x": "1.0.0",
        "y": "1.0.0",
        "z": "1.5.0",
    }


def test_optional_dependency_is_only_used_when_required_elsewhere() -> None:
    spec: Spec = {
        "a": {"1.0.0": [Dependency("opt", "~> 1.0", optional=True)]},
        "opt": {"1.0.0": [], "1.4.0": [], "2.0.0": []},
    }
    assert pins([Requested("a", "~> 1.0")], spec) == {"a": "1.0.0"}
    # Required by the root too: now included, and a's requirement still applies.
    assert pins([Requested("a", "~> 1.0"), Requested("opt", ">= 1.0.0")], spec) == {
        "a": "1.0.0",
        "opt": "1.4.0",
    }


@pytest.mark.parametrize(
    ("requirement", "chosen"),
    [("~> 1.0", "1.1.0"), ("~> 1.2.0-rc.0", "1.2.0-rc.1"), (">= 1.2.0-a", "2.0.0")],
)
def test_pre_releases_only_when_asked_for(requirement: str, chosen: str) -> None:
    assert pins([Requested("leaf", requirement)], CHAIN) == {"leaf": chosen}


def test_retired_releases_are_skipped_unless_locked() -> None:
    lookup = registry(CHAIN, retired={("leaf", "1.1.0")})
    assert resolve([Requested("leaf", "~> 1.0")], lookup).pins() == {"leaf": "1.0.0"}
    locked = resolve([Requested("leaf", "~> 1.0")], lookup, lock={"leaf": "1.1.0"})
    assert locked.pins() == {"leaf": "1.1.0"}
    assert locked.get("leaf").retired == "security"
    with pytest.raises(ResolutionError, match=r"retired: 1\.1\.0"):
        resolve([Requested("leaf", "== 1.1.0")], lookup)


def test_lock_is_honoured_even_when_newer_versions_exist() -> None:
    assert pins([Requested("top", "~> 0.1")], CHAIN, lock={"leaf": "1.0.0"}) == {
        "top": "0.1.0",
        "mid": "1.0.0",  # mid 1.1.0 needs leaf ~> 1.1, which the lock rules out
        "leaf": "1.0.0",
    }


def test_lock_from_a_rebar_lock_file() -> None:
    lock = parse_rebar_lock('[{<<"leaf">>,{pkg,<<"leaf">>,<<"1.0.0">>},1}].')
    assert pins([Requested("mid", "~> 1.0")], CHAIN, lock=lock.pins()) == {
        "mid": "1.0.0",
        "leaf": "1.0.0",
    }


@pytest.mark.parametrize(
    ("roots", "lock", "message"),
    [
        (
            [Requested("leaf", "~> 2.0")],
            {"leaf": "1.0.0"},
            "locked version 1.0.0 of 'leaf' does not satisfy '~> 2.0' (from (root))",
        ),
        (
            [Requested("leaf", "~> 1.0")],
            {"leaf": "9.9.9"},
            "locked version 9.9.9 of 'leaf' is not in repository 'hexpm'",
        ),
        (
            [Requested("mid", "~> 1.0"), Requested("leaf", "~> 2.0")],
            {},
            "'~> 2.0' (from (root))",
        ),
        (
            [Requested("leaf", "~> 3.0")],
            {},
            "no version of 'leaf' satisfies '~> 3.0' (from (root)) "
            "(available: 2.0.0, 1.2.0-rc.1, 1.1.0, 1.0.0)",
        ),
    ],
)
def test_conflicts_are_explained(
    roots: list[Requested], lock: dict[str, str], message: str
) -> None:
    with pytest.raises(ResolutionError) as info:
        resolve(roots, registry(CHAIN), lock=lock)
    assert message in info.value.message


def test_conflict_names_both_requirers() -> None:
    spec: Spec = {
        "a": {"1.0.0": [("c", "~> 1.0")]},
        "b": {"1.0.0": [("c", "~> 2.0")]},
        "c": {
            "1.0.0": [],
            "2.0.0": [],
        },
    }
    with pytest.raises(ResolutionError) as info:
        resolve([Requested("a", "1.0.0"), Requested("b", "1.0.0")], registry(spec))
    assert info.value.message == (
        "no version of 'c' satisfies '~> 1.0' (from a 1.0.0), '~> 2.0' (from b 1.0.0) "
        "(available: 2.0.0, 1.0.0)"
    )


def test_one_package_from_two_repositories_is_refused() -> None:
    spec: Spec = {
        "a": {"1.0.0": [Dependency("c", "~> 1.0", repository="other")]},
        "c": {"1.0.0": []},
    }
    with pytest.raises(ResolutionError, match="'c' is required from several repositories"):
        resolve([Requested("a", "1.0.0"), Requested("c", "~> 1.0")], registry(spec))


def test_search_is_bounded() -> None:
    # Every x version needs a z that does not exist: exhausting it takes many steps.
    spec: Spec = {
        "x": {f"1.{i}.0": [("y", ">= 1.0.0")] for i in range(30)},
        "y": {f"1.{i}.0": [("z", "~> 9.0")] for i in range(30)},
        "z": {"1.0.0": []},
    }
    with pytest.raises(ResolutionError, match="gave up after 50 steps"):
        resolve([Requested("x", ">= 1.0.0")], registry(spec), max_steps=50)


def test_each_entry_is_looked_up_once() -> None:
    lookup = registry(CHAIN)
    resolve([Requested("top", "~> 0.1")], lookup)
    calls = lookup.calls  # type: ignore[attr-defined]
    assert sorted(calls) == [("hexpm", "leaf"), ("hexpm", "mid"), ("hexpm", "top")]


def test_invalid_root_requests() -> None:
    with pytest.raises(HexError, match="invalid requirement '~> 1'"):
        Requested("a", "~> 1")
    with pytest.raises(HexError, match="invalid hex package name 'A'"):
        Requested("A", "~> 1.0")


def test_resolve_against_the_served_repository(
    hex_repo: ServedHexRepo, http_client: httpx.Client
) -> None:
    repos = Repos([hex_repo.repo], include_hexpm=False)
    lookup = package_lookup(http_client, repos, policy=DownloadPolicy(retries=0))
    result = resolve([Requested("hexa_top", "~> 0.1", repository="testrepo")], lookup)
    assert result.pins() == {"hexa_leaf": "1.1.0", "hexa_mid": "1.1.0", "hexa_top": "0.1.0"}
    leaf = result.get("hexa_leaf")
    assert leaf.repository == "testrepo"
    tarball = hex_repo.builder.release("hexa_leaf", "1.1.0").tarball()
    assert leaf.outer_checksum == hashlib.sha256(tarball).hexdigest()
