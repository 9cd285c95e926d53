"""The lazily loaded command table matches what the command modules define."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import click
from click.testing import CliRunner

import bstore.cli
from bstore.cli.commands import COMMAND_MODULES
from bstore.cli.main import cli


def _defined() -> dict[str, set[str]]:
    """Every module of bstore.cli that defines commands → their names."""
    found: dict[str, set[str]] = {}
    for info in pkgutil.iter_modules(bstore.cli.__path__):
        module = importlib.import_module(f"bstore.cli.{info.name}")
        names = {c.name for c in getattr(module, "COMMANDS", []) if c.name}
        if names:
            found[info.name] = names
    return found


def test_table_lists_exactly_the_defined_commands() -> None:
    defined = _defined()
    every = set().union(*defined.values())
    assert set(COMMAND_MODULES) == every
    for name, modules in COMMAND_MODULES.items():
        assert name in defined.get(modules[0], set()), f"{name} is not defined in {modules[0]}"


def test_subcommands_attached_by_other_modules_are_in_the_table() -> None:
    # Import everything, then check each group's subcommands are all reachable lazily.
    for info in pkgutil.iter_modules(bstore.cli.__path__):
        importlib.import_module(f"bstore.cli.{info.name}")
    code = (
        "from bstore.cli.commands import load_command\n"
        "import click, sys\n"
        "c = load_command(sys.argv[1])\n"
        "print(' '.join(sorted(c.commands)) if isinstance(c, click.Group) else '')\n"
    )
    for name in COMMAND_MODULES:
        eager = cli.get_command(click.Context(cli), name)
        assert eager is not None
        if isinstance(eager, click.Group):
            fresh = subprocess.run([sys.executable, "-c", code, name], check=True,
                                   capture_output=True, text=True).stdout.split()
            assert fresh == sorted(eager.commands), name


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMAND_MODULES:
        assert f"  {name} " in result.output


def test_a_short_command_does_not_import_the_builders() -> None:
    code = (
        "import sys\n"
        "from bstore.cli.main import cli\n"
        "try:\n    cli.main(['store', '--help'], standalone_mode=False)\n"
        "except SystemExit:\n    pass\n"
        "print('bstore.builders.realise' in sys.modules, 'pygit2' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[-2:] == ["False", "False"]
