"""Erlang terms in JSON (and YAML): the tagged form.

JSON and YAML have strings, numbers, booleans, null, arrays and objects; Erlang has
atoms, binaries, charlists, tuples, improper lists and maps with any keys. The plain
forms map as bc_gitops maps them, and a one-key object whose key starts with ``$`` says
exactly which Erlang term is meant:

==========================  ==========================  ==============================
JSON / YAML                 Erlang                      note
==========================  ==========================  ==============================
``"text"``                  ``<<"text"/utf8>>``          a string is a binary
``12``, ``1.5``             ``12``, ``1.5``
``true``, ``false``         ``true``, ``false``          atoms
``null``                    ``null``                     the atom, as bc_gitops decodes it
``[a, b]``                  ``[A, B]``                   a list
``{"k": v}``                ``#{k => V}``                keys become atoms
``{"$atom": "ok"}``         ``ok``
``{"$charlist": "abc"}``    ``"abc"`` (``[97,98,99]``)
``{"$binary": "abc"}``      ``<<"abc">>``                same as a plain string
``{"$base64": "AAE="}``     ``<<0,1>>``                  any bytes
``{"$tuple": [a, b]}``      ``{A, B}``
``{"$improper": [a, t]}``   ``[A | T]``                  the last element is the tail
``{"$map": [[k, v], ...]}`` ``#{K => V, ...}``           keys of any type
==========================  ==========================  ==============================

:func:`encode` writes a term in this form (used by ``AppSpec.to_json``); :func:`decode`
reads it back exactly; :func:`untag` reads it from a positioned YAML/JSON tree, with
errors naming the line and column.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, TypeAlias

from bstore.specs.located import Located, Position
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom, ImproperList, Term

#: What :func:`encode` returns: a value ``json.dumps`` accepts.
JsonValue: TypeAlias = Any

#: Erlang refuses atoms longer than this many characters.
MAX_ATOM_CHARS = 255

TAGS = ("$atom", "$charlist", "$binary", "$base64", "$tuple", "$improper", "$map")


def _printable(codes: list[Term]) -> bool:
    # Like io_lib:printable_unicode_list/1: only such lists read better as text.
    return bool(codes) and all(
        isinstance(c, int)
        and (
            c in (9, 10, 13) or 32 <= c < 127 or (160 <= c <= 0x10FFFF and not 0xD800 <= c < 0xE000)
        )
        for c in codes
    )


def encode(term: Term) -> JsonValue:
    """``term`` in the tagged JSON form; :func:`decode` returns exactly ``term``."""
    if isinstance(term, Atom):
        plain = {"true": True, "false": False, "null": None}
        return plain.get(term.name, {"$atom": term.name})
    if isinstance(term, bytes):
        try:
            return term.decode("utf-8")
        except UnicodeDecodeError:
            return {"$base64": base64.b64encode(term).decode("ascii")}
    if isinstance(term, bool):
        raise TypeError("a Python bool is not an Erlang term; use Atom('true')")
    if isinstance(term, int):
        return term
    if isinstance(term, float):
        if not math.isfinite(term):
            raise ValueError(f"{term!r} is not an Erlang float")
        return term
    if isinstance(term, tuple):
        return {"$tuple": [encode(t) for t in term]}
    if isinstance(term, list):
        if _printable(term):
            return {"$charlist": "".join(chr(c) for c in term)}  # type: ignore[arg-type]
        return [encode(t) for t in term]
    if isinstance(term, ImproperList):
        return {"$improper": [*(encode(t) for t in term.items), encode(term.tail)]}
    if isinstance(term, dict):
        if all(isinstance(k, Atom) and not k.name.startswith("$") for k in term):
            return {k.name: encode(v) for k, v in term.items()}  # type: ignore[union-attr]
        return {"$map": [[encode(k), encode(v)] for k, v in term.items()]}
    raise TypeError(f"not an Erlang term: {term!r}")


def _locate(value: JsonValue) -> Located:
    """A plain JSON value as a Located tree (as the JSON spec reader would build it)."""
    here = Position(1, 1)
    if isinstance(value, bool):
        return Located(Atom("true" if value else "false"), here)
    if value is None:
        return Located(Atom("null"), here)
    if isinstance(value, str):
        return Located(value.encode("utf-8"), here)
    if isinstance(value, int | float):
        return Located(value, here)
    if isinstance(value, list):
        children = tuple(_locate(v) for v in value)
        return Located([c.term for c in children], here, children)
    if isinstance(value, dict):
        parts: list[Located] = []
        for k, v in value.items():
            parts += [Located(Atom(str(k)), here), _locate(v)]
        term = {parts[i].term: parts[i + 1].term for i in range(0, len(parts), 2)}
        return Located(term, here, tuple(parts))
    raise TypeError(f"not a JSON value: {value!r}")


def decode(value: JsonValue, source: str = "<json>") -> Term:
    """The term a tagged-form JSON value (as from ``json.loads``) stands for."""
    return untag(_locate(value), source)


def _text(node: Located, source: str, tag: str) -> str:
    if not isinstance(node.term, bytes):
        raise SpecError.at(source, node.pos, f"{tag} expects a string, found {_show(node.term)}")
    try:
        return node.term.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError.at(source, node.pos, f"{tag} expects UTF-8 text") from exc


def _show(term: Term) -> str:
    if isinstance(term, bytes):
        return f"string {term.decode('utf-8', 'replace')!r}"
    if isinstance(term, dict):
        return "a mapping"
    if isinstance(term, list):
        return "a list"
    if isinstance(term, Atom):
        return term.name
    return repr(term)


def untag(node: Located, source: str) -> Term:
    """The Erlang term a YAML/JSON-derived tree stands for, tagged values resolved."""
    term = node.term
    if isinstance(term, list):
        return [untag(c, source) for c in node.children]
    if not isinstance(term, dict):
        return term
    keys, values = node.children[0::2], node.children[1::2]
    tagged = [k for k in keys if isinstance(k.term, Atom) and k.term.name.startswith("$")]
    if not tagged:
        return {k.term: untag(v, source) for k, v in zip(keys, values, strict=True)}
    first = tagged[0]
    assert isinstance(first.term, Atom)
    tag = first.term.name
    if tag not in TAGS:
        raise SpecError.at(
            source,
            first.pos,
            f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}",
            hint='to use a key starting with "$", write the map as {"$map": [[key, value]]}',
        )
    if len(keys) != 1:
        raise SpecError.at(
            source, first.pos, f"a tagged value {tag!r} must be the only key of its mapping"
        )
    return _tagged(tag, values[0], source)


def _tagged(tag: str, value: Located, source: str) -> Term:
    if tag == "$atom":
        name = _text(value, source, tag)
        if len(name) > MAX_ATOM_CHARS:
            raise SpecError.at(
                source, value.pos, f"atom is {len(name)} characters; at most {MAX_ATOM_CHARS}"
            )
        return Atom(name)
    if tag == "$charlist":
        return [ord(c) for c in _text(value, source, tag)]
    if tag == "$binary":
        _text(value, source, tag)
        assert isinstance(value.term, bytes)
        return value.term
    if tag == "$base64":
        text = _text(value, source, tag)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SpecError.at(
                source, value.pos, f"$base64 value {text[:40]!r} is not base64"
            ) from exc
    if not isinstance(value.term, list):
        raise SpecError.at(source, value.pos, f"{tag} expects a list, found {_show(value.term)}")
    items = [untag(c, source) for c in value.children]
    if tag == "$tuple":
        return tuple(items)
    if tag == "$improper":
        if len(items) < 2 or isinstance(items[-1], list):
            raise SpecError.at(
                source,
                value.pos,
                "$improper expects at least one element and a tail that is not a list",
            )
        return ImproperList(tuple(items[:-1]), items[-1])
    result: dict[Term, Term] = {}
    for pair, item in zip(value.children, items, strict=True):
        if not isinstance(item, list) or len(item) != 2:
            raise SpecError.at(source, pair.pos, "$map expects [key, value] pairs")
        key, val = item
        try:
            duplicate = key in result
        except TypeError as exc:
            raise SpecError.at(
                source, pair.pos, "a map key here cannot be a list or a map (not representable)"
            ) from exc
        if duplicate:
            raise SpecError.at(source, pair.pos, f"duplicate key {encode(key)!r} in $map")
        result[key] = val
    return result
