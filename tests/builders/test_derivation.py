"""Derivation hashing: canonical, sensitive to every input, stable across runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bstore.builders.derivation import Derivation, InvalidDerivation, canonical_json
from bstore.store.paths import StorePath

BASE = Derivation(
    name="web",
    version="1.0.0",
    builder="rebar3",
    source={"type": "git", "url": "file:///repo", "commit": "a" * 40},
    dependencies=("0" * 32 + "-cowlib-2.12.1",),
    build_env={"MIX_ENV": "prod"},
    toolchain={"otp": "25", "erts": "13.1.5"},
)


def test_golden_hash() -> None:
    # Pinned: changing the canonical form silently would rebuild every output everywhere.
    assert canonical_json(BASE.to_dict()) == (
        b'{"build_env":{"MIX_ENV":"prod"},"builder":"rebar3","dependencies":'
        b'["00000000000000000000000000000000-cowlib-2.12.1"],"format":1,"name":"web",'
        b'"source":{"commit":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","type":"git",'
        b'"url":"file:///repo"},"toolchain":{"erts":"13.1.5","otp":"25"},"version":"1.0.0"}'
    )
    assert BASE.output_path("/s").name == "web-1.0.0"


@pytest.mark.parametrize(
    "change",
    [
        {"name": "web2"},
        {"version": "1.0.1"},
        {"builder": "mix"},
        {"source": {"type": "git", "url": "file:///repo", "commit": "b" * 40}},
        {"dependencies": ()},
        {"build_env": {"MIX_ENV": "dev"}},
        {"toolchain": {"otp": "26", "erts": "14.0"}},
    ],
)
def test_every_input_changes_the_output_path(change: dict[str, Any]) -> None:
    other = dataclasses.replace(BASE, **change)
    assert other.hash_hex != BASE.hash_hex
    assert other.output_path("/s") != BASE.output_path("/s")


def test_store_dir_is_part_of_the_path() -> None:
    assert BASE.output_path("/a/store") != BASE.output_path("/b/store")


def test_key_order_does_not_matter() -> None:
    swapped = dataclasses.replace(BASE, toolchain={"erts": "13.1.5", "otp": "25"})
    assert swapped.hash_hex == BASE.hash_hex


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "we b"}, "contains ' '"),
        ({"version": "../1"}, "contains '/'"),
        ({"builder": "sh"}, "unknown builder 'sh'"),
        ({"dependencies": ("b" * 32 + "-x", "a" * 32 + "-y")}, "sorted and unique"),
        ({"dependencies": ("not-a-path",)}, "not a store path"),
    ],
)
def test_invalid_derivations(change: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception) as info:
        dataclasses.replace(BASE, **change)
    assert message in str(info.value)
    assert isinstance(info.value, InvalidDerivation) or "store path" in str(info.value)


def test_dependency_paths_parse() -> None:
    assert StorePath.parse(BASE.dependencies[0]).name == "cowlib-2.12.1"
