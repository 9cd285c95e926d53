"""Lock files of rebar3 (``rebar.lock``) and mix (``mix.lock``), read as pins for resolution.

``rebar.lock`` is Erlang terms, in one of two layouts::

    %% rebar3 < 3.5: one list
    [{<<"cowboy">>,{pkg,<<"cowboy">>,<<"2.9.0">>},0}].
    %% rebar3 >= 3.5: a versioned tuple, then the hashes
    {"1.2.0",[{<<"cowboy">>,{pkg,<<"cowboy">>,<<"2.9.0">>},0}, ...]}.
    [{pkg_hash,[{<<"cowboy">>,<<"2A3A...">>}]},{pkg_hash_ext,[{<<"cowboy">>,<<"...">>}]}].

``mix.lock`` is an Elixir map literal. Only the subset mix writes is accepted (maps,
tuples, lists, keyword lists, atoms, strings, integers, booleans and nil)::

    %{
      "plug": {:hex, :plug, "1.14.0", "inner", [:mix], [{:mime, "~> 1.0", [hex: :mime,
               repo: "hexpm", optional: false]}], "hexpm", "outer"},
      "dep": {:git, "https://example.org/dep.git", "0123abc", [branch: "main"]},
    }

Both parsers are pure (text in, :class:`Lock` out); git and path entries are kept but
are not hex pins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias, Union

from bstore.builders.hex.errors import LockError
from bstore.builders.hex.versions import Version
from bstore.errors import BstoreError
from bstore.specs.terms import Atom, Term, format, parse

#: A lock file larger than this is not a lock file.
MAX_LOCK_SIZE = 4 * 1024 * 1024
_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class LockEntry:
    """One locked dependency (``source`` is ``hex``, ``git`` or the tool's own word)."""

    name: str
    source: str
    package: str | None = None
    version: str | None = None
    inner_checksum: str | None = None
    outer_checksum: str | None = None
    repository: str | None = None
    git_url: str | None = None
    git_ref: str | None = None
    level: int | None = None
    deps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source == "hex":
            if not self.package or not self.version:
                raise LockError(f"hex lock entry {self.name!r} has no package or version")
            try:
                Version.parse(self.version)
            except BstoreError as exc:
                raise LockError(
                    f"lock entry {self.name!r} has an invalid version {self.version!r}"
                ) from exc


@dataclass(frozen=True, slots=True)
class Lock:
    """Every entry of a lock file, in file order."""

    source: str
    entries: tuple[LockEntry, ...]

    def pins(self) -> dict[str, str]:
        """``{hex package name: version}`` for every hex entry (what the resolver honours)."""
        out: dict[str, str] = {}
        for entry in self.entries:
            if entry.source == "hex":
                assert entry.package is not None and entry.version is not None
                out[entry.package] = entry.version
        return out


def _show(term: Term) -> str:
    """A term as Erlang source, shortened for an error message."""
    text = format(term)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: Term, where: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Atom):
        return value.name
    if isinstance(value, list) and all(isinstance(c, int) for c in value):
        return "".join(chr(c) for c in value)  # type: ignore[arg-type]
    raise LockError(f"{where}: expected a name or string, got {_show(value)}")


def parse_rebar_lock(text: str, source: str = "rebar.lock") -> Lock:
    """Parse a ``rebar.lock`` (either layout); raises :class:`LockError` naming ``source``."""
    if len(text) > MAX_LOCK_SIZE:
        raise LockError(f"{source} is larger than {MAX_LOCK_SIZE} bytes")
    try:
        terms = parse(text, source)
    except BstoreError as exc:
        raise LockError(f"{source} is not valid Erlang terms: {exc.message}") from exc
    if not terms:
        return Lock(source, ())
    first = terms[0]
    if isinstance(first, list):
        items, hashes = first, terms[1:]
    elif isinstance(first, tuple) and len(first) == 2 and isinstance(first[1], list):
        items, hashes = first[1], terms[1:]
    else:
        raise LockError(
            f"{source}: first term is neither a list of deps nor {{Version, Deps}}",
            hint="regenerate the lock file with rebar3",
        )
    inner, outer = _rebar_hashes(hashes, source)
    entries = []
    for index, item in enumerate(items):
        where = f"{source}: dependency #{index + 1}"
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[2], int)):
            raise LockError(f"{where} is not {{Name, Source, Level}}: {_show(item)}")
        name = _text(item[0], where)
        try:
            entries.append(_rebar_entry(name, item[1], item[2], inner, outer, where))
        except LockError as exc:
            if exc.message.startswith(source):
                raise
            raise LockError(f"{where}: {exc.message}", hint=exc.hint) from exc
    return Lock(source, tuple(entries))


