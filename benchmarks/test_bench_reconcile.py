"""Reconcile passes on a specs repository of 1,000 apps.

Numbers are medians of 15 passes; the sync (``bstore.git.pull`` duration) is reported
apart from the plan, since exporting a new checkout of 1,000 files is repo_sync's work.

1. A pass with no new commit (:meth:`Reconciler.reconcile_once`: fetch, tip check,
   running-state check, status write) vs plain ``git fetch`` of the same ``file://``
   upstream into an up-to-date clone. Budget 50 ms; the ratio bstore/git is printed.
2. A pass after a commit that changes one spec (a version bump): the time until that
   app's build starts (sync + parse of the changed directory + plan over 1,000 apps;
   budget 200 ms), the build itself (a builder double that registers the output: the
   realiser's own cost is measured in test_bench_realise), and the rest of the pass
   (generation of 1,000 apps, activation, status).

The activator is the dry-run one (the activators' own costs are benchmarked in
test_bench_generations).

Run: ``.venv/bin/pytest benchmarks/test_bench_reconcile.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gitops"))

from recohelpers import FakeBuilder, World, spec_yaml

from bstore.activation import BuildFn, BuildOutcome
from bstore.gitops.status import State
from bstore.specs.model import AppSpec
from bstore.store.local import LocalStore

APPS = 1000
ROUNDS = 15
NO_CHANGE_BUDGET_MS = 50.0
PLAN_BUDGET_MS = 200.0


class TimedBuilder(FakeBuilder):
    """Records when the build started and how long it took."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.started = 0.0
        self.took = 0.0

    def __call__(self, store: LocalStore) -> BuildFn:
        inner = super().__call__(store)

        def build(specs: Any) -> BuildOutcome:
            self.started = time.perf_counter()
            out = inner(specs)
            self.took = time.perf_counter() - self.started
            return out
        return build


def _world(tmp: Path) -> World:
    world = World(tmp)
    world.builder = TimedBuilder()
    world.reconciler = world.make()
    world.push({f"apps/app{i:04d}/app.yaml": spec_yaml(f"app{i:04d}", f"1.0.{i}")
                for i in range(APPS)}, "1000 apps")
    first = world.reconciler.reconcile_once()
    assert first.state is State.SYNCED, first.error
    return world


def _git_fetch(clone: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(["git", "fetch", "-q", "origin"], cwd=clone, env=env, check=True)
    return time.perf_counter() - start


def test_no_change_pass_vs_git_fetch(benchmark: Any, tmp_path: Path) -> None:
    world = _world(tmp_path)
    clone = tmp_path / "peer"
    subprocess.run(["git", "clone", "-q", world.remote.url, str(clone)], env=world.remote.env,
                   check=True)
    ours: list[float] = []
    peer: list[float] = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        result = world.reconciler.reconcile_once()
        ours.append(time.perf_counter() - start)
        assert result.skipped == "no change"
        peer.append(_git_fetch(clone, world.remote.env))
    benchmark.pedantic(world.reconciler.reconcile_once, rounds=5, iterations=1)
    ms, git_ms = statistics.median(ours) * 1000, statistics.median(peer) * 1000
    print(f"\nno-change reconcile pass, {APPS} apps: bstore {ms:.1f} ms (best"
          f" {min(ours) * 1000:.1f}), git fetch {git_ms:.1f} ms (best {min(peer) * 1000:.1f});"
          f" ratio bstore/git {ms / git_ms:.2f} (median), {min(ours) / min(peer):.2f} (best);"
          f" budget {NO_CHANGE_BUDGET_MS:.0f} ms: {'ok' if ms <= NO_CHANGE_BUDGET_MS else 'OVER'}")


def test_pass_after_one_changed_spec(benchmark: Any, tmp_path: Path) -> None:
    world = _world(tmp_path)
    builder = world.builder
    assert isinstance(builder, TimedBuilder)
    plans: list[float] = []
    syncs: list[float] = []
    builds: list[float] = []
    totals: list[float] = []
    pulls: list[float] = []
    world.bus.attach("bstore.git.pull",
                     lambda e: pulls.append(e.measurements["duration"] / 1000.0))
    parsed_before = world.reconciler._memo.specs.parsed
    for n in range(ROUNDS):
        world.push({"apps/app0007/app.yaml": spec_yaml("app0007", f"2.0.{n}")}, f"bump {n}")
        builder.built.clear()
        start = time.perf_counter()
        result = world.reconciler.reconcile_once()
        end = time.perf_counter()
        assert result.state is State.SYNCED, result.error
        assert builder.built == [f"app0007-2.0.{n}"]
        syncs.append(pulls[-1])
        plans.append(builder.started - start - pulls[-1])
        builds.append(builder.took)
        totals.append(end - start)
    parsed = world.reconciler._memo.specs.parsed - parsed_before
    assert parsed == ROUNDS  # one directory parsed per pass

    counter = iter(range(ROUNDS, ROUNDS + 100))

    def one() -> None:
        n = next(counter)
        world.push({"apps/app0007/app.yaml": spec_yaml("app0007", f"2.0.{n}")}, f"b{n}")
        world.reconciler.reconcile_once()

    benchmark.pedantic(one, rounds=3, iterations=1)
    plan_ms = statistics.median(plans) * 1000
    print(f"\npass after a commit changing 1 of {APPS} specs: sync (fetch, export of the"
          f" {APPS}-file checkout, prune) {statistics.median(syncs) * 1000:.1f} ms; then until"
          f" the build starts (parse 1 dir, plan {APPS} apps) {plan_ms:.1f} ms (best"
          f" {min(plans) * 1000:.1f}); build {statistics.median(builds) * 1000:.1f} ms;"
          " whole pass"
          f" {statistics.median(totals) * 1000:.1f} ms (generation of {APPS} apps,"
          f" activation, status); plan budget {PLAN_BUDGET_MS:.0f} ms:"
          f" {'ok' if plan_ms <= PLAN_BUDGET_MS else 'OVER'}")


_ = AppSpec  # re-exported type for readers of TimedBuilder's signature
