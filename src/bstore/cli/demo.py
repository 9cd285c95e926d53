"""``bstore demo``: the main job on the built-in default, for newcomers."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
