"""``bstore store ...``: the content-addressed store by hand."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from bstore.cli.context import AppContext, pass_app
from bstore.errors import BstoreError
from bstore.store.local import LocalStore
from bstore.store.manifest import compute_mcid


@click.group()
def store() -> None:
    """Add, inspect, verify, export and collect store paths."""


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``100K``, ``1.5G``, ``2GiB`` (binary units)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise BstoreError(f"size {text!r} is not understood",
                          hint="use a number with an optional K, M, G or T suffix, e.g. 500M")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_size(n: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


class _Reporter:
    """Progress on stderr: one updating line on a terminal, a log line every few
    seconds otherwise (so CI logs show long operations are alive)."""

    def __init__(self, app: AppContext, what: str) -> None:
        self.app = app
        self.what = what
        self.last = 0.0
        self.shown = False

    def update(self, text: str) -> None:
        now = time.monotonic()
        if self.app.interactive:
            if now - self.last >= 0.1:
                click.echo(f"\r\x1b[K{self.what}: {text}", err=True, nl=False)
                self.last = now
                self.shown = True
        elif now - self.last >= 5.0:
            self.app.log(f"{self.what}: {text}")
            self.last = now

    def done(self) -> None:
        if self.shown:
            click.echo("\r\x1b[K", err=True, nl=False)


def _open(app: AppContext, create: bool = False) -> LocalStore:
    return LocalStore.open(app.root, create=create)


@store.command("add")
@click.argument("path", type=click.Path(path_type=Path, exists=False))
@click.option("--name", "name", default=None, help="Store path name (default: PATH's name).")
@pass_app
def add_cmd(app: AppContext, path: Path, name: str | None) -> None:
    """Copy a file or tree into the store and print its store path."""
    reporter = _Reporter(app, f"adding {path}")

    def progress(files: int, size: int) -> None:
        reporter.update(f"{files} files, {human_size(size)}")

    with _open(app, create=True) as st:
        if not app.interactive and not app.json:
            app.log(f"adding {path}")
        try:
            sp = st.add_path(path, name, progress=progress)
        finally:
            reporter.done()
        info = st.query_info(sp)
        app.emit({"path": st.full_path(sp), "mcid": info.mcid, "nar_size": info.nar_size},
                 st.full_path(sp))


@store.command("hash")
@click.argument("path", type=click.Path(path_type=Path, exists=False))
@pass_app
def hash_cmd(app: AppContext, path: Path) -> None:
    """Print the content id (MCID) of a file or tree; adds nothing."""
    mcid = compute_mcid(path)
    app.emit({"path": str(path), "mcid": mcid}, mcid)


@store.command("info")
@click.argument("paths", nargs=-1, required=True)
@pass_app
def info_cmd(app: AppContext, paths: tuple[str, ...]) -> None:
    """Show paths' MCID, size, references, deriver, signatures."""
    with _open(app) as st:
        infos = [st.query_info(st.parse_path(p)) for p in paths]
        lines = []
        for info in infos:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                 time.gmtime(info.registration_time))
            lines += [
                st.full_path(info.store_path),
                f"  mcid:        {info.mcid}",
                f"  kind:        {info.kind.value}",
                f"  size:        {info.nar_size} ({human_size(info.nar_size)})",
                f"  registered:  {when}",
                f"  deriver:     {info.deriver or '-'}",
                "  references:  " + (", ".join(st.full_path(r) for r in info.references)
                                     or "-"),
                "  signatures:  " + (", ".join(info.signatures) or "-"),
            ]
        app.emit([i.to_dict(st.store_dir) for i in infos], "\n".join(lines))


@store.command("closure")
@click.argument("paths", nargs=-1, required=True)
@pass_app
def closure_cmd(app: AppContext, paths: tuple[str, ...]) -> None:
    """Print the paths' closure, dependencies first."""
    with _open(app) as st:
        out = [st.full_path(p) for p in st.closure(st.parse_path(p) for p in paths)]
        app.emit(out, "\n".join(out))


@store.command("referrers")
@click.argument("path")
@pass_app
def referrers_cmd(app: AppContext, path: str) -> None:
    """Print the valid paths that reference PATH."""
    with _open(app) as st:
        out = [st.full_path(p) for p in st.referrers(st.parse_path(path))]
        app.emit(out, "\n".join(out) if out else None)


@store.command("gc")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option("--max-freed", "max_freed", default=None, metavar="SIZE",
              help="Stop after freeing this much (e.g. 500M, 2G).")
@pass_app
def gc_cmd(app: AppContext, dry_run: bool, max_freed: str | None) -> None:
    """Delete unrooted store paths; print them and the bytes freed.

    Roots: symlinks under profiles/ and gcroots/ (also indirect ones, through a link
    elsewhere), and paths running bstore processes are using.
    """
    from bstore.store.gc import collect_garbage

    limit = None if max_freed is None else parse_size(max_freed)
    with _open(app) as st:
        reporter = _Reporter(app, "collecting garbage")
        count = [0]

        def progress(path: str, freed: int) -> None:
            count[0] += 1
            reporter.update(f"{count[0]} paths, {human_size(freed)} freed")

        try:
            result = collect_garbage(st, dry_run=dry_run, max_freed=limit, progress=progress)
        finally:
            reporter.done()
        verb = "would delete" if dry_run else "deleted"
        lines = [st.full_path(p) for p in result.deleted] + list(result.leftovers)
        lines.append(f"{verb} {len(result.deleted)} paths,"
                     f" {'would free' if dry_run else 'freed'} {result.bytes_freed} bytes"
                     f" ({human_size(result.bytes_freed)})")
        app.emit(result.to_dict(st.store_dir), "\n".join(lines))


@store.command("optimise")
@pass_app
def optimise_cmd(app: AppContext) -> None:
    """Make identical files across store paths share one inode."""
    from bstore.store.optimise import optimise_store

    with _open(app) as st:
        reporter = _Reporter(app, "optimising")
        try:
            result = optimise_store(
                st, progress=lambda n, saved: reporter.update(
                    f"{n} paths, {human_size(saved)} saved"))
        finally:
            reporter.done()
        lines = [f"damaged (skipped): {d}" for d in result.damaged]
        lines.append(f"linked {result.files_linked} files, saved {result.bytes_saved} bytes"
                     f" ({human_size(result.bytes_saved)})")
        app.emit(result.to_dict(), "\n".join(lines))


COMMANDS: list[click.Command] = [store]
