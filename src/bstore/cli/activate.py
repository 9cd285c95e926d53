"""``bstore activate``: build an apps directory, make it a generation, switch, activate.

``bstore activate --generation N`` activates an existing generation instead. Either
way an interrupted earlier switch is finished or reverted first (the activation
journal), and an activation whose apps fail or are not healthy in time switches back
to the previous generation and re-activates it.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from bstore.activation import ActivationResult, Pipeline, realise_builder
from bstore.activators.base import ActivatorContext, load_activator
from bstore.cli.context import AppContext, pass_app
from bstore.errors import BstoreError
from bstore.generations.profiles import DEFAULT_PROFILE
from bstore.specs.directory import check_paths
from bstore.specs.problems import Severity
from bstore.store.local import LocalStore


def _describe(result: ActivationResult) -> str:
    lines = []
    if result.recovered:
        lines.append(result.recovered)
    old = result.previous if result.previous is not None else "none"
    if result.ok and result.reused:
        lines.append(f"profile {result.profile}: generation {result.generation} is already"
                     " current (nothing changed)")
    elif result.ok:
        lines.append(f"profile {result.profile}: generation {old} -> {result.generation}"
                     " (activated)")
    else:
        back = result.rolled_back_to if result.rolled_back_to is not None else "none"
        lines.append(f"profile {result.profile}: generation {result.attempted} FAILED;"
                     f" rolled back to {back}")
        lines += [f"  {app}: {why}" for app, why in sorted(result.failed.items())]
    for name, check in sorted(result.health.items()):
        lines.append(f"  health {name}: {'healthy' if check.healthy else 'UNHEALTHY'}"
                     + (f" ({check.detail})" if check.detail else ""))
    return "\n".join(lines)


@click.command("activate")
@click.argument("apps_dir", required=False, type=click.Path(path_type=Path))
@click.option("--profile", "-p", default=DEFAULT_PROFILE, envvar="BSTORE_PROFILE",
              show_default=True, help="Profile name (profiles/<name> in the state dir).")
@click.option("--activator", default="embedded", envvar="BSTORE_ACTIVATOR",
              show_default=True,
              help="Activator that makes the running apps match ('dry-run' shows the plan"
              " only; 'none' switches links only).")
@click.option("-o", "--activator-option", "options", multiple=True, metavar="KEY=VALUE",
              help="An option for the activator (e.g. distribution=off). Repeatable.")
@click.option("--generation", "number", type=int, metavar="N",
              help="Activate the existing generation N instead of building.")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=None,
              help="Derivations built at the same time (default: one per core).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@pass_app
def activate_cmd(app: AppContext, apps_dir: Path | None, profile: str, activator: str,
                 options: tuple[str, ...], number: int | None, jobs: int | None,
                 as_json: bool) -> None:
    """Build APPS_DIR (default ./apps), make it a generation and activate it."""
    as_json = as_json or app.json
    if as_json:
        app = replace(app, json=True)
    if number is not None and apps_dir is not None:
        raise BstoreError("give an apps directory or --generation N, not both",
                          hint="bstore activate apps/  or  bstore activate --generation 3")
    echo = app.log if as_json else click.echo
    opts = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BstoreError(f"activator option {item!r} is not KEY=VALUE",
                              hint="e.g. -o distribution=off")
        opts[key] = value
    with LocalStore.open(app.root) as store:
        act = None if activator == "none" else load_activator(
            activator, ActivatorContext(app.root, profile, opts, echo=echo))
        pipeline = Pipeline(store, profile, act, echo=echo)
        recovered = pipeline.recover()
        if recovered.journal is not None:
            app.log(recovered.describe())
        if number is not None:
            result = pipeline.activate_generation(number)
        else:
            directory = apps_dir or (Path("apps") if Path("apps").is_dir() else Path("."))
            specs = check_paths([directory])
            errors = [p for p in specs.problems if p.severity is Severity.ERROR]
            for problem in errors:
                app.log(str(problem))
            if specs.failed:
                raise BstoreError(
                    f"{len(specs.failed)} app spec(s) in {str(directory)!r} are invalid:"
                    f" {', '.join(sorted(specs.failed))}",
                    hint="fix them (bstore spec check) and run bstore activate again;"
                    " nothing was switched")
            outcome = pipeline.build(list(specs.specs.values()),
                                     realise_builder(store, jobs=jobs, log=app.log))
            if outcome.errors:
                for name, why in sorted(outcome.errors.items()):
                    app.log(f"{name}: {why}")
                raise BstoreError(
                    f"{len(outcome.errors)} app(s) failed to build:"
                    f" {', '.join(sorted(outcome.errors))}",
                    hint="bstore log APP shows a build log; nothing was switched")
            result = pipeline.activate(outcome.builds.values())
    if as_json:
        app.emit(result.to_json())
    else:
        click.echo(_describe(result))
    if not result.ok:
        sys.exit(1)


COMMANDS: list[click.Command] = [activate_cmd]
