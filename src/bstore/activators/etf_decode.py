"""The bounded, strict ETF decoder behind :func:`bstore.activators.etf.decode` (the module
docstring there says what it checks and why it runs as one loop)."""

from __future__ import annotations

import math
import struct
import zlib
from typing import cast

from bstore.activators.etf_format import (
    ATOM_CACHE_MAX,
    ATOM_EXT,
    ATOM_UTF8_EXT,
    BINARY_EXT,
    BIT_BINARY_EXT,
    COMPRESSED,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_SIZE,
    DEFAULT_MAX_TERMS,
    EXPORT_EXT,
    FLOAT_EXT,
    INTEGER_EXT,
    LARGE_BIG_EXT,
    LARGE_TUPLE_EXT,
    LIST_EXT,
    MAP_EXT,
    MAX_ATOM_CHARS,
    NEW_FLOAT_EXT,
    NEW_FUN_EXT,
    NEW_PID_EXT,
    NEW_PORT_EXT,
    NEW_REFERENCE_EXT,
    NEWER_REFERENCE_EXT,
    NIL_EXT,
    PID_EXT,
    PORT_EXT,
    REFERENCE_EXT,
    SMALL_ATOM_EXT,
    SMALL_ATOM_UTF8_EXT,
    SMALL_BIG_EXT,
    SMALL_INTEGER_EXT,
    SMALL_TUPLE_EXT,
    STRING_EXT,
    V4_PORT_EXT,
    VERSION,
    EtfDecodeError,
)
from bstore.activators.vmterms import (
    MAX_REF_WORDS,
    BitString,
    Fun,
    Pid,
    Port,
    Reference,
    VmTerm,
    atom_text,
)
from bstore.specs.terms.model import Atom, ImproperList, Term


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


# Inputs from this size on decode with the cyclic garbage collector paused (see decode).

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
            if len(_ATOMS) >= ATOM_CACHE_MAX:
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
