"""JSON spec files: a strict RFC 8259 reader that keeps line and column of every value.

The standard library decoder gives no positions, so this small reader walks the text
itself, using the standard library only for string escapes (``scanstring``). Duplicate
keys, ``NaN``/``Infinity``, over-long numbers and nesting deeper than
:data:`~bstore.specs.formats.MAX_DEPTH` are positioned errors.
"""

from __future__ import annotations

import bisect
import json
import math
import re

from bstore.specs.formats import MAX_DEPTH, atom_key, binary_of, mapping_of
from bstore.specs.located import Located, Position
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom

_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_JSON_WS = re.compile(r"[ \t\n\r]*")


class _JsonReader:
    """A strict RFC 8259 reader that keeps positions (the stdlib decoder does not)."""

    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source
        self.lines = [m.end() for m in re.finditer("\n", text)]

    def pos(self, offset: int) -> Position:
        line = bisect.bisect_right(self.lines, offset)
        start = self.lines[line - 1] if line else 0
        return Position(line + 1, offset - start + 1)

    def fail(self, offset: int, expected: str) -> SpecError:
        found = repr(self.text[offset]) if offset < len(self.text) else "end of file"
        return SpecError.at(self.source, self.pos(offset), f"expected {expected}, found {found}")

    def skip(self, offset: int) -> int:
        match = _JSON_WS.match(self.text, offset)
        assert match is not None
        return match.end()

    def document(self) -> Located:
        offset = self.skip(0)
        node, offset = self.value(offset, 0)
        offset = self.skip(offset)
        if offset != len(self.text):
            raise self.fail(offset, "end of file after the JSON value")
        return node

    def string(self, offset: int) -> tuple[str, int]:
        try:
            return json.decoder.scanstring(self.text, offset + 1, True)  # type: ignore[attr-defined,no-any-return]
        except json.JSONDecodeError as exc:
            raise SpecError.at(
                self.source, self.pos(exc.pos), f"bad JSON string: {exc.msg}"
            ) from exc

    def value(self, offset: int, depth: int) -> tuple[Located, int]:
        here = self.pos(offset)
        char = self.text[offset : offset + 1]
        if char in ("{", "["):
            if depth >= MAX_DEPTH:
                raise SpecError.at(self.source, here, f"nesting deeper than {MAX_DEPTH} levels")
            return self.obj(offset, depth) if char == "{" else self.array(offset, depth)
        if char == '"':
            text, end = self.string(offset)
            return Located(binary_of(text, self.source, here), here), end
        for word, atom in (("true", "true"), ("false", "false"), ("null", "null")):
            if self.text.startswith(word, offset):
                return Located(Atom(atom), here), offset + len(word)
        match = _JSON_NUMBER.match(self.text, offset)
        if match is None:
            raise self.fail(offset, "a JSON value")
        digits = match.group()
        number: int | float
        try:
            number = float(digits) if match.group(1) or match.group(2) else int(digits)
        except ValueError as exc:  # more digits than int() accepts
            raise SpecError.at(self.source, here, f"number {digits[:30]}... is too long") from exc
        if isinstance(number, float) and not math.isfinite(number):
            raise SpecError.at(self.source, here, f"number {digits} is out of float range")
        return Located(number, here), match.end()

    def array(self, offset: int, depth: int) -> tuple[Located, int]:
        here, items = self.pos(offset), []
        offset = self.skip(offset + 1)
        if self.text.startswith("]", offset):
            return Located([], here), offset + 1
        while True:
            item, offset = self.value(offset, depth + 1)
            items.append(item)
            offset = self.skip(offset)
            if self.text.startswith("]", offset):
                return Located([i.term for i in items], here, tuple(items)), offset + 1
            if not self.text.startswith(",", offset):
                raise self.fail(offset, "',' or ']' in array")
            offset = self.skip(offset + 1)

    def obj(self, offset: int, depth: int) -> tuple[Located, int]:
        here = self.pos(offset)
        pairs: list[tuple[Located, Located]] = []
        seen: dict[str, Position] = {}
        offset = self.skip(offset + 1)
        if self.text.startswith("}", offset):
            return Located({}, here), offset + 1
        while True:
            if not self.text.startswith('"', offset):
                raise self.fail(offset, "a string key in object")
            key_pos = self.pos(offset)
            key, offset = self.string(offset)
            if key in seen:
                raise SpecError.at(
                    self.source,
                    key_pos,
                    f"duplicate key {key!r} (first at {seen[key]})",
                    hint="each key may appear once in an object",
                )
            seen[key] = key_pos
            key_node = Located(atom_key(key, self.source, key_pos), key_pos)
            offset = self.skip(offset)
            if not self.text.startswith(":", offset):
                raise self.fail(offset, "':' after object key")
            value, offset = self.value(self.skip(offset + 1), depth + 1)
            pairs.append((key_node, value))
            offset = self.skip(offset)
            if self.text.startswith("}", offset):
                term, children = mapping_of(pairs)
                return Located(term, here, children), offset + 1
            if not self.text.startswith(",", offset):
                raise self.fail(offset, "',' or '}' in object")
            offset = self.skip(offset + 1)


def parse_json(text: str, source: str) -> Located:
    """A JSON document as a positioned term tree (duplicate keys are an error)."""
    return _JsonReader(text, source).document()
