"""Realise benchmarks: a no-op ``bstore build`` of 50 built apps, and ``-j 2`` vs ``-j 1``.

1. No-op: 50 plain erlc apps (git sources pinned at a commit) are built once; then
   ``bstore build`` of the same apps dir runs again, as a real subprocess (Python start-up,
   spec parsing, fetch-cache lookups, plan, validity checks). Compiler runs are counted
   by shims around erlc/rebar3/mix/make that mark each run in the build log (must be
   zero: no log written or added, and the CLI says ``0 built``). Peer: a no-op ``rebar3 compile``
   of ONE already-built app (what a developer waits for on one app); the ratio says how
   many such no-ops cost the same as bstore's 50-app no-op.
2. Parallelism: 8 independent erlc apps realised into fresh roots with ``jobs=1`` and
   ``jobs=2``; the ratio t(-j1)/t(-j2) is printed (ideal 2.0 on the 2 cores, less when
   other load shares them).

Run: ``.venv/bin/pytest benchmarks/test_bench_realise.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "builders"))

import realise_helpers as rh
import sample_apps

from bstore.builders.realise import Realiser
from bstore.builders.sandbox import NO_ISOLATION
from bstore.builders.sources import Fetcher
from bstore.specs.model import AppSpec
from bstore.store.local import LocalStore

pytestmark = pytest.mark.skipif(shutil.which("erlc") is None, reason="erlc not installed")

NOOP_APPS = 50
PARALLEL_APPS = 8


def make_apps(base: Path, count: int, prefix: str) -> list[tuple[str, Path, str]]:
    """``count`` erlc apps, each its own git repo; returns (name, repo, commit)."""
    out = []
    for i in range(count):
        name = f"{prefix}{i:02d}"
        repo = rh.git_repo(sample_apps.erlc_app(base / "repos", name))
        out.append((name, repo, rh.git(repo, "rev-parse", "HEAD")))
    return out


def write_apps_dir(apps_dir: Path, apps: list[tuple[str, Path, str]]) -> None:
    for name, repo, commit in apps:
        (apps_dir / name).mkdir(parents=True)
        (apps_dir / name / "app.json").write_text(json.dumps({
            "name": name, "version": "1.0.0",
            "source": {"type": "git", "url": repo.as_uri(), "ref": commit}}))


def run_cli(root: Path, apps_dir: Path, shims: Path, expect: str | None = None) -> float:
    env = {**os.environ, "PATH": f"{shims}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "from bstore.cli.main import main; main()", "--root", str(root),
         "build", "-j", "2", str(apps_dir)],
        capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if expect is not None:
        assert proc.stdout.splitlines()[-1] == expect
    return elapsed


def test_noop_build_of_50_apps(benchmark: Any, tmp_path: Path) -> None:
    toolchain, _ = rh.counting_toolchain(tmp_path)
    shims = tmp_path / "shims"
    apps = make_apps(tmp_path, NOOP_APPS, "noop")
    apps_dir = tmp_path / "apps"
    write_apps_dir(apps_dir, apps)
    root = tmp_path / "root"
    cold = run_cli(root, apps_dir, shims)
    # The shims mark each compiler run in the build log (the sandbox keeps them from
    # writing the counter file); the cold build compiled every app.
    compiled = rh.logged_runs(root)
    assert compiled >= NOOP_APPS
    logs = sorted((root / "logs").glob("*.log"))
    stamps = [p.stat().st_mtime_ns for p in logs]

    times: list[float] = []
    noop = f"0 built, {NOOP_APPS} already valid, 0 failed"
    benchmark.pedantic(lambda: times.append(run_cli(root, apps_dir, shims, noop)), rounds=5,
                       iterations=1)
    # Zero compiler runs in every no-op round: no log was written or added.
    assert rh.logged_runs(root) == compiled
    assert sorted((root / "logs").glob("*.log")) == logs
    assert [p.stat().st_mtime_ns for p in logs] == stamps

    # In process (as the reconciler runs it): the toolchain probe, about 0.7 s of a CLI
    # run (erl, rebar3 and elixir each start once), is paid once per process.
    specs = [rh.git_spec(name, "1.0.0", repo, commit) for name, repo, commit in apps]
    in_process = []
    with LocalStore.open(root) as store, httpx.Client(trust_env=False) as client:
        realiser = Realiser(Fetcher(store, client), toolchain=toolchain)
        for _ in range(5):
            start = time.perf_counter()
            report = realiser.build(specs, jobs=2)
            in_process.append(time.perf_counter() - start)
            assert report.ok and report.built == () and realiser.builds == []

    # Peer: a no-op rebar3 compile of one already-built app.
    one = sample_apps.rebar3_app(tmp_path / "peer", "peerapp")
    (one / "rebar.config").write_text("{erl_opts, [debug_info]}.\n{deps, []}.\n")
    (one / "src/peerapp.erl").write_text("-module(peerapp).\n-export([a/0]).\na() -> 1.\n")
    env = {**os.environ, "HOME": str(tmp_path / "peerhome")}
    subprocess.run(["rebar3", "compile"], cwd=one, env=env, capture_output=True, check=True)
    peer = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(["rebar3", "compile"], cwd=one, env=env, capture_output=True, check=True)
        peer.append(time.perf_counter() - start)
    ours = statistics.median(times)
    print(f"\nno-op bstore build of {NOOP_APPS} built apps: median {ours:.2f} s"
          f" ({ours / NOOP_APPS * 1000:.0f} ms/app), cold build {cold:.1f} s, 0 compiler runs;"
          f" peer no-op rebar3 compile of 1 app: median {statistics.median(peer):.2f} s;"
          f" ratio bstore(50 apps)/rebar3(1 app) = {ours / statistics.median(peer):.2f};"
          f" in-process Realiser.build no-op: median {statistics.median(in_process):.3f} s")


def realise_fresh(root: Path, specs: list[AppSpec], jobs: int) -> float:
    with LocalStore.open(root) as store, httpx.Client(trust_env=False) as client:
        realiser = Realiser(Fetcher(store, client), isolation=NO_ISOLATION)
        plan = realiser.plan(specs)  # sources fetched before the clock starts
        start = time.perf_counter()
        report = realiser.realise(plan, jobs=jobs)
        elapsed = time.perf_counter() - start
    assert report.ok and len(report.built) == len(specs)
    return elapsed


def test_parallel_jobs_ratio(benchmark: Any, tmp_path: Path) -> None:
    apps = make_apps(tmp_path, PARALLEL_APPS, "par")
    specs = [rh.git_spec(name, "1.0.0", repo, commit) for name, repo, commit in apps]
    one: list[float] = []
    two: list[float] = []
    rounds = iter(range(1000))

    def round_pair() -> None:
        n = next(rounds)
        one.append(realise_fresh(tmp_path / f"j1-{n}", specs, 1))
        two.append(realise_fresh(tmp_path / f"j2-{n}", specs, 2))

    benchmark.pedantic(round_pair, rounds=3, iterations=1)
    j1, j2 = statistics.median(one), statistics.median(two)
    print(f"\nrealise {PARALLEL_APPS} independent erlc apps: -j 1 median {j1:.2f} s,"
          f" -j 2 median {j2:.2f} s, speed-up ratio t(-j1)/t(-j2) = {j1 / j2:.2f}"
          f" (best rounds: {min(one) / min(two):.2f})")
