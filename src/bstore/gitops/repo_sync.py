"""Follow the specs repository: fetch the branch tip, check it against policy, export it.

Layout under the profile's gitops directory (``<state>/gitops/<profile>/`` or
``local_path``)::

    repo.git/             bare repository, fetched with forced refspecs (a force-push
                          is followed, never merged)
    checkouts/<commit>/   exported trees (written beside, then renamed into place)
    synced                the commit of the last accepted sync
    sync.lock             held while syncing, so two passes never interleave

A sync fetches (size and time capped by :class:`~bstore.builders.fetch_git.GitLimits`),
resolves ``refs/remotes/origin/<branch>``, applies the policy — a valid SSH or GPG
signature by an allowed key when ``require_signed_commits``; the tip must descend from
the last applied commit unless ``allow_history_rewrite`` — and only then exports the
tree from the object database: no hooks, filters or submodules, and no symlink that
leaves the checkout (checked on the tree before writing, and on the written checkout
by resolving every link). Any failure leaves the previous checkout and ``synced`` as
they were. Signature checks run the real ``ssh-keygen -Y verify`` and ``gpgv`` with
argument lists (never a shell) on the payload pygit2 extracts from the commit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pygit2

from bstore.builders.fetch_git import (
    GitCredentials,
    GitFetcher,
    GitFetchError,
    GitLimits,
    export_tree,
    redact_url,
)
from bstore.errors import BstoreError
from bstore.events import EventBus, default_bus
from bstore.gitops.config import Config

_HEX_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: How long a verification tool may run; they read a few hundred bytes.
_TOOL_SECONDS = 30.0
#: Waiting for another process's sync: a fetch is capped, so this bounds the wait.
_LOCK_POLL = 0.05


class RepoSyncError(BstoreError):
    """The specs repository could not be synced; the previous checkout is kept."""


class RepoUnreachableError(RepoSyncError):
    """The remote could not be fetched (network, credentials, caps)."""

    def __init__(self, message: str, hint: str | None = None, *,
                 previous_commit: str | None = None) -> None:
        super().__init__(message, hint)
        self.previous_commit = previous_commit


class CommitRefusedError(RepoSyncError):
    """The branch tip violates the signature or history policy."""

    def __init__(self, message: str, hint: str | None = None, *, commit: str,
                 reason: str) -> None:
        super().__init__(message, hint)
        self.commit = commit
        self.reason = reason


class UnsafeCheckoutError(RepoSyncError):
    """The tip's tree cannot be exported safely (escaping symlink, bad entry name)."""


@dataclass(frozen=True)
class SyncPolicy:
    """What a tip must satisfy before it is exported."""

    require_signed_commits: bool = False
    allowed_signers: Path | None = None
    gpg_keyring: Path | None = None
    allow_history_rewrite: bool = False

    def __post_init__(self) -> None:
        if self.require_signed_commits and not (self.allowed_signers or self.gpg_keyring):
            raise RepoSyncError(
                "require_signed_commits is set without allowed_signers or gpg_keyring",
                hint="configure an allowed_signers file (SSH) or a gpg_keyring",
            )

    @classmethod
    def from_config(cls, config: Config) -> SyncPolicy:
        """The policy keys of a :class:`~bstore.gitops.config.Config`."""
        return cls(config.require_signed_commits, config.allowed_signers,
                   config.gpg_keyring, config.allow_history_rewrite)


