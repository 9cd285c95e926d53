"""The git fetcher (and repo sync) over real network transports with credentials.

Servers run on 127.0.0.1 with random ports (see gitservers.py): the real
``git http-backend`` behind basic auth (plain HTTP and HTTPS with a CA made here), and a
real OpenSSH ``sshd`` with its own host key, plus a real ``ssh-agent``. Every failure
must name the (redacted) URL and say what is wrong, and no secret may appear in a
message, a ``repr``, a chained exception, a log line or the fetch cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pygit2
import pytest
from gitservers import (
    SmartHttpServer,
    SshAgent,
    SshServer,
    TestCA,
    have_sshd,
    make_key,
)

from bstore.builders.fetch_git import GitCredentials, GitFetcher, GitFetchError, redact_url
from bstore.gitops.config import ConfigError, load_config
from bstore.gitops.repo_sync import RepoSync, RepoUnreachableError

TOKEN = "tok-7f3a9c1e5b2d4f60"
WRONG_TOKEN = "tok-wrong-0123456789"
PASSPHRASE = "pass-4e8d2a71"
GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
}

needs_https = pytest.mark.skipif(
    not pygit2.features & pygit2.enums.Feature.HTTPS,
    reason="this pygit2 wheel's libgit2 was built without HTTPS support",
)
needs_ssh = pytest.mark.skipif(
    not pygit2.features & pygit2.enums.Feature.SSH or not have_sshd(),
    reason="needs libgit2 with SSH support and /usr/sbin/sshd (apt-get install openssh-server)",
)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


@dataclass(frozen=True)
class Repos:
    """``root/specs.git`` with a branch ``main``, a tag ``v1`` (older) and ``dev``."""

    root: Path
    bare: Path
    main: str
    v1: str
    dev: str


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Repos:
    root = tmp_path_factory.mktemp("served")
    bare = root / "specs.git"
    work = root / "work"
    git(root, "init", "-q", "--bare", "-b", "main", str(bare))
    git(root, "init", "-q", "-b", "main", str(work))
    (work / "apps").mkdir()
    (work / "apps" / "demo.config").write_text("version 1\n")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "one")
    git(work, "tag", "v1")
    v1 = git(work, "rev-parse", "HEAD")
    (work / "apps" / "demo.config").write_text("version 2\n")
    git(work, "commit", "-qam", "two")
    main = git(work, "rev-parse", "HEAD")
    git(work, "checkout", "-q", "-b", "dev", v1)
    (work / "dev.txt").write_text("dev\n")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "dev")
    dev = git(work, "rev-parse", "HEAD")
    git(work, "push", "-q", str(bare), "main", "dev", "v1")
    return Repos(root, bare, main, v1, dev)


class Logs:
    """The fetcher's log callback, kept for secret checks."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


def assert_no_secret(secret: str, *, exc: BaseException | None = None,
                     logs: Logs | None = None, caplog: pytest.LogCaptureFixture | None = None,
                     cache: Path | None = None) -> None:
    """``secret`` is nowhere: not in any exception of the chain, a log, or the cache."""
    seen: BaseException | None = exc
    while seen is not None:
        hint = getattr(seen, "hint", None) or ""
        assert secret not in str(seen) and secret not in repr(seen) and secret not in hint
        seen = seen.__cause__ or seen.__context__
    for line in logs.lines if logs else []:
        assert secret not in line
    if caplog is not None:
        assert secret not in caplog.text
    if cache is not None and cache.exists():
        for path in cache.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def check_resolves(fetcher: GitFetcher, url: str, repos: Repos, tmp_path: Path) -> None:
    """Branch, tag, commit and the default branch resolve; the tag's tree exports."""
    assert fetcher.resolve(url, "main") == repos.main
    assert fetcher.resolve(url, "v1") == repos.v1
    assert fetcher.resolve(url, "dev") == repos.dev
    assert fetcher.resolve(url, repos.dev) == repos.dev
    assert fetcher.resolve(url, None) == repos.main
    out = tmp_path / "export"
    fetcher.export(url, repos.v1, out)
    assert (out / "apps" / "demo.config").read_text() == "version 1\n"
    assert sorted(p.name for p in out.iterdir()) == ["apps"]


