"""Cache backends: three primitives (exists / put / get) over a directory or HTTP.

Everything a binary cache does is built on these, so each backend stays small:
:class:`FileCache` (``file:///dir``, atomic writes) and :class:`HttpCache`
(``http(s)://host/prefix``, httpx with per-cache timeouts, a minimum throughput, size
caps and a bearer token for writes). Keys are checked by
:func:`~bstore.store.cache.format.check_key` before any file name or URL is made.

Errors (all :class:`CacheError`)::

    CacheError
    ├── CacheMissing        the object is not in the cache (404 / no such file)
    ├── CacheUnavailable    unreachable, timed out, too slow, truncated, 5xx
    ├── CacheTooLarge       more bytes than the caller's cap
    └── CacheAuthError      a write refused (401/403)
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bstore.errors import BstoreError
from bstore.http_limits import HttpLimits
from bstore.store import atomic
from bstore.store.cache.format import check_key


class CacheError(BstoreError):
    """A binary cache that cannot give or take an object."""


class CacheMissing(CacheError):
    """The object is not in the cache."""


class CacheUnavailable(CacheError):
    """The cache is unreachable, too slow, or sent a broken response."""


class CacheTooLarge(CacheError):
    """An object bigger than the reader allows (e.g. an endless body)."""


class CacheAuthError(CacheError):
    """The cache refused a write (missing or wrong token)."""


@dataclass(frozen=True, slots=True)
class CachePolicy(HttpLimits):
    """Per-cache network limits (seconds, bytes per second)."""

    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    min_rate: int = 16 * 1024
    rate_window: float = 10.0
    #: How long "this cache does not have path X" is remembered.
    negative_ttl: float = 60.0
    #: Concurrent blob downloads per cache.
    parallel: int = 8

    def __post_init__(self) -> None:
        # Explicit base call: zero-argument super() breaks in slotted dataclasses.
        HttpLimits.__post_init__(self)
        if self.negative_ttl < 0 or self.parallel < 1:
            raise ValueError("CachePolicy rates and counts must not be negative")


class CacheBackend:
    """The three primitives. ``url`` names the cache in messages; ``received`` counts the
    bytes read from it (as stored, i.e. compressed) for transfer reports."""

    url: str

    def __init__(self, url: str) -> None:
        self.url = url
        self.received = 0
        self._count_lock = threading.Lock()

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.received += n

    def where(self, key: str) -> str:
        """The object's address for messages."""
        return f"{self.url.rstrip('/')}/{key}"

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` is present."""
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` as ``key`` (atomically: readers see all of it or nothing)."""
        raise NotImplementedError

    def get(self, key: str, max_bytes: int) -> Iterator[bytes]:
        """Stream the object's bytes; :class:`CacheTooLarge` past ``max_bytes``."""
        raise NotImplementedError

    def read(self, key: str, max_bytes: int) -> bytes:
        """The whole object (at most ``max_bytes``)."""
        return b"".join(self.get(key, max_bytes))

    def flush(self) -> None:
        """Make what was put so far durable (before metadata that refers to it)."""

    def close(self) -> None:
        """Release connections."""


def _too_large(where: str, max_bytes: int) -> CacheTooLarge:
    return CacheTooLarge(f"{where} is larger than the {max_bytes}-byte limit",
                         hint="the cache sent more than the object can be; it is broken or"
                         " hostile")


