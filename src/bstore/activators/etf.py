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
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import cast

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


class EtfError(BstoreError):
    """A term that cannot be encoded or a binary that is not valid, bounded ETF."""


class EtfEncodeError(EtfError):
    """A Python value with no External Term Format encoding (names the value)."""


class EtfDecodeError(EtfError):
    """A malformed, hostile or over-limit ETF binary (names the byte offset)."""


# ---------------------------------------------------------------------------- encoding


def encode(term: AnyTerm) -> bytes:
    """Encode ``term`` as ETF (with the leading version byte 131).

    Raises :class:`EtfEncodeError` for values with no Erlang counterpart (``bool``,
    ``None``, ``str``, NaN/infinity, an :class:`ImproperList` with no items or a list tail).
    """
    out = bytearray([VERSION])
    _encode_into(out, term, 0)
    return bytes(out)


def _encode_atom(out: bytearray, name: str) -> None:
    if len(name) > MAX_ATOM_CHARS:
        raise EtfEncodeError(
            f"atom {name[:40]!r}... has {len(name)} characters; Erlang allows {MAX_ATOM_CHARS}"
        )
    raw = name.encode("utf-8")
    if len(raw) < 256:
        out += bytes([SMALL_ATOM_UTF8_EXT, len(raw)])
    else:
        out += struct.pack(">BH", ATOM_UTF8_EXT, len(raw))
    out += raw


def _encode_int(out: bytearray, value: int) -> None:
    if 0 <= value < 256:
        out += bytes([SMALL_INTEGER_EXT, value])
    elif -(1 << 31) <= value < 1 << 31:
        out += struct.pack(">Bi", INTEGER_EXT, value)
    else:
        magnitude = abs(value)
        digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
        if len(digits) < 256:
            out += bytes([SMALL_BIG_EXT, len(digits)])
        else:
            out += struct.pack(">BI", LARGE_BIG_EXT, len(digits))
        out.append(1 if value < 0 else 0)
        out += digits


def _encode_into(out: bytearray, term: object, depth: int) -> None:
    # Deep Python structures would overflow the interpreter stack; Erlang has no such
    # limit, but nothing bstore sends is remotely this deep.
    if depth > 10 * DEFAULT_MAX_DEPTH:
        raise EtfEncodeError(f"term nested deeper than {10 * DEFAULT_MAX_DEPTH} levels")
    if isinstance(term, bool) or term is None:
        raise EtfEncodeError(
            f"{term!r} has no Erlang counterpart", hint="use Atom('true'), Atom('undefined')..."
        )
    if isinstance(term, Atom):
        _encode_atom(out, term.name)
    elif isinstance(term, bytes):
        out += struct.pack(">BI", BINARY_EXT, len(term))
        out += term
    elif isinstance(term, int):
        _encode_int(out, term)
    elif isinstance(term, float):
        if not math.isfinite(term):
            raise EtfEncodeError(f"float {term!r} cannot be represented in Erlang")
        out += struct.pack(">Bd", NEW_FLOAT_EXT, term)
    elif isinstance(term, tuple):
        if len(term) < 256:
            out += bytes([SMALL_TUPLE_EXT, len(term)])
        else:
            out += struct.pack(">BI", LARGE_TUPLE_EXT, len(term))
        for item in term:
            _encode_into(out, item, depth + 1)
    elif isinstance(term, list):
        _encode_list(out, term, depth)
    elif isinstance(term, ImproperList):
        if not term.items:
            raise EtfEncodeError(f"improper list {term!r} has no items before its tail")
        if isinstance(term.tail, list):
            raise EtfEncodeError(f"improper list {term!r} has a list tail; use a plain list")
        out += struct.pack(">BI", LIST_EXT, len(term.items))
        for item in term.items:
            _encode_into(out, item, depth + 1)
        _encode_into(out, term.tail, depth + 1)
    elif isinstance(term, dict):
        out += struct.pack(">BI", MAP_EXT, len(term))
        for key, value in term.items():
            _encode_into(out, key, depth + 1)
            _encode_into(out, value, depth + 1)
    elif isinstance(term, Pid):
        out.append(NEW_PID_EXT)
        _encode_atom(out, term.node.name)
        out += struct.pack(">III", term.id, term.serial, term.creation)
    elif isinstance(term, Port):
        out.append(V4_PORT_EXT)
        _encode_atom(out, term.node.name)
        out += struct.pack(">QI", term.id, term.creation)
    elif isinstance(term, Reference):
        out += struct.pack(">BH", NEWER_REFERENCE_EXT, len(term.words))
        _encode_atom(out, term.node.name)
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


def _encode_list(out: bytearray, items: list[object], depth: int) -> None:
    if not items:
        out.append(NIL_EXT)
        return
    # Same choice as term_to_binary: a short list of bytes travels as STRING_EXT.
    if len(items) < 65536 and all(type(i) is int and 0 <= i < 256 for i in items):
        out += struct.pack(">BH", STRING_EXT, len(items))
        out += bytes(cast(list[int], items))
        return
    out += struct.pack(">BI", LIST_EXT, len(items))
    for item in items:
        _encode_into(out, item, depth + 1)
    out.append(NIL_EXT)


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
    term = decoder.term(0)
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


