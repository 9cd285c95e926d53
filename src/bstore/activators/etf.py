"""Erlang External Term Format (ETF): a strict encoder and a bounded, strict decoder.

This is the wire format between bstore and the agent inside a running BEAM node
(``term_to_binary/1`` / ``binary_to_term/2``). The node is untrusted input like any other
(DESIGN.md "Bad input"), so :func:`decode` never trusts a length field: every count is
checked against the bytes that remain before anything is allocated, nesting depth and the
total number of decoded terms are capped, trailing bytes and unknown tags are rejected, and
every error names the byte offset.

Mapping (see :mod:`bstore.specs.terms.model` for the term model)::

    Atom              <-> ATOM_UTF8_EXT / SMALL_ATOM_UTF8_EXT   (ATOM_EXT, SMALL_ATOM_EXT read)
    bytes             <-> BINARY_EXT
    int               <-> SMALL_INTEGER_EXT / INTEGER_EXT / SMALL_BIG_EXT / LARGE_BIG_EXT
    float             <-> NEW_FLOAT_EXT                          (FLOAT_EXT read)
    tuple             <-> SMALL_TUPLE_EXT / LARGE_TUPLE_EXT
    list              <-> NIL_EXT / STRING_EXT / LIST_EXT        (STRING_EXT -> list of ints)
    ImproperList      <-> LIST_EXT with a non-nil tail
    dict              <-> MAP_EXT
    Pid, Port, Reference, Fun, BitString: values that only come back from the VM; they are
    kept exactly enough to be sent back unchanged and carry their printed form.

``COMPRESSED`` (tag 80) is accepted at the top level with the same size cap on its
uncompressed length. Distribution-only encodings (atom cache refs, ``LOCAL_EXT``) and the
long-removed ``FUN_EXT`` are rejected.

Both directions are on the activation path (replies like ``which_applications`` are
decoded within a budget of about a millisecond), so each runs as one loop over an explicit
stack with the common types handled inline, instead of a call per value; that also bounds
nesting by the limits here rather than by Python's recursion limit (a fun's environment,
read by a recursive call, aside).
"""

from __future__ import annotations

import gc
import itertools
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

from bstore.activators.vmterms import (
    MAX_REF_WORDS,
    AnyTerm,
    BitString,
    Fun,
    Pid,
    Port,
    Reference,
    VmTerm,
    atom_text,
    format_term,
)
from bstore.errors import BstoreError
from bstore.specs.terms.model import Atom, ImproperList, Term

__all__ = [
    "AnyTerm",
    "BitString",
    "EtfDecodeError",
    "EtfEncodeError",
    "EtfError",
    "Fun",
    "Pid",
    "Port",
    "Reference",
    "VmTerm",
    "decode",
    "encode",
    "format_term",
]

VERSION = 131

# Tags, as in erts/emulator/beam/external.h.
NEW_FLOAT_EXT = 70
BIT_BINARY_EXT = 77
COMPRESSED = 80
NEW_PID_EXT = 88
NEW_PORT_EXT = 89
NEWER_REFERENCE_EXT = 90
SMALL_INTEGER_EXT = 97
INTEGER_EXT = 98
FLOAT_EXT = 99
ATOM_EXT = 100
REFERENCE_EXT = 101
PORT_EXT = 102
PID_EXT = 103
SMALL_TUPLE_EXT = 104
LARGE_TUPLE_EXT = 105
NIL_EXT = 106
STRING_EXT = 107
LIST_EXT = 108
BINARY_EXT = 109
SMALL_BIG_EXT = 110
LARGE_BIG_EXT = 111
NEW_FUN_EXT = 112
EXPORT_EXT = 113
NEW_REFERENCE_EXT = 114
SMALL_ATOM_EXT = 115
MAP_EXT = 116
ATOM_UTF8_EXT = 118
SMALL_ATOM_UTF8_EXT = 119
V4_PORT_EXT = 120

# Erlang refuses atoms longer than 255 characters.
MAX_ATOM_CHARS = 255

DEFAULT_MAX_DEPTH = 200
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
# Each decoded term costs a Python object (~50+ bytes) while it may cost one input byte
# (``[[],[],...]``), so the term count is capped separately from the input size.
DEFAULT_MAX_TERMS = 2_000_000

