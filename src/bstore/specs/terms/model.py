"""The Python model of Erlang terms, faithful enough to round-trip through the BEAM.

=================  =======================================  =========================
Erlang             Python                                   note
=================  =======================================  =========================
atom ``ok``        :class:`Atom` (``Atom("ok")``)            hashable, distinct from str
binary ``<<..>>``  ``bytes``                                 ``<<"x"/utf8>>`` too
integer            ``int``                                   any size
float              ``float``
tuple ``{..}``     ``tuple``
list ``[..]``      ``list``                                  ``"abc"`` is ``[97, 98, 99]``
improper list      :class:`ImproperList`                     ``[a | b]``
map ``#{..}``      ``dict``                                  keys must be hashable
=================  =======================================  =========================

A string literal is a list of character codes, exactly as in Erlang, so a charlist the
user wrote reaches the BEAM as a charlist. Maps are ``dict``; Erlang maps whose keys are
lists or maps cannot be represented (``dict`` keys must be hashable), and the parser
rejects them with a positioned error. Python's ``1 == 1.0`` differs from Erlang's
``=:=``; compare with :func:`exactly_equal` where that matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, Union


@dataclass(frozen=True, slots=True)
class Atom:
    """An Erlang atom."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class ImproperList:
    """An improper list ``[h1, h2, ... | tail]`` whose tail is not a list."""

    items: tuple[Term, ...]
    tail: Term


Term: TypeAlias = Union[  # noqa: UP007 - a recursive alias needs the string-free Union
    Atom, bytes, int, float, tuple["Term", ...], list["Term"], ImproperList, dict["Term", "Term"]
]


_INTS = frozenset({int})


def exactly_equal(a: Term, b: Term) -> bool:
    """Erlang's ``=:=``: like ``==`` but integers never equal floats, at any depth."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        assert isinstance(b, list | tuple)
        # =:= implies ==, so a C-speed == rejects at once; and two equal lists of nothing
        # but integers (charlists: most of an app's env) are exactly equal without the
        # element-wise walk (a plan compares every env of a 50-app generation).
        if len(a) != len(b) or a != b:
            return False
        if _INTS.issuperset(map(type, a)) and _INTS.issuperset(map(type, b)):
            return True
        return all(exactly_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        if len(a) != len(b):
            return False
        for key, value in a.items():
            match = [k for k in b if exactly_equal(k, key)]
            if len(match) != 1 or not exactly_equal(value, b[match[0]]):
                return False
        return True
    if isinstance(a, ImproperList):
        assert isinstance(b, ImproperList)
        return exactly_equal(list(a.items), list(b.items)) and exactly_equal(a.tail, b.tail)
    return a == b
