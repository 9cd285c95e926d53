"""The Python API, mirroring the original's module functions::

    import bstore
    bstore.configure(config, root)          # optional: else bstore.toml / $BSTORE_* / root
    bstore.reconcile()                      # -> ReconcileResult (alias: sync_and_apply)
    bstore.sync()                           # -> SyncResult (fetch + policy, no apply)
    bstore.status()                         # -> Status
    bstore.get_app_status("web")            # -> AppStatus
    bstore.get_desired_state()              # -> {name: AppSpec} of the repo tip
    bstore.get_current_state()              # -> {name: RunningState} from the activator
    bstore.deploy(spec)                     # AppSpec or a spec file path -> ActivationResult
    bstore.remove("web"); bstore.upgrade("web", "1.2.0")
    bstore.start_reconciler(config); bstore.stop_reconciler()

Every function works on one process-wide :class:`~bstore.gitops.reconciler.Reconciler`,
made on first use from :func:`configure` (or the configuration files and environment,
and the default state root). :func:`start_reconciler` runs the daemon
(:class:`bstore.gitops.daemon.Daemon`) in this process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bstore.errors import BstoreError

if TYPE_CHECKING:
    from bstore.activation import ActivationResult
    from bstore.activators.base import Activator
    from bstore.activators.plan import RunningState
    from bstore.gitops.config import Config
    from bstore.gitops.reconciler import Reconciler, ReconcileResult
    from bstore.gitops.repo_sync import SyncResult
    from bstore.gitops.status import AppStatus, Status
    from bstore.specs.model import AppSpec

__all__ = [
    "configure",
    "deploy",
    "get_app_status",
    "get_current_state",
    "get_desired_state",
    "reconcile",
    "reconciler",
    "remove",
    "start_reconciler",
    "status",
    "stop_reconciler",
    "sync",
    "upgrade",
]

_lock = threading.Lock()
_reconciler: Reconciler | None = None
_daemon: Any = None


class ApiError(BstoreError):
    """A Python API call that cannot be made (not configured, daemon state)."""


def configure(config: Config | str | Path | None = None, root: str | Path | None = None, *,
              activator: Activator | None = None) -> Reconciler:
    """Set (and return) the reconciler every function uses. ``config`` is a
    :class:`Config` or a config file path (default: ``$BSTORE_CONFIG`` /
    ``./bstore.toml`` and ``$BSTORE_*``); ``root`` the state dir (default: ``$BSTORE_ROOT``
    or the user's data dir)."""
    import os

    from bstore.cli.context import default_root
    from bstore.gitops.config import Config, load_config
    from bstore.gitops.reconciler import Reconciler

    global _reconciler
    if not isinstance(config, Config):
        config = load_config(config, default_path=Path("bstore.toml"))
    state = Path(root) if root is not None else Path(
        os.environ.get("BSTORE_ROOT") or default_root())
    with _lock:
        _reconciler = Reconciler(config, state.absolute(), activator=activator)
        return _reconciler


def reconciler() -> Reconciler:
    """The configured reconciler (configured from files and environment on first use)."""
    with _lock:
        current = _reconciler
    return current if current is not None else configure()


def reconcile() -> ReconcileResult:
    """Run one reconcile pass now (waits for a running one)."""
    return reconciler().reconcile_once(trigger="api")


def sync() -> SyncResult:
    """Fetch the repo and check its tip against the policy, without applying it."""
    return reconciler().sync()


def status() -> Status:
    """The reconciler's persisted status."""
    return reconciler().status()


def get_app_status(name: str) -> AppStatus:
    """One app's status (:class:`~bstore.gitops.reconciler.ReconcileError` if unknown)."""
    return reconciler().app_status(name)


def get_desired_state() -> dict[str, AppSpec]:
    """The valid app specs of the repo tip, by name."""
    return reconciler().get_desired_state()


def get_current_state() -> dict[str, RunningState]:
    """What the activator sees running, by app name."""
    return reconciler().get_current_state()


def _spec(spec: AppSpec | str | Path) -> AppSpec:
    from bstore.specs.loader import load_spec_file
    from bstore.specs.model import AppSpec

    if isinstance(spec, AppSpec):
        return spec
    loaded = load_spec_file(Path(spec))
    if loaded.spec is None:
        shown = "; ".join(str(p) for p in loaded.problems) or "no spec"
        raise ApiError(f"spec file {str(spec)!r} is invalid: {shown}",
                       hint="bstore spec check shows every problem")
    return loaded.spec


def deploy(spec: AppSpec | str | Path) -> ActivationResult:
    """Build and run ``spec`` (an AppSpec or a spec file) now, bypassing git; the next
    reconcile reverts it."""
    return reconciler().deploy(_spec(spec))


def remove(name: str) -> ActivationResult:
    """Stop app ``name`` and drop it from the running generation."""
    return reconciler().remove(name)


def upgrade(name: str, version: str) -> ActivationResult:
    """Build and run app ``name`` at ``version``."""
    return reconciler().upgrade(name, version)


def start_reconciler(config: Config | str | Path | None = None,
                     root: str | Path | None = None, **daemon_options: Any) -> Any:
    """Run the reconcile loop (the daemon: timer, supervision, HTTP API unless
    ``api=False``) in background threads of this process; returns the daemon."""
    from bstore.gitops.daemon import Daemon

    global _daemon
    rec = configure(config, root) if config is not None or root is not None else reconciler()
    with _lock:
        if _daemon is not None:
            raise ApiError("the reconciler is already running in this process",
                           hint="call bstore.stop_reconciler() first")
        daemon = Daemon(rec.config, rec.root, reconciler=rec, events=rec.events,
                        **daemon_options)
        daemon.start()
        _daemon = daemon
        return daemon


def stop_reconciler() -> bool:
    """Stop the loop started by :func:`start_reconciler` (apps keep running); ``False``
    when none was running."""
    global _daemon
    with _lock:
        daemon, _daemon = _daemon, None
    if daemon is None:
        return False
    daemon.stop()
    return True
