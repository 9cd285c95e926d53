"""``bstore store export|import|verify``: moving and checking store contents."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
