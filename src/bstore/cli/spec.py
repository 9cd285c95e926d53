"""``bstore spec ...``: check and show application specs."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
