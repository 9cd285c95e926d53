"""The positioned error raised for Erlang-term source that ``file:consult/1`` would reject."""

from __future__ import annotations

from bstore.errors import BstoreError


class TermSyntaxError(BstoreError):
    """Erlang-term source that cannot be read, with the 1-based position of the problem.

    The message reads ``<source>:<line>:<column>: <what>``, for example
    ``apps/web/app.config:7:14: expected '=>' or ',' in map, found ':='``.
    """

    def __init__(
        self, source: str, line: int, column: int, what: str, hint: str | None = None
    ) -> None:
        super().__init__(f"{source}:{line}:{column}: {what}", hint)
        self.source = source
        self.line = line
        self.column = column
        self.what = what
