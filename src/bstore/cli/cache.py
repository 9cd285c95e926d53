"""``bstore key|cache|copy|mesh`` and ``bstore store sign``: keys, caches, transfers.

Trusted keys for pulls come from ``--trusted-key`` (repeatable) or, without any, from
``$BSTORE_TRUSTED_PUBLIC_KEYS`` (whitespace/comma separated, as the config reads it);
mesh peers from ``--peer`` or ``$BSTORE_MESH_PEERS``.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click

from bstore.cli.context import AppContext, env_list, pass_app
from bstore.cli.store import human_size
from bstore.errors import BstoreError
from bstore.store.cache.backend import CachePolicy
from bstore.store.cache.binary_cache import BinaryCache, Substituters
from bstore.store.cache.server import ServeOptions, StoreCacheServer
from bstore.store.local import LocalStore
from bstore.store.mesh import fetch_mcid
from bstore.store.paths import StorePath
from bstore.store.signing import (
    SigningKeyError,
    TrustedKeys,
    generate_key,
    load_secret_key,
    write_key_pair,
)


def _policy(connect_timeout: float, read_timeout: float, min_rate: int) -> CachePolicy:
    try:
        return CachePolicy(connect_timeout=connect_timeout, read_timeout=read_timeout,
                           min_rate=min_rate)
    except ValueError as exc:
        raise BstoreError(f"bad cache limits: {exc}") from exc


def _net_options(fn: click.decorators.FC) -> click.decorators.FC:
    for opt in (
        click.option("--connect-timeout", type=float, default=5.0, show_default=True,
                     help="Seconds to connect to an HTTP cache."),
        click.option("--read-timeout", type=float, default=15.0, show_default=True,
                     help="Seconds without a byte before an HTTP cache is given up."),
        click.option("--min-rate", type=int, default=16 * 1024, show_default=True,
                     help="Bytes/s below which a download counts as stalled."),
    ):
        fn = opt(fn)
    return fn


# -- keys --------------------------------------------------------------------------------

@click.group("key")
def key_group() -> None:
    """Signing keys for binary caches."""


@key_group.command("generate")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="Where to write NAME.secret and NAME.public (default: ROOT/keys).")
@pass_app
def generate_cmd(app: AppContext, name: str, directory: Path | None) -> None:
    """Generate an ed25519 key pair; print the public key line to trust."""
    key = generate_key(name)
    secret, public = write_key_pair(key, directory or app.root / "keys")
    line = key.public_key.to_text()
    app.emit({"name": name, "public_key": line, "secret_file": str(secret),
              "public_file": str(public)}, line)
    if not app.json:
        app.log(f"secret key written to {secret} (mode 0600); trust the line above")


# -- cache serve ---------------------------------------------------------------------------

@click.group("cache")
def cache_group() -> None:
    """Serve this store as a binary cache."""


@cache_group.command("serve")
@click.option("--port", type=int, default=0, show_default=True, help="0: any free port.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--key", "key_file", type=click.Path(path_type=Path), default=None,
              help="Sign served metadata with this secret key.")
@click.option("--priority", type=int, default=40, show_default=True,
              help="Priority announced in cache-info (lower is preferred).")
@click.option("--writable", is_flag=True, help="Accept uploads (needs --token).")
@click.option("--token", default=None, envvar="BSTORE_CACHE_TOKEN",
              help="Bearer token uploads must carry ($BSTORE_CACHE_TOKEN).")
@click.option("--upload-dir", type=click.Path(path_type=Path), default=None,
              help="Where uploads go (default: ROOT/cache-uploads).")
@pass_app
def serve_cmd(app: AppContext, port: int, bind: str, key_file: Path | None, priority: int,
              writable: bool, token: str | None, upload_dir: Path | None) -> None:
    """Serve the local store over HTTP as a signed binary cache and mesh peer."""
    if writable and not token:
        raise BstoreError("--writable needs --token (or $BSTORE_CACHE_TOKEN)",
                          hint="uploads are only accepted with a bearer token")
    key = load_secret_key(key_file) if key_file else None
    options = ServeOptions(key=key, priority=priority, token=token if writable else None,
                           upload_dir=(upload_dir or app.root / "cache-uploads")
                           if writable else None)
    try:
        server = StoreCacheServer(app.root, options, bind, port)
    except OSError as exc:
        raise BstoreError(f"cannot listen on {bind}:{port}: {exc.strerror}") from exc
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.emit({"url": server.url, "writable": writable,
              "public_key": key.public_key.to_text() if key else None},
             f"serving {app.root} at {server.url}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()
        server.store.close()


# -- copy ------------------------------------------------------------------------------------

@click.command("copy")
@click.argument("paths", nargs=-1, required=True)
@click.option("--to", "to_url", default=None, help="Push to this cache (file:// or http(s)://).")
@click.option("--from", "from_url", default=None, help="Pull from this cache.")
@click.option("--key", "key_file", type=click.Path(path_type=Path), default=None,
              help="When pushing: sign the paths with this secret key.")
@click.option("--token", default=None, envvar="BSTORE_CACHE_TOKEN",
              help="Bearer token for a writable cache server.")
@click.option("--trusted-key", "trusted", multiple=True,
              help="NAME:BASE64 public key to accept (repeatable;"
              " default $BSTORE_TRUSTED_PUBLIC_KEYS).")
@click.option("--threshold", type=int, default=1, show_default=True,
              help="How many trusted keys must have signed each path.")
@_net_options
@pass_app
def copy_cmd(app: AppContext, paths: tuple[str, ...], to_url: str | None,
             from_url: str | None, key_file: Path | None, token: str | None,
             trusted: tuple[str, ...], threshold: int, connect_timeout: float,
             read_timeout: float, min_rate: int) -> None:
    """Copy PATHS and their closures to (--to) or from (--from) a binary cache."""
    if (to_url is None) == (from_url is None):
        raise BstoreError("give exactly one of --to URL or --from URL")
    policy = _policy(connect_timeout, read_timeout, min_rate)
    if to_url is not None:
        key = load_secret_key(key_file) if key_file else None
        cache = BinaryCache.open(to_url, policy, token=token)
        try:
            with LocalStore.open(app.root, create=False) as st:
                wanted = [st.parse_path(p) for p in paths]
                report = cache.push(st, wanted, key=key,
                                    progress=lambda sp: app.log(f"copying {sp}"))
        finally:
            cache.close()
        app.emit({"to": to_url, "paths": [str(p) for p in report.paths],
                  "skipped": [str(p) for p in report.skipped],
                  "blobs_uploaded": report.blobs_uploaded,
                  "bytes_uploaded": report.bytes_uploaded},
                 f"copied {len(report.paths)} path(s) ({len(report.skipped)} already there),"
                 f" {report.blobs_uploaded} blobs, {human_size(report.bytes_uploaded)}")
        return
    assert from_url is not None
    lines = list(trusted) or env_list("BSTORE_TRUSTED_PUBLIC_KEYS")
    try:
        keys = TrustedKeys.parse(lines, threshold)
    except SigningKeyError as exc:
        raise BstoreError(exc.message, hint=exc.hint) from exc
    subs = Substituters([from_url], keys, policy=policy, progress=app.log)
    failed: list[str] = []
    try:
        with LocalStore.open(app.root) as st:
            pulled: list[StorePath] = [st.parse_path(p) for p in paths]
            for sp in pulled:
                if not subs.substitute(st, sp):
                    failed.append(st.full_path(sp))
            done = [st.full_path(p) for p, _ in subs.report.fetched]
    finally:
        subs.close()
    rep = subs.report
    app.emit({"from": from_url, "paths": done, "failed": failed, "errors": rep.errors,
              "local_files": rep.local_files, "downloaded_files": rep.downloaded_files,
              "downloaded_bytes": rep.downloaded_bytes},
             f"copied {len(done)} path(s): {rep.downloaded_files} files downloaded"
             f" ({human_size(rep.downloaded_bytes)}), {rep.local_files} reused locally")
    if failed:
        raise BstoreError(
            f"could not copy {', '.join(failed)} from {from_url}"
            + (f": {rep.errors[-1]}" if rep.errors else ": the cache does not have it"),
            hint="check the cache and the trusted keys (--trusted-key)")


# -- mesh ------------------------------------------------------------------------------------

@click.group("mesh")
def mesh_group() -> None:
    """Content from mesh peers by MCID."""


@mesh_group.command("fetch")
@click.argument("mcid")
@click.option("--peer", "peers", multiple=True,
              help="Peer cache URL (repeatable; default $BSTORE_MESH_PEERS).")
@click.option("--name", default="mesh", show_default=True, help="Store path name.")
@_net_options
@pass_app
def mesh_fetch_cmd(app: AppContext, mcid: str, peers: tuple[str, ...], name: str,
                   connect_timeout: float, read_timeout: float, min_rate: int) -> None:
    """Fetch the tree with content id MCID from peers into the store; print its path."""
    policy = _policy(connect_timeout, read_timeout, min_rate)
    with LocalStore.open(app.root) as st:
        sp, peer, stats = fetch_mcid(st, mcid, list(peers) or env_list("BSTORE_MESH_PEERS"),
                                     name=name, policy=policy)
        full = st.full_path(sp)
    app.emit({"path": full, "mcid": mcid, "peer": peer,
              "downloaded_files": stats.downloaded_files,
              "downloaded_bytes": stats.downloaded_bytes, "local_files": stats.local_files},
             full)


COMMANDS: list[click.Command] = [key_group, cache_group, copy_cmd, mesh_group]
