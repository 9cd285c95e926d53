"""HTTP downloads of untrusted artefacts: streamed, capped, retried, hashed on the way in.

One function does the network part for every fetcher that needs a URL's bytes
(release tarballs, hex registry entries and package tarballs). The caller passes the
``httpx.Client`` (so tests can use a local server or a mock transport); this module
adds what a build system needs on top of it:

* connect and read timeouts (a server that sends headers and then sleeps is a stall);
* a minimum average throughput, so a server dripping one byte at a time also stalls;
* a total size cap, checked against ``Content-Length`` first and then on the stream;
* retries with exponential backoff on connection errors, truncated bodies and 5xx/429,
  never on 4xx or on a checksum mismatch (those will not get better);
* the SHA-256 computed on the stream and compared with the expected value (hex or
  base64, optionally prefixed ``sha256-`` / ``sha256:``);
* the body written to a temp file in a directory the caller gives, removed on failure.

No shell is ever involved: a URL is only ever an ``httpx.URL``. Errors name the URL
(with any ``user:password@`` part removed).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from bstore.errors import BstoreError
from bstore.http_limits import HttpLimits


class DownloadError(BstoreError):
    """A URL whose body could not be fetched completely within the policy."""


class DownloadTooLarge(DownloadError):
    """A body larger than the size cap (by its headers or by what was sent)."""


class ChecksumMismatch(DownloadError):
    """A complete body whose SHA-256 is not the expected one."""


@dataclass(frozen=True, slots=True)
class DownloadPolicy(HttpLimits):
    """Limits for one download. Times in seconds, sizes and rates in bytes."""

    connect_timeout: float = 15.0
    read_timeout: float = 30.0
    min_rate: int = 1024
    rate_window: float = 60.0
    max_size: int = 2 * 1024 * 1024 * 1024
    retries: int = 3
    backoff: float = 0.5

    def __post_init__(self) -> None:
        # Explicit base call: zero-argument super() breaks in slotted dataclasses.
        HttpLimits.__post_init__(self)
        if self.max_size <= 0 or self.retries < 0 or self.backoff < 0:
            raise ValueError("DownloadPolicy sizes and counts must not be negative")


DEFAULT_POLICY = DownloadPolicy()


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A complete, verified body on disk."""

    url: str
    path: Path
    size: int
    sha256: str


def redact(url: str | httpx.URL) -> str:
    """The URL as text without a ``user:password@`` part (safe for messages and logs)."""
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError, ValueError):
        return str(url)
    if parsed.userinfo:
        parsed = parsed.copy_with(username=None, password=None)
    return str(parsed)


def parse_sha256(expected: str) -> bytes:
    """The 32-byte digest named by ``expected`` (hex, or base64 / base64url, maybe prefixed)."""
    text = expected.strip()
    for prefix in ("sha256-", "sha256:", "sha256="):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
            break
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        padded = text + "=" * (-len(text) % 4)
        digest = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise DownloadError(
            f"expected sha256 {expected!r} is neither 64 hex digits nor base64 of 32 bytes",
            hint="give the SHA-256 of the file as hex (sha256sum) or base64",
        )
    return digest


def _check_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise DownloadError(f"invalid URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DownloadError(
            f"unsupported URL {redact(url)!r}: only http:// and https:// URLs can be downloaded"
        )
    # Refuse a host that is no DNS name or IP literal before any resolver sees it.
    if not _HOST.fullmatch(parsed.host) and ":" not in parsed.host:
        raise DownloadError(f"invalid URL {redact(url)!r}: host {parsed.host!r} is not valid")
    return parsed


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*\.?")


class _Retryable(Exception):
    """An attempt that failed in a way another attempt may fix (internal)."""

    def __init__(self, error: DownloadError) -> None:
        super().__init__(error.message)
        self.error = error


