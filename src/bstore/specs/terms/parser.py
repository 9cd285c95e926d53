"""Erlang terms from tokens, accepting exactly what ``file:consult/1`` accepts (OTP 25).

``file:consult/1`` parses each ``.``-terminated form as an Erlang *expression*
(``erl_parse``) and then keeps only the expressions ``erl_parse:normalise/1`` can turn
into a term: literals, tuples, lists (``[a|b]`` included), ``#{K => V}`` maps,
binaries (evaluated by ``eval_bits``), parenthesised terms ``(1)``, and a unary ``-`` or
``+`` applied directly to a number or ``$c`` literal (``-1``, ``- 1``, ``-(1)``; but not
``-(-1)``). Everything else — variables, operators such as ``1+2``, ``:=``, records,
calls, ``begin``/``case``, comprehensions — is refused, as consult refuses it.
``fun m:f/1`` is the one form consult accepts that our term model cannot hold: it is
refused with its own message.

The parser is a loop over an explicit stack (no Python recursion per nesting level), so
nesting depth is bounded by :data:`MAX_DEPTH` and reported as a positioned error instead
of a ``RecursionError``. Binaries recurse once per nested ``<<`` and are bounded the same
way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# ``located`` imports ``terms.model``, so importing it by name here would make the two
# packages' import order matter; the module object is resolved when first used instead.
from bstore.specs import located as _located
from bstore.specs.terms.binary import (
    MAX_SEGMENT_BITS,
    BitWriter,
    SegmentError,
    SegmentType,
    segment_bits,
    write_string,
)
from bstore.specs.terms.errors import TermSyntaxError
from bstore.specs.terms.lexer import LineIndex, Token, tokenize
from bstore.specs.terms.model import ImproperList, Term, exactly_equal

if TYPE_CHECKING:
    from bstore.specs.located import Located, Position

# Far deeper than any hand-written spec (they nest ~10 levels), and shallow enough that
# code walking the result recursively (``==``, ``repr``, exactly_equal, schema checks)
# stays well below Python's default recursion limit of 1000 frames.
MAX_DEPTH = 256
# Each nested << >> costs a few Python stack frames (segment values are parsed by a
# recursive call), so binaries inside binaries get their own, smaller bound.
MAX_BINARY_NESTING = 50
# Sized segments can make a short literal huge (<<0:80000000>>); all binaries built from
# one text together stay within a few times the largest spec file.
MAX_BINARY_BITS = MAX_SEGMENT_BITS

_TUPLE, _LIST, _TAIL, _MAP_KEY, _MAP_VALUE, _PAREN, _UNARY = range(7)
_OPENERS = frozenset(["{", "[", "(", "#", "-", "+"])

# What kind of literal a just-finished value was, for the rules that care: unary minus
# applies only to number literals, and a string written directly in a binary is a
# sequence of character segments (even when parenthesised, since erl_parse drops parens).
_NUMBER, _STRING = 1, 2


def describe(token: Token) -> str:
    """How a token is named in 'found ...' messages."""
    kind, value, _ = token
    if kind == "eof":
        return "end of file"
    if kind == "dot":
        return "'.' (end of term)"
    if kind == ".":
        return "'.' (not followed by white space)"
    if kind == "atom":
        return f"atom '{value.name}'"
    if kind in ("int", "float"):
        return f"number {value!r}"
    if kind == "char":
        return f"character {chr(value)!r}"
    if kind == "string":
        shown = value if len(value) <= 20 else value[:20] + "..."
        return f"string {shown!r}"
    if kind == "var":
        return f"variable {value}"
    if kind == "reserved":
        return f"reserved word '{value}'"
    return f"'{kind}'"


class _Parser:
    """One parse of one text; holds what every step needs."""

    def __init__(self, text: str, source: str, located: bool) -> None:
        self.text = text
        self.source = source
        self.located = located
        self.tokens = tokenize(text, source)
        self._lines: LineIndex | None = None
        self.binary_nesting = 0
        self.binary_bits = 0
        self.last_string = ""  # the text of the latest string literal, for binaries

    # -- positions and errors -------------------------------------------------------

    def position(self, offset: int) -> Position:
        if self._lines is None:
            self._lines = LineIndex(self.text)
        return _located.Position(*self._lines.position(offset))

    def error(self, offset: int, what: str, hint: str | None = None) -> TermSyntaxError:
        pos = self.position(offset)
        return TermSyntaxError(self.source, pos.line, pos.column, what, hint)

    def expected(self, what: str, index: int) -> TermSyntaxError:
        token = self.tokens[index]
        return self.error(token[2], f"expected {what}, found {describe(token)}")

    # -- forms ----------------------------------------------------------------------

    def forms(self) -> list[tuple[Term, Located | None]]:
        """Every ``.``-terminated term of the text."""
        out: list[tuple[Term, Located | None]] = []
        tokens = self.tokens
        index = 0
        while tokens[index][0] != "eof":
            term, loc, _, index = self.term(index, 0)
            if tokens[index][0] != "dot":
                raise self.expected("'.' after the term", index)
            index += 1
            out.append((term, loc))
        return out

    # -- one term ---------------------------------------------------------------------

    def term(self, index: int, depth: int) -> tuple[Term, Located | None, int, int]:
        """Parse one term starting at token ``index``.

        Returns the term, its located form (when locating), what literal it was (for
        binaries) and the index of the first token after it.
        """
        tokens = self.tokens
        located = self.located
        stack: list[list[Any]] = []
        while True:
            # ---- a value starts here --------------------------------------------------
            kind, value, offset = tokens[index]
            index += 1
            lit = 0
            term: Term
            if kind == "atom":
                term = value
            elif kind == "int" or kind == "char" or kind == "float":
                term = value
                lit = _NUMBER
            elif kind == "string":
                if tokens[index][0] == "string":
                    parts = [value]
                    while tokens[index][0] == "string":
                        parts.append(tokens[index][1])
                        index += 1
                    value = "".join(parts)
                term = list(map(ord, value))
                lit = _STRING
                self.last_string = value
            elif kind in _OPENERS:
                if kind == "#":
                    if tokens[index][0] != "{":
                        raise self.expected("'{' after '#' (records are not terms)", index)
                    index += 1
                    kind = "#{"
                close = {"{": "}", "[": "]", "#{": "}"}.get(kind)
                if close is not None and tokens[index][0] == close:
                    index += 1
                    term = () if kind == "{" else [] if kind == "[" else {}
                else:
                    if len(stack) + depth >= MAX_DEPTH:
                        raise self.error(offset, f"terms nested deeper than {MAX_DEPTH} levels")
                    frame_type = {"{": _TUPLE, "[": _LIST, "#{": _MAP_KEY, "(": _PAREN}.get(
                        kind, _UNARY
                    )
                    frame: list[Any] = [frame_type, [], [] if located else None, offset, kind]
                    if frame_type == _MAP_KEY:
                        # Where each key starts, for errors about keys (located or not).
                        frame.append([tokens[index][2]])
                    stack.append(frame)
                    continue
            elif kind == "<<" and tokens[index][0] == "string" and tokens[index + 1][0] == ">>":
                # Fast path for the common <<"text">>: characters truncated to bytes.
                text = tokens[index][1]
                term = text.encode("latin-1") if text.isascii() else _latin1_bytes(text)
                index += 2
            elif kind == "<<":
                if self.binary_nesting >= MAX_BINARY_NESTING:
                    raise self.error(
                        offset, f"binaries nested deeper than {MAX_BINARY_NESTING} levels"
                    )
                self.binary_nesting += 1
                term, index = self.binary(index, depth + len(stack) + 1)
                self.binary_nesting -= 1
            elif kind == "var":
                raise self.error(
                    offset,
                    f"variable {value} is not allowed in a term",
                    "quote it to make an atom ('" + value + "') or write a string",
                )
            elif kind == "reserved" and value == "fun":
                raise self.error(offset, "funs are not supported in spec terms")
            else:
                raise self.error(offset, f"expected a term, found {describe(tokens[index - 1])}")
            loc = _located.Located(term, self.position(offset)) if located else None

            # ---- fold the finished value into the enclosing frames ------------------------
            while True:
                if not stack:
                    return term, loc, lit, index
                frame = stack[-1]
                frame_type = frame[0]
                next_kind = tokens[index][0]
                if frame_type in (_TUPLE, _LIST):
                    frame[1].append(term)
                    if located:
                        frame[2].append(loc)
                    if next_kind == ",":
                        index += 1
                        break
                    if frame_type == _TUPLE:
                        if next_kind != "}":
                            raise self.expected("',' or '}' in tuple", index)
                        term = tuple(frame[1])
                    elif next_kind == "]":
                        term = frame[1]
                    elif next_kind == "|":
                        frame[0] = _TAIL
                        index += 1
                        break
                    else:
                        raise self.expected("',', '|' or ']' in list", index)
                    index += 1
                    stack.pop()
                    lit = 0
                    if located:
                        loc = _located.Located(term, self.position(frame[3]), tuple(frame[2]))
                elif frame_type == _MAP_KEY:
                    if next_kind != "=>":
                        raise self.expected("'=>' or ',' in map", index)
                    frame[1].append(term)
                    if located:
                        frame[2].append(loc)
                    frame[0] = _MAP_VALUE
                    index += 1
                    break
                elif frame_type == _MAP_VALUE:
                    frame[1].append(term)
                    if located:
                        frame[2].append(loc)
                    if next_kind == ",":
                        frame[0] = _MAP_KEY
                        index += 1
                        frame[5].append(tokens[index][2])
                        break
                    if next_kind != "}":
                        raise self.expected("',' or '}' in map", index)
                    index += 1
                    stack.pop()
                    term = self.build_map(frame[1], frame[5])
                    lit = 0
                    if located:
                        loc = _located.Located(term, self.position(frame[3]), tuple(frame[2]))
                elif frame_type == _TAIL:
                    if next_kind != "]":
                        raise self.expected("']' after the tail of a list", index)
                    index += 1
                    stack.pop()
                    term, loc = self.build_tail(frame, term, loc)
                    lit = 0
                elif frame_type == _PAREN:
                    if next_kind != ")":
                        raise self.expected("')'", index)
                    index += 1
                    stack.pop()
                else:  # _UNARY
                    if lit != _NUMBER:
                        raise self.error(
                            frame[3],
                            f"'{frame[4]}' applies only to a number literal here",
                            "expressions are not evaluated in spec terms; write the value",
                        )
                    stack.pop()
                    assert isinstance(term, int | float)
                    if frame[4] == "-":
                        term = -term
                    lit = 0
                    if located:
                        loc = _located.Located(term, self.position(frame[3]))

    # -- compound values ------------------------------------------------------------

    def build_tail(
        self, frame: list[Any], tail: Term, tail_loc: Located | None
    ) -> tuple[Term, Located | None]:
        """``[a, b | Tail]``: a proper list when the tail is one, else an ImproperList."""
        items: list[Term] = frame[1]
        locs: list[Located] = frame[2] if self.located else []
        term: Term
        if isinstance(tail, list):
            term = items + tail
            if tail_loc is not None:
                # A literal tail list [b, c] contributes its elements; a string tail
                # ("bc", a leaf) stays one child.
                locs = locs + list(tail_loc.children or (tail_loc,))
        elif isinstance(tail, ImproperList):
            term = ImproperList(tuple(items) + tail.items, tail.tail)
            if tail_loc is not None:
                locs = locs + list(tail_loc.children)
        else:
            term = ImproperList(tuple(items), tail)
            if tail_loc is not None:
                locs = [*locs, tail_loc]
        if not self.located:
            return term, None
        return term, _located.Located(term, self.position(frame[3]), tuple(locs))

    def build_map(self, items: list[Term], key_offsets: list[int]) -> Term:
        """A dict from alternating keys and values; later duplicates win, as in Erlang."""
        try:
            fast: dict[Term, Term] = dict(zip(items[0::2], items[1::2], strict=True))
        except TypeError:
            fast = {}
        if len(fast) * 2 == len(items):
            return fast  # every key distinct and hashable: nothing to check
        out: dict[Term, Term] = {}
        keys: dict[Term, Term] = {}
        for position in range(0, len(items), 2):
            key = items[position]
            try:
                previous = keys.setdefault(key, key)
            except TypeError:
                raise self.error(
                    key_offsets[position // 2],
                    f"map key {key!r} is a list or map, which bstore cannot represent",
                    "use an atom, binary, number or tuple of those as the key",
                ) from None
            if previous is not key and not exactly_equal(previous, key):
                raise self.error(
                    key_offsets[position // 2],
                    f"map keys {previous!r} and {key!r} are different in Erlang but"
                    " equal in bstore's term model",
                    "write integer and float keys so that they do not collide",
                )
            out[key] = items[position + 1]
        return out

    def binary(self, index: int, depth: int) -> tuple[bytes, int]:
        """The bytes of ``<< ... >>`` (the ``<<`` already consumed)."""
        tokens = self.tokens
        if tokens[index][0] == ">>":
            return b"", index + 1
        # Nested binaries count again in their parent: conservative, and still bounded.
        writer = BitWriter(MAX_BINARY_BITS - self.binary_bits)
        while True:
            start = tokens[index][2]
            value, _, lit, index = self.term(index, depth)
            size: int | None = None
            if tokens[index][0] == ":":
                size_offset = tokens[index + 1][2]
                size_term, _, _, index = self.term(index + 1, depth)
                if type(size_term) is not int or size_term < 0:
                    raise self.error(
                        size_offset,
                        f"binary segment size {size_term!r} is not a non-negative integer",
                    )
                size = size_term
            specifiers: list[tuple[str, int | None]] = []
            if tokens[index][0] == "/":
                while True:
                    index += 1
                    kind, name, _ = tokens[index]
                    if kind != "atom":
                        raise self.expected("a binary type specifier", index)
                    unit: int | None = None
                    index += 1
                    if tokens[index][0] == ":":
                        if tokens[index + 1][0] != "int":
                            raise self.expected("an integer unit", index + 1)
                        unit = tokens[index + 1][1]
                        index += 2
                    specifiers.append((name.name, unit))
                    if tokens[index][0] != "-":
                        break
            try:
                seg = SegmentType.resolve(specifiers, size is not None)
                if lit == _STRING:
                    write_string(writer, self.last_string, size, seg)
                else:
                    writer.write(*segment_bits(value, size, seg))
            except SegmentError as exc:
                raise self.error(start, f"invalid binary segment: {exc}") from None
            kind = tokens[index][0]
            index += 1
            if kind == ">>":
                break
            if kind != ",":
                raise self.expected("',' or '>>' in binary", index - 1)
        if writer.bit_count % 8:
            raise self.error(
                start,
                f"binary of {writer.bit_count} bits is a bitstring, which bstore cannot represent",
            )
        self.binary_bits += writer.bit_count
        return writer.getvalue(), index


def _latin1_bytes(text: str) -> bytes:
    """A string inside a binary: each character truncated to a byte, as eval_bits does."""
    return bytes([ord(char) & 0xFF for char in text])


def parse_terms(text: str, source: str) -> list[Term]:
    """Every ``.``-terminated term in ``text``."""
    return [term for term, _ in _Parser(text, source, located=False).forms()]


def parse_located_terms(text: str, source: str) -> list[Located]:
    """Every ``.``-terminated term in ``text``, with positions."""
    out: list[Located] = []
    for _, loc in _Parser(text, source, located=True).forms():
        assert loc is not None
        out.append(loc)
    return out