@dataclass(frozen=True)
class SyncResult:
    """The accepted branch tip and where its tree was exported.

    ``changed`` is whether ``commit`` differs from the previously synced commit;
    ``signer`` is ``"ssh:<principal>"`` or ``"gpg:<fingerprint>"`` when verified.
    """

    commit: str
    previous_commit: str | None
    checkout_dir: Path
    changed: bool
    commit_time: datetime
    author: str
    message: str
    signer: str | None = None

    def __post_init__(self) -> None:
        if not _HEX_RE.fullmatch(self.commit):
            raise RepoSyncError(f"commit id {self.commit!r} is not a full hex object id")

    def to_dict(self) -> dict[str, str | bool | None]:
        """JSON-ready form (for ``--json`` status output and events)."""
        return {
            "commit": self.commit, "previous_commit": self.previous_commit,
            "checkout_dir": str(self.checkout_dir), "changed": self.changed,
            "commit_time": self.commit_time.isoformat(), "author": self.author,
            "message": self.message, "signer": self.signer,
        }


class _ProfileFetcher(GitFetcher):
    """A :class:`GitFetcher` whose cache is the profile's fixed ``repo.git``."""

    def __init__(self, repo_dir: Path, credentials: GitCredentials, limits: GitLimits,
                 log: Callable[[str], None]) -> None:
        super().__init__(repo_dir.parent, credentials, limits, log)
        self.repo_dir = repo_dir

    def _cache_repo(self, url: str) -> pygit2.Repository:
        if self.repo_dir.exists():
            return pygit2.Repository(str(self.repo_dir))
        self.repo_dir.parent.mkdir(parents=True, exist_ok=True)
        # Initialised beside and renamed: a crash never leaves a half-made repo.git.
        tmp = self.repo_dir.with_name(f".repo.git.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pygit2.init_repository(str(tmp), bare=True)
        os.rename(tmp, self.repo_dir)
        return pygit2.Repository(str(self.repo_dir))


class RepoSync:
    """Syncs one branch of one repository into one profile's gitops directory."""

    def __init__(
        self,
        url: str,
        branch: str,
        gitops_dir: Path,
        *,
        credentials: GitCredentials | None = None,
        limits: GitLimits | None = None,
        policy: SyncPolicy | None = None,
        events: EventBus | None = None,
        log: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.url = url
        self.branch = branch
        self.gitops_dir = gitops_dir
        self.policy = policy or SyncPolicy()
        self.limits = limits or GitLimits()
        self.events = events or default_bus
        self.log = log
        self._fetcher = _ProfileFetcher(
            gitops_dir / "repo.git", credentials or GitCredentials(), self.limits, log
        )

    @classmethod
    def from_config(
        cls, config: Config, root: Path, *, events: EventBus | None = None,
        log: Callable[[str], None] = lambda _m: None,
    ) -> RepoSync:
        """The sync a configuration describes, under the state directory ``root``."""
        return cls(
            config.repo_url, config.branch, config.gitops_dir(root),
            credentials=config.git.credentials(), limits=config.git.limits(),
            policy=SyncPolicy.from_config(config), events=events, log=log,
        )

    @property
    def _where(self) -> str:
        return f"{redact_url(self.url)} (branch {self.branch})"

    def synced_commit(self) -> str | None:
        """The commit of the last accepted sync, if any (no fetch)."""
        try:
            text = (self.gitops_dir / "synced").read_text().strip()
        except FileNotFoundError:
            return None
        return text if _HEX_RE.fullmatch(text) else None

    def checkout_dir(self, commit: str) -> Path:
        """Where the tree of ``commit`` is (or would be) exported."""
        return self.gitops_dir / "checkouts" / commit

    def sync(self, last_applied: str | None = None) -> SyncResult:
        """Fetch, check the tip against the policy, export it; see the module docstring.

        ``last_applied`` is the commit of the running generation: the tip must descend
        from it unless the policy allows history rewrites.
        """
        started = time.monotonic()
        with self._locked():
            previous = self.synced_commit()
            repo = self._fetch(previous)
            tip_id = self._tip(repo)
            commit = repo[tip_id].peel(pygit2.Commit)
            signer = self._check_policy(repo, commit, last_applied)
            checkout = self.checkout_dir(tip_id)
            if not checkout.is_dir():
                self._export(repo, commit, checkout)
            if previous != tip_id:
                _write_atomic(self.gitops_dir / "synced", tip_id + "\n")
            self._prune({tip_id, previous, last_applied})
        result = SyncResult(
            commit=tip_id,
            previous_commit=previous,
            checkout_dir=checkout,
            changed=previous != tip_id,
            commit_time=datetime.fromtimestamp(commit.commit_time, UTC),
            author=f"{commit.author.name} <{commit.author.email}>",
            message=commit.message.strip(),
            signer=signer,
        )
        self.events.emit(
            "bstore.git.pull", {"duration": (time.monotonic() - started) * 1000.0},
            repo=redact_url(self.url), branch=self.branch, commit=tip_id,
            previous_commit=previous, changed=result.changed,
        )
        return result

    # --- steps ---------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        path = self.gitops_dir / "sync.lock"
        try:
            self.gitops_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RepoSyncError(
                f"cannot use the gitops directory {str(self.gitops_dir)!r}: {exc.strerror}",
                hint="check local_path / --root and its permissions",
            ) from exc
        deadline = time.monotonic() + self.limits.fetch_seconds + 60.0
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise RepoSyncError(f"cannot lock {path}: {exc.strerror}") from exc
                if time.monotonic() > deadline:
                    raise RepoSyncError(
                        f"{path} is still held by another sync",
                        hint="another bstore process is syncing this profile",
                    )
                time.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _fetch(self, previous: str | None) -> pygit2.Repository:
        # libgit2 only checks the caps while data flows; its socket timeouts cover a
        # server that accepts and then says nothing. Process-wide, so only ever lowered.
        cap_ms = int(self.limits.fetch_seconds * 1000)
        for name in ("server_connect_timeout", "server_timeout"):
            current = getattr(pygit2.settings, name)
            if current <= 0 or current > cap_ms:
                setattr(pygit2.settings, name, cap_ms)
        first = not self._has_fetched()
        try:
            if first:
                with self.events.span("bstore.git.clone", underscore=True,
                                      repo=redact_url(self.url), branch=self.branch):
                    return self._fetcher.fetch(self.url)
            return self._fetcher.fetch(self.url)
        except (GitFetchError, OSError) as exc:
            kept = (f"; keeping the checkout of {previous[:12]}" if previous
                    else "; nothing was synced yet")
            reason = exc.message if isinstance(exc, BstoreError) else str(exc)
            raise RepoUnreachableError(
                f"cannot sync {self._where}: {reason}{kept}",
                hint="check repo_url, the network and the git credentials; the running"
                " apps are left as they are",
                previous_commit=previous,
            ) from exc

    def _has_fetched(self) -> bool:
        """Whether repo.git holds a completed fetch (a failed clone leaves it empty)."""
        path = self.gitops_dir / "repo.git"
        if not path.exists():
            return False
        try:
            refs = pygit2.Repository(str(path)).references
            return any(name.startswith("refs/remotes/origin/") for name in refs)
        except pygit2.GitError:
            return False

    def _tip(self, repo: pygit2.Repository) -> str:
        try:
            return GitFetcher.resolve_cached(repo, self.url, self.branch)
        except GitFetchError as exc:
            raise RepoSyncError(
                f"{self._where}: the branch does not exist on the remote",
                hint="check 'branch' in bstore.toml, or push the branch",
            ) from exc

    def _refuse(self, commit: str, reason: str, hint: str) -> CommitRefusedError:
        self.events.emit("bstore.git.refused", repo=redact_url(self.url),
                         branch=self.branch, commit=commit, reason=reason)
        return CommitRefusedError(
            f"refusing commit {commit} of {self._where}: {reason}",
            hint=hint + "; the running generation is kept", commit=commit, reason=reason,
        )

    def _check_policy(self, repo: pygit2.Repository, commit: pygit2.Commit,
                      last_applied: str | None) -> str | None:
        tip = str(commit.id)
        signer = None
        if self.policy.require_signed_commits:
            try:
                signer = verify_signature(commit, self.policy)
            except SignatureError as exc:
                raise self._refuse(tip, exc.message, exc.hint or "sign the commit") from exc
        rewrite = (last_applied is not None and last_applied != tip
                   and not _is_descendant(repo, tip, last_applied))
        if rewrite and not self.policy.allow_history_rewrite:
            raise self._refuse(
                tip,
                f"it does not descend from the last applied commit {last_applied}"
                " (history was rewritten, or an older state was pushed)",
                "push a commit on top of the applied one, or set"
                " allow_history_rewrite = true to accept it",
            )
        if rewrite:
            self.log(f"git: {tip[:12]} rewrites history after {last_applied}; allowed")
        return signer

    def _export(self, repo: pygit2.Repository, commit: pygit2.Commit, dest: Path) -> None:
        tip = str(commit.id)
        where = f"{redact_url(self.url)}@{tip[:12]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{tip[:12]}-", dir=dest.parent))
        tmp.rmdir()  # export_tree creates the directory itself
        try:
            tree = commit.peel(pygit2.Tree)
            export_tree(repo, tree, tmp, where, self.limits, self.log)
            os.rename(tmp, dest)
        except GitFetchError as exc:
            raise UnsafeCheckoutError(
                f"{exc.message}; keeping the previous checkout",
                hint=exc.hint or "fix the tree in the repository and push again",
            ) from exc
        except OSError as exc:
            raise UnsafeCheckoutError(
                f"{where}: cannot export the tree: {exc}; keeping the previous checkout",
                hint="the tree has entries git itself would not write; fix the repository",
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, keep: set[str | None]) -> None:
        """Remove old checkouts (and temp dirs of crashed syncs; we hold the lock)."""
        root = self.gitops_dir / "checkouts"
        if not root.is_dir():
            return
        for entry in root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)


