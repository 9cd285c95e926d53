"""The command groups the top-level ``bstore`` command offers, one module each."""

from __future__ import annotations

import importlib

import click

#: Modules under ``bstore.cli`` that each define ``COMMANDS: list[click.Command]``.
#: A module may also attach subcommands to a group another module defines.
_MODULES = ["store", "store_transfer", "spec", "demo", "build", "generations", "cache", "node"]


def _load() -> list[click.Command]:
    commands: list[click.Command] = []
    for name in _MODULES:
        module = importlib.import_module(f"bstore.cli.{name}")
        commands.extend(getattr(module, "COMMANDS", []))
    return commands


GROUPS: list[click.Command] = _load()
