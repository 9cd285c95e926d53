"""An apps directory: find each app's spec file, read them all, check them against each other.

Layout: ``<apps>/<app>/<spec file>``, where the spec file is the first of
:data:`~bstore.specs.formats.SPEC_FILE_NAMES` that exists; later ones are reported as
shadowed. One bad spec never stops the others: :func:`load_apps_dir` returns the valid
specs and every problem. Across apps, duplicate names, unknown ``depends_on`` targets,
self-dependencies and cycles are errors on the apps involved, and an app that depends
on an excluded app is excluded too (it could not be started in dependency order).

A spec file (or the app directory it is in) may be a symlink, but the file it resolves
to must lie inside the apps directory: a repository must not make bstore read files
from elsewhere on the host.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bstore.specs.formats import SPEC_FILE_NAMES
from bstore.specs.loader import load_spec_file
from bstore.specs.located import Position
from bstore.specs.model import AppSpec, valid_app_name
from bstore.specs.problems import Problem, Severity, SpecError, errors_in


@dataclass(frozen=True)
class AppsResult:
    """Valid specs by app name, and every problem found (errors, warnings, notes)."""

    specs: Mapping[str, AppSpec]
    problems: tuple[Problem, ...]
    failed: frozenset[str] = field(default_factory=frozenset)

    @property
    def errors(self) -> list[Problem]:
        """The error-severity problems."""
        return errors_in(self.problems)


def display(path: Path | str) -> str:
    """``path`` safe to print: undecodable bytes and control characters escaped."""
    raw = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)


@dataclass(frozen=True)
class SpecLocation:
    """Where an app directory's spec is: the chosen file, and the files it shadows."""

    app_dir: Path
    spec_file: Path | None
    shadowed: tuple[Path, ...] = ()


def find_spec_file(app_dir: Path) -> SpecLocation:
    """The spec file of ``app_dir`` by precedence, and later candidates it shadows.

    A candidate counts if its name exists and is not a directory (an app may well have
    a ``config/`` directory); a broken symlink or a FIFO counts, so it is reported
    rather than silently passed over.
    """
    found: list[Path] = []
    for name in SPEC_FILE_NAMES:
        candidate = app_dir / name
        try:
            info = os.stat(candidate)
        except FileNotFoundError:
            if candidate.is_symlink():
                found.append(candidate)
            continue
        except OSError:
            found.append(candidate)
            continue
        if not stat.S_ISDIR(info.st_mode):
            found.append(candidate)
    if not found:
        return SpecLocation(app_dir, None)
    return SpecLocation(app_dir, found[0], tuple(found[1:]))


