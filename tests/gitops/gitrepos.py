"""Real git repositories for gitops tests: an upstream bare repo and a work clone.

Everything goes through the real ``git`` (and ``ssh-keygen`` / ``gpg`` for signing) with
an isolated environment: no user or system git config, a private HOME and GNUPGHOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pygit2


def isolated_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment where git reads no user or system configuration."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "Alice Author",
        "GIT_AUTHOR_EMAIL": "alice@example.org",
        "GIT_COMMITTER_NAME": "Alice Author",
        "GIT_COMMITTER_EMAIL": "alice@example.org",
    }
    env.update(extra or {})
    return env


class GitRemote:
    """``upstream.git`` (what bstore fetches) and ``work`` (where tests commit)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.upstream = root / "upstream.git"
        self.work = root / "work"
        self.env = isolated_env(root / "home")
        self.git("init", "-q", "--bare", "-b", "main", str(self.upstream), cwd=root)
        self.git("init", "-q", "-b", "main", str(self.work), cwd=root)
        self.git("remote", "add", "origin", str(self.upstream))

    @property
    def url(self) -> str:
        """The ``file://`` URL bstore is pointed at."""
        return self.upstream.as_uri()

    def git(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            check: bool = True) -> str:
        """Run real git in the work tree; returns stdout."""
        proc = subprocess.run(
            ["git", *args], cwd=cwd or self.work, env={**self.env, **(env or {})},
            capture_output=True, text=True, check=False, timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def write(self, files: Mapping[str, str | None]) -> None:
        """Write (or delete, for ``None``) files of the work tree."""
        for rel, text in files.items():
            path = self.work / rel
            if text is None:
                path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def commit(self, files: Mapping[str, str | None], message: str = "change", *,
               sign: bool = False, env: Mapping[str, str] | None = None) -> str:
        """Write files, commit everything (signed with ``-S`` if asked), return the id."""
        self.write(files)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message,
                 *(["-S"] if sign else ["--no-gpg-sign"]), env=env)
        return self.head()

    def symlink(self, rel: str, target: str, message: str = "link") -> str:
        """Commit a symlink ``rel -> target`` (git stores any target it is given)."""
        path = self.work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        return self.commit({}, message)

    def head(self) -> str:
        """The work tree's HEAD commit id."""
        return self.git("rev-parse", "HEAD").strip()

    def push(self, *, force: bool = False) -> None:
        """Push main to the upstream."""
        self.git("push", "-q", *(["--force"] if force else []), "origin", "main")

    def commit_raw_tree(self, entries: list[tuple[int, bytes, bytes]], message: str) -> str:
        """Commit a hand-made tree straight into the upstream (bypassing git's checks).

        ``entries`` are (mode, name, blob content) in the given order, written as a raw
        tree object; the upstream's ``main`` is moved to the new commit.
        """
        repo = pygit2.Repository(str(self.upstream))
        raw = b""
        for mode, name, content in entries:
            blob = repo.create_blob(content)
            raw += b"%o %s\0" % (mode, name) + blob.raw
        tree = repo.odb.write(pygit2.enums.ObjectType.TREE, raw)
        sig = pygit2.Signature("Mallory", "mallory@example.org")
        ref = repo.references.get("refs/heads/main")
        parents = [ref.target] if ref is not None else []
        commit = repo.create_commit(None, sig, sig, message, tree, parents)
        repo.references.create("refs/heads/main", commit, force=True)
        return str(commit)


def have(tool: str) -> bool:
    """Whether ``tool`` is on PATH."""
    return shutil.which(tool) is not None


class SshKey:
    """An ed25519 key made with the real ``ssh-keygen``."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.private = directory / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                        "-f", str(self.private)], check=True, capture_output=True, timeout=30)
        self.public = directory / f"{name}.pub"

    def allowed_line(self, principal: str) -> str:
        """An allowed_signers line giving this key to ``principal`` for git."""
        kind, blob = self.public.read_text().split()[:2]
        return f'{principal} namespaces="git" {kind} {blob}\n'

    def git_env(self) -> dict[str, str]:
        """Environment that makes ``git commit -S`` sign with this key."""
        return {"GIT_CONFIG_COUNT": "2",
                "GIT_CONFIG_KEY_0": "gpg.format", "GIT_CONFIG_VALUE_0": "ssh",
                "GIT_CONFIG_KEY_1": "user.signingkey", "GIT_CONFIG_VALUE_1": str(self.private)}


class GpgKey:
    """An ed25519 OpenPGP key made with real ``gpg --quick-gen-key`` in its own home."""

    def __init__(self, home: Path, uid: str) -> None:
        self.home = home
        env = self.env()
        subprocess.run(
            ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
             "--quick-gen-key", uid, "ed25519", "sign", "never"],
            env=env, check=True, capture_output=True, timeout=60,
        )
        listing = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], env=env,
                                 check=True, capture_output=True, text=True, timeout=30)
        self.fingerprint = next(
            line.split(":")[9] for line in listing.stdout.splitlines()
            if line.startswith("fpr:")
        )

    def env(self) -> dict[str, str]:
        """GNUPGHOME for this key."""
        return {"GNUPGHOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def export(self, dest: Path, *, armor: bool) -> Path:
        """Write the public key (ASCII-armored or binary) to ``dest``."""
        proc = subprocess.run(
            ["gpg", "--batch", *(["--armor"] if armor else []), "--export", self.fingerprint],
            env=self.env(), check=True, capture_output=True, timeout=30,
        )
        dest.write_bytes(proc.stdout)
        return dest

    def git_env(self) -> dict[str, str]:
        """Environment that makes ``git commit -S`` sign with this key."""
        return {"GNUPGHOME": str(self.home), "GIT_CONFIG_COUNT": "2",
                "GIT_CONFIG_KEY_0": "gpg.format", "GIT_CONFIG_VALUE_0": "openpgp",
                "GIT_CONFIG_KEY_1": "user.signingkey", "GIT_CONFIG_VALUE_1": self.fingerprint}

    def close(self) -> None:
        """Stop this home's gpg-agent and remove the home."""
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                       capture_output=True, check=False, timeout=30)
        shutil.rmtree(self.home, ignore_errors=True)


@contextmanager
def gpg_key(uid: str) -> Iterator[GpgKey]:
    """A throw-away GPG key. Its home is short and under /tmp because gpg-agent's socket
    path must fit in 108 bytes, which pytest's tmp_path does not guarantee."""
    home = Path(tempfile.mkdtemp(prefix="bsg-", dir="/tmp"))
    home.chmod(0o700)
    key = GpgKey(home, uid)
    try:
        yield key
    finally:
        key.close()