# --- tree safety ---------------------------------------------------------------------


def _is_descendant(repo: pygit2.Repository, tip: str, ancestor: str) -> bool:
    try:
        if repo.get(ancestor) is None:
            return False  # not even in our copy: nothing proves the tip descends from it
        return bool(repo.descendant_of(tip, ancestor))
    except (ValueError, KeyError, pygit2.GitError):
        return False


# --- signatures ----------------------------------------------------------------------


class SignatureError(RepoSyncError):
    """A commit signature that is missing, invalid or by a key that is not allowed."""


def _run(argv: list[str], stdin: bytes | None, env: dict[str, str]) -> tuple[int, str]:
    """Run a verification tool (argv list, never a shell); returns (rc, output)."""
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, timeout=_TOOL_SECONDS, env=env,
            check=False,
        )
    except FileNotFoundError as exc:
        package = "openssh-client" if argv[0] == "ssh-keygen" else "gnupg"
        raise SignatureError(
            f"{argv[0]} is not installed, so the signature cannot be verified",
            hint=f"install {package}",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SignatureError(f"{argv[0]} did not finish within {_TOOL_SECONDS:g} s") from exc
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return proc.returncode, output


def _tool_env(home: Path) -> dict[str, str]:
    # A fixed, minimal environment: the user's GNUPGHOME or agent plays no part.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
            "GNUPGHOME": str(home), "HOME": str(home)}


