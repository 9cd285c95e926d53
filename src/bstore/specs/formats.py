"""Spec file formats: names, limits, and reading a spec file's bytes safely.

Every format becomes one :class:`~bstore.specs.located.Located` tree so the schema can
name the line and column of any value (:mod:`~bstore.specs.json_reader`,
:mod:`~bstore.specs.yaml_reader`, and the Erlang-term parser in :mod:`bstore.specs.terms`).
YAML and JSON are mapped as bc_gitops maps them (mapping keys become atoms, strings
become binaries, ``true``/``false``/``null`` become atoms); see
:mod:`bstore.specs.termjson` for the tagged form that writes other terms.

Spec files come from a git repository anyone with push access controls, so reading is
bounded: regular files only (a FIFO would block us), at most :data:`MAX_SPEC_BYTES`
(checked with ``fstat`` before a byte is read), strict UTF-8, at most
:data:`MAX_DEPTH` levels of nesting, and YAML aliases may expand to at most
:data:`MAX_YAML_VALUES` values (an "alias bomb" is a few hundred bytes that expand to
billions).
"""

from __future__ import annotations

import os
import stat
from enum import StrEnum
from pathlib import Path

from bstore.specs.located import Located, Position
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom, Term

#: Spec files larger than this are refused unread; real specs are a few hundred bytes.
MAX_SPEC_BYTES = 1 << 20
#: Deeper nesting than this is refused (also keeps the recursive readers off Python's stack limit).
MAX_DEPTH = 100
#: A YAML document may expand (through aliases) to at most this many values.
MAX_YAML_VALUES = 1_000_000
#: Erlang atoms hold at most this many characters.
MAX_ATOM_CHARS = 255

#: Spec file names in order of precedence (the first that exists is the spec).
SPEC_FILE_NAMES = (
    "app.config",
    "app.yaml",
    "app.yml",
    "app.json",
    "config.yaml",
    "config.yml",
    "config.json",
    "config",
)


class SpecFormat(StrEnum):
    """The syntax of a spec file."""

    ERLANG = "erlang"
    YAML = "yaml"
    JSON = "json"


def format_of(path: Path) -> SpecFormat:
    """The format a spec file name implies (``.yaml``/``.yml``, ``.json``, else Erlang terms)."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return SpecFormat.YAML
    if suffix == ".json":
        return SpecFormat.JSON
    return SpecFormat.ERLANG


def _pos_at(data: bytes | str, offset: int) -> Position:
    newline = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    start = data.rfind(newline, 0, offset) + 1  # type: ignore[arg-type]
    prefix = data[start:offset]
    chars = prefix.decode("utf-8", "replace") if isinstance(prefix, bytes) else prefix
    return Position(line, len(chars) + 1)


def read_spec_bytes(path: Path, source: str | None = None) -> bytes:
    """The bytes of a spec file: a regular file of at most :data:`MAX_SPEC_BYTES`."""
    shown = source or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; we reject it just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError.at(shown, None, f"cannot open spec file: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError.at(
                shown, None, "not a regular file", hint="a spec must be a plain file"
            )
        if info.st_size > MAX_SPEC_BYTES:
            raise SpecError.at(
                shown,
                None,
                f"spec file is {info.st_size} bytes; the limit is {MAX_SPEC_BYTES} (1 MiB)",
                hint="a spec describes one app; move large data out of it",
            )
        chunks: list[bytes] = []
        remaining = MAX_SPEC_BYTES + 1  # one more byte tells us the file grew past the limit
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise SpecError.at(shown, None, f"cannot read spec file: {exc.strerror}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError.at(
            shown, None, f"spec file is over the limit of {MAX_SPEC_BYTES} bytes (1 MiB)"
        )
    return data


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as text; invalid UTF-8 is an error at the offending byte. A BOM is dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError.at(
            source,
            _pos_at(data, exc.start),
            f"invalid UTF-8: byte 0x{data[exc.start]:02x} cannot start or continue a character",
            hint="save the file as UTF-8",
        ) from exc
    return text.removeprefix("\ufeff")


def atom_key(name: str, source: str, pos: Position) -> Atom:
    """A YAML/JSON mapping key as an atom (at most :data:`MAX_ATOM_CHARS` characters)."""
    if len(name) > MAX_ATOM_CHARS:
        raise SpecError.at(
            source,
            pos,
            f"key {name[:40]!r}... is {len(name)} characters; atoms hold at most {MAX_ATOM_CHARS}",
        )
    return Atom(name)


def binary_of(text: str, source: str, pos: Position) -> bytes:
    """A YAML/JSON string as the binary bc_gitops makes of it (UTF-8)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SpecError.at(
            source, pos, "string holds a lone surrogate (\\ud800-\\udfff) escape"
        ) from exc


def mapping_of(
    pairs: list[tuple[Located, Located]],
) -> tuple[dict[Term, Term], tuple[Located, ...]]:
    """The map term and the ``k0, v0, k1, v1, ...`` children of located key/value pairs."""
    children: list[Located] = []
    for key, value in pairs:
        children += [key, value]
    return {k.term: v.term for k, v in pairs}, tuple(children)
