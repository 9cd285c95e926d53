"""Fetch git sources with pygit2: resolve a ref to a commit, export its tree.

Each remote URL gets one bare cache repository (named by the blake3 of the URL), fetched
into on every resolve so branches follow force-pushes. The export writes blob contents
straight from the object database: no hooks, no filters (no smudge, no line-ending
conversion), no submodules are ever run, and no shell is involved at any point. The
source identity is the commit id.

Servers must prove who they are: an https certificate must chain to the system CA store
(``SSL_CERT_FILE`` at start-up) or to a configured ``ca_bundle``; an ssh host key must be
listed in the configured ``known_hosts`` file, else in ``~/.ssh/known_hosts``. Unknown
servers are refused before any credential is sent.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import blake3
import pygit2

from bstore.errors import BstoreError
from bstore.store.manifest import InvalidTreeError, validate_entry_path
from bstore.store.symlinks import find_escaping_link, symlink_escapes

#: A 40-hex (SHA-1) or 64-hex (SHA-256) object id given as a ref is taken as a commit.
_COMMIT_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_ALLOWED_SCHEMES = ("file", "https", "http", "ssh", "git+ssh")
#: git tree entry modes (git stores only these; anything else is a corrupt tree).
_MODE_TREE, _MODE_BLOB, _MODE_EXEC, _MODE_LINK, _MODE_COMMIT = (
    0o040000, 0o100644, 0o100755, 0o120000, 0o160000,
)
#: libgit2 reads ssh known_hosts only from ``<its home dir>/.ssh/known_hosts``, and
#: that home dir is process-wide: ssh connections hold this lock while it may be swapped.
_SSH_HOME_LOCK = threading.Lock()
#: CA bundles already added to libgit2's (process-wide, additive) OpenSSL trust store.
_LOADED_CA_BUNDLES: set[Path] = set()


class GitFetchError(BstoreError):
    """A git source that cannot be fetched, resolved or exported."""


@dataclass(frozen=True)
class GitCredentials:
    """Where credentials come from, and which servers are trusted; never printed or logged.

    ``token_env`` names an environment variable holding an HTTPS token (used as the
    password, with ``username`` or ``x-access-token``); ``ssh_key`` is a private key
    file (its passphrase in the variable ``ssh_passphrase_env``); otherwise ssh-agent
    (``SSH_AUTH_SOCK``) is asked for ssh URLs. ``known_hosts`` replaces
    ``~/.ssh/known_hosts`` for ssh host keys; ``ca_bundle`` (PEM) is trusted for https
    in addition to the system CAs (process-wide, as libgit2's TLS store is).
    """

    username: str | None = None
    ssh_key: Path | None = None
    ssh_public_key: Path | None = None
    ssh_passphrase_env: str | None = None
    token_env: str | None = None
    known_hosts: Path | None = None
    ca_bundle: Path | None = None


@dataclass(frozen=True)
class GitLimits:
    """Caps on what one fetch and one export may cost."""

    fetch_seconds: float = 600.0
    fetch_bytes: int = 2 << 30
    export_bytes: int = 2 << 30
    export_entries: int = 200_000


def redact_url(url: str) -> str:
    """``url`` without any user-info password or token, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    # Over http(s) a bare user part is often the token itself; ssh user names are kept.
    keep_user = parts.scheme in ("ssh", "git+ssh") and parts.password is None
    user = f"{parts.username}@" if parts.username and keep_user else ""
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, ""))


def validate_url(url: str) -> str:
    """Accept ``file://``, ``http(s)://``, ``ssh://`` and scp-style ``user@host:path``."""
    if not url or "\0" in url or "\n" in url or url.startswith("-"):
        raise GitFetchError(f"git URL {redact_url(url)!r} is not valid")
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in _ALLOWED_SCHEMES:
        return url
    if not scheme and re.fullmatch(r"[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]+", url):
        return url
    raise GitFetchError(
        f"git URL {redact_url(url)!r} has an unsupported transport",
        hint="use file://, https://, ssh:// or user@host:path",
    )


