"""The binary cache against ``nix copy``, same inputs, same run; ratios are printed.

* Copy of the OTP tree (a copy of ``/usr/lib/erlang`` without its escaping symlinks) as
  a store path to a ``file://`` cache and back into an empty store (in-process
  ``BinaryCache.push`` + ``substitute``) vs ``nix copy --to file://…?compression=zstd``
  and ``nix copy --from`` into an empty daemon-less chroot store
  (``--store local?root=DIR``, ``NIX_REMOTE=''``). Target ratio ≤ 0.5.
* Upgrade transfer: host B has version 1 of a 100-module app (compiled with erlc),
  host A publishes version 2 with one module changed: bytes B reads from the cache vs
  the app's size (target ≤ 5 %), and the compressed NAR Nix would move.

Both run on tmpfs (``/dev/shm``) when there is one, so the disk of a shared machine does
not decide the result; the location is printed. The peer runs in each round's untimed
setup right before bstore. Run:
``.venv/bin/pytest benchmarks/test_bench_cache.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bstore.store.atomic import remove_tree
from bstore.store.cache import BinaryCache, Substituters
from bstore.store.local import LocalStore
from bstore.store.signing import TrustedKeys, generate_key
from peers import copy_otp, needs_otp, nix_env, print_ratio

KEY = generate_key("bench")
TRUSTED = TrustedKeys((KEY.public_key,))

needs_nix = pytest.mark.skipif(shutil.which("nix") is None, reason="needs nix (nix-bin)")
needs_erlc = pytest.mark.skipif(shutil.which("erlc") is None, reason="needs erlc")


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A scratch dir on tmpfs when there is one (the same place for bstore and Nix)."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="bstore-bench-cache-", dir=parent))
    print(f"\n[cache benchmarks in {path}]")
    try:
        yield path
    finally:
        remove_tree(path)


def _nix(*args: str) -> str:
    res = subprocess.run(["nix", *args], check=True, capture_output=True, text=True,
                         env=nix_env())
    return res.stdout.strip()


@needs_nix
@needs_otp
def test_copy_otp_via_file_cache_vs_nix_copy(benchmark: Any, base: Path) -> None:
    tree = copy_otp(base / "erlang")
    root, a_dir = base / "host" / "root", base / "a-root"
    with LocalStore.open(root) as st:
        sp = st.add_path(tree, "erlang")
    os.rename(root, a_dir)
    cache = base / "cache"
    nix_a, nix_b, ncache = base / "nix-a", base / "nix-b", base / "ncache"
    nix_path = _nix("--store", f"local?root={nix_a}", "store", "add-path", str(tree),
                    "--name", "erlang")
    nix_times: list[float] = []
    nix_cpu: list[float] = []
    our_cpu: list[float] = []
    ok: list[bool] = []

    def setup() -> None:
        remove_tree(ncache)
        remove_tree(nix_b)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        _nix("--store", f"local?root={nix_a}", "copy", "--to",
             f"file://{ncache}?compression=zstd", nix_path)
        _nix("copy", "--no-check-sigs", "--from", f"file://{ncache}", "--to",
             f"local?root={nix_b}", nix_path)
        nix_times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        nix_cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        remove_tree(cache)
        remove_tree(root)
        os.rename(a_dir, root)

    def round_trip() -> None:
        cpu = time.process_time()
        with LocalStore.open(root) as st:
            BinaryCache.open(f"file://{cache}").push(st, [sp], key=KEY)
        os.rename(root, a_dir)  # host A leaves; host B starts empty at the same root
        with LocalStore.open(root) as st:
            subs = Substituters([f"file://{cache}"], TRUSTED)
            ok.append(subs.substitute(st, sp))
            subs.close()
        our_cpu.append(time.process_time() - cpu)

    benchmark.pedantic(round_trip, setup=setup, rounds=5)
    assert all(ok) and len(ok) == 5
    assert (Path(nix_b) / nix_path.lstrip("/")).is_dir()
    print_ratio("copy OTP tree to file:// cache and back", float(benchmark.stats.stats.min),
                float(benchmark.stats.stats.median), "nix copy --to/--from", nix_times, 0.5)
    # CPU seconds (user + system, all threads / child processes): less disturbed than
    # wall time when the machine is shared.
    print(f"[same, CPU time] bstore min {min(our_cpu):.3f}s | nix min {min(nix_cpu):.3f}s |"
          f" ratio {min(our_cpu) / min(nix_cpu):.2f}")
    print(f"[cache size] bstore {_du(cache) >> 20} MiB | nix {_du(ncache) >> 20} MiB")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _erlang_app(base: Path, modules: int, changed: int | None) -> Path:
    src = base / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for i in range(modules):
        # A module of realistic size (~10 KB of BEAM): 25 small functions.
        funs = "".join(
            f"fun{j}(X, Y) -> case X of {{ok, V}} -> V + Y * {i * 31 + j}; {{error, R}} ->"
            f" {{error, {{mod{i}, fun{j}, R}}}}; _ -> lists:foldl(fun(E, A) -> A + E * {j}"
            f" end, Y, lists:seq(1, {j + 3})) end.\n" for j in range(25))
        exports = ", ".join(f"fun{j}/2" for j in range(25))
        # Distinct text per module (real modules differ), so compressing the whole app
        # at once does not win by repeating one generated module 100 times.
        text = random.Random(i).randbytes(1500).hex()
        (src / f"mod{i}.erl").write_text(
            f"-module(mod{i}).\n-export([f/0, doc/0, {exports}]).\n"
            f"f() -> {{mod{i}, {2 if i == changed else 1}}}.\n"
            f"doc() -> <<\"{text}\">>.\n{funs}")
    out = base / f"app-{changed}"
    (out / "ebin").mkdir(parents=True)
    subprocess.run(["erlc", "+deterministic", "-o", str(out / "ebin"),
                    *sorted(map(str, src.glob("*.erl")))], check=True, timeout=600)
    (out / "ebin" / "app.app").write_text('{application, app, [{vsn, "1"}]}.\n')
    return out


@needs_nix
@needs_erlc
def test_upgrade_transfer_one_module_of_100(benchmark: Any, base: Path) -> None:
    work = base / "upgrade"
    v1_tree = _erlang_app(work, 100, None)
    v2_tree = _erlang_app(work, 100, 42)
    root, a_dir, cache = work / "host" / "root", work / "a-root", work / "cache"
    with LocalStore.open(root) as st:
        v1 = st.add_path(v1_tree, "app")
        v2 = st.add_path(v2_tree, "app")
        app_size = st.query_info(v2).nar_size
        bc = BinaryCache.open(f"file://{cache}")
        bc.push(st, [v1, v2], key=KEY)
    os.rename(root, a_dir)
    moved: list[int] = []
    files: list[int] = []

    def setup() -> None:
        remove_tree(root)
        with LocalStore.open(root) as st:
            subs = Substituters([f"file://{cache}"], TRUSTED)
            assert subs.substitute(st, v1)
            subs.close()

    def upgrade() -> None:
        with LocalStore.open(root) as st:
            bc = BinaryCache.open(f"file://{cache}")
            subs = Substituters([], TRUSTED, caches=[bc])
            assert subs.substitute(st, v2)
            moved.append(bc.backend.received)
            files.append(subs.report.downloaded_files)
            subs.close()

    benchmark.pedantic(upgrade, setup=setup, rounds=3)
    # What Nix moves for the same upgrade: the whole compressed NAR of version 2.
    nix_a, ncache = work / "nix-a", work / "ncache"
    paths = [_nix("--store", f"local?root={nix_a}", "store", "add-path", str(t), "--name",
                  "app") for t in (v1_tree, v2_tree)]
    _nix("--store", f"local?root={nix_a}", "copy", "--to", f"file://{ncache}?compression=zstd",
         *paths)
    info = json.loads(_nix("path-info", "--json", "--store", f"file://{ncache}", paths[1]))
    entry = info[0] if isinstance(info, list) else info[paths[1]]
    nix_moved = int(entry.get("downloadSize") or entry.get("fileSize") or 0)
    nar_size = int(entry["narSize"])
    print(f"\n[upgrade 1 of 100 modules] bstore moved {moved[-1]} bytes ({files[-1]} file) of"
          f" a {app_size}-byte app = {100 * moved[-1] / app_size:.2f}% (target <= 5%) |"
          f" nix moves the whole NAR: {nix_moved} bytes compressed ({nar_size} NAR) ="
          f" {100 * nix_moved / app_size:.1f}% | bytes ratio bstore/nix"
          f" {moved[-1] / nix_moved:.3f} | pull time min"
          f" {float(benchmark.stats.stats.min):.3f}s")
    assert files[-1] == 1
    assert moved[-1] <= 0.05 * app_size
    print(f"[python] {sys.version.split()[0]}")
