"""``bstore cache serve``: the local store as a binary cache over HTTP (and mesh peer).

Read routes (``GET``/``HEAD``), all built from the store on the fly::

    /cache-info                          this store's dir and the priority
    /meta/<digest>.meta                  metadata of a valid path, signed with --key
    /manifests/<mcid hex>.manifest.zst   a valid path's manifest
    /mcid/<mcid>                         the same, by full MCID (mesh fetch)
    /blobs/<2 hex>/<64 hex>.zst          a file of any valid path, re-hashed before sent

Every request path must match one of these patterns exactly (no decoding, no ``..``):
anything else is 404, so ``/../../etc/passwd`` names nothing. A ``--writable`` server
also accepts ``PUT`` of cache objects with ``Authorization: Bearer <token>`` (401
without one, 403 with a wrong one) into an upload directory it serves as well.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import blake3

from bstore.errors import BstoreError
from bstore.store.cache.backend import CacheError, FileCache
from bstore.store.cache.binary_cache import path_cache_meta
from bstore.store.cache.format import CacheInfo, check_key
from bstore.store.cache.transfer import compress
from bstore.store.local import LocalStore
from bstore.store.manifest import EntryType, Manifest
from bstore.store.paths import StorePath
from bstore.store.signing import SecretKey

_log = logging.getLogger("bstore.cache.server")

_ROUTES = re.compile(
    r"/(?:(?P<info>cache-info)"
    r"|meta/(?P<digest>[0-9a-df-np-sv-z]{32})\.meta"
    r"|manifests/(?P<mhex>[0-9a-f]{64})\.manifest\.zst"
    r"|mcid/mcid1-manifest-blake3-(?P<mcid>[0-9a-f]{64})"
    r"|blobs/(?P<b2>[0-9a-f]{2})/(?P<blob>[0-9a-f]{64})\.zst)"
)
#: Largest object a writable server accepts in one PUT.
MAX_UPLOAD = 2 << 30
#: Indexes are rebuilt on a miss at most this often (a flood of misses is cheap).
_REFRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How ``cache serve`` behaves."""

    key: SecretKey | None = None
    priority: int = 40
    token: str | None = None
    upload_dir: Path | None = None


class _Index:
    """digest → path, MCID → path and blake3 → file of the valid paths (refreshable)."""

    def __init__(self) -> None:
        self.paths: dict[str, StorePath] = {}
        self.mcids: dict[str, StorePath] = {}
        self.blobs: dict[str, tuple[bytes, EntryType]] = {}
        self.built = 0.0


