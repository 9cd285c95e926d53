"""Downloads against a real local HTTP server that misbehaves on purpose."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import httpx
import pytest
from localhttp import LocalServer, Route

from bstore.builders.download import (
    ChecksumMismatch,
    DownloadError,
    DownloadPolicy,
    DownloadTooLarge,
    download,
    fetch_bytes,
    parse_sha256,
    redact,
)

BODY = b"release tarball bytes\n" * 1000
SHA = hashlib.sha256(BODY).hexdigest()
# Short timeouts keep the hostile cases fast; no test asserts on how long anything took.
FAST = DownloadPolicy(connect_timeout=2, read_timeout=0.5, retries=1, backoff=0.0)


def no_sleep(_: float) -> None:
    return


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    "expected",
    [
        SHA,
        SHA.upper(),
        "sha256:" + SHA,
        base64.b64encode(bytes.fromhex(SHA)).decode(),
        "sha256-" + base64.b64encode(bytes.fromhex(SHA)).decode(),
        base64.urlsafe_b64encode(bytes.fromhex(SHA)).decode().rstrip("="),
    ],
    ids=["hex", "HEX", "prefixed-hex", "base64", "sri", "base64url"],
)
def test_download_verifies_sha256_in_any_spelling(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path, expected: str
) -> None:
    local_server.routes["/r.tar.gz"] = Route(BODY)
    got = download(http_client, local_server.url("/r.tar.gz"), tmp_path, sha256=expected)
    assert got.path.parent == tmp_path
    assert got.path.read_bytes() == BODY
    assert (got.size, got.sha256) == (len(BODY), SHA)


@pytest.mark.parametrize("bad", ["", "abc", "z" * 64, "sha256-" + "A" * 10])
def test_unusable_expected_sha256_is_refused(bad: str) -> None:
    with pytest.raises(DownloadError, match="neither 64 hex digits nor base64"):
        parse_sha256(bad)


def test_wrong_sha256_leaves_no_file(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    local_server.routes["/r.tar.gz"] = Route(BODY)
    url = local_server.url("/r.tar.gz")
    with pytest.raises(ChecksumMismatch) as info:
        download(http_client, url, tmp_path, sha256="0" * 64, policy=FAST, sleep=no_sleep)
    assert url in info.value.message
    assert f"is {SHA}, expected {'0' * 64}" in info.value.message
    assert local_server.routes["/r.tar.gz"].hits == 1  # a mismatch is not retried
    assert leftovers(tmp_path) == []


def test_transient_503_is_retried(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    local_server.routes["/flaky"] = Route(BODY, fail_first=2)
    policy = DownloadPolicy(retries=2, backoff=0.0)
    slept: list[float] = []
    got = download(
        http_client,
        local_server.url("/flaky"),
        tmp_path,
        sha256=SHA,
        policy=policy,
        sleep=slept.append,
    )
    assert got.path.read_bytes() == BODY
    assert local_server.routes["/flaky"].hits == 3
    assert len(slept) == 2


def test_backoff_doubles(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    local_server.routes["/down"] = Route(b"", fail_first=100)
    slept: list[float] = []
    policy = DownloadPolicy(retries=3, backoff=0.25)
    with pytest.raises(DownloadError, match=r"HTTP 503 from .*/down.*gave up after 4 attempts"):
        download(
            http_client, local_server.url("/down"), tmp_path, policy=policy, sleep=slept.append
        )
    assert slept == [0.25, 0.5, 1.0]
    assert leftovers(tmp_path) == []


HOSTILE = [
    ("stall", Route(BODY, behaviour="stall"), "stalled: ReadTimeout"),
    ("truncated", Route(BODY[:100], behaviour="truncate"), "is truncated"),
    ("not-found", Route(b"nope", status=404), "HTTP 404 from"),
    ("forbidden", Route(b"nope", status=403), "HTTP 403 from"),
]


@pytest.mark.parametrize(
    ("route", "message"), [(r, m) for _, r, m in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_servers_fail_clearly(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path, route: Route, message: str
) -> None:
    local_server.routes["/x.tar"] = route
    url = local_server.url("/x.tar")
    with pytest.raises(DownloadError) as info:
        download(http_client, url, tmp_path, sha256=SHA, policy=FAST, sleep=no_sleep)
    assert message in info.value.message
    assert repr(url) in info.value.message
    assert leftovers(tmp_path) == []


def test_client_errors_are_not_retried(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    local_server.routes["/gone"] = Route(b"", status=410)
    with pytest.raises(DownloadError, match="HTTP 410"):
        download(http_client, local_server.url("/gone"), tmp_path, policy=FAST, sleep=no_sleep)
    assert local_server.routes["/gone"].hits == 1


def test_slow_drip_is_a_stall(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    # Each byte arrives before the read timeout, so only the throughput floor catches it.
    local_server.routes["/drip"] = Route(BODY, behaviour="drip")
    policy = DownloadPolicy(read_timeout=5, retries=0, min_rate=1000, rate_window=0.5)
    with pytest.raises(DownloadError, match=r"stalled: \d+ bytes in \d+ s, below 1000 bytes/s"):
        download(http_client, local_server.url("/drip"), tmp_path, policy=policy)
    assert leftovers(tmp_path) == []


def test_endless_body_stops_at_the_cap(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    local_server.routes["/endless"] = Route(behaviour="endless")
    policy = DownloadPolicy(max_size=1024 * 1024, retries=2)
    with pytest.raises(DownloadTooLarge, match="sent more than the 1048576-byte cap"):
        download(http_client, local_server.url("/endless"), tmp_path, policy=policy)
    assert local_server.routes["/endless"].hits == 1  # too large is final
    assert leftovers(tmp_path) == []


def test_announced_size_over_cap_is_refused_before_reading(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    local_server.routes["/big"] = Route(b"x" * 5000)
    with pytest.raises(DownloadTooLarge, match="announces 5000 bytes, over the 4096-byte cap"):
        download(
            http_client, local_server.url("/big"), tmp_path, policy=DownloadPolicy(max_size=4096)
        )


def test_redirects_are_followed(
    local_server: LocalServer, http_client: httpx.Client, tmp_path: Path
) -> None:
    local_server.routes["/real"] = Route(BODY)
    local_server.routes["/moved"] = Route(status=302, behaviour="redirect", location="/real")
    got = download(http_client, local_server.url("/moved"), tmp_path, sha256=SHA)
    assert got.path.read_bytes() == BODY


def test_connection_refused_names_the_url(http_client: httpx.Client, tmp_path: Path) -> None:
    # Port 9 on loopback (discard) is closed on any sane test machine.
    url = "http://127.0.0.1:9/x.tar.gz"
    with pytest.raises(DownloadError, match=r"cannot fetch 'http://127\.0\.0\.1:9/x\.tar\.gz'"):
        download(http_client, url, tmp_path, policy=FAST, sleep=no_sleep)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{base}/a;touch {canary}", "HTTP 404"),
        ("{base}/$(touch {canary})", "HTTP 404"),
        ("{base}/`touch {canary}`|sh", "HTTP 404"),
        ("http://127.0.0.1;touch {canary}/x", "invalid URL"),
        ("file:///etc/passwd", "only http:// and https://"),
        ("ftp://127.0.0.1/x", "only http:// and https://"),
        ("-o/tmp/x http://127.0.0.1/", "unsupported URL|invalid URL"),
    ],
)
def test_shell_metacharacters_are_just_bad_urls(
    local_server: LocalServer,
    http_client: httpx.Client,
    tmp_path: Path,
    template: str,
    message: str,
) -> None:
    canary = tmp_path / "canary"
    work = tmp_path / "work"
    work.mkdir()
    url = template.format(base=local_server.base_url, canary=canary)
    with pytest.raises(DownloadError, match=message):
        download(http_client, url, work, policy=FAST, sleep=no_sleep)
    assert not canary.exists()
    assert leftovers(work) == []


def test_credentials_are_redacted_in_errors(http_client: httpx.Client, tmp_path: Path) -> None:
    url = "http://user:s3cret@127.0.0.1:9/x"
    assert redact(url) == "http://127.0.0.1:9/x"
    with pytest.raises(DownloadError) as info:
        download(http_client, url, tmp_path, policy=FAST, sleep=no_sleep)
    assert "s3cret" not in info.value.message
    assert "127.0.0.1:9/x" in info.value.message


def test_fetch_bytes_returns_the_body(local_server: LocalServer, http_client: httpx.Client) -> None:
    local_server.routes["/names"] = Route(b"abc", fail_first=1)
    policy = DownloadPolicy(backoff=0.0)
    assert fetch_bytes(http_client, local_server.url("/names"), policy=policy) == b"abc"
    local_server.routes["/big"] = Route(behaviour="endless")
    with pytest.raises(DownloadTooLarge):
        fetch_bytes(http_client, local_server.url("/big"), policy=DownloadPolicy(max_size=100))


def test_missing_destination_directory(http_client: httpx.Client, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"cannot create a download file in .*nowhere"):
        download(http_client, "http://127.0.0.1:9/x", tmp_path / "nowhere")