# Both atom caches (encodings by name, decoded atoms by bytes) are emptied at this size:
# names come from user input and from the node, so neither may grow without bound.
_ATOM_CACHE_MAX = 4096


class EtfError(BstoreError):
    """A term that cannot be encoded or a binary that is not valid, bounded ETF."""


class EtfEncodeError(EtfError):
    """A Python value with no External Term Format encoding (names the value)."""


class EtfDecodeError(EtfError):
    """A malformed, hostile or over-limit ETF binary (names the byte offset)."""


# ---------------------------------------------------------------------------- encoding

# Nothing bstore sends is remotely this deep; Erlang itself has no limit.
_MAX_ENCODE_DEPTH = 10 * DEFAULT_MAX_DEPTH

# Compiled once: struct.pack(format, ...) looks the format up again on every call.
_pack_u32_head = struct.Struct(">BI").pack
_pack_i32_head = struct.Struct(">Bi").pack
_pack_u16_head = struct.Struct(">BH").pack
_pack_float = struct.Struct(">Bd").pack
# Prebuilt SMALL_INTEGER_EXT 0..255 (request ids, ops, counts) and SMALL_TUPLE_EXT headers.
_SMALL_INT_ETF = [bytes([SMALL_INTEGER_EXT, i]) for i in range(256)]
_SMALL_TUPLE_HEAD = [bytes([SMALL_TUPLE_EXT, n]) for n in range(256)]
# A list of nothing but these types may be a STRING_EXT.
_INT_ONLY = frozenset({int})
# A map is encoded as its keys and values, alternating.
_flatten = itertools.chain.from_iterable

# Encoded atoms by name: the control channel sends the same few dozen atoms (ops, app
# names, ok/error) over and over. Keyed by the name because Atom's dataclass __hash__ is
# a Python-level call.
_ATOM_ETF: dict[str, bytes] = {}


def encode(term: AnyTerm) -> bytes:
    """Encode ``term`` as ETF (with the leading version byte 131).

    Raises :class:`EtfEncodeError` for values with no Erlang counterpart (``bool``,
    ``None``, ``str``, NaN/infinity, an :class:`ImproperList` with no items or a list tail).
    """
    out = bytearray([VERSION])
    # One loop over an explicit stack rather than a call per value: calls were most of the
    # time, and nesting is then bounded by _MAX_ENCODE_DEPTH, not by Python's recursion
    # limit. `items` iterates the innermost open container; `close` is written after it
    # (NIL_EXT after a list's elements); the outer ones wait on `stack`.
    stack: list[tuple[Iterator[Any], bytes]] = []
    items: Iterator[Any] = iter((term,))
    close = b""
    inner: Sequence[Any]
    while True:
        for item in items:
            # Exact types first: the leaves and containers nearly every term is made of.
            # Everything else (bool, None, subclasses, maps, VM values) takes the checked
            # isinstance path in _encode_other.
            cls = type(item)
            if cls is Atom:
                out += _ATOM_ETF.get(item.name) or _atom_etf(item.name)
                continue
            if cls is bytes:
                out += _pack_u32_head(BINARY_EXT, len(item))
                out += item
                continue
            if cls is int:
                if 0 <= item < 256:
                    out += _SMALL_INT_ETF[item]
                elif -(1 << 31) <= item < 1 << 31:
                    out += _pack_i32_head(INTEGER_EXT, item)
                else:
                    _encode_int(out, item)
                continue
            if cls is tuple:
                n = len(item)
                out += _SMALL_TUPLE_HEAD[n] if n < 256 else _pack_u32_head(LARGE_TUPLE_EXT, n)
                inner, inner_close = item, b""
            elif cls is list:
                inner, inner_close = _list_head(out, item)
            elif cls is dict:
                out += _pack_u32_head(MAP_EXT, len(item))
                inner, inner_close = list(_flatten(item.items())), b""
            elif cls is float:
                _encode_float(out, item)
                continue
            else:
                inner, inner_close = _encode_other(out, item)
            if inner:
                if len(stack) >= _MAX_ENCODE_DEPTH:
                    raise EtfEncodeError(f"term nested deeper than {_MAX_ENCODE_DEPTH} levels")
                stack.append((items, close))
                items, close = iter(inner), inner_close
                break
        else:
            out += close
            if not stack:
                return bytes(out)
            items, close = stack.pop()


