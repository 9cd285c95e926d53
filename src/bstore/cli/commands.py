"""Which module defines each top-level ``bstore`` command, loaded only when used.

Importing every command group costs a third of a second (pygit2, httpx, the builders),
which every short command (``bstore store add``, ``store verify``) would pay; so the
top-level group imports a command's modules only when that command runs. The table is
checked against the modules by ``tests/cli/test_commands.py``, so it cannot drift.
"""

from __future__ import annotations

import importlib

import click

#: Top-level command → the ``bstore.cli`` modules to import for it. The first defines it
#: (in its ``COMMANDS`` list); later ones attach subcommands to it.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "store": ("store", "store_transfer"),
    "spec": ("spec",),
    "build": ("build",),
    "log": ("build",),
    "generations": ("generations",),
    "rollback": ("generations",),
    "diff": ("generations",),
    "key": ("cache",),
    "cache": ("cache",),
    "copy": ("cache",),
    "mesh": ("cache",),
    "node": ("node",),
    "demo": ("demo",),
    "daemon": ("daemon",),
    "activate": ("activate",),
    "reconcile": ("gitops",),
    "sync": ("gitops",),
    "plan": ("gitops",),
    "status": ("gitops",),
    "deploy": ("gitops",),
    "remove": ("gitops",),
    "upgrade": ("gitops",),
}


def load_command(name: str) -> click.Command | None:
    """Import the modules of command ``name`` and return it (None if unknown)."""
    found: click.Command | None = None
    for module_name in COMMAND_MODULES.get(name, ()):
        module = importlib.import_module(f"bstore.cli.{module_name}")
        for command in getattr(module, "COMMANDS", []):
            if command.name == name:
                found = command
    return found


class LazyGroup(click.Group):
    """A click group whose subcommands come from :data:`COMMAND_MODULES` on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load_command(cmd_name)
