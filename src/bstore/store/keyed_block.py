"""Strict ``Key: value`` text blocks: the line codec under path metadata and ``cache-info``.

Export streams and binary caches carry small text blocks, one ``Key: value`` line each,
every line ending in ``\\n``. Both are read from untrusted sources, so both are split the
same strict way here: bounded size, UTF-8, known keys only, each once (unless it may
repeat) and in the documented order, errors naming the source and the line. What the
values mean is up to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bstore.store.layout import StoreError


def block_lines(data: bytes, source: str, limit: int,
                error: type[StoreError]) -> list[str]:
    """The lines of a block of at most ``limit`` bytes; ``error`` is what a bad one raises."""
    if len(data) > limit:
        raise error(f"{source}: {len(data)} bytes is more than the {limit} allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not UTF-8 ({exc})") from exc
    if not text.endswith("\n"):
        raise error(f"{source}: does not end in a newline")
    return text[:-1].split("\n")


def parse_keyed_lines(data: bytes, source: str, keys: Sequence[str], *, limit: int,
                      error: type[StoreError], repeated: Iterable[str] = (),
                      bare: Iterable[str] = ()) -> dict[str, list[str]]:
    """Split a block into its values by key, strictly.

    ``keys`` are the known keys in their order; ``repeated`` may occur more than once
    (consecutively); a line that is just ``<key>:`` for a key in ``bare`` has the value
    ``""`` (an empty list). Whether required keys are present is the caller's check.
    """
    repeatable, empty = set(repeated), set(bare)
    fields: dict[str, list[str]] = {}
    last = -1
    for number, line in enumerate(block_lines(data, source, limit, error), start=1):
        key, sep, value = line.partition(": ")
        if not sep and line.endswith(":") and line[:-1] in empty:
            key, value = line[:-1], ""
        elif not sep or key not in keys:
            raise error(f"{source}:{number}: unknown or malformed line {line[:80]!r}")
        if key not in repeatable and key in fields:
            raise error(f"{source}:{number}: duplicate key {key!r}")
        if keys.index(key) < last:
            raise error(f"{source}:{number}: key {key!r} is out of order",
                        hint="keys appear in the documented order")
        last = keys.index(key)
        fields.setdefault(key, []).append(value)
    return fields


def render_lines(lines: Iterable[str]) -> bytes:
    """The block of ``lines``, each ended by ``\\n``."""
    return "".join(line + "\n" for line in lines).encode()
