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

import itertools
import math
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from bstore.activators.etf_decode import decode
from bstore.activators.etf_format import (
    ATOM_CACHE_MAX,
    ATOM_UTF8_EXT,
    BINARY_EXT,
    BIT_BINARY_EXT,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_SIZE,
    DEFAULT_MAX_TERMS,
    INTEGER_EXT,
    LARGE_BIG_EXT,
    LARGE_TUPLE_EXT,
    LIST_EXT,
    MAP_EXT,
    MAX_ATOM_CHARS,
    NEW_FLOAT_EXT,
    NEW_PID_EXT,
    NEWER_REFERENCE_EXT,
    NIL_EXT,
    SMALL_ATOM_UTF8_EXT,
    SMALL_BIG_EXT,
    SMALL_INTEGER_EXT,
    SMALL_TUPLE_EXT,
    STRING_EXT,
    V4_PORT_EXT,
    VERSION,
    EtfDecodeError,
    EtfEncodeError,
    EtfError,
)
from bstore.activators.vmterms import (
    AnyTerm,
    BitString,
    Fun,
    Pid,
    Port,
    Reference,
    VmTerm,
    format_term,
)
from bstore.specs.terms.model import Atom, ImproperList

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_TERMS",
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
    if len(_ATOM_ETF) >= ATOM_CACHE_MAX:
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


