"""GitOps commands: ``reconcile`` (alias ``sync``), ``plan``, ``status``, and the manual
operations ``deploy``, ``remove``, ``upgrade``.

Every command reads the configuration (``--config``, ``$BSTORE_CONFIG``, else
``./bstore.toml`` when it exists; ``$BSTORE_<KEY>`` variables and the flags below
override keys). ``status`` reads the persisted status only (no fetch, no lock), so it
answers even while a pass runs.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bstore.cli.context import AppContext, pass_app
from bstore.errors import BstoreError
from bstore.gitops.config import Config, load_config

#: Config keys every gitops command can override with a flag (``--repo-url`` ...).
_OVERRIDES: tuple[tuple[str, str, str], ...] = (
    ("repo_url", "--repo-url", "Git URL of the specs repository."),
    ("branch", "--branch", "Branch to follow."),
    ("apps_dir", "--apps-dir", "Directory of the repository holding the app specs."),
    ("profile", "--profile", "Profile the apps run in."),
    ("activator", "--activator", "Activator (embedded, vm, dry-run, or a plugin)."),
    ("local_path", "--local-path", "Where the repository is kept (default: state dir)."),
)


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and the key-overriding flags; the command receives ``config``."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        path = kwargs.pop("config_file")
        overrides = {key: kwargs.pop(key) for key, _flag, _help in _OVERRIDES}
        kwargs["config"] = load_config(path, overrides=overrides,
                                       default_path=Path("bstore.toml"))
        return func(*args, **kwargs)

    for key, flag, text in reversed(_OVERRIDES):
        wrapper = click.option(flag, key, default=None, help=text)(wrapper)
    return click.option("--config", "config_file", type=click.Path(path_type=Path),
                        default=None, help="Config file (default: $BSTORE_CONFIG, else"
                        " ./bstore.toml).")(wrapper)


def _reconciler(app: AppContext, config: Config, *, quiet: bool = False) -> Any:
    from bstore.gitops.reconciler import Reconciler

    echo = None if quiet or app.json else click.echo
    return Reconciler(config, app.root, echo=echo,
                      log=app.log if app.verbose else lambda _m: None)


def _json_app(app: AppContext, as_json: bool) -> AppContext:
    from dataclasses import replace

    return replace(app, json=True) if as_json else app


_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Machine-readable JSON output.")
_wait_option = click.option("--wait/--no-wait", default=True, show_default=True,
                            help="Wait for a pass already running (the daemon's), or fail"
                            " at once with 'reconcile already running'.")


def _run_reconcile(app: AppContext, config: Config, as_json: bool, wait: bool) -> None:
    from bstore.events import default_bus

    app = _json_app(app, as_json)
    # Build progress on stderr (the realiser emits one event per derivation).
    handle = default_bus.attach("bstore.build", lambda e: app.log(
        f"  building {e.metadata.get('derivation')}" if e.name.endswith(".start") else
        f"  {e.metadata.get('derivation')}: {e.metadata.get('result')}"
        f" ({e.measurements.get('duration', 0) / 1000:.1f} s)")
        if e.metadata.get("derivation") else None)
    try:
        result = _reconciler(app, config).reconcile_once(trigger="cli", wait=wait)
    finally:
        default_bus.detach(handle)
    status = _reconciler(app, config, quiet=True).status()
    lines = []
    if result.skipped:
        lines.append(f"commit {(result.commit or '-')[:12]}: {result.skipped}")
    elif result.plan is not None:
        lines.append(result.plan.render())
    if result.built:
        lines.append("built: " + ", ".join(result.built))
    if result.substituted:
        lines.append("substituted: " + ", ".join(result.substituted))
    lines += [f"cache: {error}" for error in result.cache_errors]
    lines.append(status.render())
    app.emit({"result": result.to_json(), "status": status.to_json()}, "\n".join(lines))
    if result.state.value in ("error", "degraded"):
        sys.exit(1)


@click.command("reconcile")
@config_options
@_json_option
@_wait_option
@pass_app
def reconcile_cmd(app: AppContext, config: Config, as_json: bool, wait: bool) -> None:
    """Run one reconcile pass: sync, plan, build, activate, health-check."""
    _run_reconcile(app, config, as_json, wait)


@click.command("sync")
@config_options
@_json_option
@_wait_option
@pass_app
def sync_cmd(app: AppContext, config: Config, as_json: bool, wait: bool) -> None:
    """Alias of reconcile (the original's name)."""
    _run_reconcile(app, config, as_json, wait)


@click.command("plan")
@config_options
@_json_option
@click.option("--no-store-check", "no_store", is_flag=True,
              help="Do not fetch sources to tell what is already in the store.")
@pass_app
def plan_cmd(app: AppContext, config: Config, as_json: bool, no_store: bool) -> None:
    """Show what a reconcile pass would do, in order: builds, restarts, removals."""
    app = _json_app(app, as_json)
    plan = _reconciler(app, config, quiet=True).plan(check_store=not no_store)
    app.emit(plan.to_json(), plan.render())


@click.command("status")
@click.argument("name", required=False)
@config_options
@_json_option
@pass_app
def status_cmd(app: AppContext, config: Config, name: str | None, as_json: bool) -> None:
    """The reconciler's status (state, commit, apps), or one app's."""
    from bstore.gitops.status import render_app

    app = _json_app(app, as_json)
    rec = _reconciler(app, config, quiet=True)
    if name is not None:
        line = rec.app_status(name)
        app.emit(line.to_json(), render_app(line).lstrip())
        return
    status = rec.status()
    app.emit(status.to_json(), status.render())


def _manual_result(app: AppContext, what: str, result: Any) -> None:
    text = f"{what}: " + ("ok" if result.ok else f"FAILED: {result.error}")
    if result.ok and result.generation is not None:
        text += f" (generation {result.generation})"
    if not result.ok and result.rolled_back_to is not None:
        text += f"; rolled back to generation {result.rolled_back_to}"
    app.emit(result.to_json(), text + "\nthe next reconcile reverts this to the repository")
    if not result.ok:
        sys.exit(1)


@click.command("deploy")
@click.argument("spec_file", type=click.Path(path_type=Path, dir_okay=False))
@config_options
@_json_option
@pass_app
def deploy_cmd(app: AppContext, config: Config, spec_file: Path, as_json: bool) -> None:
    """Build and run the app of SPEC_FILE now, bypassing git."""
    from bstore.specs.loader import load_spec_file

    app = _json_app(app, as_json)
    loaded = load_spec_file(spec_file)
    if loaded.spec is None:
        for problem in loaded.problems:
            app.log(str(problem))
        raise BstoreError(f"spec file {str(spec_file)!r} is invalid",
                          hint="bstore spec check shows every problem")
    result = _reconciler(app, config).deploy(loaded.spec)
    _manual_result(app, f"deploy {loaded.spec.name} {loaded.spec.version}", result)


@click.command("remove")
@click.argument("name")
@config_options
@_json_option
@pass_app
def remove_cmd(app: AppContext, config: Config, name: str, as_json: bool) -> None:
    """Stop app NAME and drop it from the running generation."""
    app = _json_app(app, as_json)
    _manual_result(app, f"remove {name}", _reconciler(app, config).remove(name))


@click.command("upgrade")
@click.argument("name")
@click.argument("version")
@config_options
@_json_option
@pass_app
def upgrade_cmd(app: AppContext, config: Config, name: str, version: str,
                as_json: bool) -> None:
    """Build and run app NAME at VERSION (same source)."""
    app = _json_app(app, as_json)
    _manual_result(app, f"upgrade {name} to {version}",
                   _reconciler(app, config).upgrade(name, version))


COMMANDS: list[click.Command] = [reconcile_cmd, sync_cmd, plan_cmd, status_cmd, deploy_cmd,
                                 remove_cmd, upgrade_cmd]
