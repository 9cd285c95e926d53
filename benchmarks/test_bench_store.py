"""The store against its peers, same inputs, same run; ratios bstore/peer are printed.

Inputs (created once per session): a 1 GiB file, and a copy of the installed OTP tree
(``/usr/lib/erlang``, ~3,600 files, ~106 MB) without its three symlinks that point out of
the tree (``man``, two jQuery links), which no store accepts as content.

* MCID of the 1 GiB file (in-process ``compute_mcid``) vs ``b3sum --num-threads 1``.
* MCID of the OTP tree (in-process) vs ``b3sum`` over the same files (one process).
* ``bstore store add`` of the OTP tree (the real command, durable: syncfs before the
  rename and commit) vs ``nix-store --add`` into a throwaway chroot Nix store
  (``--store local?root=DIR``: no daemon needed, no fsync of contents).
* ``bstore store gc`` deleting 5,000 unreachable one-file paths vs ``nix-store --gc`` on
  5,000 equivalent paths.

The peer runs in each round's untimed setup right before bstore, so both see the same
machine load; ratios use the minimum of the rounds (least disturbed by other load) and
the medians are printed too. Run:
``.venv/bin/pytest benchmarks/test_bench_store.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bstore.store.atomic import remove_tree
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore
from bstore.store.manifest import compute_mcid
from peers import cli_env, copy_otp, needs_otp, nix_env, print_ratio

BSTORE = str(Path(sys.executable).with_name("bstore"))
GC_PATHS = 5000

needs_b3sum = pytest.mark.skipif(shutil.which("b3sum") is None, reason="needs b3sum")
needs_nix = pytest.mark.skipif(shutil.which("nix-store") is None, reason="needs nix-store")


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 GiB of incompressible-looking data (1 MiB random block, varied per MiB)."""
    path = tmp_path_factory.mktemp("big") / "one-gib"
    block = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as f:
        for i in range(1024):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
    return path


@pytest.fixture(scope="session")
def otp_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of /usr/lib/erlang minus symlinks that leave it."""
    return copy_otp(tmp_path_factory.mktemp("otp") / "erlang")


def _files(tree: Path) -> list[str]:
    return sorted(str(Path(d) / f) for d, _, fs in os.walk(tree) for f in fs
                  if not (Path(d) / f).is_symlink())


class _Peer:
    """Times the peer command inside pedantic's untimed setup."""

    def __init__(self, prepare: Callable[[], None] | None, command: Callable[[], list[str]],
                 env: dict[str, str] | None = None) -> None:
        self.prepare = prepare
        self.command = command
        self.env = env
        self.times: list[float] = []

    def run(self) -> None:
        if self.prepare is not None:
            self.prepare()
        cmd = self.command()
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=self.env)
        self.times.append(time.perf_counter() - start)


def _report(title: str, benchmark: Any, peer: _Peer, peer_name: str, target: float) -> float:
    return print_ratio(title, float(benchmark.stats.stats.min),
                       float(benchmark.stats.stats.median), peer_name, peer.times, target)


@needs_b3sum
def test_mcid_1gib_file_vs_b3sum(benchmark: Any, big_file: Path) -> None:
    peer = _Peer(None, lambda: ["b3sum", "--num-threads", "1", str(big_file)])
    compute_mcid(big_file)  # warm the page cache for both
    benchmark.pedantic(compute_mcid, args=(big_file,), setup=peer.run, rounds=3)
    _report("MCID 1 GiB file", benchmark, peer, "b3sum --num-threads 1", 1.1)


@needs_b3sum
@needs_otp
def test_mcid_otp_tree_vs_b3sum(benchmark: Any, otp_copy: Path) -> None:
    files = _files(otp_copy)
    peer = _Peer(None, lambda: ["b3sum", *files])
    compute_mcid(otp_copy)
    benchmark.pedantic(compute_mcid, args=(otp_copy,), setup=peer.run, rounds=5)
    _report(f"MCID OTP tree ({len(files)} files)", benchmark, peer, "b3sum", 1.5)


