"""Repo sync with no new commit, on a specs repository of 1,000 apps: bstore vs ``git fetch``.

bstore side: :meth:`bstore.gitops.repo_sync.RepoSync.sync` after a first sync — fetch
(libgit2, forced refspecs, caps), resolve the tip, history check, reuse the checkout.
The peer: plain ``git fetch`` of the same upstream into a clone that is already up to
date. Both talk to the same ``file://`` upstream. A second case adds the SSH-signature
policy (one ``ssh-keygen -Y verify`` per pass).

The issue's budget for a whole no-change reconcile pass is 50 ms; sync is its largest
part. The ratio bstore/git is printed.

Run: ``.venv/bin/pytest benchmarks/test_bench_gitops_sync.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gitops"))

from gitrepos import GitRemote, SshKey

from bstore.gitops.repo_sync import RepoSync, SyncPolicy

APPS = 1000
ROUNDS = 15
BUDGET_MS = 50.0


def _specs_repo(root: Path, signer: SshKey | None) -> GitRemote:
    remote = GitRemote(root)
    files = {f"apps/app{i:04d}/app.config": f'#{{name => app{i}, version => "1.0.{i}"}}.\n'
             for i in range(APPS)}
    remote.commit(files, "1000 apps", sign=signer is not None,
                  env=signer.git_env() if signer else None)
    remote.push()
    return remote


def _git_fetch(clone: Path, remote: GitRemote) -> float:
    start = time.perf_counter()
    subprocess.run(["git", "fetch", "-q", "origin"], cwd=clone, env=remote.env, check=True)
    return time.perf_counter() - start


def _ours(sync: RepoSync, last: str) -> float:
    start = time.perf_counter()
    result = sync.sync(last_applied=last)
    elapsed = time.perf_counter() - start
    assert not result.changed
    return elapsed


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "ssh-signed"])
def test_no_change_sync_vs_git_fetch(benchmark: Any, tmp_path: Path, signed: bool) -> None:
    if signed and shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    key = SshKey(tmp_path / "keys", "alice") if signed else None
    remote = _specs_repo(tmp_path / "remote", key)
    policy = None
    if key is not None:
        allowed = tmp_path / "allowed_signers"
        allowed.write_text(key.allowed_line("alice@example.org"))
        policy = SyncPolicy(require_signed_commits=True, allowed_signers=allowed)
    sync = RepoSync(remote.url, "main", tmp_path / "state", policy=policy)
    first = sync.sync()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", remote.url, str(clone)], env=remote.env, check=True)

    ours = [_ours(sync, first.commit) for _ in range(ROUNDS)]
    peer = [_git_fetch(clone, remote) for _ in range(ROUNDS)]
    benchmark.pedantic(lambda: _ours(sync, first.commit), rounds=5, iterations=1)

    ours_ms = statistics.median(ours) * 1000
    peer_ms = statistics.median(peer) * 1000
    print(
        f"\n[gitops sync] {APPS} specs, no new commit ({'ssh-signed' if signed else 'unsigned'}):"
        f" bstore {ours_ms:.1f} ms, git fetch {peer_ms:.1f} ms, ratio {ours_ms / peer_ms:.2f}"
        f" (whole-pass budget {BUDGET_MS:.0f} ms)"
    )
