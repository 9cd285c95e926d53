"""``store verify --check-contents`` vs ``nix-store --verify --check-contents``.

Both stores hold the same copy of the installed OTP tree (``/usr/lib/erlang``, ~3,900
entries, ~106 MB). nix-store runs without a daemon against a chroot store
(``--store local?root=<tmp>``), so nothing outside the benchmark's tmp dir is touched.
Both run with a warm page cache (each is run once before timing), so the comparison is
hashing plus bookkeeping, not disk speed.

Printed: median times and the ratio bstore/nix, for bstore's Python API (what the CLI
command calls) and for the whole ``bstore`` command (which adds ~0.3 s of interpreter
start-up and imports). Run:
``.venv/bin/pytest benchmarks/test_bench_verify.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import os
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

OTP = Path("/usr/lib/erlang")
BSTORE = str(Path(sys.executable).with_name("bstore"))
ROUNDS = 7


def copy_otp(dest: Path) -> Path:
    """Copy the OTP tree, replacing links that leave it (Debian points ``man`` and two
    jquery files into /usr/share) by copies, or dropping them when they are dirs."""
    shutil.copytree(OTP, dest, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            original = OTP / path.relative_to(dest)
            resolved = original.resolve()
            if resolved.is_relative_to(OTP.resolve()):
                continue
            path.unlink()
            if resolved.is_file():
                shutil.copyfile(resolved, path)
    return dest


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
    tree = copy_otp(base / "otp")
    nix = f"local?root={base / 'nixroot'}"
    subprocess.run(["nix-store", "--store", nix, "--add", str(tree)], check=True,
                   capture_output=True)
    with LocalStore.open(base / "broot") as st:
        st.add_path(tree, "otp")
        yield Stores(st, base / "broot", nix)


def median_seconds(run: Callable[[], object], rounds: int = ROUNDS) -> float:
    run()  # warm-up: page cache, sqlite, imports
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nix_verify(nix: str) -> None:
    proc = subprocess.run(["nix-store", "--store", nix, "--verify", "--check-contents"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def bstore_cli_verify(root: Path) -> None:
    proc = subprocess.run([BSTORE, "--root", str(root), "store", "verify", "--check-contents"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verify_check_contents_vs_nix_store(stores: Stores, benchmark: Any) -> None:
    def ours() -> None:
        report = verify_store(stores.bstore, check_contents=True)
        assert report.ok and report.checked == 1

    benchmark.pedantic(ours, rounds=ROUNDS, warmup_rounds=1)
    bstore_api = statistics.median(benchmark.stats.stats.data)
    nix = median_seconds(lambda: nix_verify(stores.nix_store))
    cli = median_seconds(lambda: bstore_cli_verify(stores.bstore_root), rounds=3)
    print(f"\nverify --check-contents, OTP tree ({sum(1 for _ in OTP.rglob('*'))} entries):"
          f"\n  bstore (API)  {bstore_api:.3f} s\n  bstore (CLI)  {cli:.3f} s"
          f"\n  nix-store     {nix:.3f} s"
          f"\n  ratio bstore/nix-store: {bstore_api / nix:.2f} (API),"
          f" {cli / nix:.2f} (CLI incl. Python start-up)  [target <= 0.5]")
