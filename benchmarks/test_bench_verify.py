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

import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bstore.store.local import LocalStore
from bstore.store.verify import verify_store
from peers import OTP, copy_otp, median_seconds, nix_env

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
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verify_check_contents_vs_nix_store(stores: Stores, benchmark: Any) -> None:
    def ours() -> None:
        report = verify_store(stores.bstore, check_contents=True)
        assert report.ok and report.checked == 1

    benchmark.pedantic(ours, rounds=ROUNDS, warmup_rounds=1)
    bstore_api = statistics.median(benchmark.stats.stats.data)
    nix = median_seconds(lambda: nix_verify(stores.nix_store), ROUNDS, warm_up=True)
    cli = median_seconds(lambda: bstore_cli_verify(stores.bstore_root), 3, warm_up=True)
    print(f"\nverify --check-contents, OTP tree ({sum(1 for _ in OTP.rglob('*'))} entries):"
          f"\n  bstore (API)  {bstore_api:.3f} s\n  bstore (CLI)  {cli:.3f} s"
          f"\n  nix-store     {nix:.3f} s"
          f"\n  ratio bstore/nix-store: {bstore_api / nix:.2f} (API),"
          f" {cli / nix:.2f} (CLI incl. Python start-up)  [target <= 0.5]")