def _atom_etf(name: str) -> bytes:
    """The whole encoding of atom ``name`` (tag, length, UTF-8), through the cache."""
    cached = _ATOM_ETF.get(name)
    if cached is not None:
        return cached
    if len(name) > MAX_ATOM_CHARS:
        raise EtfEncodeError(
            f"atom {name[:40]!r}... has {len(name)} characters; Erlang allows {MAX_ATOM_CHARS}"
        )
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EtfEncodeError(f"atom {name!r} is not valid Unicode (lone surrogate)") from exc
    if len(raw) < 256:
        encoded = bytes([SMALL_ATOM_UTF8_EXT, len(raw)]) + raw
    else:
        encoded = _pack_u16_head(ATOM_UTF8_EXT, len(raw)) + raw
    if len(_ATOM_ETF) >= _ATOM_CACHE_MAX:
        _ATOM_ETF.clear()
    _ATOM_ETF[name] = encoded
    return encoded


def _encode_int(out: bytearray, value: int) -> None:
    if 0 <= value < 256:
        out += _SMALL_INT_ETF[value]
    elif -(1 << 31) <= value < 1 << 31:
        out += _pack_i32_head(INTEGER_EXT, value)
    else:
        magnitude = abs(value)
        digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
        if len(digits) < 256:
            out += bytes([SMALL_BIG_EXT, len(digits)])
        else:
            out += _pack_u32_head(LARGE_BIG_EXT, len(digits))
        out.append(1 if value < 0 else 0)
        out += digits


def _encode_float(out: bytearray, value: float) -> None:
    if not math.isfinite(value):
        raise EtfEncodeError(f"float {value!r} cannot be represented in Erlang")
    out += _pack_float(NEW_FLOAT_EXT, value)


# The items a container's header announces and what closes it: encode() goes on with them.
_Inner = tuple[Sequence[Any], bytes]
_LEAF: _Inner = ((), b"")
_NIL = bytes([NIL_EXT])


def _list_head(out: bytearray, items: list[Any]) -> _Inner:
    if not items:
        out.append(NIL_EXT)
        return _LEAF
    # Same choice as term_to_binary: a short list of bytes travels as STRING_EXT. The
    # type test is exact (a bool is an int); bytes() then does the range test, both at C
    # speed.
    if len(items) < 65536 and type(items[0]) is int and _INT_ONLY.issuperset(map(type, items)):
        try:
            chars = bytes(items)
        except ValueError:
            pass
        else:
            out += _pack_u16_head(STRING_EXT, len(items))
            out += chars
            return _LEAF
    out += _pack_u32_head(LIST_EXT, len(items))
    return items, _NIL


def _encode_other(out: bytearray, term: object) -> _Inner:
    """Encode any value but the exact types encode() handles inline (or raise)."""
    if isinstance(term, bool) or term is None:
        raise EtfEncodeError(
            f"{term!r} has no Erlang counterpart", hint="use Atom('true'), Atom('undefined')..."
        )
    if isinstance(term, Atom):
        out += _atom_etf(term.name)
    elif isinstance(term, bytes):
        out += _pack_u32_head(BINARY_EXT, len(term))
        out += term
    elif isinstance(term, int):
        _encode_int(out, term)
    elif isinstance(term, float):
        _encode_float(out, term)
    elif isinstance(term, tuple):
        if len(term) < 256:
            out += _SMALL_TUPLE_HEAD[len(term)]
        else:
            out += _pack_u32_head(LARGE_TUPLE_EXT, len(term))
        return term, b""
    elif isinstance(term, list):
        return _list_head(out, term)
    elif isinstance(term, ImproperList):
        if not term.items:
            raise EtfEncodeError(f"improper list {term!r} has no items before its tail")
        if isinstance(term.tail, list):
            raise EtfEncodeError(f"improper list {term!r} has a list tail; use a plain list")
        out += _pack_u32_head(LIST_EXT, len(term.items))
        return (*term.items, term.tail), b""
    elif isinstance(term, dict):
        out += _pack_u32_head(MAP_EXT, len(term))
        return list(_flatten(term.items())), b""
    elif isinstance(term, Pid):
        out.append(NEW_PID_EXT)
        out += _atom_etf(term.node.name)
        out += struct.pack(">III", term.id, term.serial, term.creation)
    elif isinstance(term, Port):
        out.append(V4_PORT_EXT)
        out += _atom_etf(term.node.name)
        out += struct.pack(">QI", term.id, term.creation)
    elif isinstance(term, Reference):
        out += _pack_u16_head(NEWER_REFERENCE_EXT, len(term.words))
        out += _atom_etf(term.node.name)
        out += struct.pack(f">I{len(term.words)}I", term.creation, *term.words)
    elif isinstance(term, Fun):
        out += term.raw
    elif isinstance(term, BitString):
        out += struct.pack(">BIB", BIT_BINARY_EXT, len(term.data), term.bits)
        out += term.data
    else:
        raise EtfEncodeError(
            f"{type(term).__name__} value {term!r} has no Erlang counterpart",
            hint="strings are binaries (bytes) or lists of character codes",
        )
    return _LEAF


