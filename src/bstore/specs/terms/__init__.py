"""Erlang terms: read them exactly as ``file:consult/1`` does, and print them back.

::

    consult(path)              -> list[Term]      like file:consult/1
    consult_located(path)      -> list[Located]   the same, every sub-term with line:column
    parse(text, source)        -> list[Term]      from a str already in memory
    parse_located(text, source)-> list[Located]
    format(term)               -> str             Erlang source consult reads back as term

Reading a file enforces :data:`MAX_FILE_SIZE` before reading it all, decodes it as
UTF-8 unless a ``coding: latin-1`` comment on its first two lines says otherwise (the
rule ``epp`` applies for ``file:consult/1``), and reports invalid UTF-8 at its line and
column. Every problem with the text is a :class:`TermSyntaxError` naming
``source:line:column``; a file that cannot be opened is a :class:`TermReadError`.
See :mod:`bstore.specs.terms.parser` for what is accepted.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from bstore.errors import BstoreError
from bstore.specs.terms.errors import TermSyntaxError
from bstore.specs.terms.model import Atom, ImproperList, Term, exactly_equal
from bstore.specs.terms.parser import MAX_DEPTH, parse_located_terms, parse_terms
from bstore.specs.terms.printer import TermFormatError, format_term

if TYPE_CHECKING:
    from bstore.specs.located import Located

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_SIZE",
    "Atom",
    "ImproperList",
    "Term",
    "TermFormatError",
    "TermReadError",
    "TermSyntaxError",
    "consult",
    "consult_located",
    "decode_source",
    "exactly_equal",
    "format",
    "parse",
    "parse_located",
]

# Specs are small hand-written files; anything bigger is a mistake or an attack.
MAX_FILE_SIZE = 1024 * 1024

# epp looks for the coding comment in the first 512 bytes only (16 chunks of 32).
_CODING_WINDOW = 512
_CODING_VALUE = re.compile(rb"[A-Za-z0-9-]*")


class TermReadError(BstoreError):
    """A term file that cannot be read at all (missing, unreadable, a directory)."""


def parse(text: str, source: str = "<string>") -> list[Term]:
    """Every ``.``-terminated term in ``text``; errors name ``source``."""
    return parse_terms(text, source)


def parse_located(text: str, source: str = "<string>") -> list[Located]:
    """Like :func:`parse`, keeping the 1-based line and column of every sub-term.

    Children follow :class:`~bstore.specs.located.Located`: tuple and list elements
    (an improper list's tail last), map keys and values alternately in source order
    (a duplicate key appears twice; the term keeps the last value, as Erlang does).
    Strings are leaves, and ``[a | "bc"]`` has the children ``a`` and ``"bc"``. A
    parenthesised term is located at the term inside; ``-1`` at its ``-``.
    """
    return parse_located_terms(text, source)


def consult(path: str | os.PathLike[str]) -> list[Term]:
    """The terms of a file, as ``file:consult/1`` returns them (raising instead of
    returning ``{error, ...}``)."""
    source = os.fspath(path)
    return parse_terms(decode_source(_read_capped(source), source), source)


def consult_located(path: str | os.PathLike[str]) -> list[Located]:
    """Like :func:`consult`, keeping the position of every sub-term."""
    source = os.fspath(path)
    return parse_located_terms(decode_source(_read_capped(source), source), source)


def format(term: Term) -> str:
    """Erlang source that ``file:consult/1`` reads back as exactly ``term``.

    Write ``format(t) + ".\\n"`` to a file to make it consultable. Raises
    :class:`TermFormatError` for values with no Erlang form (NaN, ``True``, ``str``).
    """
    return format_term(term)


def _read_capped(source: str) -> bytes:
    """The bytes of a file, refusing files over :data:`MAX_FILE_SIZE` before reading."""
    try:
        with open(source, "rb") as handle:
            data = handle.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise TermReadError(
            f"cannot read {source}: {exc.strerror or exc}", "check the path and permissions"
        ) from exc
    if len(data) > MAX_FILE_SIZE:
        raise TermSyntaxError(
            source,
            1,
            1,
            f"file is larger than {MAX_FILE_SIZE} bytes",
            "spec files are small; split or shrink it",
        )
    return data


def declared_encoding(data: bytes) -> str | None:
    """``"latin-1"`` or ``"utf-8"`` when a ``%`` comment on one of the first two lines
    says ``coding: latin-1`` / ``coding = utf-8`` (epp's rule), else None."""
    for line in data[:_CODING_WINDOW].split(b"\n")[:2]:
        percent = line.find(b"%")
        if percent < 0:
            continue
        rest = line[percent + 1 :]
        search = 0
        while (found := rest.find(b"coding", search)) >= 0:
            cursor = found + 6
            while rest[cursor : cursor + 1] == b" ":
                cursor += 1
            if rest[cursor : cursor + 1] in (b":", b"="):
                cursor += 1
                while rest[cursor : cursor + 1] == b" ":
                    cursor += 1
                match = _CODING_VALUE.match(rest, cursor)
                parts = (match.group() if match else b"").lower().split(b"-")
                if parts[:2] == [b"latin", b"1"]:
                    return "latin-1"
                if parts[:2] == [b"utf", b"8"]:
                    return "utf-8"
                # epp gives up at the first coding declaration it cannot use.
                return None
            search = found + 1
    return None


def decode_source(data: bytes, source: str) -> str:
    """Decode term-file bytes as ``file:consult/1`` would; invalid UTF-8 is a
    :class:`TermSyntaxError` at the line and column of the first bad byte."""
    if declared_encoding(data) == "latin-1":
        return data.decode("latin-1")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8")
        line = good.count("\n") + 1
        column = len(good) - (good.rfind("\n") + 1) + 1
        raise TermSyntaxError(
            source,
            line,
            column,
            f"invalid UTF-8 byte 0x{data[exc.start]:02X}",
            "save the file as UTF-8, or declare '%% coding: latin-1' on its first line",
        ) from exc