def _rebar_hashes(terms: list[Term], source: str) -> tuple[dict[str, str], dict[str, str]]:
    found: dict[str, dict[str, str]] = {"pkg_hash": {}, "pkg_hash_ext": {}}
    for term in terms:
        if not isinstance(term, list):
            raise LockError(f"{source}: expected the list of package hashes, got {_show(term)}")
        for item in term:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Atom)):
                raise LockError(f"{source}: malformed hash section {_show(item)}")
            if item[0].name in found and isinstance(item[1], list):
                for pair in item[1]:
                    if not (isinstance(pair, tuple) and len(pair) == 2):
                        raise LockError(f"{source}: malformed hash entry {_show(pair)}")
                    found[item[0].name][_text(pair[0], source)] = _text(pair[1], source)
    return found["pkg_hash"], found["pkg_hash_ext"]


def _rebar_entry(
    name: str, spec: Term, level: int, inner: dict[str, str], outer: dict[str, str], where: str
) -> LockEntry:
    if isinstance(spec, tuple) and spec and isinstance(spec[0], Atom):
        kind = spec[0].name
        if kind == "pkg" and 3 <= len(spec) <= 5:
            # {pkg, Package, Vsn} | {pkg, Package, Vsn, Inner} | {pkg, Package, Vsn, Inner, Outer}
            package = _text(spec[1], where)
            version = _text(spec[2], where)
            return LockEntry(
                name,
                "hex",
                package=package,
                version=version,
                inner_checksum=_text(spec[3], where) if len(spec) > 3 else inner.get(name),
                outer_checksum=_text(spec[4], where) if len(spec) > 4 else outer.get(name),
                level=level,
            )
        if kind in ("pkg", "git") and len(spec) != 3:
            raise LockError(f"{where} ({name!r}) has a malformed {kind} source {_show(spec)}")
        if kind == "git":
            ref = spec[2]
            ref_text = (
                _text(ref[1], where)
                if isinstance(ref, tuple) and len(ref) == 2
                else _text(ref, where)
            )
            return LockEntry(
                name, "git", git_url=_text(spec[1], where), git_ref=ref_text, level=level
            )
        return LockEntry(name, kind, level=level)
    raise LockError(f"{where} ({name!r}) has an unknown source {_show(spec)}")


# --- mix.lock: a small reader for the Elixir literal subset mix writes ------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<punct>%\{|=>|[{}\[\],])
  | (?P<kwstr>"(?:[^"\\]|\\.)*":(?=\s))
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<qatom>:"(?:[^"\\]|\\.)*")
  | (?P<atom>:[A-Za-z_][A-Za-z0-9_@]*[?!]?)
  | (?P<kw>[A-Za-z_][A-Za-z0-9_@]*[?!]?:(?=\s))
  | (?P<int>-?[0-9][0-9_]*)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "0": "\0", "e": "\x1b"}

MixTerm: TypeAlias = Union[  # noqa: UP007 - a recursive alias needs the string-free Union
    Atom, str, int, bool, tuple["MixTerm", ...], list["MixTerm"], dict["MixTerm", "MixTerm"], None
]


def _unescape(body: str, source: str, pos: int) -> str:
    if "#{" in body:
        raise LockError(f"{source}: string interpolation at offset {pos} is not allowed")
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _mix_tokens(text: str, source: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            line = text.count("\n", 0, pos) + 1
            raise LockError(
                f"{source}:{line}: unexpected {text[pos : pos + 10]!r} in mix.lock",
                hint="mix.lock should be a map literal written by mix",
            )
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, match.group(), pos))
        pos = match.end()
    return tokens