@needs_nix
@needs_otp
def test_store_add_otp_vs_nix_store_add(benchmark: Any, otp_copy: Path,
                                        tmp_path: Path) -> None:
    nix_root = tmp_path / "nix"
    roots: list[Path] = []
    cli_times: list[float] = []

    def fresh_nix() -> None:
        remove_tree(nix_root)
        nix_root.mkdir()

    peer = _Peer(fresh_nix, lambda: ["nix-store", "--store", f"local?root={nix_root}",
                                     "--add", str(otp_copy)], env=nix_env())

    def setup() -> None:
        for r in roots:
            remove_tree(r)
        roots.clear()
        peer.run()
        # The real command, as a user runs it (includes Python start-up and imports).
        cli_root = tmp_path / f"cli-{len(peer.times)}"
        start = time.perf_counter()
        subprocess.run([BSTORE, "--root", str(cli_root), "store", "add", str(otp_copy)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=cli_env())
        cli_times.append(time.perf_counter() - start)
        roots.extend([cli_root, tmp_path / f"api-{len(peer.times)}"])

    def add() -> None:
        with LocalStore.open(roots[-1]) as st:
            st.add_path(otp_copy)

    benchmark.pedantic(add, setup=setup, rounds=3)
    _report("store add OTP tree (durable), API", benchmark, peer, "nix-store --add", 0.5)
    _report_cli("store add OTP tree (durable), CLI", cli_times, peer)
    for root in roots:
        with LocalStore.open(root) as st:  # both really added it
            assert [p.name for p in st.valid_paths()] == ["erlang"]


def _report_cli(title: str, times: list[float], peer: _Peer) -> None:
    print(f"[{title}] bstore min {min(times):.3f}s median {statistics.median(times):.3f}s"
          f" | ratio (min) {min(times) / min(peer.times):.2f},"
          f" (median) {statistics.median(times) / statistics.median(peer.times):.2f}")


@pytest.fixture(scope="session")
def small_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """5,000 distinct small files (the contents of 5,000 small store paths)."""
    base = tmp_path_factory.mktemp("small")
    out = []
    for i in range(GC_PATHS):
        p = base / f"p{i}"
        p.write_text(f"small path {i}\n" * 4)
        out.append(p)
    return out


@needs_nix
def test_store_gc_5000_vs_nix_store_gc(benchmark: Any, small_sources: list[Path],
                                       tmp_path: Path) -> None:
    nix_root = tmp_path / "nix"
    roots: list[Path] = []

    def fresh_nix() -> None:
        remove_tree(nix_root)
        nix_root.mkdir()
        subprocess.run(["nix-store", "--store", f"local?root={nix_root}", "--add",
                        *map(str, small_sources)], check=True, stdout=subprocess.DEVNULL,
                       env=nix_env())

    peer = _Peer(fresh_nix, lambda: ["nix-store", "--store", f"local?root={nix_root}",
                                     "--gc"], env=nix_env())

    cli_times: list[float] = []

    def bstore_store(name: str) -> Path:
        root = tmp_path / name
        with LocalStore.open(root) as st:
            st.add_paths([(p, None) for p in small_sources])
        roots.append(root)
        return root

    def setup() -> None:
        for r in roots:
            remove_tree(r)
        roots.clear()
        peer.run()
        cli_root = bstore_store(f"cli-{len(peer.times)}")
        start = time.perf_counter()
        subprocess.run([BSTORE, "--root", str(cli_root), "store", "gc"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
        cli_times.append(time.perf_counter() - start)
        assert os.listdir(cli_root / "store") == []
        bstore_store(f"api-{len(peer.times)}")

    def gc() -> None:
        with LocalStore.open(roots[-1]) as st:
            collect_garbage(st)

    benchmark.pedantic(gc, setup=setup, rounds=3)
    _report(f"store gc {GC_PATHS} paths, API", benchmark, peer, "nix-store --gc", 0.5)
    _report_cli(f"store gc {GC_PATHS} paths, CLI", cli_times, peer)
    assert os.listdir(roots[-1] / "store") == []
    nix_left = [n for n in os.listdir(nix_root / "nix" / "store") if n.startswith("p")
                or "-p" in n]
    assert nix_left == [], "nix-store --gc did not delete the paths"