def _inside(path: Path, root: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real == root or root in real.parents


def _problem(severity: Severity, path: Path, message: str, hint: str | None = None) -> Problem:
    return Problem(severity, display(path), None, message, hint)


def load_app_dir(
    location: SpecLocation, *, apps_root: Path | None = None
) -> tuple[AppSpec | None, list[Problem]]:
    """Read the spec of one app directory, checking its name and where the file really is."""
    assert location.spec_file is not None
    spec_file = location.spec_file
    problems = [
        _problem(
            Severity.WARNING,
            shadowed,
            f"shadowed by {spec_file.name} (ignored)",
            hint=f"delete it, or merge it into {spec_file.name}",
        )
        for shadowed in location.shadowed
    ]
    dir_name = location.app_dir.name
    if not valid_app_name(dir_name):
        problems.append(
            _problem(
                Severity.ERROR,
                spec_file,
                f"directory name {display(dir_name)!r} is not a valid OTP application name",
                hint="name the directory after the app: a lowercase letter, then letters,"
                " digits or '_'",
            )
        )
        return None, problems
    if apps_root is not None and not _inside(spec_file, apps_root):
        problems.append(
            _problem(
                Severity.ERROR,
                spec_file,
                f"resolves to {display(os.path.realpath(spec_file))}, outside the apps"
                f" directory {display(apps_root)}",
                hint="spec files must live in the repository; copy it instead of linking",
            )
        )
        return None, problems
    result = load_spec_file(spec_file, source=display(spec_file), expected_name=dir_name)
    return result.spec, problems + list(result.problems)


def load_apps_dir(apps_dir: Path) -> AppsResult:
    """Read every app spec under ``apps_dir`` and check them against each other.

    Never raises for bad specs; raises :class:`SpecError` only if ``apps_dir`` itself
    cannot be listed.
    """
    try:
        root = Path(os.path.realpath(apps_dir, strict=True))
        entries = sorted(os.listdir(apps_dir))
    except OSError as exc:
        raise SpecError.at(
            display(apps_dir), None, f"cannot read apps directory: {exc.strerror}"
        ) from exc
    problems: list[Problem] = []
    specs: list[AppSpec] = []
    failed: set[str] = set()
    for entry in entries:
        if entry.startswith("."):
            continue  # .git, editor files: never apps
        path = apps_dir / entry
        if not path.is_dir():
            problems.append(_problem(Severity.NOTE, path, "not a directory (skipped)"))
            continue
        location = find_spec_file(path)
        if location.spec_file is None:
            problems.append(
                _problem(
                    Severity.NOTE,
                    path,
                    "no spec file (skipped)",
                    hint=f"an app directory holds one of {', '.join(SPEC_FILE_NAMES)}",
                )
            )
            continue
        spec, found = load_app_dir(location, apps_root=root)
        problems += found
        if spec is None:
            failed.add(entry)
        else:
            specs.append(spec)
    return cross_check(specs, problems, failed=failed)


def _where(spec: AppSpec, index: int | None = None) -> tuple[str, Position | None]:
    origin = spec.origin
    if origin is None:
        return f"<{spec.name}>", None
    if index is not None and index < len(origin.depends_on_pos):
        return origin.source, origin.depends_on_pos[index]
    return origin.source, origin.name_pos


def _find_cycle(members: set[str], graph: Mapping[str, Sequence[str]]) -> list[str]:
    """One cycle through the strongly connected ``members``, starting at the least name."""
    start = min(members)
    path, seen = [start], {start}
    while True:
        nxt = sorted(d for d in graph[path[-1]] if d in members)
        if start in nxt and len(path) > 1:
            return [*path, start]
        step = next((d for d in nxt if d not in seen), None)
        if step is None:  # dead end inside the component: back up
            path.pop()
            if not path:
                return [start, start]
            continue
        path.append(step)
        seen.add(step)


def _components(graph: Mapping[str, Sequence[str]]) -> list[set[str]]:
    # Tarjan's strongly connected components, iterative (dependency chains can be long).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for dep in edges:
                if dep not in index:
                    index[dep] = low[dep] = len(index)
                    stack.append(dep)
                    on_stack.add(dep)
                    work.append((dep, iter(graph[dep])))
                    break
                if dep in on_stack:
                    low[node] = min(low[node], index[dep])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    result.append(component)
    return result


def cross_check(
    specs: Iterable[AppSpec],
    problems: Iterable[Problem] = (),
    *,
    failed: Iterable[str] = (),
    check_targets: bool = True,
) -> AppsResult:
    """Check specs against each other; the result keeps only apps with no cross-app error.

    ``failed`` names apps whose spec had errors (so depending on them is an error, not
    an unknown target). With ``check_targets=False`` (a few files checked on their own)
    a dependency on an app that is not among ``specs`` is only noted.
    """
    out = list(problems)
    failed_names = set(failed)
    by_name: dict[str, list[AppSpec]] = {}
    for spec in specs:
        by_name.setdefault(spec.name, []).append(spec)

    def error(spec: AppSpec, index: int | None, message: str, hint: str | None = None) -> None:
        source, pos = _where(spec, index)
        out.append(Problem(Severity.ERROR, source, pos, message, hint))

    bad: set[str] = set()
    for name, group in by_name.items():
        if len(group) > 1:
            for spec in group:
                others = ", ".join(_where(o)[0] for o in group if o is not spec)
                error(spec, None, f"duplicate app name {name!r} (also in {others})")
            bad.add(name)
    unique = {name: group[0] for name, group in by_name.items() if len(group) == 1}
    for name, spec in unique.items():
        for i, dep in enumerate(spec.depends_on):
            if dep == name:
                error(spec, i, f"{name!r} depends on itself", hint="remove it from depends_on")
                bad.add(name)
            elif dep in failed_names or dep in bad:
                error(spec, i, f"depends on {dep!r}, whose spec has errors")
                bad.add(name)
            elif dep not in unique:
                if check_targets:
                    error(
                        spec,
                        i,
                        f"depends on {dep!r}, which is not an app in this directory",
                        hint="add its spec, or remove it from depends_on",
                    )
                    bad.add(name)
                else:
                    source, pos = _where(spec, i)
                    out.append(
                        Problem(
                            Severity.NOTE, source, pos, f"depends on {dep!r} (not checked here)"
                        )
                    )
    graph = {
        name: [d for d in spec.depends_on if d in unique and d != name and d not in bad]
        for name, spec in unique.items()
        if name not in bad
    }
    for component in _components(graph):
        if len(component) < 2:
            continue
        cycle = _find_cycle(component, graph)
        shown = " -> ".join(cycle)
        for a, b in itertools.pairwise(cycle):
            error(
                unique[a],
                unique[a].depends_on.index(b),
                f"dependency cycle: {shown}",
                hint="apps in a cycle cannot be started in order; break the cycle",
            )
        for member in sorted(component - set(cycle)):
            error(unique[member], None, f"part of a dependency cycle with {shown}")
        bad |= component
    changed = True
    while changed:  # an app whose dependency is excluded cannot start either
        changed = False
        for name, spec in sorted(unique.items()):
            if name in bad:
                continue
            for i, dep in enumerate(spec.depends_on):
                if dep in bad:
                    error(spec, i, f"depends on {dep!r}, which is excluded because of errors")
                    bad.add(name)
                    changed = True
                    break
    valid = {name: spec for name, spec in sorted(unique.items()) if name not in bad}
    return AppsResult(valid, tuple(out), frozenset(failed_names | bad))


def _is_app_dir(path: Path) -> bool:
    return find_spec_file(path).spec_file is not None


def check_paths(paths: Sequence[Path]) -> AppsResult:
    """What ``bstore spec check`` checks: apps directories, app directories and spec files.

    A directory holding a spec file is one app; any other directory is an apps
    directory. A file named like a spec file (``app.yaml``...) must name the app after
    its directory. Everything given is checked against everything else; when only
    files are given, dependencies on apps not among them are noted, not errors.
    """
    problems: list[Problem] = []
    specs: list[AppSpec] = []
    failed: set[str] = set()
    only_files = True
    for path in paths:
        if path.is_dir():
            only_files = False
            if _is_app_dir(path):
                location = find_spec_file(path)
                spec, found = load_app_dir(location, apps_root=Path(os.path.realpath(path.parent)))
            else:
                try:
                    sub = load_apps_dir(path)
                except SpecError as exc:
                    problems.append(exc.problem)
                    continue
                problems += sub.problems
                specs += sub.specs.values()
                failed |= sub.failed
                continue
        else:
            expected = path.parent.name if path.name in SPEC_FILE_NAMES else None
            result = load_spec_file(path, source=display(path), expected_name=expected)
            spec, found = result.spec, list(result.problems)
            if spec is None and expected:
                failed.add(expected)
        problems += found
        if spec is not None:
            specs.append(spec)
    return cross_check(specs, problems, failed=failed, check_targets=not only_files)
