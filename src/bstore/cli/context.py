"""What every command gets: the state root, output mode and verbosity."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click


def default_root() -> Path:
    """The state dir when neither ``--root`` nor ``$BSTORE_ROOT`` is given.

    ``/var/lib/bstore`` for root (a system service), else the XDG data dir of the user.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/bstore")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "bstore"


@dataclass(frozen=True)
class AppContext:
    """Global options, resolved once in the top-level group."""

    root: Path
    json: bool
    verbose: int

    def emit(self, data: Any, human: str | None = None) -> None:
        """Print ``data`` as JSON under ``--json``, else the human text (if any)."""
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif human is not None:
            click.echo(human)

    def log(self, message: str) -> None:
        """A progress/log line on stderr (kept off stdout so scripts can parse it)."""
        click.echo(message, err=True)

    @property
    def interactive(self) -> bool:
        """Whether stderr is a terminal (live progress) or not (plain log lines)."""
        return sys.stderr.isatty() and not self.json


pass_app = click.make_pass_decorator(AppContext)


def env_list(name: str) -> list[str]:
    """A whitespace- or comma-separated list from environment variable ``name``."""
    return [item for item in re.split(r"[\s,]+", os.environ.get(name, "")) if item]
