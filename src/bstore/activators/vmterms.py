"""Values only a BEAM node sends (pids, ports, references, funs, bitstrings), and printing.

The term model (:mod:`bstore.specs.terms.model`) covers what bstore writes; a running node
also answers with identifiers that have no source syntax. They are kept as small frozen
values, exactly enough to be sent back unchanged (:mod:`bstore.activators.etf` encodes
them), and print as Erlang prints them on their own node: ``<0.85.0>``, ``#Port<0.5>``,
``#Ref<0.1.2.3>``, ``#Fun<m.0.123>``. :func:`format_term` renders any term as Erlang text
for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, Union

from bstore.errors import BstoreError
from bstore.specs.terms.model import Atom, ImproperList

# A reference carries at most 5 words (OTP 24+: 3, or 5 for pid-references).
MAX_REF_WORDS = 5


class VmTermError(BstoreError):
    """A VM-only value constructed with out-of-range fields."""


@dataclass(frozen=True, slots=True)
class Pid:
    """An Erlang process identifier as received from a node (printed ``<0.ID.Serial>``)."""

    node: Atom
    id: int
    serial: int
    creation: int

    def __post_init__(self) -> None:
        for name, value in (("id", self.id), ("serial", self.serial), ("creation", self.creation)):
            if not 0 <= value < 1 << 32:
                raise VmTermError(f"pid {name} {value!r} is not a 32-bit unsigned integer")

    def __str__(self) -> str:
        # Printed as the owning node prints its own pids; the agent only sends local ones.
        return f"<0.{self.id}.{self.serial}>"


@dataclass(frozen=True, slots=True)
class Port:
    """An Erlang port identifier as received from a node (printed ``#Port<0.ID>``)."""

    node: Atom
    id: int
    creation: int

    def __post_init__(self) -> None:
        if not 0 <= self.id < 1 << 64 or not 0 <= self.creation < 1 << 32:
            raise VmTermError(f"port id {self.id!r} / creation {self.creation!r} out of range")

    def __str__(self) -> str:
        return f"#Port<0.{self.id}>"


@dataclass(frozen=True, slots=True)
class Reference:
    """An Erlang reference as received from a node (printed ``#Ref<0.w.w.w>``)."""

    node: Atom
    creation: int
    words: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.words) <= MAX_REF_WORDS:
            raise VmTermError(f"reference has {len(self.words)} words, expected 1..5")
        if not all(0 <= w < 1 << 32 for w in self.words) or not 0 <= self.creation < 1 << 32:
            raise VmTermError(f"reference words {self.words!r} are not 32-bit unsigned")

    def __str__(self) -> str:
        # Erlang prints the most significant word first.
        return "#Ref<0." + ".".join(str(w) for w in reversed(self.words)) + ">"


@dataclass(frozen=True, slots=True)
class Fun:
    """An opaque Erlang fun: its printed form and its exact encoding (to send it back)."""

    printed: str
    raw: bytes

    def __str__(self) -> str:
        return self.printed


@dataclass(frozen=True, slots=True)
class BitString:
    """A bitstring whose length is not a whole number of bytes.

    ``bits`` (1..7) is how many high bits of the last byte of ``data`` belong to it.
    """

    data: bytes
    bits: int

    def __post_init__(self) -> None:
        if not self.data or not 1 <= self.bits <= 7:
            raise VmTermError(f"bitstring of {len(self.data)} bytes with {self.bits} bits")

    def __str__(self) -> str:
        head = ",".join(str(b) for b in self.data[:-1])
        last = f"{self.data[-1] >> (8 - self.bits)}:{self.bits}"
        return f"<<{head + ',' if head else ''}{last}>>"


VmTerm: TypeAlias = Union[  # noqa: UP007 - a recursive alias needs the string-free Union
    Atom,
    bytes,
    int,
    float,
    tuple["VmTerm", ...],
    list["VmTerm"],
    ImproperList,
    dict["VmTerm", "VmTerm"],
    Pid,
    Port,
    Reference,
    Fun,
    BitString,
]
"""Every value :func:`decode` can return: the term model plus the VM-only opaque values."""

AnyTerm: TypeAlias = object
"""What :func:`encode` accepts: a :data:`VmTerm` or a model ``Term``, checked at run time.

(``list`` is invariant, so ``list[Term]`` is not a ``list[VmTerm]``; a static union would
reject the caller's perfectly good model terms.)"""


_RESERVED = frozenset(
    {
        *("after", "and", "andalso", "band", "begin", "bnot", "bor", "bsl", "bsr", "bxor"),
        *("case", "catch", "cond", "div", "end", "fun", "if", "let", "maybe", "not", "of"),
        *("or", "orelse", "receive", "rem", "try", "when", "xor"),
    }
)


def atom_text(name: str) -> str:
    """``name`` as Erlang source: bare when it may be, else quoted and escaped."""
    plain = (
        bool(name)
        and "a" <= name[0] <= "z"
        and all(c.isascii() and (c.isalnum() or c in "_@") for c in name)
        and name not in _RESERVED
    )
    if plain:
        return name
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def format_term(term: AnyTerm, *, limit: int = 2000) -> str:
    """Erlang source text for ``term`` (VM-only values in their printed form), cut at ``limit``.

    Used to quote terms from the node in error messages; for the term model the output
    is valid Erlang that ``erl_parse`` reads back as the same term.
    """
    parts: list[str] = []
    _format_into(parts, term)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_float(value: float) -> str:
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + ("e" + exponent if exponent else "")


def _format_into(parts: list[str], term: object) -> None:
    if isinstance(term, Atom):
        parts.append(atom_text(term.name))
    elif isinstance(term, bool) or term is None:
        parts.append(repr(term))
    elif isinstance(term, int):
        parts.append(str(term))
    elif isinstance(term, float):
        parts.append(_format_float(term))
    elif isinstance(term, bytes):
        if term and all(32 <= b < 127 for b in term):
            text = term.decode("ascii").replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'<<"{text}">>')
        else:
            parts.append("<<" + ",".join(str(b) for b in term) + ">>")
    elif isinstance(term, tuple | list):
        parts.append("{" if isinstance(term, tuple) else "[")
        for i, item in enumerate(term):
            if i:
                parts.append(",")
            _format_into(parts, item)
        parts.append("}" if isinstance(term, tuple) else "]")
    elif isinstance(term, ImproperList):
        parts.append("[")
        for i, item in enumerate(term.items):
            if i:
                parts.append(",")
            _format_into(parts, item)
        parts.append("|")
        _format_into(parts, term.tail)
        parts.append("]")
    elif isinstance(term, dict):
        parts.append("#{")
        for i, (key, value) in enumerate(term.items()):
            if i:
                parts.append(",")
            _format_into(parts, key)
            parts.append("=>")
            _format_into(parts, value)
        parts.append("}")
    else:
        parts.append(str(term))
