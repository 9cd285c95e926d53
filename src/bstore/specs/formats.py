"""Reading spec files (Erlang terms, YAML, JSON) into positioned term trees.

Every format becomes one :class:`~bstore.specs.located.Located` tree so the schema can
name the line and column of any value. YAML and JSON are mapped as bc_gitops maps them
(mapping keys become atoms, strings become binaries, ``true``/``false``/``null`` become
atoms); see :mod:`bstore.specs.termjson` for the tagged form that writes other terms.

Spec files come from a git repository anyone with push access controls, so reading is
bounded: regular files only (a FIFO would block us), at most :data:`MAX_SPEC_BYTES`
(checked with ``fstat`` before a byte is read), strict UTF-8, at most
:data:`MAX_DEPTH` levels of nesting, and YAML aliases may expand to at most
:data:`MAX_YAML_VALUES` values (an "alias bomb" is a few hundred bytes that expand to
billions). YAML is read with PyYAML's safe composer and the YAML 1.2 core schema (so
``on``/``yes``/``no`` stay strings); only the standard tags are allowed.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import math
import os
import re
import stat
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bstore.specs.located import Located, Position
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom, Term

#: Spec files larger than this are refused unread; real specs are a few hundred bytes.
MAX_SPEC_BYTES = 1 << 20
#: Deeper nesting than this is refused (also keeps the recursive readers off Python's stack limit).
MAX_DEPTH = 100
#: A YAML document may expand (through aliases) to at most this many values.
MAX_YAML_VALUES = 1_000_000
#: Erlang atoms hold at most this many characters.
MAX_ATOM_CHARS = 255

#: Spec file names in order of precedence (the first that exists is the spec).
SPEC_FILE_NAMES = (
    "app.config",
    "app.yaml",
    "app.yml",
    "app.json",
    "config.yaml",
    "config.yml",
    "config.json",
    "config",
)


class SpecFormat(StrEnum):
    """The syntax of a spec file."""

    ERLANG = "erlang"
    YAML = "yaml"
    JSON = "json"


def format_of(path: Path) -> SpecFormat:
    """The format a spec file name implies (``.yaml``/``.yml``, ``.json``, else Erlang terms)."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return SpecFormat.YAML
    if suffix == ".json":
        return SpecFormat.JSON
    return SpecFormat.ERLANG


def _pos_at(data: bytes | str, offset: int) -> Position:
    newline = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    start = data.rfind(newline, 0, offset) + 1  # type: ignore[arg-type]
    prefix = data[start:offset]
    chars = prefix.decode("utf-8", "replace") if isinstance(prefix, bytes) else prefix
    return Position(line, len(chars) + 1)


def read_spec_bytes(path: Path, source: str | None = None) -> bytes:
    """The bytes of a spec file: a regular file of at most :data:`MAX_SPEC_BYTES`."""
    shown = source or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; we reject it just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError.at(shown, None, f"cannot open spec file: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError.at(
                shown, None, "not a regular file", hint="a spec must be a plain file"
            )
        if info.st_size > MAX_SPEC_BYTES:
            raise SpecError.at(
                shown,
                None,
                f"spec file is {info.st_size} bytes; the limit is {MAX_SPEC_BYTES} (1 MiB)",
                hint="a spec describes one app; move large data out of it",
            )
        chunks: list[bytes] = []
        remaining = MAX_SPEC_BYTES + 1  # one more byte tells us the file grew past the limit
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise SpecError.at(shown, None, f"cannot read spec file: {exc.strerror}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError.at(
            shown, None, f"spec file is over the limit of {MAX_SPEC_BYTES} bytes (1 MiB)"
        )
    return data


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as text; invalid UTF-8 is an error at the offending byte. A BOM is dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError.at(
            source,
            _pos_at(data, exc.start),
            f"invalid UTF-8: byte 0x{data[exc.start]:02x} cannot start or continue a character",
            hint="save the file as UTF-8",
        ) from exc
    return text.removeprefix("\ufeff")


def _atom(name: str, source: str, pos: Position) -> Atom:
    if len(name) > MAX_ATOM_CHARS:
        raise SpecError.at(
            source,
            pos,
            f"key {name[:40]!r}... is {len(name)} characters; atoms hold at most {MAX_ATOM_CHARS}",
        )
    return Atom(name)


def _binary(text: str, source: str, pos: Position) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SpecError.at(
            source, pos, "string holds a lone surrogate (\\ud800-\\udfff) escape"
        ) from exc


