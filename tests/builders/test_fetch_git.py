"""The git fetcher against real repositories made with the git command."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pygit2
import pytest

from bstore.builders.fetch_git import (
    GitFetcher,
    GitFetchError,
    GitLimits,
    redact_url,
    validate_url,
)

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=GIT_ENV
    ).stdout.strip()


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "src").mkdir()
    (repo / "src" / "a.erl").write_text("-module(a).\n")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    os.symlink("src/a.erl", repo / "link")
    # A filter that would run if we checked out through git: it must never run.
    (repo / ".gitattributes").write_text("*.erl filter=evil\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    git(repo, "tag", "v1")
    return repo


def fetcher(tmp_path: Path, **limits: int) -> GitFetcher:
    return GitFetcher(tmp_path / "cache", limits=GitLimits(**limits))  # type: ignore[arg-type]


def test_branch_tag_and_commit_resolve_and_export(upstream: Path, tmp_path: Path) -> None:
    url = f"file://{upstream}"
    f = fetcher(tmp_path)
    head = git(upstream, "rev-parse", "HEAD")
    assert f.resolve(url, "main") == head
    assert f.resolve(url, "v1") == head
    assert f.resolve(url, head) == head
    assert f.resolve(url, None) == head
    out = tmp_path / "out"
    f.export(url, head, out)
    assert (out / "src" / "a.erl").read_text() == "-module(a).\n"
    assert os.access(out / "run.sh", os.X_OK)
    assert os.readlink(out / "link") == "src/a.erl"
    assert not (out / ".git").exists()
    assert sorted(p.name for p in out.iterdir()) == [".gitattributes", "link", "run.sh", "src"]


def test_force_push_is_followed(upstream: Path, tmp_path: Path) -> None:
    url = f"file://{upstream}"
    f = fetcher(tmp_path)
    first = f.resolve(url, "main")
    git(upstream, "checkout", "-q", "--orphan", "rewrite")
    git(upstream, "commit", "-qm", "rewritten", "--allow-empty")
    git(upstream, "branch", "-f", "main", "rewrite")
    rewritten = git(upstream, "rev-parse", "main")
    assert rewritten != first
    assert f.resolve(url, "main") == rewritten


def test_escaping_symlink_is_rejected(upstream: Path, tmp_path: Path) -> None:
    os.symlink("../../etc/passwd", upstream / "src" / "evil")
    git(upstream, "add", "-A")
    git(upstream, "commit", "-qm", "evil")
    url = f"file://{upstream}"
    f = fetcher(tmp_path)
    commit = f.resolve(url, "main")
    expected = re.escape("'src/evil' -> '../../etc/passwd' points outside")
    with pytest.raises(GitFetchError, match=expected):
        f.export(url, commit, tmp_path / "out")


def test_submodule_is_not_fetched(upstream: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    git(other, "commit", "-qm", "x", "--allow-empty")
    sub_commit = git(other, "rev-parse", "HEAD")
    git(upstream, "update-index", "--add", "--cacheinfo", f"160000,{sub_commit},vendor/sub")
    git(upstream, "commit", "-qm", "submodule")
    url = f"file://{upstream}"
    logs: list[str] = []
    f = GitFetcher(tmp_path / "cache", log=logs.append)
    f.export(url, f.resolve(url, "main"), tmp_path / "out")
    assert list((tmp_path / "out" / "vendor" / "sub").iterdir()) == []
    assert any("submodule vendor/sub not fetched" in line for line in logs)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", "has no branch or tag named 'nope'"),
        ("main; rm -rf /", "'main; rm -rf /' for file://"),
        ("$(touch /tmp/pwned)", "'$(touch /tmp/pwned)' for file://"),
        ("v1;id", "has no branch or tag named 'v1;id'"),
        ("a..b", "is not a valid name"),
        ("-x", "is not valid"),
        ("0" * 40, "is not reachable from any branch or tag"),
    ],
)
def test_bad_refs(upstream: Path, tmp_path: Path, ref: str, message: str) -> None:
    with pytest.raises(GitFetchError) as info:
        fetcher(tmp_path).resolve(f"file://{upstream}", ref)
    assert message in info.value.message
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(
    "url",
    ["", "-oProxyCommand=x", "ext::sh -c touch% /tmp/pwned", "ftp://x/y", "file:///a\nb", "; ls"],
)
def test_bad_urls_are_refused_before_any_io(url: str) -> None:
    with pytest.raises(GitFetchError):
        validate_url(url)


def test_unreachable_remote(tmp_path: Path) -> None:
    with pytest.raises(GitFetchError, match="cannot fetch file://") as info:
        fetcher(tmp_path).resolve(f"file://{tmp_path}/missing", "main")
    assert info.value.hint


def test_tokens_are_redacted() -> None:
    assert redact_url("https://user:s3cret@host.invalid/r.git") == "https://host.invalid/r.git"
    assert "s3cret" not in redact_url("https://s3cret@host.invalid/r")
    assert redact_url("file:///x") == "file:///x"
    assert redact_url("ssh://git@host.invalid/r") == "ssh://git@host.invalid/r"


def test_export_size_cap(upstream: Path, tmp_path: Path) -> None:
    url = f"file://{upstream}"
    f = fetcher(tmp_path, export_bytes=5)
    with pytest.raises(GitFetchError, match="larger than 5"):
        f.export(url, f.resolve(url, "main"), tmp_path / "out")


def _raw_commit(upstream: Path, entries: list[tuple[int, bytes, bytes]]) -> None:
    """Commit a hand-made tree (bypassing git's own checks) as the new ``main``."""
    repo = pygit2.Repository(str(upstream))
    raw = b""
    for mode, name, content in entries:
        raw += b"%o %s\0" % (mode, name) + repo.create_blob(content).raw
    tree = repo.odb.write(pygit2.enums.ObjectType.TREE, raw)
    sig = pygit2.Signature("Mallory", "mallory@example.invalid")
    head = repo.references["refs/heads/main"].target
    commit = repo.create_commit(None, sig, sig, "crafted", tree, [head])
    repo.references.create("refs/heads/main", commit, force=True)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        # l -> . and y -> l/.. each look harmless; together y is the parent of the tree,
        # and a blob named "y/x" would be written through it.
        ([(0o120000, b"l", b"."), (0o120000, b"y", b"l/.."), (0o100644, b"y/x", b"pwn")],
         "has a '/' in its name"),
        ([(0o120000, b"l", b"."), (0o120000, b"y", b"l/..")], "points outside the tree"),
        ([(0o120000, b"a", b"x"), (0o100644, b"a", b"second")], "appears twice"),
        ([(0o100644, b"..", b"x")], "'.' or '..' component"),
        ([(0o100644, b".git", b"x")], "'.git' entry"),
    ],
)
def test_crafted_trees_are_refused(
    upstream: Path, tmp_path: Path, entries: list[tuple[int, bytes, bytes]], message: str
) -> None:
    _raw_commit(upstream, entries)
    url = f"file://{upstream}"
    f = fetcher(tmp_path)
    commit = f.resolve(url, "main")
    out = tmp_path / "exports" / "out"
    out.parent.mkdir()
    with pytest.raises(GitFetchError) as info:
        f.export(url, commit, out)
    assert message in info.value.message
    assert list(out.parent.iterdir()) == []
    assert not (out.parent / "x").exists()
