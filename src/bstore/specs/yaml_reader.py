"""YAML spec files: PyYAML's safe composer, the YAML 1.2 core schema, and hard bounds.

Only the composer runs (nodes with positions); no PyYAML constructor ever does, so no
tag can build a Python object. Plain scalars are resolved by the YAML 1.2 core schema
(``on``/``yes``/``no`` stay strings, ``010`` is ten), only the standard tags are
allowed, duplicate keys and merge keys are errors, and aliases may expand to at most
:data:`~bstore.specs.formats.MAX_YAML_VALUES` values and
:data:`~bstore.specs.formats.MAX_DEPTH` levels.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bstore.specs.formats import MAX_DEPTH, MAX_YAML_VALUES, atom_key, binary_of, mapping_of
from bstore.specs.located import Located, Position
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom, Term

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
        return binary_of(text, self.source, _mark(node))

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
                (Located(atom_key(name, self.source, key_pos), key_pos), self.build(value_node))
            )
        term, children = mapping_of(pairs)
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
