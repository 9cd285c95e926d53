"""SemVer versions and Hex version requirements, with Elixir's ``Version`` semantics.

A version is ``MAJOR.MINOR.PATCH[-PRE][+BUILD]``: numbers without leading zeros, dot
separated pre-release identifiers (numeric ones without leading zeros, compared as
numbers and below alphanumeric ones) and build metadata that never affects ordering.

A requirement is clauses joined by ``and`` / ``or`` (``and`` binds tighter, no
parentheses). A clause is an operator (``==`` when omitted, ``!=``, ``>``, ``>=``, ``<``,
``<=``, ``~>``) and a version; only ``~>`` takes a two-part version:

=================  ===========================================
``~> 2.1``         ``>= 2.1.0 and < 3.0.0-0``
``~> 2.1.3``       ``>= 2.1.3 and < 2.2.0-0``
``~> 2.1.3-dev``   ``>= 2.1.3-dev and < 2.2.0-0``
=================  ===========================================

The ``-0`` upper bounds mean ``~>`` never admits pre-releases of its upper bound.
With ``allow_pre=False`` (what a resolver uses for fresh choices) a pre-release version
only satisfies ``>``, ``>=`` and ``~>`` clauses whose own version is a pre-release;
``==``, ``!=``, ``<`` and ``<=`` are plain comparisons. This matches Elixir 1.14's
``Version.match?/3`` (the tests compare against the real ``elixir``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import total_ordering

from bstore.builders.hex.errors import VersionError

_NUM = r"(?:0|[1-9][0-9]*)"
_IDENT = r"[0-9A-Za-z-]+"
_VERSION = re.compile(
    rf"(?P<major>{_NUM})\.(?P<minor>{_NUM})(?:\.(?P<patch>{_NUM}))?"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?"
    rf"(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?"
)
_OPERATORS = ("~>", ">=", "<=", "==", "!=", ">", "<")

PreId = int | str


def _pre_ids(text: str | None, source: str) -> tuple[PreId, ...]:
    if text is None:
        return ()
    out: list[PreId] = []
    for ident in text.split("."):
        if ident.isdigit():
            if len(ident) > 1 and ident.startswith("0"):
                raise VersionError(
                    f"invalid version {source!r}: numeric pre-release part {ident!r} has a "
                    "leading zero"
                )
            out.append(int(ident))
        else:
            out.append(ident)
    return tuple(out)


def _pre_key(pre: tuple[PreId, ...]) -> tuple[tuple[int, int, str], ...]:
    # Numeric identifiers sort below alphanumeric ones; each compares within its kind.
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in pre)


@total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A parsed SemVer version; ordering and equality ignore ``build``."""

    major: int
    minor: int
    patch: int
    pre: tuple[PreId, ...] = ()
    build: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if min(self.major, self.minor, self.patch) < 0:
            raise VersionError(f"invalid version {self!s}: parts must not be negative")

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``text`` as a full three-part version; raises :class:`VersionError`."""
        version, parts = _parse_parts(text)
        if parts != 3:
            raise VersionError(
                f"invalid version {text!r}: expected MAJOR.MINOR.PATCH",
                hint="versions look like 1.2.3, 1.2.3-rc.1 or 1.2.3+build.5",
            )
        return version

    @property
    def is_pre(self) -> bool:
        """Whether this is a pre-release (has ``-PRE`` identifiers)."""
        return bool(self.pre)

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts above every pre-release of the same MAJOR.MINOR.PATCH.
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, _pre_key(self.pre))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.pre:
            text += "-" + ".".join(str(p) for p in self.pre)
        if self.build is not None:
            text += "+" + self.build
        return text


def _parse_parts(text: str) -> tuple[Version, int]:
    """Parse a version allowing a missing patch; returns it and how many parts it had."""
    match = _VERSION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise VersionError(
            f"invalid version {text!r}",
            hint="versions look like 1.2.3, 1.2.3-rc.1 or 1.2.3+build.5",
        )
    patch = match["patch"]
    version = Version(
        int(match["major"]),
        int(match["minor"]),
        int(patch) if patch is not None else 0,
        _pre_ids(match["pre"], text),
        match["build"],
    )
    return version, 3 if patch is not None else 2


@dataclass(frozen=True, slots=True)
class Clause:
    """One ``<op> <version>`` comparison of a requirement."""

    op: str
    version: Version
    # Only for ``~>``: whether the version was written with two parts (``~> 1.2``).
    two_parts: bool = False

    def __post_init__(self) -> None:
        if self.op not in _OPERATORS:
            raise VersionError(f"invalid requirement operator {self.op!r}")

    def upper(self) -> Version:
        """The exclusive upper bound of a ``~>`` clause."""
        v = self.version
        if self.two_parts:
            return Version(v.major + 1, 0, 0, (0,))
        return Version(v.major, v.minor + 1, 0, (0,))

    def matches(self, version: Version, *, allow_pre: bool = True) -> bool:
        """Whether ``version`` satisfies this clause."""
        pre_excluded = version.is_pre and not self.version.is_pre and not allow_pre
        if pre_excluded and self.op in (">", ">=", "~>"):
            return False
        if self.op == "==":
            return version == self.version
        if self.op == "!=":
            return version != self.version
        if self.op == ">":
            return version > self.version
        if self.op == ">=":
            return version >= self.version
        if self.op == "<":
            return version < self.version
        if self.op == "<=":
            return version <= self.version
        return self.version <= version < self.upper()

    def __str__(self) -> str:
        if self.op == "~>" and self.two_parts:
            v = self.version
            text = f"{v.major}.{v.minor}"
            if v.pre:
                text += "-" + ".".join(str(p) for p in v.pre)
            if v.build is not None:
                text += "+" + v.build
            return f"~> {text}"
        return f"{self.op} {self.version}"


@dataclass(frozen=True, slots=True)
class Requirement:
    """A requirement in disjunctive form: any group whose clauses all match."""

    source: str
    groups: tuple[tuple[Clause, ...], ...]

    def __post_init__(self) -> None:
        if not self.groups or not all(self.groups):
            raise VersionError(f"invalid requirement {self.source!r}: it has no clauses")

    @classmethod
    def parse(cls, text: str) -> Requirement:
        """Parse a Hex/Elixir requirement string; raises :class:`VersionError`."""
        return cls(text, _parse_requirement(text))

    def matches(self, version: Version, *, allow_pre: bool = True) -> bool:
        """Whether ``version`` satisfies the requirement (see the module doc for pre)."""
        return any(
            all(clause.matches(version, allow_pre=allow_pre) for clause in group)
            for group in self.groups
        )

    @property
    def mentions_pre(self) -> bool:
        """Whether any clause names a pre-release (so pre-releases may be chosen)."""
        return any(c.version.is_pre for group in self.groups for c in group)

    def __str__(self) -> str:
        return self.source


def _tokens(text: str) -> list[str]:
    """Split into operators, versions and ``and``/``or`` (an operator may touch its version)."""
    out: list[str] = []
    for word in text.split():
        if word in ("and", "or"):
            out.append(word)
            continue
        for op in _OPERATORS:
            if word.startswith(op):
                out.append(op)
                word = word[len(op) :]
                break
        if word:
            out.append(word)
    return out


def _parse_requirement(text: str) -> tuple[tuple[Clause, ...], ...]:
    if not isinstance(text, str):
        raise VersionError(f"invalid requirement {text!r}: not a string")
    tokens = _tokens(text)
    groups: list[tuple[Clause, ...]] = []
    current: list[Clause] = []
    i = 0
    expect_clause = True
    while i < len(tokens):
        token = tokens[i]
        if expect_clause:
            op = "=="
            if token in _OPERATORS:
                op = token
                i += 1
                if i >= len(tokens):
                    raise VersionError(f"invalid requirement {text!r}: {op!r} has no version")
                token = tokens[i]
            if token in ("and", "or") or token in _OPERATORS:
                raise VersionError(f"invalid requirement {text!r}: unexpected {token!r}")
            try:
                version, parts = _parse_parts(token)
            except VersionError as exc:
                raise VersionError(
                    f"invalid requirement {text!r}: {token!r} is not a version",
                    hint="requirements look like '~> 1.2', '>= 1.2.3 and < 2.0.0'",
                ) from exc
            if parts == 2 and op != "~>":
                raise VersionError(
                    f"invalid requirement {text!r}: {token!r} needs MAJOR.MINOR.PATCH "
                    f"with {op!r} (only '~>' takes MAJOR.MINOR)"
                )
            current.append(Clause(op, version, two_parts=parts == 2))
            expect_clause = False
        else:
            if token == "and":
                pass
            elif token == "or":
                groups.append(tuple(current))
                current = []
            else:
                raise VersionError(
                    f"invalid requirement {text!r}: expected 'and' or 'or' before {token!r}"
                )
            expect_clause = True
        i += 1
    if expect_clause:
        raise VersionError(
            f"invalid requirement {text!r}: it ends without a version"
            if tokens
            else f"invalid requirement {text!r}: it is empty"
        )
    groups.append(tuple(current))
    return tuple(groups)


def parse_version(text: str) -> Version:
    """Shorthand for :meth:`Version.parse`."""
    return Version.parse(text)


def parse_requirement(text: str) -> Requirement:
    """Shorthand for :meth:`Requirement.parse`."""
    return Requirement.parse(text)
