"""Choosing one version of every Hex dependency: highest versions that satisfy everything.

The resolver is a backtracking search over registry entries (given as values through a
``lookup(repository, package)`` callable, so it is pure and testable without a
network):

* every requirement on a package, from the roots and from every chosen release, must
  hold for its chosen version (Hex requirement semantics, :mod:`.versions`);
* pre-releases are only chosen when some requirement on that package names a
  pre-release (otherwise Elixir's ``allow_pre: false`` applies); retired releases only
  where the lock pins them;
* an *optional* dependency constrains a package but does not pull it in: it is used
  only if some other, non-optional, requirement includes it (Hex's rule);
* a lock (``{package: version}``, from ``rebar.lock`` / ``mix.lock``) is strict: a locked
  package gets exactly its locked version, or resolution fails saying which requirement
  the lock breaks — builds are reproducible, never silently re-resolved;
* among the packages still open, the one with the fewest candidates is decided first,
  and candidates are tried highest first, so the answer is the highest-first solution
  and conflicts surface early. The search is bounded by ``max_steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bstore.builders.hex.errors import ResolutionError, VersionError
from bstore.builders.hex.protobuf import Package, Release
from bstore.builders.hex.repos import validate_package_name
from bstore.builders.hex.versions import Requirement, Version

#: ``lookup(repository, package)`` returns the verified registry entry.
RegistryLookup = Callable[[str, str], Package]

ROOT = "(root)"


@dataclass(frozen=True, slots=True)
class Requested:
    """A top-level dependency of the app being built."""

    package: str
    requirement: str
    repository: str = "hexpm"
    app: str | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        validate_package_name(self.package)
        Requirement.parse(self.requirement)


@dataclass(frozen=True, slots=True)
class Resolved:
    """One chosen package version and what it needs."""

    package: str
    version: str
    repository: str
    app: str
    inner_checksum: str
    outer_checksum: str | None
    deps: tuple[str, ...] = ()
    retired: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (for derivations and ``bstore build --json``)."""
        return {
            "package": self.package,
            "version": self.version,
            "repository": self.repository,
            "app": self.app,
            "inner_checksum": self.inner_checksum,
            "outer_checksum": self.outer_checksum,
            "deps": list(self.deps),
            "retired": self.retired,
        }


@dataclass(frozen=True, slots=True)
class Resolution:
    """Every chosen package, dependencies before their dependents (ties by name)."""

    packages: tuple[Resolved, ...]

    def pins(self) -> dict[str, str]:
        """``{package: version}`` of the whole resolution (a lock)."""
        return {p.package: p.version for p in self.packages}

    def get(self, package: str) -> Resolved:
        """The resolved entry of ``package``; raises ``KeyError`` when absent."""
        for entry in self.packages:
            if entry.package == package:
                return entry
        raise KeyError(package)

    def to_json(self) -> list[dict[str, Any]]:
        """JSON-ready list, in build order."""
        return [p.to_json() for p in self.packages]


@dataclass(frozen=True, slots=True)
class _Need:
    requirement: Requirement
    by: str
    optional: bool
    repository: str
    app: str


@dataclass
class _State:
    chosen: dict[str, tuple[Version, Release, str]] = field(default_factory=dict)
    needs: dict[str, list[_Need]] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(dict(self.chosen), {k: list(v) for k, v in self.needs.items()})