class FileCache(CacheBackend):
    """A cache in a local directory (``file:///dir``)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(f"file://{directory}")
        self.directory = directory
        self._base = str(directory) + "/"
        # Fan-out directories known to exist (thousands of blobs share 256 of them).
        self._made: set[str] = set()

    def _file(self, key: str) -> str:
        return self._base + check_key(key)

    def exists(self, key: str) -> bool:
        """Whether the object file exists."""
        return os.path.isfile(self._file(key))

    def put(self, key: str, data: bytes) -> None:
        """Write to a temp file beside the object, then rename it into place."""
        path = self._file(key)
        parent, _, name = path.rpartition("/")
        try:
            if parent not in self._made:
                os.makedirs(parent, exist_ok=True)
                self._made.add(parent)
            tmp = f"{parent}/.{name}.tmp-{secrets.token_hex(4)}"
            atomic.write_new_file(tmp, data, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            raise CacheError(f"cannot write {self.where(key)}: {exc.strerror}") from exc

    def get(self, key: str, max_bytes: int) -> Iterator[bytes]:
        """Read the object file in chunks (never through a symlink)."""
        path = self._file(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CacheMissing(f"{self.where(key)} does not exist") from None
        except OSError as exc:
            raise CacheUnavailable(f"cannot read {self.where(key)}: {exc.strerror}") from exc
        return self._chunks(fd, key, max_bytes)

    def _chunks(self, fd: int, key: str, max_bytes: int) -> Iterator[bytes]:
        total = 0
        try:
            # Read what the file holds (plus one byte to see the end) rather than a
            # fixed 1 MiB: os.read allocates its whole buffer, per call, per blob.
            want = min(os.fstat(fd).st_size, 1 << 20) + 1
            while chunk := os.read(fd, want):
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(self.where(key), max_bytes)
                self._count(len(chunk))
                yield chunk
        except OSError as exc:
            raise CacheUnavailable(f"cannot read {self.where(key)}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def flush(self) -> None:
        """One filesystem sync for everything written so far."""
        if self.directory.exists():
            atomic.syncfs(self.directory)


class HttpCache(CacheBackend):
    """A cache over HTTP(S): ``GET``/``HEAD`` to read, ``PUT`` with a bearer token to write.

    ``client`` may be passed in (tests, connection sharing); else one is made and owned.
    """

    def __init__(self, url: str, policy: CachePolicy | None = None, *,
                 token: str | None = None, client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(url.rstrip("/"))
        self.policy = policy or CachePolicy()
        self._token = token
        self._owned = client is None
        self._client = client or httpx.Client(
            timeout=self.policy.timeout(),
            limits=httpx.Limits(max_connections=self.policy.parallel * 2),
            follow_redirects=False)
        self._clock = clock

    def _map(self, key: str, exc: httpx.HTTPError, got: int = 0) -> CacheError:
        where = self.where(key)
        if isinstance(exc, httpx.TimeoutException):
            return CacheUnavailable(f"{where} timed out ({type(exc).__name__}) after {got}"
                                    " bytes", hint="the cache is slow or stalled; check it")
        if isinstance(exc, httpx.RemoteProtocolError):
            return CacheUnavailable(f"{where}: broken response after {got} bytes: {exc}")
        return CacheUnavailable(f"cannot reach {where}: {exc}",
                                hint="check the cache URL and that the server runs")

    def _status(self, key: str, status: int, write: bool = False) -> CacheError:
        where = self.where(key)
        if status == 404:
            return CacheMissing(f"{where} does not exist (HTTP 404)")
        if status in (401, 403):
            return CacheAuthError(
                f"{where}: HTTP {status}, the cache refused the {'write' if write else 'read'}",
                hint="pass the cache's write token (--token)" if write else None)
        return CacheUnavailable(f"{where}: HTTP {status}")

    def exists(self, key: str) -> bool:
        """``HEAD`` the object."""
        check_key(key)
        try:
            resp = self._client.head(self.where(key), timeout=self.policy.timeout())
        except httpx.HTTPError as exc:
            raise self._map(key, exc) from exc
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._status(key, resp.status_code)

    def put(self, key: str, data: bytes) -> None:
        """``PUT`` the object with the bearer token."""
        check_key(key)
        headers = {"content-type": "application/octet-stream"}
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        try:
            resp = self._client.put(self.where(key), content=data, headers=headers,
                                    timeout=self.policy.timeout())
        except httpx.HTTPError as exc:
            raise self._map(key, exc) from exc
        if resp.status_code not in (200, 201, 204):
            raise self._status(key, resp.status_code, write=True)

    def get(self, key: str, max_bytes: int) -> Iterator[bytes]:
        """Stream ``GET``: size cap (header and body), minimum average throughput."""
        check_key(key)
        return self._stream(key, max_bytes)

    def _stream(self, key: str, max_bytes: int) -> Iterator[bytes]:
        where = self.where(key)
        got = 0
        try:
            with self._client.stream("GET", where, timeout=self.policy.timeout(),
                                     headers={"accept-encoding": "identity"}) as resp:
                if resp.status_code != 200:
                    raise self._status(key, resp.status_code)
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise _too_large(where, max_bytes)
                started = self._clock()
                for chunk in resp.iter_raw():
                    got += len(chunk)
                    if got > max_bytes:
                        raise _too_large(where, max_bytes)
                    self._count(len(chunk))
                    elapsed = self._clock() - started
                    if self.policy.stalled(got, elapsed):
                        raise CacheUnavailable(
                            f"{where} is too slow: {got} bytes in {elapsed:.1f} s, below"
                            f" {self.policy.min_rate} bytes/s",
                            hint="the cache is overloaded or hostile; the next one is tried")
                    yield chunk
                if declared is not None and declared.isdigit() and got != int(declared):
                    raise CacheUnavailable(f"{where} is truncated: {got} of {declared} bytes")
        except httpx.HTTPError as exc:
            raise self._map(key, exc, got) from exc

    def close(self) -> None:
        """Close the client if this backend made it."""
        if self._owned:
            self._client.close()


def open_backend(url: str, policy: CachePolicy | None = None, *, token: str | None = None,
                 client: httpx.Client | None = None) -> CacheBackend:
    """The backend for ``file:///dir`` or ``http(s)://…``."""
    if url.startswith("file://"):
        path = url[len("file://"):]
        path = path.split("?", 1)[0]
        if not path.startswith("/") or "\0" in path:
            raise CacheError(f"cache URL {url!r} does not name an absolute directory",
                             hint="use file:///absolute/dir")
        return FileCache(Path(path))
    if url.startswith(("http://", "https://")):
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as exc:
            raise CacheError(f"invalid cache URL {url!r}: {exc}") from exc
        if not parsed.host or parsed.query:
            raise CacheError(f"cache URL {url!r} needs a host and no query string")
        return HttpCache(url, policy, token=token, client=client)
    raise CacheError(f"unsupported cache URL {url!r}",
                     hint="caches are file:///dir, http://host/… or https://host/…")
