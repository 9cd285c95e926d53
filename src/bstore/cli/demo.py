"""``bstore demo``: the main job on a built-in example, for newcomers.

It creates a work dir (a new temporary directory, or ``--workdir``) with example apps in
local git repositories, a GitOps repository and a ``bstore.toml``, then reconciles for
real: deploy, upgrade, a broken release rolled back and quarantined (see
:mod:`bstore.demo.run`). Its state root is inside the work dir, never the user's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from bstore.cli.context import AppContext, pass_app


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where to put the demo: a new or empty directory (default: a new"
              " temporary directory).")
@click.option("--keep-running", is_flag=True,
              help="Leave the host node and the worker VM running at the end.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a machine-readable summary on stdout (the story goes to stderr).")
@pass_app
def demo(app: AppContext, workdir: Path | None, keep_running: bool, as_json: bool) -> None:
    """Run bstore's main job end to end on a built-in example (takes well under a minute)."""
    from bstore.demo.run import run_demo

    as_json = as_json or app.json
    base = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="bstore-demo-"))
    if as_json:
        say = app.log
        styled = False
    else:
        say = click.echo
        styled = sys.stdout.isatty()
    say(f"bstore demo: GitOps for BEAM apps, end to end (work dir {base})")
    summary = run_demo(base, say, styled=styled, keep_running=keep_running)
    if as_json:
        import json

        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))


COMMANDS: list[click.Command] = [demo]