def _mapping(pairs: list[tuple[Located, Located]]) -> tuple[dict[Term, Term], tuple[Located, ...]]:
    children: list[Located] = []
    for key, value in pairs:
        children += [key, value]
    return {k.term: v.term for k, v in pairs}, tuple(children)


# ---------------------------------------------------------------------------- JSON

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
            return Located(_binary(text, self.source, here), here), end
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
            key_node = Located(_atom(key, self.source, key_pos), key_pos)
            offset = self.skip(offset)
            if not self.text.startswith(":", offset):
                raise self.fail(offset, "':' after object key")
            value, offset = self.value(self.skip(offset + 1), depth + 1)
            pairs.append((key_node, value))
            offset = self.skip(offset)
            if self.text.startswith("}", offset):
                term, children = _mapping(pairs)
                return Located(term, here, children), offset + 1
            if not self.text.startswith(",", offset):
                raise self.fail(offset, "',' or '}' in object")
            offset = self.skip(offset + 1)


def parse_json(text: str, source: str) -> Located:
    """A JSON document as a positioned term tree (duplicate keys are an error)."""
    return _JsonReader(text, source).document()


# ---------------------------------------------------------------------------- YAML

_PLAIN = "bstore:plain"  # tag we give untagged plain scalars, resolved by the 1.2 core schema
_STD = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {
    _PLAIN,
    *(_STD + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "binary")),
}
_NULL = re.compile(r"~|null|Null|NULL|")
_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_SPECIAL_FLOAT = re.compile(r"[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe reader and composer (no constructor runs), with a depth bound."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth = 0
        self.first_alias: Any = None

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            if self.first_alias is None:
                self.first_alias = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            alias = super().compose_node(parent, index)
            assert alias is not None
            return alias
        self.depth += 1
        if self.depth > MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise SpecError.at(
                self.name,
                Position(mark.line + 1, mark.column + 1),
                f"nesting deeper than {MAX_DEPTH} levels",
            )
        try:
            composed = super().compose_node(parent, index)
            assert composed is not None
            return composed
        finally:
            self.depth -= 1

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        # Plain scalars are resolved later by the YAML 1.2 core schema, not PyYAML's 1.1
        # rules (under which `on`, `yes` and `no` are booleans and 010 is octal).
        if kind is ScalarNode and implicit[0]:
            return _PLAIN
        tag: str = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
        return tag


def _mark(node: Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def _kids(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, SequenceNode) else []


def _check_expansion(root: Node, source: str, first_alias: Any) -> None:
    """Refuse alias cycles, and aliases that expand past the value or depth bounds.

    Sizes and depths are computed per distinct node (aliases share nodes), so this is
    linear in the document, however far the aliases would expand.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, expanded depth)
    visiting = {id(root)}
    stack = [(root, iter(_kids(root)))]
    while stack:
        node, pending = stack[-1]
        for kid in pending:
            if id(kid) in sizes:
                continue
            if id(kid) in visiting:
                raise SpecError.at(
                    source, _mark(kid), "YAML alias refers to a node that contains it"
                )
            visiting.add(id(kid))
            stack.append((kid, iter(_kids(kid))))
            break
        else:
            stack.pop()
            visiting.discard(id(node))
            kids = [sizes[id(k)] for k in _kids(node)]
            size = min(1 + sum(k[0] for k in kids), MAX_YAML_VALUES + 1)
            depth = 1 + max((k[1] for k in kids), default=0)
            sizes[id(node)] = (size, depth)
    size, depth = sizes[id(root)]
    where = (
        f" (first alias at {first_alias.line + 1}:{first_alias.column + 1})" if first_alias else ""
    )
    if size > MAX_YAML_VALUES:
        raise SpecError.at(
            source,
            _mark(root),
            f"YAML aliases expand to more than {MAX_YAML_VALUES} values{where}",
            hint="an alias bomb? write the values out instead",
        )
    if depth > MAX_DEPTH + 1:
        raise SpecError.at(
            source, _mark(root), f"YAML aliases nest deeper than {MAX_DEPTH} levels{where}"
        )


class _YamlBuilder:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: Node, message: str, hint: str | None = None) -> SpecError:
        return SpecError.at(self.source, _mark(node), message, hint)

    def scalar(self, node: ScalarNode) -> Term:
        text, tag = node.value, node.tag
        if tag == _PLAIN:
            if _NULL.fullmatch(text):
                return Atom("null")
            if _BOOL.fullmatch(text):
                return Atom(text.lower())
            if _SPECIAL_FLOAT.fullmatch(text):
                raise self.fail(
                    node, f"{text} is not an Erlang number", hint="quote it for a string"
                )
            tag = _STD + (
                "int" if _INT.fullmatch(text) else "float" if _FLOAT.fullmatch(text) else "str"
            )
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
                node, f"{text[:30]!r} is not a valid {kind} (or is out of range)"
            ) from exc
        if kind == "bool":
            if not _BOOL.fullmatch(text):
                raise self.fail(node, f"{text!r} is not a boolean; expected true or false")
            return Atom(text.lower())
        if kind == "null":
            return Atom("null")
        if kind == "binary":
            try:
                return base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise self.fail(node, "!!binary value is not base64") from exc
        return _binary(text, self.source, _mark(node))

    def build(self, node: Node) -> Located:
        if node.tag not in _ALLOWED_TAGS:
            raise self.fail(
                node,
                f"YAML tag {node.tag!r} is not allowed",
                hint='specs use plain YAML; write Erlang terms in the tagged form ({"$atom": ...})',
            )
        pos = _mark(node)
        if isinstance(node, ScalarNode):
            if node.tag in (_STD + "map", _STD + "seq"):
                raise self.fail(node, f"tag {node.tag!r} on a scalar")
            return Located(self.scalar(node), pos)
        if isinstance(node, SequenceNode):
            if node.tag != _STD + "seq":
                raise self.fail(node, f"tag {node.tag!r} on a sequence")
            items = tuple(self.build(n) for n in node.value)
            return Located([i.term for i in items], pos, items)
        assert isinstance(node, MappingNode)
        if node.tag != _STD + "map":
            raise self.fail(node, f"tag {node.tag!r} on a mapping")
        pairs: list[tuple[Located, Located]] = []
        seen: dict[str, Position] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise self.fail(key_node, "expected a plain key (a string), found a collection")
            if key_node.tag not in _ALLOWED_TAGS:
                raise self.fail(key_node, f"YAML tag {key_node.tag!r} is not allowed")
            if key_node.tag == _PLAIN and key_node.value == "<<":
                raise self.fail(
                    key_node, "YAML merge keys (<<) are not supported", hint="write the keys out"
                )
            key_pos = _mark(key_node)
            name = key_node.value
            if name in seen:
                raise self.fail(
                    key_node,
                    f"duplicate key {name!r} (first at {seen[name]})",
                    hint="each key may appear once in a mapping",
                )
            seen[name] = key_pos
            pairs.append(
                (Located(_atom(name, self.source, key_pos), key_pos), self.build(value_node))
            )
        term, children = _mapping(pairs)
        return Located(term, pos, children)


def parse_yaml(text: str, source: str) -> Located:
    """One YAML document as a positioned term tree (safe composer, bounded, no custom tags)."""
    loader = _Loader(text)
    loader.name = source
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = Position(mark.line + 1, mark.column + 1) if mark is not None else None
        raise SpecError.at(
            source, pos, "YAML syntax: " + " ".join(t for t in (exc.context, exc.problem) if t)
        ) from exc
    except yaml.YAMLError as exc:
        raise SpecError.at(source, None, f"YAML: {exc}") from exc
    finally:
        loader.dispose()
    if root is None:
        raise SpecError.at(source, Position(1, 1), "expected a mapping, found an empty document")
    _check_expansion(root, source, loader.first_alias)
    return _YamlBuilder(source).build(root)


# ---------------------------------------------------------------------------- files


def load_located(path: Path, source: str | None = None) -> tuple[SpecFormat, Located]:
    """Read a spec file: its format and its single top-level term, positioned.

    Raises :class:`SpecError` (or the term parser's ``TermSyntaxError``) with the
    file, line and column.
    """
    shown = source or str(path)
    fmt = format_of(path)
    data = read_spec_bytes(path, shown)
    if fmt is SpecFormat.ERLANG:
        return fmt, _erlang(data, path, shown)
    text = decode_utf8(data, shown)
    return fmt, (parse_json(text, shown) if fmt is SpecFormat.JSON else parse_yaml(text, shown))


def _erlang(data: bytes, path: Path, source: str) -> Located:
    # Imported here: the term parser is its own package and may be large.
    from bstore.specs import terms

    terms_read = terms.parse_located(terms.decode_source(data, source), source)
    if not terms_read:
        raise SpecError.at(
            source, Position(1, 1), "expected one map or proplist ending in '.', found no term"
        )
    if len(terms_read) > 1:
        raise SpecError.at(
            source,
            terms_read[1].pos,
            "expected one map or proplist, found a second term",
            hint="a spec file holds exactly one term",
        )
    return terms_read[0]