def _attempt(
    client: httpx.Client,
    url: httpx.URL,
    sink: BinaryIO,
    policy: DownloadPolicy,
    clock: Callable[[], float],
) -> tuple[int, bytes]:
    """One GET of ``url`` into ``sink``; returns (size, sha256 digest)."""
    shown = redact(url)
    digest = hashlib.sha256()
    size = 0
    try:
        # identity encoding: the checksum and the caps apply to the bytes as published.
        with client.stream(
            "GET",
            url,
            headers={"accept-encoding": "identity"},
            timeout=policy.timeout(),
            follow_redirects=True,
        ) as resp:
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Retryable(DownloadError(f"HTTP {resp.status_code} from {shown!r}"))
            if resp.status_code != 200:
                raise DownloadError(
                    f"HTTP {resp.status_code} from {shown!r}",
                    hint="check the URL; the server refused or does not have it",
                )
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_size:
                raise DownloadTooLarge(
                    f"{shown!r} announces {int(declared)} bytes, over the "
                    f"{policy.max_size}-byte cap"
                )
            started = clock()
            for chunk in resp.iter_raw():
                size += len(chunk)
                if size > policy.max_size:
                    raise DownloadTooLarge(
                        f"{shown!r} sent more than the {policy.max_size}-byte cap"
                    )
                digest.update(chunk)
                sink.write(chunk)
                elapsed = clock() - started
                if policy.stalled(size, elapsed):
                    raise _Retryable(
                        DownloadError(
                            f"download of {shown!r} stalled: {size} bytes in {elapsed:.0f} s, "
                            f"below {policy.min_rate} bytes/s"
                        )
                    )
            if declared is not None and declared.isdigit() and size != int(declared):
                raise _Retryable(
                    DownloadError(f"download of {shown!r} is truncated: {size} of {declared} bytes")
                )
    except httpx.TimeoutException as exc:
        raise _Retryable(
            DownloadError(f"download of {shown!r} stalled: {type(exc).__name__} after {size} bytes")
        ) from exc
    except httpx.RemoteProtocolError as exc:
        raise _Retryable(
            DownloadError(f"download of {shown!r} is truncated after {size} bytes: {exc}")
        ) from exc
    except httpx.TransportError as exc:
        raise _Retryable(DownloadError(f"cannot fetch {shown!r}: {exc}")) from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"cannot fetch {shown!r}: {exc}") from exc
    return size, digest.digest()


def _run(
    client: httpx.Client,
    url: str,
    open_sink: Callable[[], BinaryIO],
    policy: DownloadPolicy,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> tuple[int, bytes]:
    """Attempts with backoff; ``open_sink`` gives a fresh, empty sink per attempt."""
    parsed = _check_url(url)
    last: DownloadError | None = None
    for attempt in range(policy.retries + 1):
        if attempt:
            sleep(policy.backoff * (2 ** (attempt - 1)))
        sink = open_sink()
        try:
            return _attempt(client, parsed, sink, policy, clock)
        except _Retryable as retry:
            last = retry.error
    assert last is not None
    raise DownloadError(
        f"{last.message} (gave up after {policy.retries + 1} attempts)",
        hint="check the network and the server; the URL did not give a complete body",
    )


def download(
    client: httpx.Client,
    url: str,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    policy: DownloadPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Downloaded:
    """Fetch ``url`` into a new temp file in ``dest_dir``, verified against ``sha256``.

    The returned path is a fresh file that the caller owns (it moves or removes it); on
    any failure no file is left behind. Raises :class:`DownloadError` (and subclasses).
    """
    expected = parse_sha256(sha256) if sha256 is not None else None
    try:
        fd, name = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    except OSError as exc:
        raise DownloadError(
            f"cannot create a download file in {str(dest_dir)!r} for {redact(url)!r}: "
            f"{exc.strerror or exc}"
        ) from exc
    path = Path(name)
    out = os.fdopen(fd, "w+b")

    def fresh() -> BinaryIO:
        out.seek(0)
        out.truncate()
        return out

    try:
        with out:
            size, digest = _run(client, url, fresh, policy, sleep, clock)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and digest != expected:
            raise ChecksumMismatch(
                f"sha256 of {redact(url)!r} is {digest.hex()}, expected {expected.hex()}",
                hint="the file changed or the expected checksum is wrong; do not trust it",
            )
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return Downloaded(url=redact(url), path=path, size=size, sha256=digest.hex())


def fetch_bytes(
    client: httpx.Client,
    url: str,
    *,
    policy: DownloadPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """Fetch a small body (``policy.max_size`` bounds it) into memory, with retries."""
    buffer = io.BytesIO()

    def fresh() -> BinaryIO:
        buffer.seek(0)
        buffer.truncate()
        return buffer

    _run(client, url, fresh, policy, sleep, clock)
    return buffer.getvalue()