# ---------------------------------------------------------------------------- decoding


def decode(
    data: bytes,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_size: int = DEFAULT_MAX_SIZE,
    max_terms: int = DEFAULT_MAX_TERMS,
    source: str = "ETF",
) -> VmTerm:
    """Decode one whole ETF binary (version byte included) into a :data:`VmTerm`.

    ``max_size`` bounds the input and any decompressed payload, ``max_depth`` the nesting,
    ``max_terms`` the number of decoded values. ``source`` names where the bytes came from
    in error messages. Raises :class:`EtfDecodeError`.
    """
    if len(data) > max_size:
        raise EtfDecodeError(f"{source}: {len(data)} bytes exceed the limit of {max_size}")
    if not data:
        raise EtfDecodeError(f"{source}: empty binary, expected version byte {VERSION}")
    if data[0] != VERSION:
        raise EtfDecodeError(f"{source}: byte 0 is {data[0]}, expected ETF version byte {VERSION}")
    body = bytes(data)
    offset = 1
    if len(body) > 1 and body[1] == COMPRESSED:
        body = _decompress(body, max_size, source)
        offset = 0
    decoder = _Decoder(body, offset, max_depth, max_terms, source)
    # A big term becomes tens of thousands of lists, tuples and dicts that all live on; the
    # cyclic collector would scan them, and the whole heap with them, over and over while
    # they are built, which costs about as much as building them. Decoding makes no
    # reference cycles, so there is nothing for it to find: it is paused for big inputs.
    # It is process-wide, so it is resumed only if this call paused it.
    pause = len(body) >= _GC_PAUSE_BYTES and gc.isenabled()
    if pause:
        gc.disable()
    try:
        term = decoder.term(0)
    finally:
        if pause:
            gc.enable()
    if decoder.pos != len(body):
        raise EtfDecodeError(
            f"{source}: {len(body) - decoder.pos} trailing bytes after the term at byte "
            f"{decoder.pos}"
        )
    return term


def _decompress(data: bytes, max_size: int, source: str) -> bytes:
    if len(data) < 6:
        raise EtfDecodeError(f"{source}: truncated compressed term header")
    (size,) = struct.unpack_from(">I", data, 2)
    if size > max_size:
        raise EtfDecodeError(
            f"{source}: compressed term claims {size} bytes, over the limit of {max_size}"
        )
    inflater = zlib.decompressobj()
    try:
        # Ask for one byte more than declared so a lying size is detected, not truncated.
        plain = inflater.decompress(data[6:], size + 1)
    except zlib.error as exc:
        raise EtfDecodeError(f"{source}: corrupt compressed term: {exc}") from exc
    if len(plain) != size or not inflater.eof or inflater.unused_data:
        raise EtfDecodeError(
            f"{source}: compressed term does not inflate to exactly the declared {size} bytes"
        )
    return plain


# Inputs from this size on decode with the cyclic garbage collector paused (see decode).
_GC_PAUSE_BYTES = 64 * 1024

_unpack_u16 = struct.Struct(">H").unpack_from
_unpack_u32 = struct.Struct(">I").unpack_from
_unpack_i32 = struct.Struct(">i").unpack_from
_unpack_f64 = struct.Struct(">d").unpack_from

