"""The External Term Format's tags, the codec's limits and its errors (shared by
:mod:`bstore.activators.etf`, the encoder and public face, and
:mod:`bstore.activators.etf_decode`)."""

from __future__ import annotations

from bstore.errors import BstoreError

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
ATOM_CACHE_MAX = 4096


class EtfError(BstoreError):
    """A term that cannot be encoded or a binary that is not valid, bounded ETF."""


class EtfEncodeError(EtfError):
    """A Python value with no External Term Format encoding (names the value)."""


class EtfDecodeError(EtfError):
    """A malformed, hostile or over-limit ETF binary (names the byte offset)."""
