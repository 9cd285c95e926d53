"""What the reconciler reports: the overall state, the last commit, and each app.

Persisted atomically as ``<gitops dir>/status.json`` (temp file, fsync, rename, fsync of
the directory), so one-shot commands (``bstore status``) and the daemon read the same
thing. Overall states (the seed's):

=============  ======================================================================
initializing   nothing was reconciled yet
ready          the repo was synced (bstore.sync(), the daemon) but nothing applied yet
synced         the last pass applied the tip and every app is running and healthy
degraded       applied, but some app failed or is unhealthy, or the tip is quarantined
error          the last pass could not run (repo unreachable, commit refused, ...):
               the running apps were left as they were
=============  ======================================================================

App states: ``pending | starting | running | stopped | failed | upgrading``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from bstore.errors import BstoreError

STATUS_FILE = "status.json"
#: A status file larger than this is not ours (1,000 apps take ~500 KiB).
MAX_STATUS_BYTES = 64 << 20


class StatusError(BstoreError):
    """A status file that cannot be read or written."""


class State(StrEnum):
    """The reconciler's overall state."""

    INITIALIZING = "initializing"
    READY = "ready"
    SYNCED = "synced"
    DEGRADED = "degraded"
    ERROR = "error"


class AppState(StrEnum):
    """One app's state as the reconciler reports it."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    UPGRADING = "upgrading"


def now_iso() -> str:
    """The current UTC time as ``2026-01-31T12:00:00Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class AppStatus:
    """One app: what runs (version, store path, isolation, node), how it is, since when,
    and the last error (a bad spec, a failed build, an unhealthy check). ``note`` says
    what else a reader should know (a manual deploy the next pass reverts)."""

    name: str
    version: str | None
    status: AppState
    store_path: str | None = None
    isolation: str | None = None
    node: str | None = None
    healthy: bool | None = None
    health: str | None = None
    since: str | None = None
    last_error: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.status, AppState):
            raise StatusError(f"app {self.name!r}: status {self.status!r} is not an AppState")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "version": self.version, "status": self.status.value,
                "store_path": self.store_path, "isolation": self.isolation,
                "node": self.node, "healthy": self.healthy, "health": self.health,
                "since": self.since, "last_error": self.last_error, "note": self.note}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AppStatus:
        """Inverse of :meth:`to_json`."""
        return cls(name=str(data["name"]), version=data.get("version"),
                   status=AppState(data["status"]), store_path=data.get("store_path"),
                   isolation=data.get("isolation"), node=data.get("node"),
                   healthy=data.get("healthy"), health=data.get("health"),
                   since=data.get("since"), last_error=data.get("last_error"),
                   note=data.get("note"))


@dataclass(frozen=True)
class Status:
    """The whole report (see the module docstring)."""

    state: State = State.INITIALIZING
    profile: str = "default"
    last_commit: str | None = None
    tip_commit: str | None = None
    generation: int | None = None
    last_reconcile: str | None = None
    last_success: str | None = None
    error: str | None = None
    quarantine: Mapping[str, Any] | None = None
    apps: Mapping[str, AppStatus] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.state, State):
            raise StatusError(f"status state {self.state!r} is not a State")

    @property
    def app_count(self) -> int:
        """How many apps the status knows."""
        return len(self.apps)

    @property
    def healthy_count(self) -> int:
        """Apps running and healthy (or running without a failed check)."""
        return sum(1 for a in self.apps.values()
                   if a.status is AppState.RUNNING and a.healthy is not False)

    def with_(self, **changes: Any) -> Status:
        """A copy with ``changes``."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (what ``status.json`` and ``bstore status --json`` hold)."""
        return {
            "state": self.state.value, "profile": self.profile,
            "last_commit": self.last_commit, "tip_commit": self.tip_commit,
            "generation": self.generation, "last_reconcile": self.last_reconcile,
            "last_success": self.last_success, "error": self.error,
            "quarantine": dict(self.quarantine) if self.quarantine else None,
            "app_count": self.app_count, "healthy_count": self.healthy_count,
            "apps": {n: a.to_json() for n, a in sorted(self.apps.items())},
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Status:
        """Inverse of :meth:`to_json`."""
        apps = {n: AppStatus.from_json(a) for n, a in (data.get("apps") or {}).items()}
        return cls(state=State(data["state"]), profile=str(data.get("profile", "default")),
                   last_commit=data.get("last_commit"), tip_commit=data.get("tip_commit"),
                   generation=data.get("generation"),
                   last_reconcile=data.get("last_reconcile"),
                   last_success=data.get("last_success"), error=data.get("error"),
                   quarantine=data.get("quarantine"), apps=apps,
                   notes=tuple(data.get("notes") or ()))

    def render(self) -> str:
        """Human text: the summary line, then one line per app."""
        lines = [f"state: {self.state.value}   profile: {self.profile}   generation:"
                 f" {self.generation if self.generation is not None else '-'}",
                 f"commit: {(self.last_commit or '-')[:12]}   apps: {self.app_count}"
                 f"   healthy: {self.healthy_count}   last reconcile:"
                 f" {self.last_reconcile or 'never'}"]
        if self.error and not self.quarantine:  # the quarantine line says it
            lines.append(f"error: {self.error}")
        if self.quarantine:
            q = self.quarantine
            lines.append(f"quarantined: commit {str(q.get('commit'))[:12]}: {q.get('reason')}"
                         " (not retried until the repository tip changes)")
        lines.extend(f"note: {n}" for n in self.notes)
        for name in sorted(self.apps):
            lines.append(render_app(self.apps[name]))
        return "\n".join(lines)


def render_app(app: AppStatus) -> str:
    """One app as one line (plus its error and note)."""
    health = "" if app.healthy is None else (" healthy" if app.healthy else " UNHEALTHY")
    line = (f"  {app.name:<20} {app.version or '-':<12} {app.status.value:<10}{health}"
            f"  {app.isolation or '-'}  since {app.since or '-'}")
    if app.store_path:
        line += f"\n      {app.store_path}"
    if app.last_error:
        line += f"\n      error: {app.last_error}"
    if app.note:
        line += f"\n      note: {app.note}"
    return line


def status_path(gitops_dir: Path) -> Path:
    """Where the status of the profile whose gitops directory is ``gitops_dir`` lives."""
    return gitops_dir / STATUS_FILE


def read_status(gitops_dir: Path, profile: str = "default") -> Status:
    """The persisted status; ``initializing`` when there is none yet."""
    path = status_path(gitops_dir)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        return Status(profile=profile)
    except OSError as exc:
        raise StatusError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    if len(data) > MAX_STATUS_BYTES:
        raise StatusError(f"{str(path)!r} is larger than {MAX_STATUS_BYTES} bytes",
                          hint="remove it; the next reconcile writes it again")
    try:
        return Status.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StatusError(f"{str(path)!r} is not a bstore status file: {exc}",
                          hint="remove it; the next reconcile writes it again") from exc


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compact: with ``indent`` json uses its pure-Python encoder, several times slower
    # on the status of 1,000 apps, which every pass writes.
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":")).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_status(gitops_dir: Path, status: Status) -> None:
    """Persist ``status`` atomically."""
    try:
        write_json_atomic(status_path(gitops_dir), status.to_json())
    except OSError as exc:
        raise StatusError(f"cannot write {str(status_path(gitops_dir))!r}: {exc.strerror}",
                          hint="check the permissions of the state directory") from exc