# --- smart HTTP with a token -------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(repos: Repos) -> Iterator[SmartHttpServer]:
    with SmartHttpServer(repos.root, TOKEN) as server:
        yield server


def test_http_token_from_env_resolves_and_exports(
    http_server: SmartHttpServer, repos: Repos, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("BSTORE_TEST_GIT_TOKEN", TOKEN)
    logs = Logs()
    fetcher = GitFetcher(tmp_path / "cache", GitCredentials(token_env="BSTORE_TEST_GIT_TOKEN"),
                         log=logs)
    before = http_server.denied
    check_resolves(fetcher, http_server.url("specs.git"), repos, tmp_path)
    assert http_server.denied > before  # the server really demanded the token
    assert logs.lines and all("127.0.0.1" in line for line in logs.lines)
    assert_no_secret(TOKEN, logs=logs, caplog=caplog, cache=tmp_path / "cache")


@pytest.mark.parametrize(
    ("case", "env_value", "token_env", "userinfo", "expected"),
    [
        ("wrong token", WRONG_TOKEN, "BSTORE_TEST_GIT_TOKEN", "",
         "the server refused the token from $BSTORE_TEST_GIT_TOKEN"),
        ("token variable unset", None, "BSTORE_TEST_GIT_TOKEN", "",
         "asks for a token but the environment variable BSTORE_TEST_GIT_TOKEN is not set"),
        ("token variable empty", "", "BSTORE_TEST_GIT_TOKEN", "",
         "asks for a token but the environment variable BSTORE_TEST_GIT_TOKEN is not set"),
        ("nothing configured", None, None, "",
         "asks for credentials and none are configured"),
        ("wrong token in the URL", None, None, f"x-access-token:{WRONG_TOKEN}",
         "refused the credentials in the URL"),
        ("wrong bare token as URL user", None, None, WRONG_TOKEN,
         "refused the credentials in the URL"),
    ],
)
def test_http_bad_credentials_fail_clearly_without_leaking(
    http_server: SmartHttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, case: str, env_value: str | None,
    token_env: str | None, userinfo: str, expected: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    if env_value is None:
        monkeypatch.delenv("BSTORE_TEST_GIT_TOKEN", raising=False)
    else:
        monkeypatch.setenv("BSTORE_TEST_GIT_TOKEN", env_value)
    logs = Logs()
    fetcher = GitFetcher(tmp_path / "cache", GitCredentials(token_env=token_env), log=logs)
    url = http_server.url("specs.git", userinfo)
    with pytest.raises(GitFetchError) as info:
        fetcher.resolve(url, "main")
    message = info.value.message
    assert expected in message, case
    assert f"http://127.0.0.1:{http_server.port}/specs.git" in message
    assert info.value.hint
    for secret in (WRONG_TOKEN, TOKEN):
        assert_no_secret(secret, exc=info.value, logs=logs, caplog=caplog,
                         cache=tmp_path / "cache")
    assert not any(secret in line for line in http_server.requests
                   for secret in (TOKEN, WRONG_TOKEN))


def test_token_in_url_is_redacted_everywhere(
    http_server: SmartHttpServer, repos: Repos, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = http_server.url("specs.git", f"x-access-token:{TOKEN}")
    assert redact_url(url) == f"http://127.0.0.1:{http_server.port}/specs.git"
    logs = Logs()
    fetcher = GitFetcher(tmp_path / "cache", log=logs)
    assert fetcher.resolve(url, "v1") == repos.v1
    fetcher.export(url, repos.v1, tmp_path / "out")
    assert logs.lines
    with pytest.raises(GitFetchError) as info:
        fetcher.resolve(url, "no-such-branch")
    assert "has no branch or tag named 'no-such-branch'" in info.value.message
    assert_no_secret(TOKEN, exc=info.value, logs=logs, caplog=caplog, cache=tmp_path / "cache")


# --- HTTPS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def https_server(repos: Repos, https_ca: TestCA) -> Iterator[SmartHttpServer]:
    with SmartHttpServer(repos.root, TOKEN, tls=https_ca.server_context()) as server:
        yield server


@needs_https
def test_https_untrusted_certificate_is_refused_before_credentials(
    repos: Repos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A CA of its own, never given to libgit2 (the trust store only ever grows).
    other = TestCA(tmp_path / "other-ca", name="untrusted test CA")
    monkeypatch.setenv("BSTORE_TEST_GIT_TOKEN", TOKEN)
    with SmartHttpServer(repos.root, TOKEN, tls=other.server_context()) as server:
        fetcher = GitFetcher(tmp_path / "cache",
                             GitCredentials(token_env="BSTORE_TEST_GIT_TOKEN"))
        with pytest.raises(GitFetchError) as info:
            fetcher.resolve(server.url("specs.git"), "main")
        assert server.requests == []  # TLS failed: no request, so no token, was sent
    assert info.value.message == (
        f"the TLS certificate of 127.0.0.1 (https://127.0.0.1:{server.port}/specs.git)"
        " is not trusted; refusing to connect"
    )
    assert "ca_bundle" in (info.value.hint or "")
    assert_no_secret(TOKEN, exc=info.value)


@needs_https
def test_https_trusted_through_configured_ca_bundle(
    https_server: SmartHttpServer, https_ca: TestCA, repos: Repos, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("BSTORE_TEST_GIT_TOKEN", TOKEN)
    creds = GitCredentials(token_env="BSTORE_TEST_GIT_TOKEN", ca_bundle=https_ca.ca_file)
    logs = Logs()
    fetcher = GitFetcher(tmp_path / "cache", creds, log=logs)
    check_resolves(fetcher, https_server.url("specs.git"), repos, tmp_path)
    assert_no_secret(TOKEN, logs=logs, caplog=caplog, cache=tmp_path / "cache")


@needs_https
def test_https_bad_ca_bundle_is_an_error_naming_it(
    https_server: SmartHttpServer, tmp_path: Path,
) -> None:
    bundle = tmp_path / "not-a-ca.pem"
    bundle.write_text("this is not PEM\n")
    fetcher = GitFetcher(tmp_path / "cache", GitCredentials(ca_bundle=bundle))
    with pytest.raises(GitFetchError) as info:
        fetcher.resolve(https_server.url("specs.git"), "main")
    assert f"CA bundle {str(bundle)!r} cannot be loaded" in info.value.message


@needs_https
def test_https_trusted_through_ssl_cert_file(
    https_server: SmartHttpServer, https_ca: TestCA, repos: Repos, tmp_path: Path,
) -> None:
    # SSL_CERT_FILE is read when pygit2 is imported, so this runs in a fresh process.
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from bstore.builders.fetch_git import GitCredentials, GitFetcher\n"
        "f = GitFetcher(Path(sys.argv[1]), GitCredentials(token_env='BSTORE_TEST_GIT_TOKEN'))\n"
        "print(f.resolve(sys.argv[2], 'main'))\n"
    )
    env = {**os.environ, "SSL_CERT_FILE": str(https_ca.ca_file),
           "BSTORE_TEST_GIT_TOKEN": TOKEN}
    env.pop("SSL_CERT_DIR", None)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"),
                           https_server.url("specs.git")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repos.main
    assert TOKEN not in proc.stdout + proc.stderr


# --- ssh -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshSetup:
    server: SshServer
    key: Path
    locked_key: Path
    other_key: Path
    known_hosts: Path
    url: str


@pytest.fixture(scope="module")
def ssh(repos: Repos, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshSetup]:
    if not have_sshd() or not pygit2.features & pygit2.enums.Feature.SSH:
        pytest.skip("needs libgit2 with SSH support and /usr/sbin/sshd")
    base = tmp_path_factory.mktemp("ssh")
    key = make_key(base / "keys" / "id_ok")
    locked = make_key(base / "keys" / "id_locked", passphrase=PASSPHRASE)
    other = make_key(base / "keys" / "id_other")  # not authorised
    with SshServer(base / "sshd", [key, locked]) as server:
        known = base / "known_hosts"
        known.write_text(server.known_hosts_line())
        yield SshSetup(server, key, locked, other, known, server.url(repos.bare))


def key_creds(ssh: SshSetup, key: Path, **extra: object) -> GitCredentials:
    return GitCredentials(ssh_key=key, ssh_public_key=Path(f"{key}.pub"),
                          known_hosts=ssh.known_hosts, **extra)  # type: ignore[arg-type]


@needs_ssh
def test_ssh_key_file_from_config(ssh: SshSetup, repos: Repos, tmp_path: Path) -> None:
    logs = Logs()
    fetcher = GitFetcher(tmp_path / "cache", key_creds(ssh, ssh.key), log=logs)
    check_resolves(fetcher, ssh.url, repos, tmp_path)
    assert f"ssh://{ssh.server.user}@127.0.0.1:{ssh.server.port}" in logs.lines[0]


@needs_ssh
def test_ssh_url_without_user_takes_the_configured_username(
    ssh: SshSetup, repos: Repos, tmp_path: Path,
) -> None:
    url = f"ssh://127.0.0.1:{ssh.server.port}{repos.bare}"
    fetcher = GitFetcher(tmp_path / "cache", key_creds(ssh, ssh.key, username=ssh.server.user))
    assert fetcher.resolve(url, "dev") == repos.dev


@needs_ssh
def test_ssh_key_with_passphrase_from_env(
    ssh: SshSetup, repos: Repos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("BSTORE_TEST_SSH_PASS", PASSPHRASE)
    logs = Logs()
    creds = key_creds(ssh, ssh.locked_key, ssh_passphrase_env="BSTORE_TEST_SSH_PASS")
    fetcher = GitFetcher(tmp_path / "cache", creds, log=logs)
    assert fetcher.resolve(ssh.url, "main") == repos.main
    assert_no_secret(PASSPHRASE, logs=logs, caplog=caplog, cache=tmp_path / "cache")
    # Without the passphrase the key cannot be used: a clear, bounded failure.
    monkeypatch.setenv("BSTORE_TEST_SSH_PASS", "not-the-passphrase")
    with pytest.raises(GitFetchError) as info:
        GitFetcher(tmp_path / "cache2", creds).resolve(ssh.url, "main")
    assert info.value.message == (
        f"authentication to {redact_url(ssh.url)} failed: the server refused the ssh key"
        f" {str(ssh.locked_key)!r}, or its passphrase from $BSTORE_TEST_SSH_PASS is wrong"
        " (3 attempts)"
    )
    assert_no_secret(PASSPHRASE, exc=info.value)
    assert_no_secret("not-the-passphrase", exc=info.value)


@needs_ssh
def test_ssh_agent(ssh: SshSetup, repos: Repos, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    agent = SshAgent()
    try:
        agent.add(ssh.other_key)  # tried first and refused; the agent then offers the next
        agent.add(ssh.key)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent.socket))
        fetcher = GitFetcher(tmp_path / "cache", GitCredentials(known_hosts=ssh.known_hosts))
        check_resolves(fetcher, ssh.url, repos, tmp_path)
    finally:
        agent.close()
    assert agent.proc.poll() is not None


@needs_ssh
@pytest.mark.parametrize("via", ["key file", "ssh-agent"])
def test_ssh_wrong_key_fails_after_bounded_attempts(
    ssh: SshSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str,
) -> None:
    agent = SshAgent() if via == "ssh-agent" else None
    log_start = len(ssh.server.log.read_text())
    try:
        if agent is not None:
            agent.add(ssh.other_key)
            monkeypatch.setenv("SSH_AUTH_SOCK", str(agent.socket))
            creds = GitCredentials(known_hosts=ssh.known_hosts)
        else:
            creds = key_creds(ssh, ssh.other_key)
        with pytest.raises(GitFetchError) as info:
            GitFetcher(tmp_path / "cache", creds).resolve(ssh.url, "main")
    finally:
        if agent is not None:
            agent.close()
    refused = (f"the ssh key {str(ssh.other_key)!r}" if via == "key file"
               else "every key ssh-agent offered")
    assert info.value.message == (
        f"authentication to {redact_url(ssh.url)} failed: the server refused {refused}"
        " (3 attempts)"
    )
    # Bounded by us, not by the server's MaxAuthTries (10): three refusals, then stop.
    log = ssh.server.log.read_text()[log_start:]
    assert log.count("Failed publickey") == 3, log


@needs_ssh
@pytest.mark.parametrize("case", ["empty file", "other port", "other key", "not configured"])
def test_ssh_unknown_host_key_is_refused(
    ssh: SshSetup, tmp_path: Path, case: str,
) -> None:
    known = tmp_path / "known_hosts"
    line = ssh.server.known_hosts_line()
    forged = make_key(tmp_path / "forged")
    known.write_text({
        "empty file": "",
        "other port": line.replace(f":{ssh.server.port} ", f":{ssh.server.port + 1} "),
        "other key": line.split()[0] + " " + " ".join(
            Path(f"{forged}.pub").read_text().split()[:2]) + "\n",
        "not configured": "",
    }[case])
    creds = GitCredentials(ssh_key=ssh.key,
                           known_hosts=None if case == "not configured" else known)
    log_start = len(ssh.server.log.read_text())
    with pytest.raises(GitFetchError) as info:
        GitFetcher(tmp_path / "cache", creds).resolve(ssh.url, "main")
    assert "publickey" not in ssh.server.log.read_text()[log_start:]  # no key was offered
    listed = "~/.ssh/known_hosts" if case == "not configured" else repr(str(known))
    assert info.value.message == (
        f"the ssh host key of 127.0.0.1:{ssh.server.port} ({redact_url(ssh.url)}) is not"
        f" listed in {listed} (unknown host, or its key changed); refusing to connect"
    )
    assert "known_hosts" in (info.value.hint or "")


# --- repo sync with credentials from the configuration -----------------------------------


@pytest.mark.parametrize("key", ["known_hosts", "ca_bundle"])
def test_config_trust_files_must_exist(tmp_path: Path, key: str) -> None:
    config_file = tmp_path / "bstore.toml"
    config_file.write_text(f'repo_url = "https://example.invalid/x.git"\n\n[git]\n'
                           f'{key} = "missing.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_file, env={})
    assert info.value.message == (
        f"config key 'git.{key}' in {config_file}: file"
        f" {str(tmp_path / 'missing.pem')!r} does not exist"
    )
    (tmp_path / "missing.pem").write_text("x\n")
    git = load_config(config_file, env={}).git.credentials()
    assert getattr(git, key) == tmp_path / "missing.pem"


@pytest.mark.parametrize("transport", [
    pytest.param("ssh", marks=needs_ssh), pytest.param("https", marks=needs_https),
])
def test_repo_sync_from_config_with_credentials(
    request: pytest.FixtureRequest, repos: Repos, tmp_path: Path, transport: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    if transport == "ssh":
        ssh: SshSetup = request.getfixturevalue("ssh")
        url = ssh.url
        trust = f'known_hosts = "{ssh.known_hosts}"\n'
        secret = f'ssh_key = "{ssh.key}"\n'
    else:
        server: SmartHttpServer = request.getfixturevalue("https_server")
        ca: TestCA = request.getfixturevalue("https_ca")
        url = server.url("specs.git")
        trust = f'ca_bundle = "{ca.ca_file}"\n'
        secret = 'token_env = "BSTORE_TEST_GIT_TOKEN"\n'
    monkeypatch.setenv("BSTORE_TEST_GIT_TOKEN", TOKEN)
    config_file = tmp_path / "bstore.toml"
    config_file.write_text(f'repo_url = "{url}"\nbranch = "main"\n\n[git]\n{trust}{secret}')
    config = load_config(config_file, env={})
    logs = Logs()
    sync = RepoSync.from_config(config, tmp_path / "state", log=logs)
    result = sync.sync()
    assert result.commit == repos.main and result.changed
    assert (result.checkout_dir / "apps" / "demo.config").read_text() == "version 2\n"
    assert sync.synced_commit() == repos.main
    assert_no_secret(TOKEN, logs=logs, caplog=caplog, cache=tmp_path / "state")
    # The same configuration without its credentials cannot reach the repository.
    config_file.write_text(f'repo_url = "{url}"\n\n[git]\n{trust}')
    bare = load_config(config_file, env={})
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # no agent to fall back on
    with pytest.raises(RepoUnreachableError) as info:
        RepoSync.from_config(bare, tmp_path / "state2").sync()
    assert f"cannot sync {redact_url(url)} (branch main)" in info.value.message
    assert_no_secret(TOKEN, exc=info.value)
