"""``bstore build`` (realise app specs into the store) and ``bstore log`` (kept build logs)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import click
import httpx

from bstore.builders.hex.repos import HexRepo, Repos
from bstore.builders.realise import AppState, BuildReport, Progress, Realiser, log_for
from bstore.builders.sources import Fetcher
from bstore.cli.context import AppContext, env_list, pass_app
from bstore.errors import BstoreError
from bstore.specs.directory import check_paths
from bstore.specs.problems import Severity
from bstore.store.cache.binary_cache import Substituters
from bstore.store.local import LocalStore
from bstore.store.signing import TrustedKeys


class LiveProgress:
    """Progress on stderr: on a terminal one redrawn line per running job plus the
    overall count (plain ANSI: cursor up, clear line); otherwise one line per event."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self.total = 0
        self.done = 0
        self.running: dict[str, float] = {}
        self.drawn = 0
        self.lock = threading.Lock()

    def _line(self, text: str) -> None:
        sys.stderr.write(text + "\n")

    def _redraw(self) -> None:
        out = sys.stderr
        if self.drawn:
            out.write(f"\x1b[{self.drawn}F\x1b[J")  # up to our first line, clear below
        now = time.monotonic()
        lines = [f"  building {label} ({now - t:.0f} s)" for label, t in self.running.items()]
        lines.append(f"[{self.done}/{self.total}] derivations done")
        out.write("\n".join(lines) + "\n")
        out.flush()
        self.drawn = len(lines)

    def on_plan(self, total: int) -> None:
        """The number of derivations to realise is known."""
        with self.lock:
            self.total = total
            if not self.live:
                self._line(f"realising {total} derivation(s)")

    def on_start(self, label: str) -> None:
        """A job started."""
        with self.lock:
            self.running[label] = time.monotonic()
            if self.live:
                self._redraw()

    def on_finish(self, label: str, state: str) -> None:
        """A job ended (``done``, ``failed``...)."""
        with self.lock:
            started = self.running.pop(label, None)
            self.done += 1
            took = f" in {time.monotonic() - started:.1f} s" if started is not None else ""
            if self.live:
                if self.drawn:
                    sys.stderr.write(f"\x1b[{self.drawn}F\x1b[J")
                    self.drawn = 0
                if state != "already valid":  # no-op runs stay one redrawn line
                    self._line(f"{label}: {'built' if state == 'done' else state}{took}")
                self._redraw()
            else:
                self._line(f"[{self.done}/{self.total}] {label}: {state}{took}")

    def hooks(self) -> Progress:
        """The realiser's callbacks."""
        return Progress(on_plan=self.on_plan, on_start=self.on_start, on_finish=self.on_finish)


def _hex_repos(options: tuple[tuple[str, str, Path], ...]) -> Repos:
    repos = []
    for name, url, key_file in options:
        try:
            pem = key_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise BstoreError(f"cannot read the public key of hex repository {name!r}"
                              f" from {str(key_file)!r}: {exc}") from exc
        repos.append(HexRepo(name, url, pem))
    return Repos(repos)


def _human(report: BuildReport) -> str:
    lines = []
    for name, result in sorted(report.apps.items()):
        if result.output is not None:
            lines.append(f"{name} {result.output}")
        else:
            lines.append(f"{name} {result.state.value}: {result.error}")
            if result.hint:
                lines.append(f"  hint: {result.hint}")
    lines.append(f"{len(report.built)} built, {len(report.skipped)} already valid,"
                 f" {len(report.failed)} failed")
    return "\n".join(lines)


@click.command("build")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Derivations built at the same time.")
@click.option("--keep-going", is_flag=True, help="Build independent apps after a failure.")
@click.option("--hex-repo", "hex_repo", type=(str, str, click.Path(path_type=Path)),
              multiple=True, metavar="NAME URL KEYFILE",
              help="A Hex repository (a mirror named hexpm replaces hex.pm) and the PEM"
              " file of its public key. Repeatable.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800.0, show_default=True,
              help="Seconds one build may take.")