class _MixReader:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.text = text
        self.tokens = _mix_tokens(text, source)
        self.i = 0

    def where(self) -> str:
        pos = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return f"{self.source}:{self.text.count(chr(10), 0, pos) + 1}"

    def peek(self) -> tuple[str, str] | None:
        if self.i < len(self.tokens):
            kind, value, _ = self.tokens[self.i]
            return kind, value
        return None

    def take(self, value: str) -> None:
        token = self.peek()
        if token is None or token[1] != value:
            got = "end of file" if token is None else repr(token[1])
            raise LockError(f"{self.where()}: expected {value!r}, got {got}")
        self.i += 1

    def value(self, depth: int = 0) -> MixTerm:
        if depth > _MAX_DEPTH:
            raise LockError(f"{self.where()}: nesting deeper than {_MAX_DEPTH}")
        token = self.peek()
        if token is None:
            raise LockError(f"{self.where()}: unexpected end of file")
        kind, text = token
        pos = self.tokens[self.i][2]
        self.i += 1
        if kind == "string":
            return _unescape(text[1:-1], self.source, pos)
        if kind == "atom":
            return Atom(text[1:])
        if kind == "qatom":
            return Atom(_unescape(text[2:-1], self.source, pos))
        if kind == "int":
            return int(text.replace("_", ""))
        if kind == "word" and text in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[text]
        if text == "{":
            return tuple(self.sequence("}", depth))
        if text == "[":
            return self.sequence("]", depth)
        if text == "%{":
            return self.mapping(depth)
        self.i -= 1
        raise LockError(f"{self.where()}: unexpected {text!r}")

    def sequence(self, close: str, depth: int) -> list[MixTerm]:
        items: list[MixTerm] = []
        while True:
            token = self.peek()
            if token is not None and token[1] == close:
                self.i += 1
                return items
            if token is not None and token[0] == "kw":
                # Keyword-list sugar: ``key: value`` is ``{:key, value}``.
                self.i += 1
                items.append((Atom(token[1][:-1]), self.value(depth + 1)))
            else:
                items.append(self.value(depth + 1))
            token = self.peek()
            if token is not None and token[1] == ",":
                self.i += 1
                continue
            self.take(close)
            return items

    def mapping(self, depth: int) -> dict[MixTerm, MixTerm]:
        out: dict[MixTerm, MixTerm] = {}
        while True:
            token = self.peek()
            if token is not None and token[1] == "}":
                self.i += 1
                return out
            if token is not None and token[0] == "kwstr":
                pos = self.tokens[self.i][2]
                self.i += 1
                key: MixTerm = _unescape(token[1][1:-2], self.source, pos)
            elif token is not None and token[0] == "kw":
                self.i += 1
                key = Atom(token[1][:-1])
            else:
                key = self.value(depth + 1)
                self.take("=>")
            if key in out:
                raise LockError(f"{self.where()}: duplicate key {key!r}")
            out[key] = self.value(depth + 1)
            token = self.peek()
            if token is not None and token[1] == ",":
                self.i += 1
                continue
            self.take("}")
            return out


def read_elixir_literal(text: str, source: str = "<string>") -> MixTerm:
    """Parse one Elixir literal of the mix.lock subset (strings are ``str``)."""
    reader = _MixReader(text, source)
    value = reader.value()
    if reader.peek() is not None:
        raise LockError(f"{reader.where()}: unexpected text after the literal")
    return value


def parse_mix_lock(text: str, source: str = "mix.lock") -> Lock:
    """Parse a ``mix.lock``; raises :class:`LockError` naming ``source``."""
    if len(text) > MAX_LOCK_SIZE:
        raise LockError(f"{source} is larger than {MAX_LOCK_SIZE} bytes")
    value = read_elixir_literal(text, source)
    if not isinstance(value, dict):
        raise LockError(f"{source} is not a map literal", hint="mix.lock starts with %{")
    entries: list[LockEntry] = []
    for key, spec in value.items():
        if not isinstance(key, str):
            raise LockError(f"{source}: key {key!r} is not a string")
        where = f"{source}: {key!r}"
        try:
            entries.append(_mix_entry(key, spec, where))
        except LockError as exc:
            if exc.message.startswith(source):
                raise
            raise LockError(f"{where}: {exc.message}", hint=exc.hint) from exc
    return Lock(source, tuple(entries))


def _mix_str(value: MixTerm, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Atom):
        return value.name
    raise LockError(f"{where}: expected a string, got {value!r}")


def _mix_entry(name: str, spec: MixTerm, where: str) -> LockEntry:
    if not (isinstance(spec, tuple) and spec and isinstance(spec[0], Atom)):
        raise LockError(f"{where} is not a {{:scm, ...}} tuple: {spec!r}")
    kind = spec[0].name
    if kind == "hex":
        # {:hex, pkg, vsn, inner, managers, deps[, repo[, outer]]}
        if len(spec) < 4:
            raise LockError(f"{where}: hex entry is too short: {spec!r}")
        deps: list[str] = []
        if len(spec) > 5:
            dep_list = spec[5]
            if not isinstance(dep_list, list):
                raise LockError(f"{where}: dependencies are not a list")
            for dep in dep_list:
                if not (isinstance(dep, tuple) and dep and isinstance(dep[0], Atom)):
                    raise LockError(f"{where}: malformed dependency {dep!r}")
                deps.append(dep[0].name)
        return LockEntry(
            name,
            "hex",
            package=_mix_str(spec[1], where),
            version=_mix_str(spec[2], where),
            inner_checksum=_mix_str(spec[3], where),
            repository=_mix_str(spec[6], where) if len(spec) > 6 else "hexpm",
            outer_checksum=_mix_str(spec[7], where) if len(spec) > 7 else None,
            deps=tuple(deps),
        )
    if kind == "git" and len(spec) >= 3:
        return LockEntry(
            name, "git", git_url=_mix_str(spec[1], where), git_ref=_mix_str(spec[2], where)
        )
    return LockEntry(name, kind)