def verify_signature(commit: pygit2.Commit, policy: SyncPolicy) -> str:
    """Verify ``commit``'s signature against the policy; returns the signer.

    SSH signatures are checked with ``ssh-keygen -Y verify`` against the
    ``allowed_signers`` file, as the committer's e-mail; GPG signatures with ``gpgv``
    against ``gpg_keyring`` (every key in it is trusted). Raises :class:`SignatureError`.
    """
    signature, payload = commit.gpg_signature
    if not signature or payload is None:
        raise SignatureError("the commit is not signed",
                             hint="sign commits (git commit -S) with an allowed key")
    with tempfile.TemporaryDirectory(prefix="bstore-verify-") as tmp:
        home = Path(tmp)
        sig_file = home / "commit.sig"
        sig_file.write_bytes(signature)
        if signature.startswith(b"-----BEGIN SSH SIGNATURE-----"):
            return _verify_ssh(commit, policy, sig_file, payload, home)
        if signature.startswith(b"-----BEGIN PGP SIGNATURE-----"):
            return _verify_gpg(policy, sig_file, payload, home)
    raise SignatureError("the commit carries a signature of an unsupported kind (x509?)",
                         hint="sign with an SSH or GPG key")


def _verify_ssh(commit: pygit2.Commit, policy: SyncPolicy, sig_file: Path, payload: bytes,
                home: Path) -> str:
    allowed = policy.allowed_signers
    if allowed is None:
        raise SignatureError("the commit has an SSH signature but no allowed_signers"
                             " file is configured", hint="set allowed_signers")
    email = commit.committer.email
    env = _tool_env(home)
    rc, output = _run(
        ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", email, "-n", "git",
         "-s", str(sig_file)], payload, env,
    )
    match = re.search(r'Good "git" signature for (.+?) with', output)
    if rc == 0 and match:
        return f"ssh:{match.group(1)}"
    # Say *why*: a key allowed for someone else, or a key not allowed at all.
    rc2, found = _run(["ssh-keygen", "-Y", "find-principals", "-f", str(allowed),
                       "-s", str(sig_file)], None, env)
    if rc2 == 0 and found.strip():
        principals = ", ".join(found.split())
        reason = (f"its SSH signature is by a key allowed for {principals}, not for the"
                  f" committer {email!r}")
    else:
        detail = output.strip().splitlines()[-1] if output.strip() else f"exit {rc}"
        reason = (f"its SSH signature is not by a key in {str(allowed)!r} for"
                  f" {email!r} ({detail})")
    raise SignatureError(reason, hint=f"add the signer's key to {allowed} for {email}")