def _is_ssh(url: str) -> bool:
    return urlsplit(url).scheme in ("ssh", "git+ssh") if "://" in url else True


@contextmanager
def _trust(url: str, creds: GitCredentials) -> Iterator[None]:
    """Make the configured CA bundle / known_hosts file the ones libgit2 checks."""
    if creds.ca_bundle is not None and creds.ca_bundle not in _LOADED_CA_BUNDLES:
        try:
            pygit2.settings.set_ssl_cert_locations(str(creds.ca_bundle), None)
        except pygit2.GitError as exc:
            raise GitFetchError(
                f"CA bundle {str(creds.ca_bundle)!r} cannot be loaded: {exc}",
                hint="give a PEM file of CA certificates",
            ) from exc
        _LOADED_CA_BUNDLES.add(creds.ca_bundle)
    if not _is_ssh(url):
        yield
        return
    with _SSH_HOME_LOCK:
        if creds.known_hosts is None:
            yield
            return
        try:
            hosts = creds.known_hosts.read_bytes()
        except OSError as exc:
            raise GitFetchError(
                f"known_hosts file {str(creds.known_hosts)!r} cannot be read: {exc.strerror}",
                hint="fix git.known_hosts",
            ) from exc
        previous = pygit2.option(pygit2.enums.Option.GET_HOMEDIR)
        with tempfile.TemporaryDirectory(prefix="bstore-ssh-home-") as home:
            (Path(home) / ".ssh").mkdir()
            (Path(home) / ".ssh" / "known_hosts").write_bytes(hosts)
            pygit2.option(pygit2.enums.Option.SET_HOMEDIR, home)
            try:
                yield
            finally:
                pygit2.option(pygit2.enums.Option.SET_HOMEDIR, previous)


