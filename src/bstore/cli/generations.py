"""``bstore generations``, ``bstore rollback``, ``bstore diff``: a profile's generations.

Every command first finishes or reverts a switch an earlier bstore was killed in (the
activation journal); ``rollback`` activates the generation it switches to with the
configured activator (``--activator``, ``$BSTORE_ACTIVATOR``; ``dry-run`` by default
until the real activators are configured, which shows the plan and runs nothing;
``none`` switches the links only). When a GitOps configuration is in use (``--config``,
``$BSTORE_CONFIG``, or ``./bstore.toml``), ``rollback`` goes through the reconciler
(:meth:`bstore.gitops.reconciler.Reconciler.rollback`): under its lock, with the
configured activator and health checks, and ``status.json`` rewritten from what then runs.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click

from bstore.activators.base import ActivatorContext, activation_hook, load_activator
from bstore.activators.plan import plan, plan_to_json, render_plan
from bstore.cli.context import AppContext, pass_app
from bstore.errors import BstoreError
from bstore.generations.diff import diff_generations, render_diff
from bstore.generations.generation import load_generation
from bstore.generations.journal import Outcome, recover
from bstore.generations.listing import generation_rows
from bstore.generations.profiles import DEFAULT_PROFILE, Profile, parse_duration
from bstore.generations.switch import ActivationHook, delete_generations, rollback
from bstore.store.local import LocalStore

_profile_option = click.option(
    "--profile", "-p", default=DEFAULT_PROFILE, envvar="BSTORE_PROFILE", show_default=True,
    help="Profile name (profiles/<name> in the state dir).")
_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Machine-readable JSON output.")


def _app(app: AppContext, as_json: bool) -> AppContext:
    return replace(app, json=True) if as_json else app


def _recover(app: AppContext, prof: Profile) -> None:
    with prof.locked():
        result = recover(prof)
    if result.outcome is not Outcome.NONE:
        app.log(result.describe())


@click.group(invoke_without_command=True)
@_profile_option
@_json_option
@pass_app
@click.pass_context
def generations(ctx: click.Context, app: AppContext, profile: str, as_json: bool) -> None:
    """List the generations of a profile: number, date, commit, apps, current marker."""
    if ctx.invoked_subcommand is not None:
        return
    app = _app(app, as_json)
    with LocalStore.open(app.root, create=False) as store:
        prof = Profile(store, profile)
        _recover(app, prof)
        current = prof.current_number()
        rows = generation_rows(store, prof)
    lines = [f"profile {profile}: {len(rows)} generation(s)"]
    for r in rows:
        apps = ", ".join(f"{a['name']}-{a['version']}" for a in r["apps"])
        what = f"DAMAGED: {r['error']}" if r["error"] else (apps or "(no apps)")
        commit = (r["commit"] or "-")[:12]
        mark = "*" if r["current"] else " "
        lines.append(f"{mark} {r['number']:>4}  {r['date']}  {commit:<12}  {what}"
                     + ("  (current)" if r["current"] else ""))
    app.emit({"profile": profile, "current": current, "generations": rows},
             "\n".join(lines))


@generations.command("delete")
@click.option("--keep", type=int, help="Keep the N newest generations (and the current).")
@click.option("--older-than", "older_than", metavar="D",
              help="Delete generations linked more than D ago (30d, 12h, 1w2d).")
@_profile_option
@_json_option
@pass_app
def delete(app: AppContext, keep: int | None, older_than: str | None, profile: str,
           as_json: bool) -> None:
    """Delete old generations (never the current one); bstore store gc frees their paths."""
    app = _app(app, as_json)
    if (keep is None) == (older_than is None):
        raise BstoreError("give exactly one of --keep N or --older-than D",
                          hint="e.g. bstore generations delete --keep 5")
    age = parse_duration(older_than) if older_than is not None else None
    with LocalStore.open(app.root, create=False) as store:
        prof = Profile(store, profile)
        deleted = delete_generations(prof, keep=keep, older_than=age)
    shown = ", ".join(map(str, deleted)) or "none"
    app.emit({"profile": profile, "deleted": deleted},
             f"deleted generation(s) of profile {profile}: {shown}"
             + ("\nrun bstore store gc to free their store paths" if deleted else ""))


def _hook(app: AppContext, store: LocalStore, profile: str, name: str
          ) -> ActivationHook | None:
    if name == "none":
        return None
    echo = app.log if app.json else click.echo
    activator = load_activator(name, ActivatorContext(app.root, profile, echo=echo))
    return activation_hook(store, activator, echo)


class RollbackFailed(BstoreError):
    """A rollback through the reconciler whose activation failed (it was switched back)."""


def _explicit(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _rollback_gitops(ctx: click.Context, app: AppContext, config_file: Path, to: int | None,
                     activator: str, profile: str) -> None:
    """``bstore rollback`` with a GitOps config: through :meth:`Reconciler.rollback`."""
    from bstore.gitops.config import load_config
    from bstore.gitops.reconciler import Reconciler

    overrides = {"profile": profile if _explicit(ctx, "profile") else None,
                 "activator": activator if _explicit(ctx, "activator") else None}
    config = load_config(config_file, overrides=overrides)
    echo = app.log if app.json else click.echo
    result = Reconciler(config, app.root, echo=echo).rollback(to)
    if not result.ok:
        raise RollbackFailed(
            f"rollback of profile {config.profile} to generation {result.attempted} failed:"
            f" {result.error}; it stays at generation {result.generation}",
            hint="bstore status shows each app; bstore node logs the node's log")
    app.emit({"profile": config.profile, "from": result.previous, "to": result.generation,
              "switched": result.previous != result.generation, "via": "reconciler",
              "config": str(config_file), "activation": result.to_json()},
             f"profile {config.profile}: generation {result.previous} -> {result.generation}"
             " (status updated; the next reconcile re-applies the repository tip: suspend"
             " the daemon's loop to stay here)")


@click.command("rollback")
@click.option("--to", "to", type=int, metavar="N",
              help="Generation to switch to (default: the one before the current).")
@click.option("--activator", default="dry-run", envvar="BSTORE_ACTIVATOR", show_default=True,
              help="Activator that makes the running apps match ('none': links only).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="GitOps config (default: $BSTORE_CONFIG, else ./bstore.toml if it exists):"
              " roll back through the reconciler so its status stays right.")
@_profile_option
@_json_option
@pass_app
@click.pass_context
def rollback_cmd(ctx: click.Context, app: AppContext, to: int | None, activator: str,
                 config_file: Path | None, profile: str, as_json: bool) -> None:
    """Switch the profile back to an earlier generation and activate it."""
    from bstore.gitops.config import config_path

    app = _app(app, as_json)
    gitops = config_path(config_file, os.environ, Path("bstore.toml"))
    if gitops is not None:
        _rollback_gitops(ctx, app, gitops, to, activator, profile)
        return
    with LocalStore.open(app.root, create=False) as store:
        prof = Profile(store, profile)
        hook = _hook(app, store, profile, activator)
        result = rollback(prof, to, hook=hook)
    old = result.previous.number if result.previous else None
    new = result.current.number
    if result.recovered.outcome is not Outcome.NONE:
        app.log(result.recovered.describe())
    text = (f"profile {profile} is already at generation {new}" if result.reused
            else f"profile {profile}: generation {old} -> {new}")
    app.emit({"profile": profile, "from": old, "to": new, "switched": not result.reused},
             text)


@click.command("diff")
@click.argument("numbers", nargs=-1, type=int)
@_profile_option
@_json_option
@pass_app
def diff_cmd(app: AppContext, numbers: tuple[int, ...], profile: str, as_json: bool) -> None:
    """What changed between generations: N and M, N and the current one, or (no
    arguments) the one before the current and the current one."""
    app = _app(app, as_json)
    if len(numbers) > 2:
        raise BstoreError(f"diff takes at most two generation numbers, got {len(numbers)}",
                          hint="bstore diff [N [M]]")
    with LocalStore.open(app.root, create=False) as store:
        prof = Profile(store, profile)
        _recover(app, prof)
        current = prof.current_number()
        if current is None and len(numbers) < 2:
            raise BstoreError(f"profile {profile!r} has no current generation",
                              hint="name two generations: bstore diff N M")
        a: int | None
        b: int | None
        if len(numbers) == 2:
            a, b = numbers
        elif len(numbers) == 1:
            a, b = numbers[0], current
        else:
            assert current is not None
            a, b = prof.previous_number(current), current
            if a is None:
                raise BstoreError(f"generation {current} is the oldest of profile"
                                  f" {profile!r}; nothing to compare it with",
                                  hint="name two generations: bstore diff N M")
        assert a is not None and b is not None
        old = load_generation(store, prof.get(a).store_path)
        new = load_generation(store, prof.get(b).store_path)
    diffs = diff_generations(old, new)
    actions = plan(old, new)
    app.emit({"profile": profile, "from": a, "to": b,
              "apps": [d.to_json() for d in diffs], "plan": plan_to_json(actions)},
             render_diff(diffs, str(a), str(b)) + "\n"
             + render_plan(actions, f"activation plan {a} -> {b}"))


COMMANDS: list[click.Command] = [generations, rollback_cmd, diff_cmd]
