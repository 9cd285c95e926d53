"""Fetch git sources with pygit2: resolve a ref to a commit, export its tree.

Each remote URL gets one bare cache repository (named by the blake3 of the URL), fetched
into on every resolve so branches follow force-pushes. The export writes blob contents
straight from the object database: no hooks, no filters (no smudge, no line-ending
conversion), no submodules are ever run, and no shell is involved at any point. The
source identity is the commit id.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable
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


class GitFetchError(BstoreError):
    """A git source that cannot be fetched, resolved or exported."""


@dataclass(frozen=True)
class GitCredentials:
    """Where credentials come from; never printed or logged.

    ``token_env`` names an environment variable holding an HTTPS token (used as the
    password, with ``username`` or ``x-access-token``); ``ssh_key`` is a private key
    file; otherwise ssh-agent is asked for ssh URLs.
    """

    username: str | None = None
    ssh_key: Path | None = None
    ssh_public_key: Path | None = None
    ssh_passphrase_env: str | None = None
    token_env: str | None = None


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


class _Callbacks(pygit2.RemoteCallbacks):
    """Credentials plus the time and size caps, enforced from the progress callback."""

    def __init__(self, url: str, creds: GitCredentials, limits: GitLimits) -> None:
        super().__init__()
        self._url = url
        self._creds = creds
        self._limits = limits
        self._started = time.monotonic()
        self._asked = 0

    def credentials(
        self, url: str, username_from_url: str | None, allowed: pygit2.enums.CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair:
        # libgit2 keeps asking while authentication fails; stop after a few tries so
        # a wrong key is an error, not a loop.
        self._asked += 1
        if self._asked > 3:
            raise GitFetchError(f"authentication to {redact_url(self._url)} failed")
        creds = self._creds
        user = creds.username or username_from_url or "git"
        if allowed & pygit2.enums.CredentialType.USERPASS_PLAINTEXT and creds.token_env:
            token = os.environ.get(creds.token_env)
            if token:
                return pygit2.UserPass(creds.username or "x-access-token", token)
        if allowed & pygit2.enums.CredentialType.SSH_KEY:
            if creds.ssh_key:
                passphrase = os.environ.get(creds.ssh_passphrase_env or "", "")
                public = str(creds.ssh_public_key) if creds.ssh_public_key else None
                return pygit2.Keypair(user, public, str(creds.ssh_key), passphrase)
            return pygit2.KeypairFromAgent(user)
        raise GitFetchError(
            f"{redact_url(self._url)} asks for credentials and none are configured",
            hint="configure an ssh key, ssh-agent, or a token environment variable",
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
        try:
            remote.fetch(
                # Forced refspecs: a force-pushed branch replaces our copy, never merges.
                ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"],
                callbacks=_Callbacks(url, self.credentials, self.limits),
                prune=pygit2.enums.FetchPrune.PRUNE,
            )
        except GitFetchError:
            raise
        except (pygit2.GitError, KeyError, OSError, ValueError) as exc:
            message = str(exc).replace(url, redact_url(url))
            raise GitFetchError(
                f"cannot fetch {redact_url(url)}: {message}",
                hint="check the URL, the network and the credentials",
            ) from exc
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
        try:
            heads = remote.list_heads(callbacks=_Callbacks(url, self.credentials, self.limits))
        except (pygit2.GitError, OSError) as exc:
            raise GitFetchError(f"cannot list refs of {redact_url(url)}: {exc}") from exc
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
