"""Cold build of one rebar3 app with one dependency: bstore's runner vs plain rebar3.

bstore side: :func:`bstore.builders.buildsystems.build` of ``rebarapp`` (sample app:
one module using ``greeter``'s header and functions, plus priv) into a fresh work and
output dir each round — source copy, sandbox (network/mount/PID namespaces where the
host allows), ``rebar3 bare compile``, ``.app`` finalisation, copy-out.

Peer: plain ``rebar3 compile`` of the same app in a fresh copy each round, with the same
dependency already built (``ERL_LIBS`` points at its lib dir; the copy's ``rebar.config``
lists no deps because rebar3 would otherwise ask hex.pm for ``greeter``, and there is no
network). Both sides compile exactly the same module against the same built dep.

Rounds alternate between the two sides. Two ratios bstore/rebar3 are printed: of the
medians, and of the best rounds (the least disturbed by other load on the machine);
target <= 1.3.

Run: ``.venv/bin/pytest benchmarks/test_bench_build.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "builders"))

import sample_apps

from bstore.builders.buildsystems import DepLib, build
from bstore.builders.toolchain import detect_toolchain

ROUNDS = 9
TARGET = 1.3

pytestmark = pytest.mark.skipif(shutil.which("rebar3") is None, reason="rebar3 not installed")


def _ours(base: Path, source: Path, dep: DepLib, n: int) -> float:
    start = time.perf_counter()
    result = build(source, base / f"out{n}", app_name="rebarapp", version="2.0.0", deps=[dep],
                   toolchain=detect_toolchain(), work_dir=base / f"work{n}",
                   log_path=base / f"log{n}.txt", timeout=300)
    elapsed = time.perf_counter() - start
    assert result.modules == ("rebarapp",)
    return elapsed


def _peer(base: Path, source: Path, dep: DepLib, n: int) -> float:
    copy = base / f"peer{n}"
    shutil.copytree(source, copy)
    (copy / "rebar.config").write_text("{erl_opts, [debug_info]}.\n{deps, []}.\n")
    home = base / f"peerhome{n}"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           "ERL_LIBS": str(dep.lib_dir.parent), "REBAR_COLOR": "none"}
    start = time.perf_counter()
    subprocess.run(["rebar3", "compile"], cwd=copy, env=env, check=True,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    assert (copy / "_build" / "default" / "lib" / "rebarapp" / "ebin" / "rebarapp.beam").is_file()
    return elapsed


def test_cold_rebar3_build_vs_plain_rebar3(benchmark: Any, tmp_path: Path) -> None:
    tc = detect_toolchain()
    src = tmp_path / "src"
    greeter_src = sample_apps.greeter_dep(src)
    greeter = build(greeter_src, tmp_path / "dep-out", app_name="greeter", version="1.0.0",
                    deps=[], toolchain=tc, work_dir=tmp_path / "dep-work",
                    log_path=tmp_path / "dep.log", timeout=300)
    dep = DepLib("greeter", "1.0.0", greeter.lib_dir)
    source = sample_apps.rebar3_app(src)

    ours: list[float] = []
    peer: list[float] = []
    # One warm-up each (page cache, first BEAM start), not counted.
    _ours(tmp_path, source, dep, 0)
    _peer(tmp_path, source, dep, 0)
    for n in range(1, ROUNDS + 1):
        ours.append(_ours(tmp_path, source, dep, n))
        peer.append(_peer(tmp_path, source, dep, n))

    counter = iter(range(100, 10_000))
    benchmark.pedantic(lambda: _ours(tmp_path, source, dep, next(counter)), rounds=3,
                       iterations=1)

    ours_median, peer_median = statistics.median(ours), statistics.median(peer)
    print(
        f"\n[build] cold rebar3 app + 1 dep, {ROUNDS} rounds: "
        f"bstore median {ours_median * 1000:.0f} ms / best {min(ours) * 1000:.0f} ms; "
        f"plain rebar3 compile median {peer_median * 1000:.0f} ms / best "
        f"{min(peer) * 1000:.0f} ms; ratio median {ours_median / peer_median:.2f}, "
        f"best {min(ours) / min(peer):.2f} (target <= {TARGET})"
    )
