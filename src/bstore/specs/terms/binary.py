"""Building the value of a binary literal ``<<...>>`` from its segments, as eval_bits does.

``file:consult/1`` evaluates binary literals with OTP's ``eval_bits``: every segment has
a type (integer, float, binary, utf8/16/32), a size times a unit, a signedness and an
endianness, with the defaults of ``erl_bits``. The segments are concatenated bit by bit;
our term model has only byte binaries, so a total that is not a whole number of bytes
(a bitstring) is refused.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from bstore.specs.terms.lexer import is_unicode_scalar

_TYPES = {"integer", "float", "binary", "utf8", "utf16", "utf32"}
_ALIASES = {"bytes": ("binary", 8), "bitstring": ("binary", 1), "bits": ("binary", 1)}
_SIGNS = {"signed", "unsigned"}
_ENDIANS = {"big", "little", "native"}
# The machines bstore targets (x86-64, aarch64) are little-endian.
_NATIVE = "little"


# A 15-byte literal like <<1:100000000000>> would otherwise ask for gigabytes: no segment,
# and no text's binaries together (see the parser), may exceed a few times the 1 MiB cap
# on spec files.
MAX_SEGMENT_BITS = 8 * 4 * 1024 * 1024


class SegmentError(ValueError):
    """A segment ``eval_bits`` would refuse; the parser adds the position."""


@dataclass(frozen=True, slots=True)
class SegmentType:
    """The resolved type of one segment (``erl_bits:set_bit_type/2`` with defaults)."""

    type: str
    unit: int | None
    signed: bool
    endian: str

    @staticmethod
    def resolve(specifiers: list[tuple[str, int | None]], has_size: bool) -> SegmentType:
        """Merge type specifiers like ``integer``, ``little``, ``unit:8``; refuse conflicts."""
        fields: dict[str, str | int] = {}

        def merge(field: str, value: str | int) -> None:
            if fields.setdefault(field, value) != value:
                raise SegmentError(f"conflicting {field} specifiers in binary segment")

        for name, unit in specifiers:
            if name == "unit":
                if unit is None or not 1 <= unit <= 256:
                    raise SegmentError("unit must be written unit:N with 1 =< N =< 256")
                merge("unit", unit)
            elif unit is not None:
                raise SegmentError(f"unknown binary type specifier '{name}:{unit}'")
            elif name in _TYPES:
                merge("type", name)
            elif name in _ALIASES:
                merge("type", _ALIASES[name][0])
                merge("unit", _ALIASES[name][1])
            elif name in _SIGNS:
                merge("sign", name)
            elif name in _ENDIANS:
                merge("endian", name)
            else:
                raise SegmentError(f"unknown binary type specifier '{name}'")
        kind = str(fields.get("type", "integer"))
        unit_value = fields.get("unit")
        unit = int(unit_value) if unit_value is not None else None
        if kind.startswith("utf") and (has_size or unit is not None):
            raise SegmentError(f"a {kind} segment takes no size or unit")
        if kind in ("integer", "float") and not has_size and unit is not None:
            raise SegmentError("a unit needs an explicit size")
        endian = str(fields.get("endian", "big"))
        return SegmentType(
            kind, unit, fields.get("sign") == "signed", _NATIVE if endian == "native" else endian
        )


def _integer_bits(value: int, nbits: int, endian: str) -> int:
    """``<<Value:NBits>>`` as an unsigned int of ``nbits`` bits (value truncated)."""
    value &= (1 << nbits) - 1
    if endian == "big" or nbits <= 8:
        return value
    # Little endian: whole bytes least significant first, then the leftover top bits.
    whole, rest = divmod(nbits, 8)
    out = 0
    for index in range(whole):
        out = (out << 8) | ((value >> (8 * index)) & 0xFF)
    if rest:
        out = (out << rest) | (value >> (8 * whole))
    return out


def segment_bits(value: object, size: int | None, seg: SegmentType) -> tuple[int, int]:
    """The bits of one segment as ``(bits, count)``; raises :class:`SegmentError`."""
    kind = seg.type
    if kind == "integer":
        if type(value) is not int:
            raise SegmentError(f"integer segment needs an integer, got {value!r}")
        nbits = (8 if size is None else size) * (seg.unit or 1)
        if nbits > MAX_SEGMENT_BITS:
            raise SegmentError(f"segment of {nbits} bits is larger than bstore allows")
        return _integer_bits(value, nbits, seg.endian), nbits
    if kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SegmentError(f"float segment needs a number, got {value!r}")
        nbits = (64 if size is None else size) * (seg.unit or 1)
        codes = {16: "e", 32: "f", 64: "d"}
        if nbits not in codes:
            raise SegmentError(f"float segment must be 16, 32 or 64 bits, not {nbits}")
        fmt = ("<" if seg.endian == "little" else ">") + codes[nbits]
        try:
            number = float(value)
        except OverflowError as exc:
            raise SegmentError(f"{value!r} does not fit a float") from exc
        try:
            packed = struct.pack(fmt, number)
        except OverflowError:
            # Erlang rounds a double too large for 16/32 bits to infinity.
            packed = struct.pack(fmt, math.copysign(math.inf, number))
        return int.from_bytes(packed, "big"), nbits
    if kind == "binary":
        if not isinstance(value, bytes):
            raise SegmentError(f"binary segment needs a binary, got {value!r}")
        unit = seg.unit or 8
        have = len(value) * 8
        bits = int.from_bytes(value, "big")
        if size is None:
            if have % unit:
                raise SegmentError(f"binary of {have} bits is not a multiple of unit {unit}")
            return bits, have
        want = size * unit
        if want > have:
            raise SegmentError(f"binary segment wants {want} bits, the binary has {have}")
        return bits >> (have - want), want
    # utf8 / utf16 / utf32
    if type(value) is not int or (not is_unicode_scalar(value) and not 0xFFFE <= value <= 0xFFFF):
        raise SegmentError(f"{kind} segment needs a Unicode code point, got {value!r}")
    codec = {"utf8": "utf-8", "utf16": "utf-16", "utf32": "utf-32"}[kind]
    if kind != "utf8":
        codec += "-le" if seg.endian == "little" else "-be"
    encoded = chr(value).encode(codec, "surrogatepass")
    return int.from_bytes(encoded, "big"), len(encoded) * 8


def write_string(writer: BitWriter, text: str, size: int | None, seg: SegmentType) -> int:
    """A string written inside a binary: one segment per character, all of the same type.

    Returns the number of bits written.
    """
    if (
        seg.type == "integer"
        and seg.endian == "big"
        and (8 if size is None else size) * (seg.unit or 1) == 8
    ):
        # The common case <<"text">>: every character truncated to a byte (band 255).
        data = text.encode() if text.isascii() else bytes([ord(c) & 0xFF for c in text])
        return writer.write_bytes(data)
    if seg.type == "utf8":
        # Characters of a scanned string are valid code points, so this cannot fail.
        return writer.write_bytes(text.encode("utf-8"))
    if not text:
        segment_bits(0, size, seg)  # eval_bits checks the type even for ""
    written = 0
    for char in text:
        bits, nbits = segment_bits(ord(char), size, seg)
        writer.write(bits, nbits)
        written += nbits
    return written


class BitWriter:
    """Concatenates segments bit by bit in linear time (whole bytes go straight out)."""

    def __init__(self, max_bits: int) -> None:
        self._max_bits = max_bits
        self._out = bytearray()
        self._pending = 0  # the last count % 8 bits, not yet a whole byte
        self._pending_bits = 0

    @property
    def bit_count(self) -> int:
        """How many bits have been written."""
        return len(self._out) * 8 + self._pending_bits

    def write(self, bits: int, count: int) -> None:
        """Append the low ``count`` bits of ``bits``, most significant first."""
        self._check(count)
        value = (self._pending << count) | bits
        total = self._pending_bits + count
        whole, rest = divmod(total, 8)
        if whole:
            self._out += (value >> rest).to_bytes(whole, "big")
        self._pending = value & ((1 << rest) - 1)
        self._pending_bits = rest

    def write_bytes(self, data: bytes) -> int:
        """Append whole bytes; returns the number of bits written."""
        self._check(len(data) * 8)
        if self._pending_bits:
            self.write(int.from_bytes(data, "big"), len(data) * 8)
        else:
            self._out += data
        return len(data) * 8

    def _check(self, count: int) -> None:
        if self.bit_count + count > self._max_bits:
            raise SegmentError(
                f"binaries in one text may hold at most {MAX_SEGMENT_BITS // 8} bytes in all"
            )

    def getvalue(self) -> bytes:
        """The bytes written; only valid when :attr:`bit_count` is a multiple of 8."""
        assert self._pending_bits == 0
        return bytes(self._out)
