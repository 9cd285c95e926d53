"""Loading spec files: read, parse by format, validate — problems instead of exceptions.

This is the I/O edge of spec reading: :func:`load_spec_file` turns any file into a
:class:`SpecResult` (the spec, or ``None``, and every positioned problem) and never
raises for a bad file; :func:`load_spec` raises :class:`SpecError` for code that wants
one valid spec or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bstore.errors import BstoreError
from bstore.specs import terms
from bstore.specs.formats import SpecFormat, decode_utf8, format_of, read_spec_bytes
from bstore.specs.json_reader import parse_json
from bstore.specs.located import Located, Position
from bstore.specs.model import AppSpec
from bstore.specs.problems import Problem, Severity, SpecError, errors_in
from bstore.specs.schema import spec_from_located
from bstore.specs.yaml_reader import parse_yaml


def load_located(path: Path, source: str | None = None) -> tuple[SpecFormat, Located]:
    """Read a spec file: its format and its single top-level term, positioned.

    Raises :class:`SpecError` (or the term parser's ``TermSyntaxError``) with the
    file, line and column.
    """
    shown = source or str(path)
    fmt = format_of(path)
    data = read_spec_bytes(path, shown)
    if fmt is SpecFormat.ERLANG:
        return fmt, _erlang(data, shown)
    text = decode_utf8(data, shown)
    return fmt, (parse_json(text, shown) if fmt is SpecFormat.JSON else parse_yaml(text, shown))


def _erlang(data: bytes, source: str) -> Located:
    terms_read = terms.parse_located(terms.decode_source(data, source), source)
    if not terms_read:
        raise SpecError.at(
            source, Position(1, 1), "expected one map or proplist ending in '.', found no term"
        )
    if len(terms_read) > 1:
        raise SpecError.at(
            source,
            terms_read[1].pos,
            "expected one map or proplist, found a second term",
            hint="a spec file holds exactly one term",
        )
    return terms_read[0]


@dataclass(frozen=True)
class SpecResult:
    """The outcome of reading one spec file: the spec (``None`` on any error) and all problems."""

    spec: AppSpec | None
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> list[Problem]:
        """The error-severity problems."""
        return errors_in(self.problems)


def _term_error(exc: BstoreError, source: str) -> Problem:
    # TermSyntaxError carries .line/.column; any other BstoreError has no position.
    line, column = getattr(exc, "line", None), getattr(exc, "column", None)
    pos = Position(line, column) if isinstance(line, int) and isinstance(column, int) else None
    what = getattr(exc, "what", None)
    message = what if isinstance(what, str) else exc.message
    return Problem(Severity.ERROR, source, pos, message, exc.hint)


def load_spec_file(
    path: Path, *, source: str | None = None, expected_name: str | None = None
) -> SpecResult:
    """Read and validate one spec file; never raises for a bad file (see ``problems``).

    ``source`` is how the file is named in messages (default: ``str(path)``).
    """
    shown = source or str(path)
    try:
        fmt, root = load_located(path, shown)
    except SpecError as exc:
        return SpecResult(None, (exc.problem,))
    except BstoreError as exc:  # the Erlang term parser's errors
        return SpecResult(None, (_term_error(exc, shown),))
    spec, problems = spec_from_located(root, fmt, shown, expected_name)
    return SpecResult(spec, tuple(problems))


def load_spec(path: Path, *, expected_name: str | None = None) -> AppSpec:
    """Read one spec file; raises :class:`SpecError` with the first error."""
    result = load_spec_file(path, expected_name=expected_name)
    if result.spec is None:
        raise SpecError(result.errors[0])
    return result.spec