@click.option("--substituter", "substituters", multiple=True, metavar="URL",
              help="A binary cache to take outputs from before building (repeatable;"
              " default $BSTORE_SUBSTITUTERS).")
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="NAME:KEY",
              help="A public key whose signatures are trusted (repeatable;"
              " default $BSTORE_TRUSTED_PUBLIC_KEYS).")
@click.option("--mesh-peer", "mesh_peers", multiple=True, metavar="URL",
              help="A peer asked for mesh sources by content id (repeatable;"
              " default $BSTORE_MESH_PEERS).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@pass_app
def build_cmd(app: AppContext, paths: tuple[Path, ...], jobs: int, keep_going: bool,
              hex_repo: tuple[tuple[str, str, Path], ...], timeout: float,
              substituters: tuple[str, ...], trusted_keys: tuple[str, ...],
              mesh_peers: tuple[str, ...], as_json: bool) -> None:
    """Build app specs into the store and print each app's output path.

    PATHS are apps directories, app directories or spec files (default: ./apps if it
    exists, else .). Derivations whose output is already valid are not rebuilt.
    Exits 1 if any app failed (its derivation and the tail of its log are shown; the
    full log stays available with `bstore log APP`).
    """
    as_json = as_json or app.json
    specs = check_paths(list(paths) or [Path("apps") if Path("apps").is_dir() else Path(".")])
    problems = [p for p in specs.problems if p.severity is Severity.ERROR]
    for problem in problems:
        app.log(f"{problem}")
    repos = _hex_repos(hex_repo)
    progress = LiveProgress(live=app.interactive and not as_json)
    with LocalStore.open(app.root) as store, httpx.Client(trust_env=False) as client:
        fetcher = Fetcher(store, client, hex_repos=repos,
                          mesh_peers=tuple(mesh_peers or env_list("BSTORE_MESH_PEERS")),
                          log=app.log if app.verbose else lambda _m: None)
        cancel = threading.Event()
        caches = list(substituters or env_list("BSTORE_SUBSTITUTERS"))
        subs = Substituters(caches, TrustedKeys.parse(
            list(trusted_keys or env_list("BSTORE_TRUSTED_PUBLIC_KEYS")))) if caches else None
        realiser = Realiser(fetcher, timeout=timeout, progress=progress.hooks(), cancel=cancel,
                            substituters=subs,
                            log=app.log if app.verbose else lambda _m: None)
        # Ctrl-C kills the running builds (their failures are reported, nothing half
        # built is registered); a second Ctrl-C interrupts bstore itself.
        previous = signal.getsignal(signal.SIGINT)

        def interrupted(_signum: int, _frame: object) -> None:
            app.log("interrupted: stopping the running builds")
            cancel.set()
            signal.signal(signal.SIGINT, previous)

        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            signal.signal(signal.SIGINT, interrupted)
        try:
            report = realiser.build(list(specs.specs.values()), jobs=jobs,
                                    keep_going=keep_going)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
    failed_specs = sorted(specs.failed)
    if as_json:
        data = report.to_json()
        data["invalid_specs"] = failed_specs
        data["problems"] = [p.to_dict() for p in problems]
        data["ok"] = report.ok and not failed_specs and not problems
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(_human(report))
        for name in failed_specs:
            click.echo(f"{name} invalid spec (see the errors above)")
    if subs is not None:
        for error in subs.report.errors:
            app.log(f"substituter: {error}")
    if not report.ok or failed_specs or problems:
        if not as_json:
            for result in report.apps.values():
                if result.state is AppState.FAILED and result.log:
                    app.log(f"{result.name}: full log: bstore log {result.name}")
        sys.exit(1)


@click.command("log")
@click.argument("what")
@pass_app
def log_cmd(app: AppContext, what: str) -> None:
    """Print the kept build log of an app (by name) or of an output store path."""
    key = what
    if "/" in what:
        with LocalStore.open(app.root, create=False) as store:
            key = str(store.parse_path(what))
    path = log_for(app.root, key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BstoreError(f"cannot read build log {str(path)!r}: {exc.strerror}") from exc
    click.echo(data.decode("utf-8", "replace"), nl=False)


COMMANDS: list[click.Command] = [build_cmd, log_cmd]
