"""bstore: GitOps for BEAM applications on a Nix-style content-addressed store.

The Python API (:mod:`bstore.api`) is re-exported here lazily, so ``import bstore``
stays light: ``bstore.status()``, ``bstore.reconcile()``, ``bstore.deploy(spec)`` ...
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: Names of :mod:`bstore.api` available as ``bstore.<name>``.
_API = frozenset({
    "configure", "deploy", "get_app_status", "get_current_state", "get_desired_state",
    "reconcile", "remove", "start_reconciler", "status", "stop_reconciler", "sync",
    "upgrade",
})


def __getattr__(name: str) -> Any:
    # Imported on first use: the API pulls in pygit2, the builders and the activators.
    if name in _API:
        from bstore import api

        return getattr(api, name)
    raise AttributeError(f"module 'bstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