class StoreCacheServer:
    """A threaded HTTP server over one store. ``serve_forever()`` / ``shutdown()``."""

    def __init__(self, root: Path, options: ServeOptions, bind: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.store = LocalStore.open(root, create=False)
        self.options = options
        self.lock = threading.Lock()  # one database connection for all handler threads
        self.index = _Index()
        self.bytes_sent = 0
        self.uploads = FileCache(options.upload_dir) if options.upload_dir else None
        self.httpd = _HTTPServer((bind, port), _Handler)
        self.httpd.app = self
        self.refresh(force=True)

    @property
    def url(self) -> str:
        """``http://host:port`` where it listens."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`."""
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop serving and close the store."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.store.close()

    def refresh(self, force: bool = False) -> None:
        """Rebuild the indexes (throttled unless ``force``)."""
        with self.lock:
            if not force and time.monotonic() - self.index.built < _REFRESH_SECONDS:
                return
            index = _Index()
            for sp in self.store.valid_paths():
                index.paths[sp.digest] = sp
                manifest = self.store.query_manifest(sp)
                index.mcids[manifest.mcid.rpartition("-")[2]] = sp
                base = os.fsencode(self.store.real_path(sp))
                for e in manifest.files():
                    if e.blake3_hex is not None and e.blake3_hex not in index.blobs:
                        index.blobs[e.blake3_hex] = (base + b"/" + e.path if e.path else base,
                                                     e.type)
            index.built = time.monotonic()
            self.index = index

    def lookup(self, table: str, key: str) -> object | None:
        """An index entry, refreshing once on a miss (new paths appear)."""
        found: object | None = getattr(self.index, table).get(key)
        if found is None:
            self.refresh()
            found = getattr(self.index, table).get(key)
        return found

    def manifest_of(self, sp: StorePath) -> Manifest:
        """The recorded manifest of ``sp``."""
        with self.lock:
            return self.store.query_manifest(sp)

    def object(self, match: re.Match[str], head: bool = False) -> bytes | None:
        """The bytes of the object a request names, or None (404). For ``head`` a blob
        is only looked up (its bytes are not needed: a placeholder is returned)."""
        store = self.store
        if match.group("info"):
            return CacheInfo(str(store.store_dir), self.options.priority).to_bytes()
        if match.group("digest"):
            sp = self.lookup("paths", match.group("digest"))
            if not isinstance(sp, StorePath):
                return None
            manifest = self.manifest_of(sp)
            with self.lock:
                if not store.is_valid(sp):
                    return None
                meta = path_cache_meta(store, sp, manifest, self.options.key)
            return meta.to_bytes()
        mhex = match.group("mhex") or match.group("mcid")
        if mhex:
            sp = self.lookup("mcids", mhex)
            if not isinstance(sp, StorePath):
                return None
            return compress(self.manifest_of(sp).to_bytes())
        digest = match.group("blob")
        if digest and match.group("b2") == digest[:2]:
            found = self.lookup("blobs", digest)
            if not isinstance(found, tuple):
                return None
            path, etype = found
            if head:
                return b""
            try:
                if etype is EntryType.SYMLINK:
                    data = os.readlink(path)
                else:
                    with open(path, "rb") as fh:
                        data = fh.read()
            except OSError:
                return None
            # Never serve a damaged file under the name of the contents it should have.
            if blake3.blake3(data).hexdigest() != digest:
                _log.error("store file %r does not match its recorded blake3",
                           os.fsdecode(path))
                return None
            return compress(data)
        return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: StoreCacheServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        _log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes = b"", head: bool = False,
               content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
            with self.server.app.lock:
                self.server.app.bytes_sent += len(body)

    def _get(self, head: bool) -> None:
        app = self.server.app
        path = self.path
        match = _ROUTES.fullmatch(path)
        try:
            data = app.object(match, head) if match else None
            if data is None and app.uploads is not None and match is not None:
                key = path[1:]
                if not key.startswith("mcid/") and app.uploads.exists(key):
                    data = app.uploads.read(key, MAX_UPLOAD)
        except BstoreError as exc:
            _log.error("%s: %s", path, exc.message)
            self._reply(500, exc.message.encode(), head, "text/plain")
            return
        if data is None:
            self._reply(404, b"not found\n", head, "text/plain")
            return
        self._reply(200, data, head, "text/plain" if path.endswith((".meta", "info"))
                    else "application/octet-stream")

    def do_GET(self) -> None:
        """Serve an object."""
        self._get(head=False)

    def do_HEAD(self) -> None:
        """Whether an object exists."""
        self._get(head=True)

    def do_PUT(self) -> None:
        """Accept an upload (writable servers, with the token)."""
        app = self.server.app
        token = app.options.token
        if app.uploads is None or token is None:
            self._reply(405, b"this cache is read-only\n", content_type="text/plain")
            return
        auth = self.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            self.close_connection = True
            self._reply(401, b"a bearer token is required\n", content_type="text/plain")
            return
        if not hmac.compare_digest(auth[len("Bearer "):].encode(), token.encode()):
            self.close_connection = True
            self._reply(403, b"wrong token\n", content_type="text/plain")
            return
        key = self.path[1:]
        length = self.headers.get("content-length", "")
        try:
            check_key(key)
        except CacheError:
            self.close_connection = True
            self._reply(400, b"not a cache object key\n", content_type="text/plain")
            return
        if not length.isdigit() or int(length) > MAX_UPLOAD:
            self.close_connection = True
            self._reply(413, b"missing or too large content-length\n",
                        content_type="text/plain")
            return
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            return
        try:
            app.uploads.put(key, body)
        except BstoreError as exc:
            self._reply(500, exc.message.encode(), content_type="text/plain")
            return
        self._reply(201, b"")