# Decoded atoms by their UTF-8 bytes, shared between decodes: the agent's replies name the
# same atoms (app names, ok, undefined) every time, and building the frozen dataclass costs
# more than reading the rest of a small tuple. Only atoms that passed every check go in.
# Atoms are immutable values, so sharing one between callers is safe.
_ATOMS: dict[bytes, Atom] = {}

# An open container while decoding (see _Decoder.term): its items so far, how many more
# it needs, and its tag.
_Frame = tuple[list[VmTerm], int, int]


class _Decoder:
    __slots__ = ("data", "max_depth", "pos", "source", "terms_left")

    def __init__(self, data: bytes, pos: int, max_depth: int, max_terms: int, source: str) -> None:
        self.data = data
        self.pos = pos
        self.max_depth = max_depth
        self.terms_left = max_terms
        self.source = source

    def fail(self, what: str, at: int | None = None) -> EtfDecodeError:
        return EtfDecodeError(f"{self.source}: {what} at byte {self.pos if at is None else at}")

    def truncated(self, at: int, n: int) -> EtfDecodeError:
        return self.fail(f"truncated: need {n} bytes, {len(self.data) - at} left", at)

    def count_error(self, n: int, min_bytes_each: int, what: str, at: int) -> EtfDecodeError:
        """Why ``n`` items of ``min_bytes_each`` bytes cannot follow at ``at``."""
        if n * min_bytes_each > len(self.data) - at:
            return self.fail(f"{what} of {n} elements is longer than the remaining input", at)
        return self.fail(f"{what} of {n} elements exceeds the term count limit", at)

    def count(self, n: int, min_bytes_each: int, what: str) -> int:
        """Check that ``n`` items of at least ``min_bytes_each`` bytes can still follow."""
        if n * min_bytes_each > len(self.data) - self.pos or n > self.terms_left:
            raise self.count_error(n, min_bytes_each, what, self.pos)
        return n

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n > len(self.data) - pos:
            raise self.truncated(pos, n)
        self.pos = pos + n
        return self.data[pos : pos + n]

    def u8(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise self.truncated(pos, 1)
        self.pos = pos + 1
        return self.data[pos]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def atom(self, depth: int) -> Atom:
        term = self.term(depth)
        if not isinstance(term, Atom):
            raise self.fail(f"expected an atom, found {type(term).__name__}")
        return term

    def small_int(self, depth: int) -> int:
        term = self.term(depth)
        if not isinstance(term, int):
            raise self.fail(f"expected an integer, found {type(term).__name__}")
        return term

    def new_atom(self, raw: bytes, tag: int, start: int) -> Atom:
        """Check and build the atom ``raw`` of the atom tag ``tag`` at ``start``."""
        if tag in (ATOM_EXT, SMALL_ATOM_EXT):
            name = raw.decode("latin-1")
        else:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail("atom is not valid UTF-8", start) from exc
        if len(name) > MAX_ATOM_CHARS:
            raise self.fail(f"atom of {len(name)} characters (limit {MAX_ATOM_CHARS})", start)
        atom = Atom(name)
        if tag in (ATOM_UTF8_EXT, SMALL_ATOM_UTF8_EXT):
            if len(_ATOMS) >= _ATOM_CACHE_MAX:
                _ATOMS.clear()
            _ATOMS[raw] = atom
        return atom

    def container_header(self, tag: int, pos: int, left: int) -> tuple[int, int]:
        """Read the LARGE_TUPLE_EXT, LIST_EXT or MAP_EXT header whose tag is at ``pos``.

        Returns how many terms follow (a list's elements and its tail; a map's pairs) and
        the offset after the header, once both limits allow that many.
        """
        data = self.data
        if pos + 5 > len(data):
            raise self.truncated(pos + 1, 4)
        n: int = _unpack_u32(data, pos + 1)[0]
        after = pos + 5
        if tag == LIST_EXT:
            if n == 0:
                raise self.fail("LIST_EXT with no elements (an empty list is NIL_EXT)", pos)
            # n elements plus the tail, each at least one byte.
            n += 1
            what, each = "list", 1
        elif tag == MAP_EXT:
            what, each = "map", 2
        else:
            what, each = "tuple", 1
        if n * each > len(data) - after or n > left:
            raise self.count_error(n, each, what, after)
        return n, after

    def term(self, depth: int) -> VmTerm:
        """Decode the term at ``self.pos``, ``depth`` levels deep, and all it contains.

        One loop instead of a call per term (calls were most of the time): a container
        pushes a frame and the loop goes on with its first item; the tags replies are made
        of are read inline; rare tags go to the ``d_*`` handlers, which may call back in.
        The checks, their order and the offsets in errors are those of a plain recursive
        decoder: each term counts against ``max_terms`` when reached, a container checks its
        count against the bytes left before anything is read, and depth is checked when a
        non-empty container opens (its items are all one level deeper).
        """
        data = self.data
        end = len(data)
        pos = self.pos
        left = self.terms_left
        max_depth = self.max_depth
        if depth > max_depth:
            raise self.fail(f"term nested deeper than the limit of {max_depth}")
        atoms = _ATOMS
        # The innermost open container: its items so far, how many it still needs (a map:
        # to complete its current key-value pair) and its tag, 0 standing for the one term
        # asked for. The outer ones wait on `stack`.
        items: list[VmTerm] = []
        todo = 1
        kind = 0
        stack: list[_Frame] = []
        # The innermost open map: the dict so far, where its current key began and how
        # many pairs are left (this one included). The outer ones wait on `maps`.
        mapping: dict[VmTerm, VmTerm] = {}
        key_at = pairs = 0
        maps: list[tuple[dict[VmTerm, VmTerm], int, int]] = []
        while True:
            while todo:
                left -= 1
                if left < 0:
                    raise self.fail("too many terms (limit reached)", pos)
                try:
                    tag = data[pos]
                except IndexError:
                    raise self.truncated(pos, 1) from None
                if tag == SMALL_ATOM_UTF8_EXT:
                    if pos + 2 > end:
                        raise self.truncated(pos + 1, 1)
                    stop = pos + 2 + data[pos + 1]
                    if stop > end:
                        raise self.truncated(pos + 2, stop - pos - 2)
                    raw = data[pos + 2 : stop]
                    items.append(atoms.get(raw) or self.new_atom(raw, tag, pos))
                    pos = stop
                elif tag == BINARY_EXT:
                    if pos + 5 > end:
                        raise self.truncated(pos + 1, 4)
                    stop = pos + 5 + _unpack_u32(data, pos + 1)[0]
                    if stop > end:
                        raise self.truncated(pos + 5, stop - pos - 5)
                    items.append(data[pos + 5 : stop])
                    pos = stop
                elif tag == SMALL_INTEGER_EXT:
                    if pos + 2 > end:
                        raise self.truncated(pos + 1, 1)
                    items.append(data[pos + 1])
                    pos += 2
                elif tag == INTEGER_EXT:
                    if pos + 5 > end:
                        raise self.truncated(pos + 1, 4)
                    items.append(_unpack_i32(data, pos + 1)[0])
                    pos += 5
                elif tag == SMALL_TUPLE_EXT:
                    if pos + 2 > end:
                        raise self.truncated(pos + 1, 1)
                    n = data[pos + 1]
                    pos += 2
                    if n > end - pos or n > left:
                        raise self.count_error(n, 1, "tuple", pos)
                    if n:
                        if depth >= max_depth:
                            raise self.fail(
                                f"term nested deeper than the limit of {max_depth}", pos
                            )
                        stack.append((items, todo, kind))
                        items, todo, kind = [], n, tag
                        depth += 1
                        continue
                    items.append(())
                elif tag == NIL_EXT:
                    items.append([])
                    pos += 1
                elif tag in (LIST_EXT, MAP_EXT, LARGE_TUPLE_EXT):
                    n, pos = self.container_header(tag, pos, left)
                    if n:
                        if depth >= max_depth:
                            raise self.fail(
                                f"term nested deeper than the limit of {max_depth}", pos
                            )
                        if tag == MAP_EXT:
                            maps.append((mapping, key_at, pairs))
                            mapping, key_at, pairs = {}, pos, n
                            n = 2
                        stack.append((items, todo, kind))
                        items, todo, kind = [], n, tag
                        depth += 1
                        continue
                    items.append({} if tag == MAP_EXT else ())
                elif tag == STRING_EXT:
                    if pos + 3 > end:
                        raise self.truncated(pos + 1, 2)
                    n = _unpack_u16(data, pos + 1)[0]
                    pos += 3
                    if n > end - pos or n > left:
                        raise self.count_error(n, 1, "string", pos)
                    # Its characters are terms too.
                    left -= n
                    items.append(list(data[pos : pos + n]))
                    pos += n
                elif tag == NEW_FLOAT_EXT:
                    if pos + 9 > end:
                        raise self.truncated(pos + 1, 8)
                    number: float = _unpack_f64(data, pos + 1)[0]
                    if not math.isfinite(number):
                        raise self.fail(f"float {number!r} is not a finite Erlang float", pos)
                    items.append(number)
                    pos += 9
                else:
                    handler = _HANDLERS.get(tag)
                    if handler is None:
                        raise self.fail(f"unknown or unsupported term tag {tag}", pos)
                    self.pos = pos + 1
                    self.terms_left = left
                    items.append(handler(self, depth, pos))
                    pos = self.pos
                    left = self.terms_left
                todo -= 1
            # The innermost container has all it needs: close it (a map: take in its current
            # pair) and hand it to the one around it.
            value: VmTerm
            if kind == MAP_EXT:
                key, value = items
                items.clear()
                size = len(mapping)
                try:
                    # One hash, not two (`in`, then store): Atom's __hash__ is Python.
                    mapping[key] = value
                except TypeError as exc:
                    raise self.fail(
                        f"map key of type {type(key).__name__} cannot be represented in Python",
                        key_at,
                    ) from exc
                if len(mapping) == size:
                    # Either a malformed map or keys Erlang tells apart (1 and 1.0) but
                    # Python does not; both would silently lose a value.
                    raise self.fail(f"duplicate map key {key!r}", key_at)
                pairs -= 1
                if pairs:
                    # Checked before the next key is read, like a recursive decoder does.
                    todo, key_at = 2, pos
                    continue
                value = mapping
                mapping, key_at, pairs = maps.pop()
            elif kind == LIST_EXT:
                value = _list_value(items)
            elif kind:
                value = tuple(items)
            else:
                self.pos = pos
                self.terms_left = left
                return items[0]
            items, todo, kind = stack.pop()
            depth -= 1
            items.append(value)
            todo -= 1

    # -- handlers of the rarer tags: (self, depth, offset of the tag) -> term, with
    #    self.pos just after the tag.

    def d_big(self, depth: int, start: int) -> VmTerm:
        n = self.u8() if self.data[start] == SMALL_BIG_EXT else self.u32()
        sign = self.u8()
        if sign > 1:
            raise self.fail(f"bignum sign byte {sign} is not 0 or 1", self.pos - 1)
        value = int.from_bytes(self.take(n), "little")
        return -value if sign else value

    def d_old_float(self, depth: int, start: int) -> VmTerm:
        text = self.take(31).rstrip(b"\0")
        try:
            value = float(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.fail(f"FLOAT_EXT text {text!r} is not a float", start) from exc
        if not math.isfinite(value):
            raise self.fail(f"float {value!r} is not a finite Erlang float", start)
        return value

    def d_atom(self, depth: int, start: int) -> VmTerm:
        tag = self.data[start]
        raw = self.take(self.u8() if tag == SMALL_ATOM_EXT else self.u16())
        cached = _ATOMS.get(raw) if tag == ATOM_UTF8_EXT else None
        return cached or self.new_atom(raw, tag, start)

    def d_bit_binary(self, depth: int, start: int) -> VmTerm:
        n = self.u32()
        bits = self.u8()
        data = self.take(n)
        if n == 0 or not 1 <= bits <= 8:
            raise self.fail(f"bit binary of {n} bytes with {bits} bits in the last byte", start)
        if bits == 8:
            return data
        # Erlang zeroes the unused low bits; anything else is a malformed encoding.
        if data[-1] & ((1 << (8 - bits)) - 1):
            raise self.fail("bit binary has non-zero padding bits", start)
        return BitString(data, bits)

    def d_pid(self, depth: int, start: int) -> VmTerm:
        node = self.atom(depth + 1)
        ident, serial = self.u32(), self.u32()
        creation = self.u32() if self.data[start] == NEW_PID_EXT else self.u8()
        return Pid(node, ident, serial, creation)

    def d_port(self, depth: int, start: int) -> VmTerm:
        tag = self.data[start]
        node = self.atom(depth + 1)
        wide = tag == V4_PORT_EXT
        ident = int(struct.unpack(">Q", self.take(8))[0]) if wide else self.u32()
        creation = self.u8() if tag == PORT_EXT else self.u32()
        return Port(node, ident, creation)

    def d_new_reference(self, depth: int, start: int) -> VmTerm:
        n = self.u16()
        if not 1 <= n <= MAX_REF_WORDS:
            raise self.fail(f"reference with {n} words (expected 1..{MAX_REF_WORDS})", start)
        node = self.atom(depth + 1)
        creation = self.u32() if self.data[start] == NEWER_REFERENCE_EXT else self.u8()
        words = tuple(self.u32() for _ in range(n))
        return Reference(node, creation, words)

    def d_old_reference(self, depth: int, start: int) -> VmTerm:
        node = self.atom(depth + 1)
        word = self.u32()
        return Reference(node, self.u8(), (word,))

    def d_export(self, depth: int, start: int) -> VmTerm:
        module = self.atom(depth + 1)
        function = self.atom(depth + 1)
        arity = self.small_int(depth + 1)
        printed = f"fun {atom_text(module.name)}:{atom_text(function.name)}/{arity}"
        return Fun(printed, self.data[start : self.pos])

    def d_new_fun(self, depth: int, start: int) -> VmTerm:
        size = self.u32()
        # Size counts itself and everything after the tag.
        end = start + 1 + size
        if size < 4 or end > len(self.data):
            raise self.fail(f"fun claims {size} bytes, more than the input holds", start)
        self.take(1 + 16 + 4)  # arity, uniq (md5), index
        free = self.u32()
        module = self.atom(depth + 1)
        old_index = self.small_int(depth + 1)
        old_uniq = self.small_int(depth + 1)
        self.term(depth + 1)  # creator pid
        self.count(free, 1, "fun environment")
        for _ in range(free):
            self.term(depth + 1)
        if self.pos != end:
            raise self.fail(f"fun size {size} does not match its contents", start)
        printed = f"#Fun<{atom_text(module.name)}.{old_index}.{old_uniq}>"
        return Fun(printed, self.data[start:end])


def _list_value(items: list[VmTerm]) -> VmTerm:
    """The value of a LIST_EXT whose elements and then tail are ``items``."""
    tail = items.pop()
    if isinstance(tail, list):
        # A list tail makes the whole thing proper; term_to_binary never emits one but [].
        items += tail
        return items
    if isinstance(tail, ImproperList):
        return ImproperList(cast(tuple[Term, ...], tuple(items)) + tail.items, tail.tail)
    return ImproperList(cast(tuple[Term, ...], tuple(items)), cast(Term, tail))


# The tags _Decoder.term does not read inline.
_HANDLERS = {
    SMALL_BIG_EXT: _Decoder.d_big,
    LARGE_BIG_EXT: _Decoder.d_big,
    FLOAT_EXT: _Decoder.d_old_float,
    ATOM_EXT: _Decoder.d_atom,
    SMALL_ATOM_EXT: _Decoder.d_atom,
    ATOM_UTF8_EXT: _Decoder.d_atom,
    BIT_BINARY_EXT: _Decoder.d_bit_binary,
    PID_EXT: _Decoder.d_pid,
    NEW_PID_EXT: _Decoder.d_pid,
    PORT_EXT: _Decoder.d_port,
    NEW_PORT_EXT: _Decoder.d_port,
    V4_PORT_EXT: _Decoder.d_port,
    REFERENCE_EXT: _Decoder.d_old_reference,
    NEW_REFERENCE_EXT: _Decoder.d_new_reference,
    NEWER_REFERENCE_EXT: _Decoder.d_new_reference,
    EXPORT_EXT: _Decoder.d_export,
    NEW_FUN_EXT: _Decoder.d_new_fun,
}
