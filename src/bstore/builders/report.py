"""What one realise did: per-app results and the derivations built, skipped or failed.

Values only (no I/O): :class:`BuildReport` is what :meth:`Realiser.realise
<bstore.builders.realise.Realiser.realise>` returns and what ``bstore build --json``
prints; :class:`Progress` carries the callbacks of a live display.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bstore.errors import BstoreError


class RealiseError(BstoreError):
    """An app that could not be planned or realised."""


class AppState(StrEnum):
    """How an app ended in one ``realise``."""

    BUILT = "built"
    SKIPPED = "skipped"  # output already valid
    FAILED = "failed"
    DEPENDENCY_FAILED = "dependency-failed"
    NOT_STARTED = "not-started"


@dataclass(frozen=True)
class AppResult:
    """One app's outcome."""

    name: str
    version: str
    state: AppState
    output: str | None = None
    derivation: str | None = None
    error: str | None = None
    hint: str | None = None
    log: str | None = None
    resolution: list[dict[str, Any]] | None = None
    #: The error itself (a :class:`DerivationFailed` for a failed build), for callers
    #: that want to raise it; not part of the JSON form.
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``bstore build --json``)."""
        return {
            "name": self.name, "version": self.version, "state": self.state.value,
            "output": self.output, "derivation": self.derivation, "error": self.error,
            "hint": self.hint, "log": self.log, "resolution": self.resolution,
        }


@dataclass(frozen=True)
class BuildReport:
    """What one realise did: per-app results, and which derivations were built,
    skipped or failed (as output base names)."""

    apps: Mapping[str, AppResult]
    built: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    #: Outputs fetched from a binary cache instead of built (also in ``skipped``).
    substituted: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every app has its output."""
        return all(a.state in (AppState.BUILT, AppState.SKIPPED) for a in self.apps.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ok": self.ok,
            "apps": {name: app.to_json() for name, app in sorted(self.apps.items())},
            "built": list(self.built), "skipped": list(self.skipped),
            "failed": list(self.failed), "substituted": list(self.substituted),
        }

    def raise_for_failure(self) -> None:
        """Raise the error of the first app (by name) without an output, if any: a
        :class:`DerivationFailed` naming the derivation and its log tail for a failed
        build, else a :class:`RealiseError` saying why the app has no output."""
        for name in sorted(self.apps):
            app = self.apps[name]
            if app.state in (AppState.BUILT, AppState.SKIPPED):
                continue
            if isinstance(app.exception, BstoreError):
                raise app.exception
            raise RealiseError(f"app {name!r} has no output: {app.error}", hint=app.hint)


@dataclass(frozen=True)
class Progress:
    """Callbacks for a live display (called from worker threads; keep them quick)."""

    on_plan: Callable[[int], None] = lambda _n: None
    on_start: Callable[[str], None] = lambda _label: None
    on_finish: Callable[[str, str], None] = lambda _label, _state: None
