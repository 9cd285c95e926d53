"""Terms that remember where in a spec file they were written.

Every spec format (Erlang terms, YAML, JSON) is read into a :class:`Located` tree, so
schema errors can name the file, line and column of the offending value whatever the
format. :attr:`Located.term` is the plain term (see :mod:`bstore.specs.terms.model`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bstore.specs.terms.model import Term


@dataclass(frozen=True, slots=True)
class Position:
    """A 1-based line and column in a source file."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Located:
    """A term with its position and the located form of its parts.

    ``children`` holds, in source order: the elements of a tuple or list (for an
    improper list the tail comes last); for a map, key and value alternately
    (``k0, v0, k1, v1, ...``). Atoms, numbers and binaries have no children.
    """

    term: Term
    pos: Position
    children: tuple[Located, ...] = ()