class _Resolver:
    def __init__(self, lookup: RegistryLookup, lock: Mapping[str, str], max_steps: int) -> None:
        self.lookup = lookup
        self.lock = {name: Version.parse(v) for name, v in lock.items()}
        self.max_steps = max_steps
        self.steps = 0
        self.cache: dict[tuple[str, str], list[tuple[Version, Release]]] = {}
        self.conflict: ResolutionError | None = None

    def releases(self, repository: str, package: str) -> list[tuple[Version, Release]]:
        key = (repository, package)
        if key not in self.cache:
            entry = self.lookup(repository, package)
            parsed: list[tuple[Version, Release]] = []
            for release in entry.releases:
                try:
                    parsed.append((Version.parse(release.version), release))
                except VersionError:
                    continue  # an unusable version string in the registry is never chosen
            parsed.sort(key=lambda item: item[0], reverse=True)
            self.cache[key] = parsed
        return self.cache[key]

    def repository_of(self, package: str, needs: list[_Need]) -> str:
        repos = {n.repository for n in needs}
        if len(repos) > 1:
            raise ResolutionError(
                f"package {package!r} is required from several repositories: "
                + ", ".join(f"{n.repository!r} by {n.by}" for n in needs),
                hint="a package name may come from one repository only in one build",
            )
        return repos.pop()

    def candidates(self, package: str, needs: list[_Need]) -> list[tuple[Version, Release]]:
        repository = self.repository_of(package, needs)
        available = self.releases(repository, package)
        locked = self.lock.get(package)
        if locked is not None:
            pinned = [(v, r) for v, r in available if v == locked]
            if not pinned:
                raise ResolutionError(
                    f"locked version {locked} of {package!r} is not in repository "
                    f"{repository!r} (available: {_versions(available)})",
                    hint="update the lock file",
                )
            broken = [n for n in needs if not n.requirement.matches(locked)]
            if broken:
                self.note_conflict(
                    ResolutionError(
                        f"locked version {locked} of {package!r} does not satisfy "
                        + _describe(broken),
                        hint="update the lock file (e.g. rebar3 upgrade / mix deps.update)",
                    )
                )
                return []
            return pinned
        # Once any requirement names a pre-release, pre-releases are fair game for all.
        allow_pre = any(n.requirement.mentions_pre for n in needs)
        fits = [
            (v, r)
            for v, r in available
            if all(n.requirement.matches(v, allow_pre=allow_pre) for n in needs)
        ]
        fresh = [(v, r) for v, r in fits if r.retired is None]
        if not fresh:
            retired = f"; retired: {_versions(fits)}" if fits else ""
            self.note_conflict(
                ResolutionError(
                    f"no version of {package!r} satisfies "
                    + _describe(needs)
                    + f" (available: {_versions(available)}{retired})",
                    hint="relax a requirement, or pin the package in the lock file",
                )
            )
        return fresh

    def note_conflict(self, error: ResolutionError) -> None:
        # The first dead end found is usually the closest to the cause.
        if self.conflict is None:
            self.conflict = error

    def solve(self, state: _State) -> _State | None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise ResolutionError(
                f"dependency resolution gave up after {self.max_steps} steps",
                hint="pin some versions in the lock file to narrow the search",
            )
        open_packages = sorted(
            p
            for p, needs in state.needs.items()
            if p not in state.chosen and any(not n.optional for n in needs)
        )
        if not open_packages:
            return state
        options = {p: self.candidates(p, state.needs[p]) for p in open_packages}
        package = min(open_packages, key=lambda p: (len(options[p]), p))
        repository = self.repository_of(package, state.needs[package])
        for version, release in options[package]:
            nxt = state.copy()
            nxt.chosen[package] = (version, release, repository)
            if not self.add_deps(nxt, package, version, release, repository):
                continue
            solved = self.solve(nxt)
            if solved is not None:
                return solved
        return None

    def add_deps(
        self, state: _State, package: str, version: Version, release: Release, repository: str
    ) -> bool:
        by = f"{package} {version}"
        for dep in release.dependencies:
            try:
                requirement = Requirement.parse(dep.requirement)
            except VersionError:
                self.note_conflict(
                    ResolutionError(
                        f"{by} has an invalid requirement {dep.requirement!r} on {dep.package!r}"
                    )
                )
                return False
            need = _Need(
                requirement,
                by,
                dep.optional,
                dep.repository or repository,
                dep.app or dep.package,
            )
            earlier = list(state.needs.get(dep.package, []))
            state.needs.setdefault(dep.package, []).append(need)
            chosen = state.chosen.get(dep.package)
            if chosen is not None and not requirement.matches(chosen[0]):
                self.note_conflict(
                    ResolutionError(
                        f"{by} requires {dep.package} {str(requirement)!r}, but "
                        f"{dep.package} {chosen[0]} was chosen for " + _describe(earlier),
                        hint="relax a requirement, or pin the package in the lock file",
                    )
                )
                return False
        return True


def _versions(items: Sequence[tuple[Version, Release]]) -> str:
    return ", ".join(str(v) for v, _ in items[:10]) + (" ..." if len(items) > 10 else "") or "none"


def _describe(needs: Sequence[_Need]) -> str:
    return ", ".join(f"{str(n.requirement)!r} (from {n.by})" for n in needs)


def resolve(
    roots: Sequence[Requested],
    lookup: RegistryLookup,
    *,
    lock: Mapping[str, str] | None = None,
    max_steps: int = 100_000,
) -> Resolution:
    """Choose versions for ``roots`` and everything they need; raises :class:`ResolutionError`.

    ``lock`` pins packages to exact versions (see the module doc).
    """
    resolver = _Resolver(lookup, lock or {}, max_steps)
    start = _State()
    for root in roots:
        need = _Need(
            Requirement.parse(root.requirement),
            ROOT,
            root.optional,
            root.repository,
            root.app or root.package,
        )
        start.needs.setdefault(root.package, []).append(need)
    solved = resolver.solve(start)
    if solved is None:
        raise resolver.conflict or ResolutionError("dependencies cannot be resolved")
    return _result(solved)


def _result(state: _State) -> Resolution:
    entries: dict[str, Resolved] = {}
    for package, (version, release, repository) in state.chosen.items():
        deps = tuple(sorted({d.package for d in release.dependencies if d.package in state.chosen}))
        apps = {n.app for n in state.needs[package]}
        entries[package] = Resolved(
            package=package,
            version=str(version),
            repository=repository,
            app=sorted(apps)[0] if len(apps) == 1 else package,
            inner_checksum=release.inner_checksum.hex(),
            outer_checksum=release.outer_checksum.hex() if release.outer_checksum else None,
            deps=deps,
            retired=release.retired.reason_name if release.retired else None,
        )
    ordered: list[Resolved] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in entries[name].deps:
            visit(dep)
        ordered.append(entries[name])

    for name in sorted(entries):
        visit(name)
    return Resolution(tuple(ordered))
