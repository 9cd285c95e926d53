"""Generation switch and activation plan with 50 apps.

1. Switch a profile between two generations of 50 apps (1 app differs), in-process through
   :func:`bstore.generations.switch.switch_to_number` (profile lock, recovery check,
   journal written and removed, temp symlink + rename, fsync of ``profiles/``) vs the
   same symlink switch done by a shell: ``ln -sfn <p>-<N>-link .tmp && mv -T .tmp <p>``
   (no lock, no journal, no fsync; one ``sh`` spawning ``ln`` and ``mv``). Ratio of
   medians is printed; the real ``bstore rollback --activator none`` command's wall time
   (Python start-up included) is printed too.
2. The pure plan (:func:`bstore.activators.plan.plan`) for 50 apps of which one changed:
   time per plan.

Run: ``.venv/bin/pytest benchmarks/test_bench_generations.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "generations"))

from genhelpers import bstore_cmd, compile_variants, fake_entry, make_output, spec

from bstore.activators.plan import ActionKind, plan
from bstore.generations.generation import AppBuild, make_manifest
from bstore.generations.manifest import GenerationManifest
from bstore.generations.profiles import Profile
from bstore.generations.switch import commit_generation, switch_to_number
from bstore.store.local import LocalStore

APPS = 50
ROUNDS = 40


def _setup(root: Path, base: Path) -> None:
    beams = compile_variants(base / "beams")
    with LocalStore.open(root) as store:
        builds = [AppBuild(spec(f"app{i}", "1.0"),
                           make_output(store, f"app{i}", "1.0", {"core": beams[1]["core"]}))
                  for i in range(APPS)]
        changed = AppBuild(spec("app0", "1.0"),
                           make_output(store, "app0", "1.0", {"core": beams[2]["core"]}))
        prof = Profile(store)
        start = time.perf_counter()
        commit_generation(prof, make_manifest(store, builds))
        made = time.perf_counter() - start
        commit_generation(prof, make_manifest(store, [changed, *builds[1:]]))
        print(f"\n[generations] create + switch to a generation of {APPS} apps:"
              f" {made * 1000:.1f} ms")


def _peer_switch(profiles: Path, n: int) -> float:
    start = time.perf_counter()
    subprocess.run(["sh", "-c", f"ln -sfn default-{n}-link .tmp-peer && mv -T .tmp-peer"
                    " default"], cwd=profiles, check=True)
    return time.perf_counter() - start


def test_switch_vs_shell(benchmark: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _setup(root, tmp_path)
    # the peer works on a copy of the links so both sides switch identical structures
    peer_dir = tmp_path / "peer-profiles"
    peer_dir.mkdir()
    for name in os.listdir(root / "profiles"):
        if os.path.islink(root / "profiles" / name):
            os.symlink(os.readlink(root / "profiles" / name), peer_dir / name)
    ours: list[float] = []
    peer: list[float] = []
    with LocalStore.open(root) as store:
        prof = Profile(store)

        def switch(n: int) -> float:
            start = time.perf_counter()
            result = switch_to_number(prof, n)
            elapsed = time.perf_counter() - start
            assert result.current.number == n and not result.reused
            return elapsed

        for i in range(ROUNDS):
            n = 1 if i % 2 == 0 else 2
            ours.append(switch(n))
            peer.append(_peer_switch(peer_dir, n))
            assert os.readlink(peer_dir / "default") == f"default-{n}-link"
        counter = iter(range(10**6))
        benchmark.pedantic(lambda: switch(1 + next(counter) % 2), rounds=10, iterations=1)
    cli = []
    for n in (1, 2, 1, 2, 1):
        env = {**os.environ, "BSTORE_ROOT": str(root)}
        start = time.perf_counter()
        subprocess.run([*bstore_cmd(), "rollback", "--to", str(n), "--activator", "none"],
                       env=env, check=True, capture_output=True)
        cli.append(time.perf_counter() - start)
    o, p = statistics.median(ours), statistics.median(peer)
    print(f"\n[generations] switch between two generations of {APPS} apps, {ROUNDS} rounds:"
          f" bstore (lock, journal, rename, fsync) median {o * 1000:.2f} ms /"
          f" best {min(ours) * 1000:.2f} ms; shell ln -sfn + mv -T median {p * 1000:.2f} ms"
          f" / best {min(peer) * 1000:.2f} ms; ratio median {o / p:.2f},"
          f" best {min(ours) / min(peer):.2f}; bstore rollback command (process start"
          f" included) median {statistics.median(cli) * 1000:.0f} ms")


def _manifests() -> tuple[GenerationManifest, GenerationManifest]:
    apps = [fake_entry(f"app{i}", "1.0", depends_on=[f"app{i - 1}"] if i % 5 else [])
            for i in range(APPS)]
    changed = fake_entry("app7", "1.0", modules={"app7": "v2"}, depends_on=["app6"])
    new = [changed if a.name == "app7" else a for a in apps]  # type: ignore[attr-defined]
    return GenerationManifest.of(apps), GenerationManifest.of(new)  # type: ignore[arg-type]


def test_plan_one_of_fifty_changed(benchmark: Any) -> None:
    old, new = _manifests()
    actions = plan(old, new)
    assert [a.app for a in actions if a.kind is not ActionKind.KEEP] == ["app7"]
    assert next(a for a in actions if a.app == "app7").kind is ActionKind.RELOAD
    times = []
    for _ in range(200):
        start = time.perf_counter()
        plan(old, new)
        times.append(time.perf_counter() - start)
    benchmark(plan, old, new)
    print(f"\n[generations] pure plan, {APPS} apps, 1 changed: median"
          f" {statistics.median(times) * 1e6:.0f} us, best {min(times) * 1e6:.0f} us")
