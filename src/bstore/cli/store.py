"""``bstore store ...``: the content-addressed store by hand."""

from __future__ import annotations

import click


@click.group()
def store() -> None:
    """Add, inspect, verify, export and collect store paths."""


COMMANDS: list[click.Command] = [store]
