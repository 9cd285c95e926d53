"""``bstore daemon``: follow the git repository in the foreground, with the HTTP API.

Runs :class:`bstore.gitops.daemon.Daemon` until SIGTERM or Ctrl-C (exit 0; the apps keep
running). Log lines go to stderr, one per thing that happened (a pass, a deploy, a
failed health check, a supervisor restart); ``--once`` runs a single pass without the
loop or the API and exits 0 if it succeeded, 1 if not.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

import click

from bstore.cli.context import AppContext, pass_app
from bstore.events import Event, EventBus

#: Events worth a log line in the foreground, and how to say them.
_QUIET_PREFIXES = ("bstore.reconcile.start", "bstore.deps.", "bstore.build.start",
                   "bstore.git.clone_start", "bstore.mesh.", "bstore.code.")


def describe_event(event: Event, verbose: bool = False) -> str | None:
    """A one-line human form of ``event`` (``None``: not worth a line).

    Unless ``verbose``, a pass that found nothing new says nothing: a daemon that checks
    every minute for months should log what changed, not that nothing did."""
    name = event.name
    if not name.startswith("bstore."):
        return None
    if not verbose:
        if name.startswith(_QUIET_PREFIXES):
            return None
        meta = event.metadata
        if name == "bstore.git.pull" and meta.get("changed") is False:
            return None
        if name == "bstore.reconcile.stop" and meta.get("changed") is False \
                and meta.get("status") in ("synced", "ok"):
            return None
    if name.endswith((".start", "_start")) and name != "bstore.daemon.start":
        return None
    if name == "bstore.health.check" and event.metadata.get("result") in ("ok", "healthy"):
        return None
    parts = []
    for key in ("app", "result", "status", "state", "commit", "from_version", "to_version",
                "from_generation", "to_generation", "reason", "error", "node", "api"):
        value = event.metadata.get(key)
        if value is not None and value != "":
            text = str(value)
            parts.append(f"{key}={text[:12] if key == 'commit' else text}")
    duration = event.measurements.get("duration")
    if duration is not None:
        parts.append(f"{duration:.0f}ms")
    clock = datetime.fromtimestamp(event.time).strftime("%H:%M:%S")
    return f"{clock} {name.removeprefix('bstore.')} {' '.join(parts)}".rstrip()


def _address(text: str | None) -> str | None:
    if text is None:
        return None
    from bstore.gitops.config_values import split_address

    try:
        split_address(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--api-address") from exc
    return text


@click.command("daemon")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="bstore.toml (default: $BSTORE_CONFIG).")
@click.option("--once", is_flag=True, help="Run one reconcile pass and exit (no loop, no API).")
@click.option("--api-address", default=None, metavar="HOST:PORT",
              help="Where the HTTP API listens (config api_address; port 0: a free one).")
@click.option("--no-api", is_flag=True, help="Run the loop without the HTTP API.")
@click.option("--interval", default=None, metavar="DURATION",
              help="Reconcile interval, e.g. 60s or 500ms (config reconcile_interval).")
@click.option("--profile", "-p", default=None, help="Profile (config profile).")
@click.option("--activator", default=None, help="Activator (config activator).")
@click.option("--repo-url", default=None, help="The specs repository (config repo_url).")
@click.option("--webhook-secret-env", default="BSTORE_WEBHOOK_SECRET", show_default=True,
              metavar="VAR", help="Environment variable holding the /hooks/git HMAC secret"
              " (unset: webhooks need the bearer token).")
@pass_app
def daemon(app: AppContext, config_file: Path | None, once: bool, api_address: str | None,
           no_api: bool, interval: str | None, profile: str | None, activator: str | None,
           repo_url: str | None, webhook_secret_env: str) -> None:
    """Follow the git repository: reconcile at the interval, supervise VMs, serve the API."""
    from bstore.gitops.config import load_config
    from bstore.gitops.daemon import Daemon

    config = load_config(config_file, overrides={
        "api_address": _address(api_address), "reconcile_interval": interval,
        "profile": profile, "activator": activator, "repo_url": repo_url})
    bus = EventBus()
    verbose = app.verbose > 0
    last: dict[str, str] = {}

    def show(event: Event) -> None:
        line = describe_event(event, verbose=verbose)
        if line is None:
            return
        # A pass that keeps failing the same way (a quarantined tip, an unreachable repo)
        # says so once, not every interval.
        if event.name.startswith("bstore.reconcile.") and not verbose:
            body = re.sub(r" \d+ms$", "", line.split(" ", 1)[1])
            if last.get("reconcile") == body:
                return
            last["reconcile"] = body
        app.log(line)

    def say(line: str) -> None:
        if line.startswith("reconcile pass") and not verbose:
            if last.get("pass") == line:
                return
            last["pass"] = line
        app.log(line)

    bus.attach("*", show)
    secret = os.environ.get(webhook_secret_env) or None
    runner = Daemon(config, app.root, events=bus, api=not (once or no_api),
                    webhook_secret=secret, log=say)
    if once:
        record = runner.run_once().to_dict()
        app.emit(record, f"pass {'ok' if record['ok'] else 'FAILED'}"
                 + (f": {record['error']}" if record["error"] else ""))
        if not record["ok"]:
            raise SystemExit(1)
        return

    def announce() -> None:
        api = runner.api_url
        token = ("the configured token" if config.api_token or config.api_token_env
                 else f"token in {runner.token_file}")
        app.log(f"bstore daemon: profile {config.profile}, every {config.reconcile_interval:g}"
                f" s, " + (f"API {api} (POST needs {token})" if api else "no API")
                + (" — loop SUSPENDED (POST /resume)" if runner.suspended else ""))

    runner.run_forever(on_start=announce)


COMMANDS: list[click.Command] = [daemon]
