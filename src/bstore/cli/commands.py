"""The list of command groups the top-level ``bstore`` command offers."""

from __future__ import annotations

import click

GROUPS: list[click.Command] = []