class _Decoder:
    def __init__(self, data: bytes, pos: int, max_depth: int, max_terms: int, source: str) -> None:
        self.data = data
        self.pos = pos
        self.max_depth = max_depth
        self.terms_left = max_terms
        self.source = source

    def fail(self, what: str, at: int | None = None) -> EtfDecodeError:
        return EtfDecodeError(f"{self.source}: {what} at byte {self.pos if at is None else at}")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"truncated: need {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise self.fail("truncated: need 1 bytes, 0 left")
        self.pos = pos + 1
        return self.data[pos]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def count(self, n: int, min_bytes_each: int, what: str) -> int:
        """Check that ``n`` items of at least ``min_bytes_each`` bytes can still follow."""
        if n * min_bytes_each > len(self.data) - self.pos:
            raise self.fail(f"{what} of {n} elements is longer than the remaining input")
        if n > self.terms_left:
            raise self.fail(f"{what} of {n} elements exceeds the term count limit")
        return n

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

    def term(self, depth: int) -> VmTerm:
        if depth > self.max_depth:
            raise self.fail(f"term nested deeper than the limit of {self.max_depth}")
        self.terms_left -= 1
        if self.terms_left < 0:
            raise self.fail("too many terms (limit reached)")
        start = self.pos
        tag = self.u8()
        handler = _HANDLERS.get(tag)
        if handler is None:
            raise self.fail(f"unknown or unsupported term tag {tag}", start)
        return handler(self, depth, start)

    # -- handlers: (self, depth, start offset of the tag) -> term

    def d_small_int(self, depth: int, start: int) -> VmTerm:
        return self.u8()

    def d_int(self, depth: int, start: int) -> VmTerm:
        return int(struct.unpack(">i", self.take(4))[0])

    def d_big(self, depth: int, start: int) -> VmTerm:
        n = self.u8() if self.data[start] == SMALL_BIG_EXT else self.u32()
        sign = self.u8()
        if sign > 1:
            raise self.fail(f"bignum sign byte {sign} is not 0 or 1", self.pos - 1)
        value = int.from_bytes(self.take(n), "little")
        return -value if sign else value

    def d_new_float(self, depth: int, start: int) -> VmTerm:
        value = float(struct.unpack(">d", self.take(8))[0])
        if not math.isfinite(value):
            raise self.fail(f"float {value!r} is not a finite Erlang float", start)
        return value

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
        n = self.u8() if tag in (SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT) else self.u16()
        raw = self.take(n)
        if tag in (ATOM_EXT, SMALL_ATOM_EXT):
            name = raw.decode("latin-1")
        else:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail("atom is not valid UTF-8", start) from exc
        if len(name) > MAX_ATOM_CHARS:
            raise self.fail(f"atom of {len(name)} characters (limit {MAX_ATOM_CHARS})", start)
        return Atom(name)

    def d_tuple(self, depth: int, start: int) -> VmTerm:
        n = self.u8() if self.data[start] == SMALL_TUPLE_EXT else self.u32()
        self.count(n, 1, "tuple")
        return tuple(self.term(depth + 1) for _ in range(n))

    def d_nil(self, depth: int, start: int) -> VmTerm:
        return []

    def d_string(self, depth: int, start: int) -> VmTerm:
        n = self.u16()
        self.count(n, 1, "string")
        self.terms_left -= n
        return list(self.take(n))

    def d_list(self, depth: int, start: int) -> VmTerm:
        n = self.u32()
        if n == 0:
            raise self.fail("LIST_EXT with no elements (an empty list is NIL_EXT)", start)
        # n elements plus the tail, each at least one byte.
        self.count(n + 1, 1, "list")
        items = [self.term(depth + 1) for _ in range(n)]
        tail = self.term(depth + 1)
        if isinstance(tail, list):
            # A list tail makes the whole thing proper; term_to_binary never emits it.
            return items + tail
        if isinstance(tail, ImproperList):
            return ImproperList(cast(tuple[Term, ...], tuple(items)) + tail.items, tail.tail)
        return ImproperList(cast(tuple[Term, ...], tuple(items)), cast(Term, tail))

    def d_binary(self, depth: int, start: int) -> VmTerm:
        return self.take(self.u32())

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

    def d_map(self, depth: int, start: int) -> VmTerm:
        n = self.u32()
        self.count(n, 2, "map")
        result: dict[VmTerm, VmTerm] = {}
        for _ in range(n):
            key_at = self.pos
            key = self.term(depth + 1)
            value = self.term(depth + 1)
            try:
                duplicate = key in result
            except TypeError as exc:
                raise self.fail(
                    f"map key of type {type(key).__name__} cannot be represented in Python",
                    key_at,
                ) from exc
            if duplicate:
                # Either a malformed map or keys Erlang tells apart (1 and 1.0) but Python
                # does not; both would silently lose a value.
                raise self.fail(f"duplicate map key {key!r}", key_at)
            result[key] = value
        return result

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


_HANDLERS = {
    SMALL_INTEGER_EXT: _Decoder.d_small_int,
    INTEGER_EXT: _Decoder.d_int,
    SMALL_BIG_EXT: _Decoder.d_big,
    LARGE_BIG_EXT: _Decoder.d_big,
    NEW_FLOAT_EXT: _Decoder.d_new_float,
    FLOAT_EXT: _Decoder.d_old_float,
    ATOM_EXT: _Decoder.d_atom,
    SMALL_ATOM_EXT: _Decoder.d_atom,
    ATOM_UTF8_EXT: _Decoder.d_atom,
    SMALL_ATOM_UTF8_EXT: _Decoder.d_atom,
    SMALL_TUPLE_EXT: _Decoder.d_tuple,
    LARGE_TUPLE_EXT: _Decoder.d_tuple,
    NIL_EXT: _Decoder.d_nil,
    STRING_EXT: _Decoder.d_string,
    LIST_EXT: _Decoder.d_list,
    BINARY_EXT: _Decoder.d_binary,
    BIT_BINARY_EXT: _Decoder.d_bit_binary,
    MAP_EXT: _Decoder.d_map,
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
