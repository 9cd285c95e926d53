"""``store verify --check-contents`` vs ``nix-store --verify --check-contents``.

Both stores hold the same copy of the installed OTP tree (``/usr/lib/erlang``, ~3,900
entries, ~106 MB). nix-store runs without a daemon against a chroot store
(``--store local?root=<tmp>``), so nothing outside the benchmark's tmp dir is touched.
Both run with a warm page cache (each is run once before timing), so the comparison is
hashing plus bookkeeping, not disk speed.

Printed: min (and median) of the rounds and the ratios bstore/nix, for bstore's Python
API (what the CLI command calls) and for the whole ``bstore`` command (which adds ~70 ms
of interpreter start-up and imports; run with compiled bytecode, see
``peers.cli_env``). Run:
``.venv/bin/pytest benchmarks/test_bench_verify.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bstore.store.local import LocalStore
from bstore.store.verify import verify_store
from peers import OTP, cli_env, copy_otp, nix_env

BSTORE = str(Path(sys.executable).with_name("bstore"))
ROUNDS = 7


@dataclass
class Stores:
    bstore: LocalStore
    bstore_root: Path
    nix_store: str


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    if not OTP.is_dir() or shutil.which("nix-store") is None:
        pytest.skip("needs /usr/lib/erlang and nix-store")
    base = tmp_path_factory.mktemp("bench-verify")
    # Links that leave the tree for a file become copies of the file (~3,900 entries).
    tree = copy_otp(base / "otp", copy_escaping_files=True)
    nix = f"local?root={base / 'nixroot'}"
    subprocess.run(["nix-store", "--store", nix, "--add", str(tree)], check=True,
                   capture_output=True, env=nix_env())
    with LocalStore.open(base / "broot") as st:
        st.add_path(tree, "otp")
        yield Stores(st, base / "broot", nix)


def nix_verify(nix: str) -> None:
    proc = subprocess.run(["nix-store", "--store", nix, "--verify", "--check-contents"],
                          capture_output=True, text=True, env=nix_env())
    assert proc.returncode == 0, proc.stderr


def bstore_cli_verify(root: Path) -> None:
    proc = subprocess.run([BSTORE, "--root", str(root), "store", "verify", "--check-contents"],
                          capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _timed(run: Callable[[], object], rounds: int) -> list[float]:
    run()  # warm: page cache, sqlite, bytecode
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def test_verify_check_contents_vs_nix_store(stores: Stores, benchmark: Any) -> None:
    def ours() -> None:
        report = verify_store(stores.bstore, check_contents=True)
        assert report.ok and report.checked == 1

    benchmark.pedantic(ours, rounds=ROUNDS, warmup_rounds=1)
    api = list(benchmark.stats.stats.data)
    nix = _timed(lambda: nix_verify(stores.nix_store), ROUNDS)
    cli = _timed(lambda: bstore_cli_verify(stores.bstore_root), ROUNDS)
    print(f"\nverify --check-contents, OTP tree ({sum(1 for _ in OTP.rglob('*'))} entries),"
          " min (median) of rounds:"
          f"\n  bstore (API)  {min(api):.3f} s ({statistics.median(api):.3f})"
          f"\n  bstore (CLI)  {min(cli):.3f} s ({statistics.median(cli):.3f})"
          f"\n  nix-store     {min(nix):.3f} s ({statistics.median(nix):.3f})"
          f"\n  ratio bstore/nix-store (min): {min(api) / min(nix):.2f} (API),"
          f" {min(cli) / min(nix):.2f} (CLI incl. Python start-up)  [target <= 0.5]"
          f"\n  ratio (median): {statistics.median(api) / statistics.median(nix):.2f} (API),"
          f" {statistics.median(cli) / statistics.median(nix):.2f} (CLI)")
