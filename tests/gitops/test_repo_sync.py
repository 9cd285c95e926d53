"""Repo sync against real git repositories in temp dirs (and real ssh-keygen / gpg)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pygit2
import pytest
from gitrepos import GitRemote, GpgKey, SshKey, gpg_key, have

from bstore.builders.fetch_git import GitLimits
from bstore.events import Event, EventBus
from bstore.gitops.config import Config
from bstore.gitops.repo_sync import (
    CommitRefusedError,
    RepoSync,
    RepoSyncError,
    RepoUnreachableError,
    SyncPolicy,
    UnsafeCheckoutError,
)

SPEC = '#{name => demo, version => "1.0.0"}.\n'


@pytest.fixture
def remote(tmp_path: Path) -> GitRemote:
    remote = GitRemote(tmp_path / "remote")
    remote.commit({"apps/demo/app.config": SPEC}, "first")
    remote.push()
    return remote


@pytest.fixture
def bus() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.attach("*", seen.append)
    return bus, seen


def make_sync(remote: GitRemote, tmp_path: Path, policy: SyncPolicy | None = None,
              bus: EventBus | None = None, url: str | None = None) -> RepoSync:
    return RepoSync(url or remote.url, "main", tmp_path / "state" / "gitops" / "default",
                    policy=policy, events=bus)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- clone, fetch, force-push ---------------------------------------------------------


def test_first_sync_clones_and_exports(remote: GitRemote, tmp_path: Path,
                                       bus: tuple[EventBus, list[Event]]) -> None:
    sync = make_sync(remote, tmp_path, bus=bus[0])
    result = sync.sync()
    assert result.commit == remote.head()
    assert result.previous_commit is None and result.changed
    assert result.author == "Alice Author <alice@example.org>"
    assert result.message == "first"
    assert (result.checkout_dir / "apps/demo/app.config").read_text() == SPEC
    assert result.checkout_dir == sync.gitops_dir / "checkouts" / result.commit
    assert (sync.gitops_dir / "repo.git").is_dir()
    assert not (result.checkout_dir / ".git").exists()
    assert sync.synced_commit() == result.commit
    names = [e.name for e in bus[1]]
    assert names == ["bstore.git.clone_start", "bstore.git.clone_stop", "bstore.git.pull"]
    pull = bus[1][-1]
    assert pull.metadata["commit"] == result.commit and pull.metadata["branch"] == "main"
    assert pull.measurements["duration"] >= 0


def test_new_commit_is_fetched_and_unchanged_tip_reuses_checkout(
        remote: GitRemote, tmp_path: Path, bus: tuple[EventBus, list[Event]]) -> None:
    sync = make_sync(remote, tmp_path, bus=bus[0])
    first = sync.sync()
    second_id = remote.commit({"apps/other/app.config": SPEC}, "second")
    remote.push()
    second = sync.sync(last_applied=first.commit)
    assert second.commit == second_id and second.changed
    assert second.previous_commit == first.commit
    assert (second.checkout_dir / "apps/other/app.config").is_file()
    again = sync.sync(last_applied=second.commit)
    assert not again.changed and again.previous_commit == second.commit
    assert again.checkout_dir == second.checkout_dir
    # only one clone: later syncs are plain fetches
    assert [e.name for e in bus[1]].count("bstore.git.clone_start") == 1


def test_old_checkouts_are_pruned(remote: GitRemote, tmp_path: Path) -> None:
    sync = make_sync(remote, tmp_path)
    ids = [sync.sync().commit]
    for n in range(2):
        remote.commit({f"apps/a{n}/app.config": SPEC}, f"c{n}")
        remote.push()
        ids.append(sync.sync().commit)
    kept = sorted(p.name for p in (sync.gitops_dir / "checkouts").iterdir())
    assert kept == sorted(ids[1:])


def test_force_push_is_followed_not_merged(remote: GitRemote, tmp_path: Path) -> None:
    first = remote.head()
    remote.commit({"apps/doomed/app.config": SPEC}, "doomed")
    remote.push()
    sync = make_sync(remote, tmp_path)
    assert (sync.sync().checkout_dir / "apps/doomed").is_dir()
    remote.git("reset", "-q", "--hard", first)
    rewritten = remote.commit({"apps/replacement/app.config": SPEC}, "rewritten")
    remote.push(force=True)
    result = sync.sync()  # no applied commit yet: nothing to protect
    assert result.commit == rewritten
    assert not (result.checkout_dir / "apps/doomed").exists()
    assert (result.checkout_dir / "apps/replacement/app.config").is_file()


def test_non_descendant_tip_refused_unless_history_rewrite_allowed(
        remote: GitRemote, tmp_path: Path, bus: tuple[EventBus, list[Event]]) -> None:
    base = remote.head()
    applied = remote.commit({"apps/v2/app.config": SPEC}, "v2")
    remote.push()
    sync = make_sync(remote, tmp_path, bus=bus[0])
    sync.sync()
    remote.git("reset", "-q", "--hard", base)
    other = remote.commit({"apps/fork/app.config": SPEC}, "fork")
    remote.push(force=True)
    with pytest.raises(CommitRefusedError) as info:
        sync.sync(last_applied=applied)
    err = info.value
    assert err.commit == other
    assert f"refusing commit {other}" in err.message
    assert f"does not descend from the last applied commit {applied}" in err.message
    assert "allow_history_rewrite" in (err.hint or "")
    assert sync.synced_commit() == applied  # the refused tip was not recorded
    assert not sync.checkout_dir(other).exists()
    refused = [e for e in bus[1] if e.name == "bstore.git.refused"]
    assert refused and refused[0].metadata["commit"] == other
    allowed = make_sync(remote, tmp_path, SyncPolicy(allow_history_rewrite=True))
    assert allowed.sync(last_applied=applied).commit == other


def test_push_of_an_older_state_is_refused(remote: GitRemote, tmp_path: Path) -> None:
    """Rolling the branch back to an ancestor (an old, once-valid state) is refused."""
    old = remote.head()
    new = remote.commit({"apps/fix/app.config": SPEC}, "security fix")
    remote.push()
    sync = make_sync(remote, tmp_path)
    sync.sync()
    remote.git("reset", "-q", "--hard", old)
    remote.push(force=True)
    with pytest.raises(CommitRefusedError, match=f"last applied commit {new}"):
        sync.sync(last_applied=new)


def test_last_applied_unknown_to_the_repo_is_refused(remote: GitRemote,
                                                      tmp_path: Path) -> None:
    stranger = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(CommitRefusedError, match=f"last applied commit {stranger}"):
        make_sync(remote, tmp_path).sync(last_applied=stranger)


def test_missing_branch_is_a_clear_error(remote: GitRemote, tmp_path: Path) -> None:
    sync = RepoSync(remote.url, "production", tmp_path / "g")
    with pytest.raises(RepoSyncError, match=r"branch production\): the branch does not exist"):
        sync.sync()


# --- unreachable ------------------------------------------------------------------------


def test_unreachable_remote_keeps_previous_checkout(remote: GitRemote, tmp_path: Path) -> None:
    sync = make_sync(remote, tmp_path)
    good = sync.sync()
    remote.upstream.rename(remote.root / "gone.git")
    with pytest.raises(RepoUnreachableError) as info:
        sync.sync(last_applied=good.commit)
    err = info.value
    assert f"cannot sync {remote.url} (branch main)" in err.message
    assert f"keeping the checkout of {good.commit[:12]}" in err.message
    assert err.previous_commit == good.commit
    assert (good.checkout_dir / "apps/demo/app.config").read_text() == SPEC
    assert sync.synced_commit() == good.commit


@pytest.mark.parametrize(
    ("url", "shown", "secret"),
    [
        ("https://bob:hunter2@127.0.0.1:{port}/specs.git", "https://127.0.0.1:{port}/specs.git",
         "hunter2"),
        ("https://ghp_TOKEN@127.0.0.1:{port}/specs.git", "https://127.0.0.1:{port}/specs.git",
         "ghp_TOKEN"),
        ("http://127.0.0.1:{port}/specs.git", "http://127.0.0.1:{port}/specs.git", None),
    ],
)
def test_unreachable_first_sync_names_redacted_url(
        tmp_path: Path, url: str, shown: str, secret: str | None) -> None:
    port = free_port()  # nothing listens: connection refused at once
    sync = RepoSync(url.format(port=port), "main", tmp_path / "g")
    with pytest.raises(RepoUnreachableError) as info:
        sync.sync()
    message = info.value.message
    assert f"cannot sync {shown.format(port=port)} (branch main)" in message
    assert "nothing was synced yet" in message
    if secret:
        assert secret not in message and secret not in str(info.value.hint)
    assert sync.synced_commit() is None


# --- hostile trees ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("apps/evil", "/etc/passwd"),
        ("apps/evil", "../../outside"),
        ("evil", ".."),
        ("apps/demo/evil", "../../../etc"),
    ],
)
def test_symlink_escaping_checkout_is_rejected(remote: GitRemote, tmp_path: Path,
                                               link: str, target: str) -> None:
    sync = make_sync(remote, tmp_path)
    good = sync.sync()
    bad = remote.symlink(link, target)
    remote.push()
    with pytest.raises(UnsafeCheckoutError) as info:
        sync.sync(last_applied=good.commit)
    message = info.value.message
    assert f"@{bad[:12]}" in message
    assert repr(target) in message and "outside" in message
    assert "keeping the previous checkout" in message
    assert not sync.checkout_dir(bad).exists()
    assert sync.synced_commit() == good.commit
    assert (good.checkout_dir / "apps/demo/app.config").is_file()
    assert [p.name for p in (sync.gitops_dir / "checkouts").iterdir()] == [good.commit]


def test_symlink_chain_escaping_is_rejected(remote: GitRemote, tmp_path: Path) -> None:
    """Each link alone looks inside (x/l -> .., y -> x/l/..) but y resolves outside."""
    remote.symlink("x/l", "..")
    bad = remote.symlink("y", "x/l/..")
    remote.push()
    with pytest.raises(UnsafeCheckoutError) as info:
        make_sync(remote, tmp_path).sync()
    assert f"@{bad[:12]}: symlink 'y' -> 'x/l/..' points outside the tree" in info.value.message


def test_symlinks_inside_are_kept(remote: GitRemote, tmp_path: Path) -> None:
    remote.symlink("apps/alias", "demo")
    remote.push()
    result = make_sync(remote, tmp_path).sync()
    assert os.readlink(result.checkout_dir / "apps/alias") == "demo"
    assert (result.checkout_dir / "apps/alias/app.config").read_text() == SPEC


_BLOB, _LINK = 0o100644, 0o120000


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([(_BLOB, b"..", b"x")], "'.' or '..' component"),
        ([(_BLOB, b".", b"x")], "'.' or '..' component"),
        ([(_BLOB, b".git", b"x")], "'.git' entry"),
        ([(_BLOB, b".GIT", b"x")], "'.git' entry"),
        ([(_BLOB, b"apps/../../x", b"x")], "has a '/' in its name"),
        ([(_BLOB, b"a/b", b"x")], "has a '/' in its name"),
        ([(_BLOB, b"/etc/passwd", b"x")], "has a '/' in its name"),
        ([(_LINK, b"dup", b"elsewhere"), (_BLOB, b"dup", b"x")], "appears twice"),
        # NUL cannot be in a name (the tree format ends names with it) but a symlink
        # target is blob content and can hold one.
        ([(_LINK, b"nul", b"inside\0/../../x")], "points outside the source tree"),
        ([(_LINK, b"abs", b"/tmp")], "points outside the source tree"),
        # l -> . and y -> l/.. each look inside, but y is the checkout's parent; an entry
        # named "y/x" would then be written outside. Caught before anything is written.
        ([(_LINK, b"l", b"."), (_LINK, b"y", b"l/.."), (_BLOB, b"y/x", b"pwned")],
         "has a '/' in its name"),
        ([(_LINK, b"l", b"."), (_LINK, b"y", b"l/..")],
         "symlink 'y' -> 'l/..' points outside the tree"),
    ],
)
def test_hand_made_tree_tricks_are_rejected(
        remote: GitRemote, tmp_path: Path, entries: list[tuple[int, bytes, bytes]],
        expected: str) -> None:
    sync = make_sync(remote, tmp_path)
    good = sync.sync()
    bad = remote.commit_raw_tree(entries, "crafted")
    with pytest.raises(UnsafeCheckoutError) as info:
        sync.sync(last_applied=good.commit)
    assert expected in info.value.message
    assert f"@{bad[:12]}" in info.value.message
    assert sync.synced_commit() == good.commit
    assert not sync.checkout_dir(bad).exists()
    assert not any(p.name.startswith(".tmp") for p in (sync.gitops_dir / "checkouts").iterdir())
    assert not (sync.gitops_dir / "x").exists()
    assert not (sync.gitops_dir / "checkouts" / "x").exists()


def test_submodules_are_not_fetched(remote: GitRemote, tmp_path: Path) -> None:
    # A gitlink entry points at a commit of another repository; it becomes an empty dir.
    sub = "1111111111111111111111111111111111111111"
    remote.git("update-index", "--add", "--cacheinfo", f"160000,{sub},vendor/lib")
    remote.git("commit", "-q", "-m", "submodule")
    remote.push()
    result = make_sync(remote, tmp_path).sync()
    assert list((result.checkout_dir / "vendor/lib").iterdir()) == []


# --- signed commits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SshKey]:
    if not have("ssh-keygen"):
        pytest.skip("ssh-keygen (openssh-client) is not installed")
    directory = tmp_path_factory.mktemp("sshkeys")
    return {name: SshKey(directory, name) for name in ("alice", "mallory")}


def ssh_policy(tmp_path: Path, lines: list[str], name: str = "allowed_signers") -> SyncPolicy:
    allowed = tmp_path / name
    allowed.write_text("".join(lines))
    return SyncPolicy(require_signed_commits=True, allowed_signers=allowed)


def test_ssh_signed_by_allowed_key_is_accepted(remote: GitRemote, tmp_path: Path,
                                               ssh_keys: dict[str, SshKey]) -> None:
    alice = ssh_keys["alice"]
    signed = remote.commit({"apps/s/app.config": SPEC}, "signed", sign=True,
                           env=alice.git_env())
    remote.push()
    policy = ssh_policy(tmp_path, [alice.allowed_line("alice@example.org")])
    result = make_sync(remote, tmp_path, policy).sync()
    assert result.commit == signed
    assert result.signer == "ssh:alice@example.org"


@pytest.mark.parametrize(
    ("signer", "allowed_for", "expected"),
    [
        ("mallory", {"alice": "alice@example.org"}, "is not by a key in"),
        ("alice", {"alice": "bob@example.org"},
         "by a key allowed for bob@example.org, not for the committer 'alice@example.org'"),
        (None, {"alice": "alice@example.org"}, "the commit is not signed"),
    ],
)
def test_ssh_untrusted_or_unsigned_tip_is_refused(
        remote: GitRemote, tmp_path: Path, ssh_keys: dict[str, SshKey],
        signer: str | None, allowed_for: dict[str, str], expected: str) -> None:
    alice = ssh_keys["alice"]
    policy = ssh_policy(tmp_path, [ssh_keys[k].allowed_line(p) for k, p in allowed_for.items()])
    good_policy = ssh_policy(tmp_path, [alice.allowed_line("alice@example.org")], "good")
    first = remote.commit({"apps/ok/app.config": SPEC}, "ok", sign=True, env=alice.git_env())
    remote.push()
    sync = make_sync(remote, tmp_path, good_policy)
    assert sync.sync().commit == first
    key = ssh_keys[signer] if signer else None
    bad = remote.commit({"apps/bad/app.config": SPEC}, "bad", sign=key is not None,
                        env=key.git_env() if key else None)
    remote.push()
    strict = make_sync(remote, tmp_path, policy)
    with pytest.raises(CommitRefusedError) as info:
        strict.sync(last_applied=first)
    err = info.value
    assert err.commit == bad
    assert f"refusing commit {bad} of {remote.url} (branch main)" in err.message
    assert expected in err.message
    assert "the running generation is kept" in (err.hint or "")
    assert strict.synced_commit() == first and not strict.checkout_dir(bad).exists()


def test_ssh_signature_without_allowed_signers_is_refused(
        remote: GitRemote, tmp_path: Path, ssh_keys: dict[str, SshKey]) -> None:
    remote.commit({}, "signed", sign=True, env=ssh_keys["alice"].git_env())
    remote.push()
    keyring = tmp_path / "empty.gpg"
    keyring.write_bytes(b"")
    policy = SyncPolicy(require_signed_commits=True, gpg_keyring=keyring)
    with pytest.raises(CommitRefusedError, match="no allowed_signers file is configured"):
        make_sync(remote, tmp_path, policy).sync()


def test_policy_requires_a_trust_source() -> None:
    with pytest.raises(RepoSyncError, match="without allowed_signers or gpg_keyring"):
        SyncPolicy(require_signed_commits=True)


@pytest.fixture(scope="module")
def gpg_keys() -> Iterator[dict[str, GpgKey]]:
    if not (have("gpg") and have("gpgv")):
        pytest.skip("gpg/gpgv (gnupg) is not installed")
    with gpg_key("Alice Author <alice@example.org>") as alice, \
            gpg_key("Mallory <mallory@example.org>") as mallory:
        yield {"alice": alice, "mallory": mallory}


@pytest.mark.parametrize("armor", [True, False], ids=["armored", "binary"])
def test_gpg_signed_by_key_in_keyring_is_accepted(
        remote: GitRemote, tmp_path: Path, gpg_keys: dict[str, GpgKey], armor: bool) -> None:
    alice = gpg_keys["alice"]
    signed = remote.commit({"apps/g/app.config": SPEC}, "gpg", sign=True, env=alice.git_env())
    remote.push()
    keyring = alice.export(tmp_path / "trusted.asc", armor=armor)
    policy = SyncPolicy(require_signed_commits=True, gpg_keyring=keyring)
    result = make_sync(remote, tmp_path, policy).sync()
    assert result.commit == signed
    assert result.signer == f"gpg:{alice.fingerprint}"


def test_gpg_signed_by_other_key_is_refused(
        remote: GitRemote, tmp_path: Path, gpg_keys: dict[str, GpgKey]) -> None:
    bad = remote.commit({}, "gpg", sign=True, env=gpg_keys["mallory"].git_env())
    remote.push()
    keyring = gpg_keys["alice"].export(tmp_path / "trusted.asc", armor=True)
    policy = SyncPolicy(require_signed_commits=True, gpg_keyring=keyring)
    with pytest.raises(CommitRefusedError) as info:
        make_sync(remote, tmp_path, policy).sync()
    assert info.value.commit == bad
    assert f"its GPG signature is by a key that is not in {str(keyring)!r}" in info.value.message


def test_gpg_signature_with_tampered_payload_is_refused(
        remote: GitRemote, tmp_path: Path, gpg_keys: dict[str, GpgKey]) -> None:
    """Re-use a valid signature on a different commit body: gpgv must say BADSIG."""
    alice = gpg_keys["alice"]
    signed = remote.commit({}, "honest", sign=True, env=alice.git_env())
    repo = pygit2.Repository(str(remote.work))
    signature, payload = repo[signed].peel(pygit2.Commit).gpg_signature
    forged_body = payload.replace(b"honest", b"forged")
    forged = repo.create_commit_with_signature(forged_body.decode(), signature.decode())
    remote.git("update-ref", "refs/heads/main", str(forged))
    remote.push(force=True)
    keyring = alice.export(tmp_path / "trusted.asc", armor=True)
    policy = SyncPolicy(require_signed_commits=True, gpg_keyring=keyring)
    with pytest.raises(CommitRefusedError, match=r"its GPG signature is not valid \(BADSIG\)"):
        make_sync(remote, tmp_path, policy).sync()


def test_from_config_uses_profile_dir_and_policy(tmp_path: Path) -> None:
    signers = tmp_path / "allowed"
    signers.write_text("")
    config = Config(repo_url="file:///srv/specs.git", branch="prod", profile="edge",
                    require_signed_commits=True, allowed_signers=signers)
    sync = RepoSync.from_config(config, tmp_path / "root")
    assert sync.gitops_dir == tmp_path / "root" / "gitops" / "edge"
    assert sync.branch == "prod" and sync.policy.allowed_signers == signers
    local = Config(repo_url="file:///srv/specs.git", local_path=tmp_path / "here")
    assert RepoSync.from_config(local, tmp_path).gitops_dir == tmp_path / "here"


# --- caps and concurrency -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (GitLimits(fetch_bytes=1000), "exceeded 1000 bytes"),
        (GitLimits(fetch_seconds=1e-9), "took longer than"),
    ],
)
def test_fetch_caps(remote: GitRemote, tmp_path: Path, limits: GitLimits,
                    expected: str) -> None:
    remote.commit({"apps/big/blob.bin": os.urandom(200_000).hex()}, "big")
    remote.push()
    sync = RepoSync(remote.url, "main", tmp_path / "g", limits=limits)
    with pytest.raises(RepoUnreachableError) as info:
        sync.sync()
    assert expected in info.value.message
    assert sync.synced_commit() is None


def test_concurrent_syncs_are_serialised(remote: GitRemote, tmp_path: Path) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(make_sync(remote, tmp_path).sync().commit)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [remote.head()] * 3
    checkouts = list((tmp_path / "state/gitops/default/checkouts").iterdir())
    assert [p.name for p in checkouts] == [remote.head()]


def test_failed_first_clone_is_retried_as_a_clone(
        remote: GitRemote, tmp_path: Path, bus: tuple[EventBus, list[Event]]) -> None:
    sync = make_sync(remote, tmp_path, bus=bus[0])
    remote.upstream.rename(remote.root / "away.git")
    with pytest.raises(RepoUnreachableError, match="nothing was synced yet"):
        sync.sync()
    assert [e.name for e in bus[1]] == ["bstore.git.clone_start", "bstore.git.clone_error"]
    assert "cannot fetch" in bus[1][1].metadata["error"]
    (remote.root / "away.git").rename(remote.upstream)
    bus[1].clear()
    result = sync.sync()
    assert [e.name for e in bus[1]] == ["bstore.git.clone_start", "bstore.git.clone_stop",
                                        "bstore.git.pull"]
    data = result.to_dict()
    assert data["commit"] == remote.head() and data["changed"] is True
    assert data["checkout_dir"] == str(result.checkout_dir)
    assert data["author"] == "Alice Author <alice@example.org>"
    assert str(data["commit_time"]).endswith("+00:00")


def test_unusable_gitops_dir_is_a_clear_error(remote: GitRemote, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    sync = RepoSync(remote.url, "main", tmp_path / "file" / "gitops")
    with pytest.raises(RepoSyncError) as info:
        sync.sync()
    assert info.value.message.startswith(
        f"cannot use the gitops directory {str(tmp_path / 'file' / 'gitops')!r}: ")
