"""Erlang source for terms: ``file:consult/1`` reads ``format(t) + ".\\n"`` back as ``t``.

The output is compact (like ``io_lib:format("~0p")``) and plain ASCII except for printable
non-ASCII characters inside strings, quoted atoms and ``/utf8`` binaries, so it reads back
identically from a UTF-8 file (the default encoding of ``file:consult/1``). Charlists
that are printable text print as ``"strings"``; binaries print as ``<<"text">>``,
``<<"text"/utf8>>`` or ``<<1,2,3>>``; floats print the shortest text that reads back as
the same double, always with a fraction (``1.0e10``; Erlang has no ``1e10``).

The printer walks an explicit stack, so any depth the parser accepts prints without
recursion.
"""

from __future__ import annotations

import math
import re

from bstore.errors import BstoreError
from bstore.specs.terms.lexer import MAX_ATOM_LENGTH, RESERVED_WORDS, is_unicode_scalar
from bstore.specs.terms.model import Atom, ImproperList, Term


class TermFormatError(BstoreError):
    """A Python value that has no Erlang source form (NaN, a bool, a too-long atom ...)."""


_UNQUOTED_ATOM = re.compile(r"[a-z\xdf-\xf6\xf8-\xff][a-zA-Z0-9_@\xc0-\xd6\xd8-\xf6\xf8-\xff]*")
# Quoted even though OTP 25 reads them bare: they are keywords from OTP 27 on.
_FUTURE_KEYWORDS = frozenset({"maybe", "else"})
_ESCAPES = {
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\b": "\\b",
    "\f": "\\f",
    "\x1b": "\\e",
    "\x7f": "\\d",
}
# Control characters io_lib counts as printable text (written as escapes).
_TEXT_CONTROLS = frozenset("\n\r\t\v\b\f\x1b")


class _Raw(str):
    """Literal output text on the printer's stack (never confused with a user's str)."""

    __slots__ = ()


_COMMA = _Raw(",")


def _is_text_char(char: str) -> bool:
    return char.isprintable() or char in _TEXT_CONTROLS


def _quote(text: str, quote: str) -> str:
    """``text`` between ``quote`` characters, escaped so erl_scan reads it back exactly."""
    out = [quote]
    for char in text:
        escaped = _ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char == quote:
            out.append("\\" + quote)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\x{{{ord(char):X}}}")
    out.append(quote)
    return "".join(out)


def format_atom(atom: Atom) -> str:
    """An atom, quoted only when Erlang needs the quotes."""
    name = atom.name
    if len(name) > MAX_ATOM_LENGTH:
        raise TermFormatError(
            f"atom {name[:40]!r}... is longer than {MAX_ATOM_LENGTH} characters",
            "Erlang atoms hold at most 255 characters; use a binary",
        )
    if any(not is_unicode_scalar(ord(c)) for c in name):
        raise TermFormatError(f"atom {name!r} contains a character Erlang refuses")
    if (
        _UNQUOTED_ATOM.fullmatch(name)
        and name not in RESERVED_WORDS
        and name not in _FUTURE_KEYWORDS
    ):
        return name
    return _quote(name, "'")


def format_float(value: float) -> str:
    """The shortest Erlang float literal that reads back as exactly ``value``."""
    if not math.isfinite(value):
        raise TermFormatError(
            f"float {value!r} has no Erlang form", "Erlang floats are finite; use an atom"
        )
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def format_int(value: int) -> str:
    """Decimal digits of any size (CPython's ``str`` refuses more than 4300 digits)."""
    if -(10**4000) < value < 10**4000:
        return str(value)
    if value < 0:
        return "-" + format_int(-value)
    digits = len(format(value, "x")) * 6 // 5  # a lower bound on the decimal length
    half = max(digits // 2, 1)
    high, low = divmod(value, 10**half)
    return format_int(high) + format_int(low).rjust(half, "0")


def _text_of_charlist(items: list[Term]) -> str | None:
    """The text a list of character codes spells, if it is printable; else None."""
    if not items:
        return None
    chars = []
    for item in items:
        if type(item) is not int or not is_unicode_scalar(item):
            return None
        char = chr(item)
        if not _is_text_char(char):
            return None
        chars.append(char)
    return "".join(chars)


def format_binary(data: bytes) -> str:
    """``<<"ascii or latin-1 text">>``, ``<<"unicode text"/utf8>>`` or ``<<1,2,3>>``."""
    if not data:
        return "<<>>"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(_is_text_char(c) for c in text):
        return "<<" + _quote(text, '"') + ("" if text.isascii() else "/utf8") + ">>"
    latin = data.decode("latin-1")
    if all(_is_text_char(c) for c in latin):
        # Characters 128-255 written literally read back as the same byte values.
        return "<<" + _quote(latin, '"') + ">>"
    return "<<" + ",".join(map(str, data)) + ">>"


def format_term(term: Term) -> str:
    """Erlang source for ``term`` (see the module docstring for the rules)."""
    out: list[str] = []
    # Items are terms to print or, as ``_Raw``, literal output text.
    stack: list[Term | _Raw] = [term]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is _Raw:
            assert isinstance(item, _Raw)
            out.append(item)
        elif kind is Atom:
            assert isinstance(item, Atom)
            out.append(format_atom(item))
        elif kind is int:
            assert isinstance(item, int)
            out.append(format_int(item))
        elif kind is float:
            assert isinstance(item, float)
            out.append(format_float(item))
        elif kind is bytes:
            assert isinstance(item, bytes)
            out.append(format_binary(item))
        elif kind is list:
            assert isinstance(item, list)
            text = _text_of_charlist(item)
            if text is not None:
                out.append(_quote(text, '"'))
            else:
                _push_sequence(stack, out, "[", item, "]")
        elif kind is tuple:
            assert isinstance(item, tuple)
            _push_sequence(stack, out, "{", list(item), "}")
        elif kind is ImproperList:
            assert isinstance(item, ImproperList)
            if not item.items:
                raise TermFormatError("an improper list needs at least one element")
            stack.extend([_Raw("]"), item.tail, _Raw("|")])
            _push_sequence(stack, out, "[", list(item.items), "")
        elif kind is dict:
            assert isinstance(item, dict)
            out.append("#{")
            stack.append(_Raw("}"))
            pairs = list(item.items())
            for index in range(len(pairs) - 1, -1, -1):
                key, value = pairs[index]
                stack.extend([value, _Raw(" => "), key])
                if index:
                    stack.append(_Raw(","))
        else:
            raise TermFormatError(
                f"{item!r} ({kind.__name__}) is not an Erlang term",
                "use Atom, bytes, int, float, tuple, list, ImproperList or dict"
                " (use Atom('true') for booleans)",
            )
    return "".join(out)


def _push_sequence(
    stack: list[Term | _Raw], out: list[str], opening: str, items: list[Term], closing: str
) -> None:
    out.append(opening)
    if closing:
        stack.append(_Raw(closing))
    for index in range(len(items) - 1, -1, -1):
        stack.append(items[index])
        if index:
            stack.append(_COMMA)
