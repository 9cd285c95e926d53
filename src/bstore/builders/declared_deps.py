"""The Hex dependencies a source tree declares, read without running its build tool.

Each build system names its dependencies in its own file:

=========  ===================================================================
rebar3     ``rebar.config``: ``{deps, [Name | {Name, Req} | {Name, {pkg, P}} |
           {Name, Req, {pkg, P}}]}`` (Erlang terms; profiles are ignored)
mix        ``mix.exs``: the literal list of ``defp deps`` (or ``deps: [...]``);
           ``only:`` without ``:prod`` drops a dep, ``optional:``, ``hex:``, ``repo:``
           are honoured; when the list is computed, every Hex entry of ``mix.lock``
make       erlang.mk ``Makefile``: ``DEPS``/``BUILD_DEPS`` with ``dep_<n> = hex <vsn> [pkg]``
erlc       none
=========  ===================================================================

A ``rebar.lock`` or ``mix.lock`` next to it pins versions (:mod:`.hex.locks`). Only Hex
dependencies can be built from the store: a git or path dependency is an error naming
it. Everything here is pure text reading: untrusted code (``rebar.config.script``,
``mix.exs``) is never evaluated to find dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bstore.builders.hex.errors import LockError
from bstore.builders.hex.locks import (
    MAX_LOCK_SIZE,
    Lock,
    parse_mix_lock,
    parse_rebar_lock,
    read_elixir_literal,
)
from bstore.builders.hex.resolve import Requested
from bstore.errors import BstoreError
from bstore.specs.terms import Atom, Term, decode_source, parse

#: Build files larger than this are not build files.
_MAX_BUILD_FILE = 1 << 20


class DeclaredDepsError(BstoreError):
    """A build file whose dependencies cannot be read or cannot come from Hex."""


@dataclass(frozen=True)
class DeclaredDeps:
    """The Hex packages a source asks for, and the pins of its lock file (if any)."""

    requested: tuple[Requested, ...] = ()
    lock: dict[str, str] = field(default_factory=dict)
    lock_file: str | None = None


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_BUILD_FILE + 1)
    except OSError as exc:
        raise DeclaredDepsError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    if len(data) > _MAX_BUILD_FILE:
        raise DeclaredDepsError(f"{str(path)!r} is larger than {_MAX_BUILD_FILE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeclaredDepsError(f"{str(path)!r} is not UTF-8 text") from exc


def read_declared_deps(source_dir: Path, build_system: str, *,
                       label: str | None = None) -> DeclaredDeps:
    """The Hex dependencies the tree at ``source_dir`` (built by ``build_system``)
    declares. ``label`` names the source in errors (default: the directory)."""
    where = label or str(source_dir)
    if build_system == "rebar3":
        requested = _rebar_deps(source_dir / "rebar.config", where)
        lock = _lock(source_dir / "rebar.lock", where, parse_rebar_lock)
    elif build_system == "mix":
        lock = _lock(source_dir / "mix.lock", where, parse_mix_lock)
        try:
            requested = _mix_deps(source_dir / "mix.exs", where)
        except DeclaredDepsError:
            if lock is None:
                raise
            # mix.exs computes its deps; the lock still names every Hex package it
            # resolved to (dev/test-only ones included: built, never loaded).
            requested = [Requested(e.package, f"== {e.version}", app=e.name,
                                   repository=e.repository or "hexpm")
                         for e in lock.entries
                         if e.source == "hex" and e.package and e.version]
    elif build_system == "make":
        requested = _erlang_mk_deps(source_dir, where)
        lock = None
    else:
        return DeclaredDeps()
    return DeclaredDeps(tuple(requested), lock.pins() if lock else {},
                        lock.source if lock else None)


def _lock(path: Path, where: str, parser: object) -> Lock | None:
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_LOCK_SIZE:
        raise DeclaredDepsError(f"{where}: {path.name} is larger than {MAX_LOCK_SIZE} bytes")
    assert callable(parser)
    try:
        lock = parser(_read(path), f"{where}/{path.name}")
    except LockError as exc:
        raise DeclaredDepsError(exc.message, hint=exc.hint) from exc
    assert isinstance(lock, Lock)
    return lock


# -- rebar3 ---------------------------------------------------------------------------------

def _name(term: Term) -> str | None:
    if isinstance(term, Atom):
        return term.name
    if isinstance(term, bytes):
        return term.decode("utf-8", "replace")
    if isinstance(term, list) and all(isinstance(c, int) for c in term):
        return "".join(chr(c) for c in term)  # type: ignore[arg-type]
    return None


def _rebar_deps(path: Path, where: str) -> list[Requested]:
    if not path.is_file():
        return []
    label = f"{where}/rebar.config"
    try:
        terms = parse(decode_source(_read(path).encode("utf-8"), label), label)
    except BstoreError as exc:
        raise DeclaredDepsError(f"{label}: {exc.message}") from exc
    out: list[Requested] = []
    for term in terms:
        if not (isinstance(term, tuple) and len(term) == 2 and term[0] == Atom("deps")):
            continue
        if not isinstance(term[1], list):
            raise DeclaredDepsError(f"{label}: deps is not a list")
        for dep in term[1]:
            out.append(_rebar_dep(dep, label))
    return out


def _rebar_dep(dep: Term, label: str) -> Requested:
    try:
        if isinstance(dep, Atom):
            return Requested(dep.name, ">= 0.0.0", app=dep.name)
        if isinstance(dep, tuple) and dep and isinstance(dep[0], Atom):
            app = dep[0].name
            rest = list(dep[1:])
            requirement = ">= 0.0.0"
            package = app
            if rest and _name(rest[0]) is not None and not isinstance(rest[0], Atom):
                requirement = _name(rest[0]) or requirement
                rest = rest[1:]
            if rest and isinstance(rest[0], tuple) and rest[0] and rest[0][0] == Atom("pkg"):
                pkg = rest[0]
                package = (_name(pkg[1]) if len(pkg) > 1 else None) or app
                if len(pkg) > 2 and _name(pkg[2]):
                    requirement = _name(pkg[2]) or requirement
                rest = rest[1:]
            if not rest:
                return Requested(package or app, requirement, app=app)
    except BstoreError as exc:
        raise DeclaredDepsError(f"{label}: dependency {dep!r}: {exc.message}") from exc
    raise DeclaredDepsError(
        f"{label}: dependency {dep!r} is not a Hex package",
        hint="only Hex dependencies can be built from the store; publish it to a Hex"
        " repository (or a private mirror) and depend on that",
    )


# -- mix --------------------------------------------------------------------------------------

_DEPS_FUNCTION = re.compile(r"\bdefp?\s+deps\s*(?:\(\s*\))?\s*(?:,\s*do:|do)\s*(?=\[)")
_DEPS_KEYWORD = re.compile(r"\bdeps:\s*(?=\[)")


def _bracketed(text: str, start: int, label: str) -> str:
    """The ``[...]`` starting at ``start``, skipping brackets inside strings and comments."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
        i += 1
    raise DeclaredDepsError(f"{label}: the deps list is not closed")


