"""Positioned problems found in app specs, and the error that carries one.

Parsing a directory of specs never stops at the first bad file: every finding becomes a
:class:`Problem` (an error, a warning or a note) naming the file, line and column. Code
that wants an exception (one spec file, a builder reading a spec) gets a
:class:`SpecError` wrapping the first error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from bstore.errors import BstoreError
from bstore.specs.located import Position


class Severity(StrEnum):
    """How bad a :class:`Problem` is: only errors make a spec (or a check) fail."""

    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about a spec: where it is (file and, when known, position) and what."""

    severity: Severity
    source: str
    pos: Position | None
    message: str
    hint: str | None = None

    def __post_init__(self) -> None:
        if not self.message:
            raise ValueError("a problem needs a message")

    @property
    def location(self) -> str:
        """``file:line:col`` (or just ``file`` when there is no position)."""
        return f"{self.source}:{self.pos}" if self.pos is not None else self.source

    def __str__(self) -> str:
        return f"{self.location}: {self.severity.value}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        """The problem as a JSON-ready mapping."""
        return {
            "severity": self.severity.value,
            "file": self.source,
            "line": self.pos.line if self.pos else None,
            "column": self.pos.column if self.pos else None,
            "message": self.message,
            "hint": self.hint,
        }


class SpecError(BstoreError):
    """A spec (or a spec file) that cannot be used; ``problem`` says where and why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.location}: {problem.message}", hint=problem.hint)
        self.problem = problem

    @classmethod
    def at(
        cls, source: str, pos: Position | None, message: str, hint: str | None = None
    ) -> SpecError:
        """An error-severity problem at ``source:pos``."""
        return cls(Problem(Severity.ERROR, source, pos, message, hint))


def errors_in(problems: Iterable[Problem]) -> list[Problem]:
    """The error-severity problems of ``problems``, in order."""
    return [p for p in problems if p.severity is Severity.ERROR]