def _verify_gpg(policy: SyncPolicy, sig_file: Path, payload: bytes, home: Path) -> str:
    keyring = policy.gpg_keyring
    if keyring is None:
        raise SignatureError("the commit has a GPG signature but no gpg_keyring is"
                             " configured", hint="set gpg_keyring")
    env = _tool_env(home)
    ring = keyring.absolute()
    if keyring.read_bytes()[:64].lstrip().startswith(b"-----BEGIN PGP"):
        # gpgv reads binary keyrings only; de-armor an exported ASCII keyring first.
        ring = home / "keyring.gpg"
        rc, output = _run(["gpg", "--batch", "--homedir", str(home), "--dearmor",
                           "--output", str(ring), str(keyring)], None, env)
        if rc != 0:
            raise SignatureError(f"gpg_keyring {str(keyring)!r} is not a valid keyring:"
                                 f" {output.strip()}")
    data_file = home / "commit.payload"
    data_file.write_bytes(payload)
    rc, output = _run(["gpgv", "--homedir", str(home), "--status-fd", "1",
                       "--keyring", str(ring), str(sig_file), str(data_file)], None, env)
    status = {line.split()[1]: line for line in output.splitlines()
              if line.startswith("[GNUPG:] ") and len(line.split()) > 1}
    bad = [k for k in ("BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG") if k in status]
    if rc == 0 and "VALIDSIG" in status and "GOODSIG" in status and not bad:
        return "gpg:" + status["VALIDSIG"].split()[2]
    if "NO_PUBKEY" in status or "ERRSIG" in status:
        reason = f"its GPG signature is by a key that is not in {str(keyring)!r}"
    elif bad:
        reason = f"its GPG signature is not valid ({bad[0]})"
    else:
        reason = f"its GPG signature could not be verified (gpgv exit {rc})"
    raise SignatureError(reason, hint=f"add the signer's public key to {keyring}")


def _write_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename, fsync the directory: a crash leaves old or new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
