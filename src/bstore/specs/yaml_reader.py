"""YAML spec files: PyYAML's parser events, the YAML 1.2 core schema, and hard bounds.

Only PyYAML's *parser* runs (libyaml's when available, else the pure-Python one; both
are non-recursive state machines): this module composes the events into a positioned
term tree itself, so no PyYAML constructor ever runs and no tag can build a Python
object. Composing here is also what makes the bounds cheap to enforce as the events
arrive: nesting deeper than :data:`~bstore.specs.formats.MAX_DEPTH`, and aliases that
would expand past :data:`~bstore.specs.formats.MAX_YAML_VALUES` values (an alias is
shared, never copied, but everything downstream walks the expanded tree).

Plain scalars are resolved by the YAML 1.2 core schema (``on``/``yes``/``no`` stay
strings, ``010`` is ten); only the standard tags are allowed; duplicate keys, merge
keys, non-scalar keys and more than one document are errors.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from bstore.specs.formats import MAX_DEPTH, MAX_YAML_VALUES, atom_key, binary_of, mapping_of
from bstore.specs.located import Located, Position
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom, Term

_Parser: Any
try:  # libyaml: about 50 times faster on a 1 MiB file than the pure-Python parser
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Parser

_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_STD + t for t in ("str", "int", "float", "bool", "null", "binary")}
_NULL = re.compile(r"~|null|Null|NULL|")
_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_SPECIAL_FLOAT = re.compile(r"[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
_TAG_HINT = 'specs use plain YAML; write Erlang terms in the tagged form ({"$atom": ...})'


def _pos(event: Any) -> Position:
    return Position(event.start_mark.line + 1, event.start_mark.column + 1)


@dataclass
class _Open:
    """A sequence or mapping whose end event has not arrived yet."""

    pos: Position
    is_map: bool
    anchor: str | None
    items: list[Located] = field(default_factory=list)
    seen: dict[str, Position] = field(default_factory=dict)


class _Composer:
    def __init__(self, source: str) -> None:
        self.source = source
        self.anchors: dict[str, Located | None] = {}  # None: anchored node still open
        # Expanded (values, depth) of every finished collection, by id; shared nodes
        # (aliases) are counted from here instead of being walked again.
        self.sizes: dict[int, tuple[int, int]] = {}
        self.first_alias: Position | None = None

    def fail(self, pos: Position, message: str, hint: str | None = None) -> SpecError:
        return SpecError.at(self.source, pos, message, hint)

    def scalar(self, event: Any) -> Term:
        text: str = event.value
        tag = event.tag
        pos = _pos(event)
        if tag is None and event.implicit[0]:  # plain: YAML 1.2 core schema
            if _NULL.fullmatch(text):
                return Atom("null")
            if _BOOL.fullmatch(text):
                return Atom(text.lower())
            if _SPECIAL_FLOAT.fullmatch(text):
                raise self.fail(
                    pos, f"{text} is not an Erlang number", hint="quote it for a string"
                )
            tag = _STD + (
                "int" if _INT.fullmatch(text) else "float" if _FLOAT.fullmatch(text) else "str"
            )
        elif tag is None or tag == "!":  # quoted, or the non-specific tag: a string
            tag = _STD + "str"
        elif tag not in _SCALAR_TAGS:
            raise self.fail(pos, f"YAML tag {tag!r} is not allowed", hint=_TAG_HINT)
        kind = tag.removeprefix(_STD)
        try:
            if kind == "int":
                return int(text, 0) if text[:2] in ("0x", "0o") else int(text, 10)
            if kind == "float":
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError(text)
                return value
        except ValueError as exc:
            raise self.fail(
                pos, f"{text[:30]!r} is not a valid {kind} (or is out of range)"
            ) from exc
        if kind == "bool":
            if not _BOOL.fullmatch(text):
                raise self.fail(pos, f"{text!r} is not a boolean; expected true or false")
            return Atom(text.lower())
        if kind == "null":
            return Atom("null")
        if kind == "binary":
            try:
                return base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise self.fail(pos, "!!binary value is not base64") from exc
        return binary_of(text, self.source, pos)

    def key(self, event: Any, frame: _Open) -> Located:
        pos = _pos(event)
        if not isinstance(event, yaml.ScalarEvent):
            what = "an alias" if isinstance(event, yaml.AliasEvent) else "a collection"
            raise self.fail(pos, f"expected a plain key (a string), found {what}")
        if event.tag not in (None, "!", _STD + "str"):
            raise self.fail(pos, f"YAML tag {event.tag!r} is not allowed on a key", hint=_TAG_HINT)
        name: str = event.value
        if event.tag is None and event.implicit[0] and name == "<<":
            raise self.fail(
                pos, "YAML merge keys (<<) are not supported", hint="write the keys out"
            )
        if name in frame.seen:
            raise self.fail(
                pos,
                f"duplicate key {name!r} (first at {frame.seen[name]})",
                hint="each key may appear once in a mapping",
            )
        frame.seen[name] = pos
        return Located(atom_key(name, self.source, pos), pos)

    def collection_tag(self, event: Any, expected: str) -> None:
        if event.tag not in (None, "!", _STD + expected):
            raise self.fail(_pos(event), f"YAML tag {event.tag!r} is not allowed", hint=_TAG_HINT)

    def finish(self, frame: _Open) -> Located:
        counted = [self.sizes.get(id(item), (1, 0)) for item in frame.items]
        size = min(1 + sum(c[0] for c in counted), MAX_YAML_VALUES + 1)
        depth = 1 + max((c[1] for c in counted), default=0)
        where = f" (first alias at {self.first_alias})" if self.first_alias else ""
        if size > MAX_YAML_VALUES:
            raise self.fail(
                frame.pos,
                f"YAML aliases expand to more than {MAX_YAML_VALUES} values{where}",
                hint="an alias bomb? write the values out instead",
            )
        if depth > MAX_DEPTH:
            raise self.fail(frame.pos, f"YAML aliases nest deeper than {MAX_DEPTH} levels{where}")
        if frame.is_map:
            pairs = list(zip(frame.items[0::2], frame.items[1::2], strict=True))
            term, children = mapping_of(pairs)
            node = Located(term, frame.pos, children)
        else:
            node = Located([i.term for i in frame.items], frame.pos, tuple(frame.items))
        self.sizes[id(node)] = (size, depth)
        return node

    def document(self, parser: Any) -> Located:
        """Compose the one document the event stream holds."""
        stack: list[_Open] = []
        root: Located | None = None
        parser.get_event()  # StreamStart
        if parser.check_event(yaml.StreamEndEvent):
            raise self.fail(Position(1, 1), "expected a mapping, found an empty document")
        parser.get_event()  # DocumentStart
        while root is None:
            event = parser.get_event()
            top = stack[-1] if stack else None
            at_key = top is not None and top.is_map and len(top.items) % 2 == 0
            if at_key and not isinstance(event, yaml.MappingEndEvent):
                assert top is not None
                top.items.append(self.key(event, top))
                continue
            if isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                node = self.close(stack.pop())
            elif isinstance(event, yaml.AliasEvent):
                self.first_alias = self.first_alias or _pos(event)
                if event.anchor not in self.anchors:
                    raise self.fail(_pos(event), f"found undefined alias {event.anchor!r}")
                shared = self.anchors[event.anchor]
                if shared is None:
                    raise self.fail(_pos(event), "YAML alias refers to a node that contains it")
                node = shared
            elif isinstance(event, yaml.ScalarEvent):
                node = Located(self.scalar(event), _pos(event))
                if event.anchor is not None:
                    self.anchors[event.anchor] = node
            elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                is_map = isinstance(event, yaml.MappingStartEvent)
                self.collection_tag(event, "map" if is_map else "seq")
                if len(stack) >= MAX_DEPTH:
                    raise self.fail(_pos(event), f"nesting deeper than {MAX_DEPTH} levels")
                if event.anchor is not None:
                    self.anchors[event.anchor] = None
                stack.append(_Open(_pos(event), is_map, event.anchor))
                continue
            else:  # pragma: no cover - the parser emits no other event inside a document
                raise self.fail(_pos(event), f"unexpected YAML event {type(event).__name__}")
            if stack:
                stack[-1].items.append(node)
            else:
                root = node
        parser.get_event()  # DocumentEnd
        if not parser.check_event(yaml.StreamEndEvent):
            extra = parser.get_event()
            raise self.fail(
                _pos(extra), "expected a single document in the stream but found another document"
            )
        return root

    def close(self, frame: _Open) -> Located:
        node = self.finish(frame)
        if frame.anchor is not None:
            self.anchors[frame.anchor] = node
        return node


def parse_yaml(text: str, source: str) -> Located:
    """One YAML document as a positioned term tree (safe, bounded, standard tags only)."""
    parser = _Parser(text)
    try:
        return _Composer(source).document(parser)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = Position(mark.line + 1, mark.column + 1) if mark is not None else None
        raise SpecError.at(
            source, pos, "YAML syntax: " + " ".join(t for t in (exc.context, exc.problem) if t)
        ) from exc
    except yaml.YAMLError as exc:
        raise SpecError.at(source, None, f"YAML: {exc}") from exc
    finally:
        parser.dispose()