def _mix_deps(path: Path, where: str) -> list[Requested]:
    label = f"{where}/mix.exs"
    text = _read(path)
    match = _DEPS_FUNCTION.search(text) or _DEPS_KEYWORD.search(text)
    if match is None:
        if re.search(r"\bdeps\b", text.replace("deps: deps()", "")):
            raise DeclaredDepsError(
                f"{label}: cannot find a literal deps list",
                hint="write deps as a literal list in `defp deps`, or commit a mix.lock",
            )
        return []
    literal = _bracketed(text, match.end(), label)
    try:
        value = read_elixir_literal(literal, label)
    except LockError as exc:
        raise DeclaredDepsError(
            f"{label}: the deps list is not a plain literal: {exc.message}",
            hint="bstore reads deps without running mix.exs: use literal tuples",
        ) from exc
    assert isinstance(value, list)
    out = []
    for dep in value:
        requested = _mix_dep(dep, label)
        if requested is not None:
            out.append(requested)
    return out


def _mix_dep(dep: object, label: str) -> Requested | None:
    if not (isinstance(dep, tuple) and dep and isinstance(dep[0], Atom)):
        raise DeclaredDepsError(f"{label}: dependency {dep!r} is not a {{:name, ...}} tuple")
    app = dep[0].name
    requirement = ">= 0.0.0"
    opts: dict[str, object] = {}
    for part in dep[1:]:
        if isinstance(part, str):
            requirement = part
        elif isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], Atom):
            # The reader turns trailing `key: value` sugar into {:key, value} items.
            opts[part[0].name] = part[1]
        elif isinstance(part, list):
            for item in part:
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Atom):
                    opts[item[0].name] = item[1]
    for key in ("git", "github", "path", "in_umbrella"):
        if key in opts:
            raise DeclaredDepsError(
                f"{label}: dependency {app!r} is a {key} dependency, not a Hex package",
                hint="only Hex dependencies can be built from the store",
            )
    only = opts.get("only")
    envs = [only] if isinstance(only, Atom) else only if isinstance(only, list) else None
    if envs is not None and Atom("prod") not in envs:
        return None  # dev/test-only: a MIX_ENV=prod build never loads it
    package = opts.get("hex")
    repo = opts.get("repo")
    try:
        return Requested(
            package.name if isinstance(package, Atom) else str(package or app),
            requirement,
            repository=repo if isinstance(repo, str) else "hexpm",
            app=app,
            optional=opts.get("optional") is True,
        )
    except BstoreError as exc:
        raise DeclaredDepsError(f"{label}: dependency {app!r}: {exc.message}") from exc


# -- erlang.mk ----------------------------------------------------------------------------------

_MAKE_ASSIGN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|\+=|=)\s*(.*?)\s*$")


def _erlang_mk_deps(source_dir: Path, where: str) -> list[Requested]:
    makefile = next((source_dir / n for n in ("GNUmakefile", "makefile", "Makefile")
                     if (source_dir / n).is_file()), None)
    if makefile is None:
        return []
    label = f"{where}/{makefile.name}"
    values: dict[str, str] = {}
    for line in _read(makefile).splitlines():
        match = _MAKE_ASSIGN.match(line)
        if match is None:
            continue
        key, op, value = match.groups()
        if op == "+=":
            values[key] = f"{values.get(key, '')} {value}".strip()
        elif op != "?=" or key not in values:
            values[key] = value
    out = []
    for app in (values.get("DEPS", "") + " " + values.get("BUILD_DEPS", "")).split():
        spec = values.get(f"dep_{app}", "").split()
        if len(spec) < 2 or spec[0] != "hex":
            raise DeclaredDepsError(
                f"{label}: dependency {app!r} has no 'dep_{app} = hex <version>' line",
                hint="bstore builds erlang.mk deps from Hex only; name the version",
            )
        package = spec[2] if len(spec) > 2 else app
        try:
            out.append(Requested(package, f"== {spec[1]}", app=app))
        except BstoreError as exc:
            raise DeclaredDepsError(f"{label}: dependency {app!r}: {exc.message}") from exc
    return out
