"""The ``bstore`` command: global options, command groups, and the error edge."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from bstore import __version__
from bstore.cli.commands import LazyGroup
from bstore.cli.context import AppContext, default_root
from bstore.errors import BstoreError


class _Group(LazyGroup):
    """Top-level group that turns :class:`BstoreError` into a message and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BstoreError as exc:
            as_json = isinstance(ctx.obj, AppContext) and ctx.obj.json
            if as_json:
                click.echo(json.dumps(exc.to_dict()), err=True)
            else:
                click.echo(f"error: {exc.message}", err=True)
                if exc.hint:
                    click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    envvar="BSTORE_ROOT",
    help="State dir (store, database, profiles). Default: ~/.local/share/bstore,"
    " /var/lib/bstore as root.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.version_option(__version__, prog_name="bstore")
@click.pass_context
def cli(ctx: click.Context, root: Path | None, as_json: bool, verbose: int) -> None:
    """bstore: GitOps for BEAM applications on a content-addressed store."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # HTTP clients log one line per request at INFO: that is -vv detail, not -v.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING if verbose < 2
                                              else logging.DEBUG))
    ctx.obj = AppContext(root=(root or default_root()).absolute(), json=as_json, verbose=verbose)


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(standalone_mode=True))
