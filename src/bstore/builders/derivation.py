"""Derivations: everything that determines a build output, and the path it gets.

A derivation is a value; its canonical JSON (sorted keys, no insignificant whitespace,
UTF-8) is hashed with blake3, and that hash names the output store path (kind
``output``). Same inputs ⇒ same output path ⇒ the build is skipped when the path is
already valid. Nothing here touches the disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from bstore.errors import BstoreError
from bstore.store.paths import PathKind, StorePath, make_store_path, validate_name

#: Bumped when the meaning of a field changes, so old outputs are never reused wrongly.
DERIVATION_FORMAT = 1

BUILDERS = frozenset({"rebar3", "mix", "make", "erlc", "release", "agent"})


class InvalidDerivation(BstoreError):
    """A derivation that cannot be hashed (bad name, builder or field)."""


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that hashes depend on."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Derivation:
    """The inputs of one build.

    ``source`` is the source's identity (e.g. ``{"type": "git", "url": ..., "commit":
    ...}``) plus the store path it was fetched to; ``dependencies`` are the output paths
    of the derivations this one builds against (as base names, sorted); ``toolchain`` is
    the toolchain fingerprint; ``build_env`` the extra environment the build sees.
    """

    name: str
    version: str
    builder: str
    source: Mapping[str, str]
    dependencies: tuple[str, ...] = ()
    build_env: Mapping[str, str] = field(default_factory=dict)
    toolchain: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            validate_name(self.output_name)
        except BstoreError as exc:
            raise InvalidDerivation(
                f"derivation {self.name!r} version {self.version!r}: {exc.message}"
            ) from exc
        if self.builder not in BUILDERS:
            raise InvalidDerivation(
                f"derivation {self.output_name!r} has unknown builder {self.builder!r}",
                hint=f"builders are {', '.join(sorted(BUILDERS))}",
            )
        if list(self.dependencies) != sorted(set(self.dependencies)):
            raise InvalidDerivation(
                f"derivation {self.output_name!r}: dependencies must be sorted and unique"
            )
        for dep in self.dependencies:
            StorePath.parse(dep)

    @property
    def output_name(self) -> str:
        """The name part of the output store path: ``<name>-<version>``."""
        return f"{self.name}-{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form that is hashed and recorded next to the output."""
        return {
            "format": DERIVATION_FORMAT,
            "name": self.name,
            "version": self.version,
            "builder": self.builder,
            "source": dict(self.source),
            "dependencies": list(self.dependencies),
            "build_env": dict(self.build_env),
            "toolchain": dict(self.toolchain),
        }

    def to_json(self) -> bytes:
        """Canonical JSON bytes."""
        return canonical_json(self.to_dict())

    @property
    def hash_hex(self) -> str:
        """blake3 of the canonical JSON: the derivation's identity."""
        return str(blake3.blake3(self.to_json()).hexdigest())

    def output_path(self, store_dir: str) -> StorePath:
        """The store path this derivation's output has in ``store_dir``."""
        return make_store_path(PathKind.OUTPUT, self.hash_hex, store_dir, self.output_name)