class _Callbacks(pygit2.RemoteCallbacks):
    """Credentials plus the time and size caps, enforced from the progress callback."""

    def __init__(self, url: str, creds: GitCredentials, limits: GitLimits) -> None:
        super().__init__()
        self._url = url
        self._creds = creds
        self._limits = limits
        self._started = time.monotonic()
        self._asked = 0
        self._offered = "credentials"

    def credentials(
        self, url: str, username_from_url: str | None, allowed: pygit2.enums.CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair:
        kinds = pygit2.enums.CredentialType
        creds = self._creds
        user = creds.username or username_from_url or "git"
        if allowed == kinds.USERNAME:
            return pygit2.Username(user)  # ssh asks for the user name before the key
        # libgit2 asks again each time the server refuses what we gave; the same
        # credentials will not succeed later, so a few refusals end the fetch.
        self._asked += 1
        if self._asked > 3:
            raise GitFetchError(
                f"authentication to {redact_url(self._url)} failed: the server refused"
                f" {self._offered} ({self._asked - 1} attempts)",
                hint="check the token, key or ssh-agent configured for git",
            )
        if allowed & kinds.USERPASS_PLAINTEXT and creds.token_env:
            token = os.environ.get(creds.token_env)
            if token:
                self._offered = f"the token from ${creds.token_env}"
                return pygit2.UserPass(creds.username or "x-access-token", token)
            if not allowed & kinds.SSH_KEY:
                raise GitFetchError(
                    f"{redact_url(self._url)} asks for a token but the environment"
                    f" variable {creds.token_env} is not set",
                    hint=f"export {creds.token_env}=<token> for the bstore process",
                )
        if allowed & kinds.SSH_KEY:
            if creds.ssh_key:
                passphrase = os.environ.get(creds.ssh_passphrase_env or "", "")
                public = str(creds.ssh_public_key) if creds.ssh_public_key else None
                self._offered = f"the ssh key {str(creds.ssh_key)!r}"
                if creds.ssh_passphrase_env:
                    # libssh2 reports a wrong passphrase as a refused key, so say both.
                    self._offered += (f", or its passphrase from ${creds.ssh_passphrase_env}"
                                      " is wrong")
                return pygit2.Keypair(user, public, str(creds.ssh_key), passphrase)
            self._offered = "every key ssh-agent offered"
            return pygit2.KeypairFromAgent(user)
        parts = urlsplit(self._url)
        if self._asked == 1 and (parts.password or parts.username):
            raise GitFetchError(
                f"{redact_url(self._url)} refused the credentials in the URL",
                hint="put the token in an environment variable (git.token_env) instead",
            )
        raise GitFetchError(
            f"{redact_url(self._url)} asks for credentials and none are configured",
            hint="configure an ssh key, ssh-agent, or a token environment variable",
        )

    def failure(self, action: str, exc: Exception) -> GitFetchError:
        """``exc`` from libgit2 as an error naming the redacted URL (and what was refused)."""
        where = redact_url(self._url)
        message = str(exc).replace(self._url, where)
        if self._asked and "authentication" in message.lower():
            return GitFetchError(
                f"authentication to {where} failed: the server refused {self._offered}"
                f" ({message})",
                hint="check the token, key or ssh-agent configured for git",
            )
        return GitFetchError(f"cannot {action} {where}: {message}",
                             hint="check the URL, the network and the credentials")

    def certificate_check(self, certificate: None, valid: bool, host: bytes) -> bool:
        """Accept only what libgit2 verified: a trusted TLS chain, a known ssh host key.

        pygit2 would otherwise accept any ssh host key; raising (rather than
        returning False) gives the caller a message saying what to configure.
        """
        if valid:
            return True
        name = host.decode("utf-8", "replace")
        where = redact_url(self._url)
        if _is_ssh(self._url):
            listed = (repr(str(self._creds.known_hosts)) if self._creds.known_hosts
                      else "~/.ssh/known_hosts")
            port = urlsplit(self._url).port if "://" in self._url else None
            raise GitFetchError(
                f"the ssh host key of {name}{f':{port}' if port else ''} ({where}) is not"
                f" listed in {listed} (unknown host, or its key changed); refusing to connect",
                hint="verify the server's host key and add it to the known_hosts file"
                " (git.known_hosts)",
            )
        raise GitFetchError(
            f"the TLS certificate of {name} ({where}) is not trusted; refusing to connect",
            hint="add the CA that signed it as git.ca_bundle (PEM), or set SSL_CERT_FILE",
        )

    def transfer_progress(self, stats: pygit2.remotes.TransferProgress) -> None:
        if time.monotonic() - self._started > self._limits.fetch_seconds:
            raise GitFetchError(
                f"fetching {redact_url(self._url)} took longer than"
                f" {self._limits.fetch_seconds:.0f} s"
            )
        if stats.received_bytes > self._limits.fetch_bytes:
            raise GitFetchError(
                f"fetching {redact_url(self._url)} exceeded {self._limits.fetch_bytes} bytes"
            )


class GitFetcher:
    """Resolves refs and exports trees, caching one bare repository per URL."""

    def __init__(
        self,
        cache_dir: Path,
        credentials: GitCredentials | None = None,
        limits: GitLimits | None = None,
        log: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.cache_dir = cache_dir
        self.credentials = credentials or GitCredentials()
        self.limits = limits or GitLimits()
        self.log = log

    def _cache_repo(self, url: str) -> pygit2.Repository:
        path = self.cache_dir / (blake3.blake3(url.encode()).hexdigest()[:32] + ".git")
        if path.exists():
            return pygit2.Repository(str(path))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Initialise beside it and rename, so a concurrent process never sees a half repo.
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        pygit2.init_repository(str(tmp), bare=True)
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        return pygit2.Repository(str(path))

    def fetch(self, url: str) -> pygit2.Repository:
        """Fetch every branch and tag of ``url`` into its cache repository."""
        validate_url(url)
        repo = self._cache_repo(url)
        remote = repo.remotes.create_anonymous(url)
        self.log(f"git: fetching {redact_url(url)}")
        callbacks = _Callbacks(url, self.credentials, self.limits)
        try:
            with _trust(url, self.credentials):
                remote.fetch(
                    # Forced refspecs: a force-pushed branch replaces our copy, never merges.
                    ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"],
                    callbacks=callbacks,
                    prune=pygit2.enums.FetchPrune.PRUNE,
                )
        except GitFetchError:
            raise
        except (pygit2.GitError, KeyError, OSError, ValueError) as exc:
            raise callbacks.failure("fetch", exc) from exc
        return repo

    def resolve(self, url: str, ref: str | None) -> str:
        """Fetch ``url`` and return the commit id ``ref`` names (default: remote HEAD)."""
        repo = self.fetch(url)
        if ref is None:
            return self._default_branch_commit(repo, url)
        if "\0" in ref or "\n" in ref or ref.startswith("-") or not ref:
            raise GitFetchError(f"git ref {ref!r} for {redact_url(url)} is not valid")
        if _COMMIT_RE.fullmatch(ref):
            try:
                obj = repo.get(ref)
            except ValueError:
                obj = None
            if obj is None:
                raise GitFetchError(
                    f"commit {ref} is not reachable from any branch or tag of"
                    f" {redact_url(url)}",
                    hint="push the commit to a branch or tag, or fix the ref",
                )
            return str(obj.peel(pygit2.Commit).id)
        for candidate in (f"refs/remotes/origin/{ref}", f"refs/tags/{ref}"):
            if not pygit2.reference_is_valid_name(candidate):
                raise GitFetchError(f"git ref {ref!r} for {redact_url(url)} is not a valid name")
            reference = repo.references.get(candidate)
            if reference is not None:
                return str(reference.peel(pygit2.Commit).id)
        raise GitFetchError(
            f"{redact_url(url)} has no branch or tag named {ref!r}",
            hint="check the ref in the spec (a branch, a tag or a full commit id)",
        )

    def _default_branch_commit(self, repo: pygit2.Repository, url: str) -> str:
        remote = repo.remotes.create_anonymous(url)
        callbacks = _Callbacks(url, self.credentials, self.limits)
        try:
            with _trust(url, self.credentials):
                heads = remote.list_heads(callbacks=callbacks)
        except GitFetchError:
            raise
        except (pygit2.GitError, OSError) as exc:
            raise callbacks.failure("list refs of", exc) from exc
        for head in heads:
            if head.name == "HEAD" and head.symref_target:
                branch = head.symref_target.removeprefix("refs/heads/")
                return self.resolve_cached(repo, url, branch)
        raise GitFetchError(
            f"{redact_url(url)} has no default branch", hint="give a ref in the spec"
        )

    @staticmethod
    def resolve_cached(repo: pygit2.Repository, url: str, branch: str) -> str:
        """Commit of ``branch`` in an already fetched cache repository."""
        reference = repo.references.get(f"refs/remotes/origin/{branch}")
        if reference is None:
            raise GitFetchError(f"{redact_url(url)} has no branch {branch!r}")
        return str(reference.peel(pygit2.Commit).id)

    def export(self, url: str, commit: str, dest: Path) -> None:
        """Write the tree of ``commit`` (already fetched) into the new directory ``dest``."""
        repo = self._cache_repo(url)
        try:
            tree = repo[commit].peel(pygit2.Tree)
        except (KeyError, ValueError) as exc:
            raise GitFetchError(f"commit {commit} of {redact_url(url)} is not fetched") from exc
        export_tree(repo, tree, dest, f"{redact_url(url)}@{commit[:12]}", self.limits, self.log)


def export_tree(
    repo: pygit2.Repository,
    tree: pygit2.Tree,
    dest: Path,
    where: str,
    limits: GitLimits,
    log: Callable[[str], None] = lambda _m: None,
) -> None:
    """Write ``tree`` into ``dest`` from the object database, checking every entry.

    Entry names with ``/`` or appearing twice in one directory (git never writes
    either; a crafted tree can hold them) are refused, so every file is written into a
    directory this function created and never through a symlink; after writing, every
    symlink is resolved and must stay inside ``dest`` (catching chains of links).
    """
    dest.mkdir()
    try:
        links = _write_tree(repo, tree, dest, where, limits, log)
        escaping = find_escaping_link(links)
        if escaping is not None:
            link, target, why = escaping
            raise GitFetchError(
                f"{where}: symlink {link.decode('utf-8', 'replace')!r} ->"
                f" {target.decode('utf-8', 'replace')!r} {why}",
                hint="sources may only contain symlinks that stay inside them",
            )
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise GitFetchError(
            f"{where}: cannot export the tree: {exc}",
            hint="the tree has entries git itself would not write; fix the repository",
        ) from exc
    except BaseException:
        # Nothing half-exported is left for a caller to mistake for a source tree.
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _write_tree(
    repo: pygit2.Repository,
    tree: pygit2.Tree,
    dest: Path,
    where: str,
    limits: GitLimits,
    log: Callable[[str], None],
) -> dict[bytes, bytes]:
    """Write the tree; return its symlinks (path → target) for the containment check."""
    links: dict[bytes, bytes] = {}
    total = 0
    count = 0
    stack: list[tuple[pygit2.Tree, bytes]] = [(tree, b"")]
    while stack:
        current, prefix = stack.pop()
        seen: set[bytes] = set()
        for entry in current:
            name = _entry_name(entry)
            rel = prefix + b"/" + name if prefix else name
            if b"/" in name or name in seen:
                problem = "has a '/' in its name" if b"/" in name else "appears twice"
                raise GitFetchError(
                    f"{where}: tree entry {rel.decode('utf-8', 'replace')!r} {problem}",
                    hint="the repository was crafted by hand; fix it and push again",
                )
            seen.add(name)
            try:
                validate_entry_path(rel)
            except InvalidTreeError as exc:
                raise GitFetchError(f"{where}: {exc.message}") from exc
            if name == b".git" or name.lower() == b".git":
                raise GitFetchError(f"{where}: the tree contains a '.git' entry at {rel!r}")
            count += 1
            if count > limits.export_entries:
                raise GitFetchError(f"{where}: more than {limits.export_entries} entries")
            target = os.path.join(os.fsencode(dest), rel)
            mode = entry.filemode
            if mode == _MODE_TREE:
                os.mkdir(target)
                stack.append((repo[entry.id].peel(pygit2.Tree), rel))
            elif mode in (_MODE_BLOB, _MODE_EXEC):
                data = _blob_data(repo, entry)
                total += len(data)
                if total > limits.export_bytes:
                    raise GitFetchError(f"{where}: tree is larger than {limits.export_bytes} B")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o755 if mode == _MODE_EXEC else 0o644)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            elif mode == _MODE_LINK:
                link = _blob_data(repo, entry)
                if symlink_escapes(rel, link):
                    raise GitFetchError(
                        f"{where}: symlink {rel.decode('utf-8', 'replace')!r} -> "
                        f"{link.decode('utf-8', 'replace')!r} points outside the source tree",
                        hint="sources may only contain symlinks that stay inside them",
                    )
                links[rel] = link
                os.symlink(link, target)
            elif mode == _MODE_COMMIT:
                # Submodules are never fetched (they would run another fetch from a URL
                # the spec did not name); git itself leaves an empty directory there.
                log(f"{where}: submodule {rel.decode('utf-8', 'replace')} not fetched")
                os.mkdir(target)
            else:
                raise GitFetchError(
                    f"{where}: entry {rel!r} has unknown mode {stat.filemode(mode)}"
                )
    return links


def _entry_name(entry: pygit2.Object) -> bytes:
    # raw_name keeps names that are not valid UTF-8 exactly as git stored them.
    raw = getattr(entry, "raw_name", None)
    if isinstance(raw, bytes):
        return raw
    return (entry.name or "").encode("utf-8", "surrogateescape")


def _blob_data(repo: pygit2.Repository, entry: pygit2.Object) -> bytes:
    blob = repo.get(entry.id)
    if not isinstance(blob, pygit2.Blob):
        raise GitFetchError(f"git object {entry.id} is not a blob")
    return blob.data
