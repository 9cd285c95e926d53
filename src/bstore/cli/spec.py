"""``bstore spec ...``: check and show application specs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bstore.cli.context import AppContext, pass_app
from bstore.specs.directory import check_paths, display
from bstore.specs.formats import SPEC_FILE_NAMES
from bstore.specs.loader import load_spec_file
from bstore.specs.problems import Problem, Severity


def _human(problem: Problem) -> str:
    text = str(problem)
    return f"{text}\n  hint: {problem.hint}" if problem.hint else text


def _default_paths() -> list[Path]:
    return [Path("apps")] if Path("apps").is_dir() else [Path(".")]


@click.group("spec")
def spec() -> None:
    """Check and show application specs (Erlang terms, YAML or JSON)."""


@spec.command("check")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@pass_app
def check(app: AppContext, paths: tuple[Path, ...], as_json: bool) -> None:
    """Check app specs: every error, warning and note with its file:line:column.

    PATHS are apps directories, app directories or spec files (default: ./apps if it
    exists, else .). Exits 1 if there is any error.
    """
    result = check_paths(list(paths) or _default_paths())
    errors = result.errors
    warnings = [p for p in result.problems if p.severity is Severity.WARNING]
    if as_json or app.json:
        click.echo(
            json.dumps(
                {
                    "ok": not errors,
                    "valid_apps": sorted(result.specs),
                    "failed_apps": sorted(result.failed),
                    "problems": [p.to_dict() for p in result.problems],
                },
                indent=2,
            )
        )
    else:
        for problem in result.problems:
            click.echo(_human(problem))
        click.echo(
            f"{len(result.specs)} valid app(s), {len(errors)} error(s), {len(warnings)} warning(s)"
        )
    if errors:
        raise click.exceptions.Exit(1)


@spec.command("show")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
@pass_app
def show(app: AppContext, file: Path, as_json: bool) -> None:
    """Print the normalised spec in FILE, with defaults filled in.

    As Erlang terms by default; with --json in the JSON form builders read (Erlang
    terms in env are written in the tagged form, see docs/specs.md).
    """
    expected = file.parent.name if file.name in SPEC_FILE_NAMES else None
    result = load_spec_file(file, source=display(file), expected_name=expected)
    for problem in result.problems:
        click.echo(_human(problem), err=True)
    if result.spec is None:
        raise click.exceptions.Exit(1)
    if as_json or app.json:
        click.echo(json.dumps(result.spec.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(result.spec.to_erlang())


COMMANDS: list[click.Command] = [spec]
