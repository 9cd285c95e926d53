"""``bstore store export|import|verify|sign``: moving, checking and signing store contents."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

import click

from bstore.cli.context import AppContext, pass_app
from bstore.cli.store import parse_size, store
from bstore.errors import BstoreError
from bstore.store.archive_meta import DEFAULT_MAX_BYTES
from bstore.store.local import LocalStore
from bstore.store.paths import StorePath

# The archive and verify modules are imported inside the commands that use them: every
# ``bstore store ...`` command loads this module, and most need neither.

_MAX_SIZE_HELP = (f"Refuse streams that expand beyond SIZE (default"
                  f" {DEFAULT_MAX_BYTES >> 30}G), e.g. 500M.")


@store.command("export")
@click.argument("paths", nargs=-1, required=True)
@click.option("--closure/--no-closure", default=True, show_default=True,
              help="Also export everything the paths reference (dependencies first).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="Write to FILE (atomically) instead of stdout.")
@pass_app
def export_cmd(app: AppContext, paths: tuple[str, ...], closure: bool,
               output: Path | None) -> None:
    """Write PATHS as one deterministic zstd export stream."""
    from bstore.store.archive import export_paths

    with LocalStore.open(app.root, create=False) as st:
        wanted = [st.parse_path(p) for p in paths]
        if output is None:
            out = sys.stdout.buffer
            if out.isatty():
                raise BstoreError("refusing to write a binary export stream to a terminal",
                                  hint="redirect stdout (> file) or use --output FILE")
            order = export_paths(st, wanted, out, closure=closure)
            out.flush()
        else:
            order = _export_to_file(st, wanted, output, closure)
        app.log(f"exported {len(order)} path(s)")


def _export_to_file(st: LocalStore, wanted: list[StorePath], output: Path,
                    closure: bool) -> list[StorePath]:
    from bstore.store.archive import export_paths

    tmp = output.with_name(f".{output.name}.tmp-{os.urandom(4).hex()}")
    try:
        with open(tmp, "wb") as handle:
            order = export_paths(st, wanted, handle, closure=closure)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    except OSError as exc:
        raise BstoreError(f"cannot write {str(output)!r}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return order


def _open_input(path: Path | None) -> tuple[BinaryIO, str]:
    if path is None or str(path) == "-":
        return sys.stdin.buffer, "<stdin>"
    try:
        return open(path, "rb"), str(path)
    except OSError as exc:
        raise BstoreError(f"cannot read {str(path)!r}: {exc.strerror}") from exc


@store.command("import")
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--max-size", "max_size", default=None, metavar="SIZE", help=_MAX_SIZE_HELP)
@pass_app
def import_cmd(app: AppContext, file: Path | None, max_size: str | None) -> None:
    """Import an export stream from FILE or stdin; print its paths.

    Every file hash, MCID and store path is verified, for the whole stream, before any
    path becomes valid.
    """
    from bstore.store.archive import import_stream

    limit = DEFAULT_MAX_BYTES if max_size is None else parse_size(max_size)
    raw, source = _open_input(file)
    try:
        with LocalStore.open(app.root, create=True) as st:
            result = import_stream(st, raw, source=source, max_bytes=limit)
            added = sum(1 for r in result if r.added)
            app.log(f"imported {added} new path(s), {len(result) - added} already valid")
            app.emit([{"path": st.full_path(r.path), "added": r.added} for r in result],
                     "\n".join(st.full_path(r.path) for r in result) or None)
    finally:
        if file is not None and str(file) != "-":
            raw.close()


@store.command("verify")
@click.argument("paths", nargs=-1)
@click.option("--check-contents", is_flag=True,
              help="Hash every file and compare it with the recorded manifest.")
@click.option("--repair", is_flag=True,
              help="Replace damaged paths from --from (implies --check-contents).")
@click.option("--from", "source", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="Export stream to repair from ('-' for stdin).")
@click.option("--max-size", "max_size", default=None, metavar="SIZE", help=_MAX_SIZE_HELP)
@pass_app
@click.pass_context
def verify_cmd(ctx: click.Context, app: AppContext, paths: tuple[str, ...],
               check_contents: bool, repair: bool, source: Path | None,
               max_size: str | None) -> None:
    """Report missing or modified paths and database inconsistencies.

    Exit code 1 when anything is wrong; store directories without a database row
    (crash leftovers) are only warnings.
    """
    from bstore.store.verify import DAMAGE, ProblemKind, repair_from_stream, verify_store

    # What --repair can act on: damaged trees, rows deleted behind the store's back.
    repairable = DAMAGE | {ProblemKind.UNREGISTERED, ProblemKind.DANGLING_REFERENCE}
    if repair and source is None:
        raise BstoreError("--repair needs a source of good copies",
                          hint="give an export stream with --from FILE")
    if source is not None and not repair:
        raise BstoreError("--from is only used with --repair", hint="add --repair")
    with LocalStore.open(app.root, create=False) as st:
        wanted = [st.parse_path(p) for p in paths] or None
        report = verify_store(st, wanted, check_contents=check_contents or repair)
        if repair and source is not None and any(
                p.kind in repairable for p in report.problems):
            limit = DEFAULT_MAX_BYTES if max_size is None else parse_size(max_size)
            raw, name = _open_input(source)
            try:
                report = repair_from_stream(st, report, raw, source=name, max_bytes=limit,
                                            paths=wanted)
            finally:
                if str(source) != "-":
                    raw.close()
        lines = [p.message if p.severity == "error" else f"{p.severity}: {p.message}"
                 for p in report.problems]
        errors = sum(1 for p in report.problems if p.severity == "error")
        lines.append(f"checked {report.checked} path(s): "
                     + ("ok" if report.ok else f"{errors} problem(s)"))
        app.emit(report.to_dict(), "\n".join(lines))
        if not report.ok:
            ctx.exit(1)


COMMANDS: list[click.Command] = []


@store.command("sign")
@click.argument("paths", nargs=-1, required=True)
@click.option("--key", "key_file", type=click.Path(path_type=Path), required=True,
              help="Secret key file (from `bstore key generate`).")
@pass_app
def sign_cmd(app: AppContext, paths: tuple[str, ...], key_file: Path) -> None:
    """Sign valid store paths (signatures are kept in the database)."""
    from bstore.store.signing import fingerprint, load_secret_key

    key = load_secret_key(key_file)
    out = []
    with LocalStore.open(app.root, create=False) as st:
        for text in paths:
            sp = st.parse_path(text)
            info = st.query_info(sp)
            sig = key.sign(fingerprint(str(st.store_dir), sp, info.mcid, info.nar_size,
                                       info.references))
            st.add_signatures(sp, [sig])
            out.append({"path": st.full_path(sp), "signature": sig})
    app.emit(out, "\n".join(f"{o['path']} {o['signature']}" for o in out))
