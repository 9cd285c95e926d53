"""The desired state of a commit, parsed in proportion to what changed, and the
generation manifest built from it in proportion to what changed.

:class:`SpecCache` reads ``<checkout>/<apps_dir>`` like
:func:`~bstore.specs.directory.load_apps_dir`, but an app directory whose git tree id is
the same as in an earlier pass is not parsed again: its spec (or its problems) comes
from the cache. Directories holding symlinks are always parsed (a link's target may
change without the directory's tree changing). The cross-app checks (duplicates,
unknown dependencies, cycles) run on every pass; they are cheap. :func:`annotate_store`
tells, for ``bstore plan``, which outputs to build are already in the store.

:func:`merge_manifest` builds the next generation's manifest from the active one: apps
whose code is unchanged keep their entry (only the spec fields are replaced: env,
health, depends_on, isolation, vm_config), so only rebuilt apps cost store queries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pygit2

from bstore.errors import BstoreError
from bstore.generations.generation import AppBuild, GenerationError, make_manifest
from bstore.generations.manifest import AppEntry, GenerationManifest, SourceIdentity
from bstore.gitops.planner import BuildNeed, ReconcilePlan
from bstore.specs.directory import (
    AppsResult,
    cross_check,
    display,
    find_spec_file,
    load_app_dir,
)
from bstore.specs.model import AppSpec, IconSpec, SourceSpec
from bstore.specs.problems import Problem, Severity
from bstore.store.local import LocalStore

_SYMLINK_MODE = 0o120000


class DesiredStateError(BstoreError):
    """A desired state that cannot be read at all (the apps directory is unusable)."""


def check_apps_dir(apps_dir: str) -> PurePosixPath:
    """``apps_dir`` as a relative path inside the checkout; refuses absolute paths,
    ``..`` parts and NUL bytes (the repo layout must not point bstore elsewhere)."""
    if "\0" in apps_dir:
        raise DesiredStateError(f"apps_dir {apps_dir!r} contains a NUL byte",
                                hint="set apps_dir to a directory of the repository")
    path = PurePosixPath(apps_dir)
    if path.is_absolute() or ".." in path.parts or not apps_dir.strip():
        raise DesiredStateError(
            f"apps_dir {apps_dir!r} is not a relative path inside the repository",
            hint="use a path like 'apps' (no leading '/', no '..')")
    return path


@dataclass
class SpecCache:
    """Parsed app directories by (name, git tree id); see the module docstring."""

    entries: dict[tuple[str, str], tuple[AppSpec | None, list[Problem]]] = field(
        default_factory=dict)
    by_commit: dict[str, AppsResult] = field(default_factory=dict)
    parsed: int = 0  # directories actually parsed (for tests and benchmarks)

    def load(self, repo_dir: Path, commit: str, checkout: Path, apps_dir: str) -> AppsResult:
        """The specs of ``commit`` (exported at ``checkout``), parsing only app
        directories whose tree changed since they were last parsed."""
        known = self.by_commit.get(commit)
        if known is not None:
            return known
        rel = check_apps_dir(apps_dir)
        root = checkout / rel
        trees = _app_trees(repo_dir, commit, rel)
        try:
            real_root = Path(os.path.realpath(root, strict=True))
            if not _inside(real_root, Path(os.path.realpath(checkout))):
                raise DesiredStateError(
                    f"apps directory {display(root)} resolves outside the checkout",
                    hint="apps_dir must be a directory of the repository, not a link out")
            names = sorted(os.listdir(root))
        except OSError as exc:
            raise DesiredStateError(
                f"cannot read apps directory {apps_dir!r} of commit {commit[:12]}:"
                f" {exc.strerror}", hint="check apps_dir in bstore.toml, or add the"
                " directory to the repository") from exc
        problems: list[Problem] = []
        specs: list[AppSpec] = []
        failed: set[str] = set()
        fresh: dict[tuple[str, str], tuple[AppSpec | None, list[Problem]]] = {}
        for name in names:
            if name.startswith("."):
                continue
            path = root / name
            if not path.is_dir():
                problems.append(Problem(Severity.NOTE, display(path), None,
                                        "not a directory (skipped)"))
                continue
            tree_id = trees.get(name)
            key = (name, tree_id) if tree_id is not None else None
            cached = self.entries.get(key) if key is not None else None
            if cached is None:
                location = find_spec_file(path)
                if location.spec_file is None:
                    problems.append(Problem(Severity.NOTE, display(path), None,
                                            "no spec file (skipped)"))
                    continue
                cached = load_app_dir(location, apps_root=real_root)
                self.parsed += 1
            if key is not None:
                fresh[key] = cached
            spec, found = cached
            problems += found
            if spec is None:
                failed.add(name)
            else:
                specs.append(spec)
        # Only the current commit's directories are kept: the cache never outgrows the repo.
        self.entries = fresh
        result = cross_check(specs, problems, failed=failed)
        self.by_commit = {commit: result}
        return result


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _app_trees(repo_dir: Path, commit: str, rel: PurePosixPath) -> dict[str, str]:
    """App directory name → git tree id, for directories without symlinked entries
    (those are never cached). Empty when the tree cannot be read (nothing is cached)."""
    try:
        repo = pygit2.Repository(str(repo_dir))
        tree = repo[commit].peel(pygit2.Tree)
        for part in rel.parts:
            tree = repo[tree[part].id].peel(pygit2.Tree)
    except (KeyError, ValueError, pygit2.GitError):
        return {}
    out: dict[str, str] = {}
    for entry in tree:
        if entry.filemode != pygit2.enums.FileMode.TREE or entry.name is None:
            continue
        sub = repo[entry.id].peel(pygit2.Tree)
        if any(e.filemode == _SYMLINK_MODE for e in sub):
            continue
        out[entry.name] = str(entry.id)
    return out


def app_errors(result: AppsResult, checkout: Path | None = None
               ) -> tuple[dict[str, str], list[str]]:
    """Failed app → its error messages (joined), found by the app directory each
    problem names; and the error lines of no failed app. Paths are shown relative to
    ``checkout`` (the repository), not where the checkout happens to live."""
    prefix = f"{checkout}/" if checkout is not None else None

    def shown(text: str) -> str:
        return text.replace(prefix, "") if prefix else text

    out: dict[str, list[str]] = {name: [] for name in result.failed}
    other: list[str] = []
    for p in result.problems:
        if p.severity is not Severity.ERROR:
            continue
        parts = PurePosixPath(p.source).parts
        owner = parts[-2] if len(parts) >= 2 else None
        if owner in out:
            out[owner].append(shown(f"{p.location}: {p.message}"))
        else:
            other.append(shown(str(p)))
    return {name: "; ".join(msgs) or "invalid spec" for name, msgs in out.items()}, other


def spec_from_entry(entry: AppEntry, *, version: str | None = None) -> AppSpec:
    """An :class:`AppSpec` equivalent to a generation's entry (for ``upgrade`` and
    ``deploy`` on top of what runs). With ``version``, a hex source whose ref was the old
    version follows the new one."""
    src = entry.source
    ref = src.ref
    if version is not None and ref == entry.version:
        ref = version
    return AppSpec(
        name=entry.name, version=version or entry.version,
        source=SourceSpec(src.type, ref=ref, repo=src.repo, url=src.url, sha256=src.sha256,
                          mcid=src.mcid),
        icon=IconSpec.identicon(entry.name), env=dict(entry.env), health=entry.health,
        depends_on=entry.depends_on, isolation=entry.isolation, vm_config=entry.vm_config)


def reuse_entry(entry: AppEntry, spec: AppSpec, commit: str | None) -> AppEntry:
    """``entry`` (same code) with the runtime fields of ``spec``."""
    return replace(entry, env=spec.env, health=spec.health, depends_on=spec.depends_on,
                   isolation=spec.isolation, vm_config=spec.vm_config,
                   source=SourceIdentity.from_spec(spec.source, entry.source.resolved),
                   origin=spec.origin.source if spec.origin is not None else entry.origin,
                   commit=commit)


def merge_manifest(store: LocalStore, active: GenerationManifest | None,
                   kept: Mapping[str, AppEntry], built: Sequence[AppBuild], *,
                   commit: str | None) -> GenerationManifest:
    """The manifest of ``kept`` entries (used as they are) plus ``built`` apps (read from
    the store). The code path of kept apps comes from ``active``; only the built apps'
    closures are scanned."""
    partial = make_manifest(store, list(built), commit=commit) if built else None
    keep_paths = {str(p) for e in kept.values() for p in e.closure}
    code_path: dict[str, str] = {}
    if active is not None:
        code_path = {k: v for k, v in active.code_path.items()
                     if v.split("/", 1)[0] in keep_paths}
    missing = keep_paths - {v.split("/", 1)[0] for v in code_path.values()}
    if missing and kept:
        # A kept entry not from ``active`` (a caller's own): compute its code path.
        code_path.update(_scan_code_path(store, kept, missing))
    apps = list(kept.values())
    if partial is not None:
        for key, target in partial.code_path.items():
            if code_path.setdefault(key, target) != target:
                raise GenerationError(
                    f"lib/{key} comes from two store paths: {code_path[key].split('/')[0]}"
                    f" and {target.split('/')[0]}",
                    hint="build both apps against the same dependency, or give them"
                    " different versions")
        apps += [a for a in partial.apps.values() if a.name not in kept]
    return GenerationManifest.of(apps, code_path, commit=commit)


def _scan_code_path(store: LocalStore, kept: Mapping[str, AppEntry],
                    paths: set[str]) -> dict[str, str]:
    from bstore.store.manifest import EntryType

    out: dict[str, str] = {}
    for entry in kept.values():
        for sp in entry.closure:
            if str(sp) not in paths:
                continue
            for e in store.query_manifest(sp).entries:
                parts = e.path.split(b"/")
                if len(parts) == 2 and parts[0] == b"lib" and e.type is EntryType.DIRECTORY:
                    out.setdefault(parts[1].decode("utf-8", "replace"),
                                   f"{sp}/lib/{parts[1].decode('utf-8', 'replace')}")
    return out


def drop_orphans(kept: dict[str, AppEntry], built: list[AppBuild],
                  desired: Mapping[str, AppSpec], failed: dict[str, str]) -> None:
    """Apps depending on a desired app that has no entry cannot start: fail them too."""
    changed = True
    while changed:
        changed = False
        present = set(kept) | {b.spec.name for b in built}
        for b in list(built):
            for dep in b.spec.depends_on:
                if dep in desired and dep not in present:
                    failed[b.spec.name] = f"dependency {dep!r} failed"
                    built.remove(b)
                    changed = True
                    break


def annotate_store(store: LocalStore, plan: ReconcilePlan, desired: Mapping[str, AppSpec],
                   hex_repos: Any, log: Callable[[str], None] = lambda _m: None
                   ) -> ReconcilePlan:
    """``plan`` with ``in_store`` and ``output`` set for each app to build: the realiser
    plans them (fetching their sources) and the store says whether each output is there."""
    import httpx

    from bstore.builders.realise import Realiser
    from bstore.builders.sources import Fetcher

    with httpx.Client(trust_env=False) as client:
        realiser = Realiser(Fetcher(store, client, hex_repos=hex_repos, log=log), log=log)
        built = realiser.plan([desired[n] for n in plan.to_build], jobs=os.cpu_count() or 1)
    changes = []
    for c in plan.changes:
        app = built.apps.get(c.name) if c.build is BuildNeed.BUILD else None
        if app is not None and app.key is not None:
            out = built.nodes[app.key].out
            c = replace(c, in_store=store.is_valid(out), output=store.full_path(out))
        elif app is not None and app.error is not None:
            c = replace(c, error=app.error.message)
        changes.append(c)
    return replace(plan, changes=tuple(changes))
