"""What several benchmarks share: the OTP tree input, a daemon-less Nix store, timings.

* :func:`copy_otp` copies the installed OTP tree (``/usr/lib/erlang``) without the
  symlinks that point out of it (Debian points ``man`` and two jQuery files into
  ``/usr/share``), which no store accepts as content.
* :func:`nix_env` is the environment for ``nix``/``nix-store`` against a chroot store
  (``--store local?root=DIR``): no daemon, nothing touches ``/nix``.
* :func:`cli_env` runs the ``bstore`` command with compiled bytecode, as installed.
* :func:`median_seconds` and :func:`print_ratio` time a callable and print a
  bstore/peer line in one format.

The benchmark files import it as ``peers`` (pytest puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from bstore.store.manifest import symlink_escapes

OTP = Path("/usr/lib/erlang")

needs_otp = pytest.mark.skipif(not OTP.is_dir(), reason="needs /usr/lib/erlang")


def copy_otp(dest: Path, *, copy_escaping_files: bool = False) -> Path:
    """Copy the OTP tree to ``dest`` without its symlinks that leave it.

    With ``copy_escaping_files`` a link that leaves the tree for a file is replaced by a
    copy of that file instead of being dropped (links to directories are dropped).
    """
    shutil.copytree(OTP, dest, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = os.fsencode(path.relative_to(dest))
            if path.is_symlink() and symlink_escapes(rel, os.readlink(os.fsencode(path))):
                target = (OTP / path.relative_to(dest)).resolve()
                path.unlink()
                if copy_escaping_files and target.is_file():
                    shutil.copyfile(target, path)
    return dest


def nix_env() -> dict[str, str]:
    """The environment for Nix commands against a daemon-less chroot store."""
    # NIX_REMOTE='' keeps Nix off the daemon; state goes where --store says.
    return {**os.environ, "NIX_REMOTE": "",
            "NIX_CONFIG": "experimental-features = nix-command\nsandbox = false"}


def cli_env() -> dict[str, str]:
    """The environment for running the ``bstore`` command as an installed copy runs.

    pip compiles an installed package's bytecode; this development venv runs with
    ``PYTHONDONTWRITEBYTECODE=1``, which would make every command recompile every bstore
    module it imports (~25 ms of a ~70 ms start-up). Bytecode goes to a cache dir of its
    own (``PYTHONPYCACHEPREFIX``), never into the source tree; the first run fills it.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "bstore-bench-pycache")
    return env


def median_seconds(run: Callable[[], object], rounds: int, *, warm_up: bool = False) -> float:
    """The median wall time of ``rounds`` calls of ``run`` (after one untimed call with
    ``warm_up``: page cache, sqlite, imports)."""
    if warm_up:
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_ratio(title: str, ours_min: float, ours_median: float, peer_name: str,
                peer_times: Sequence[float], target: float) -> float:
    """Print bstore's and the peer's min and median times and their ratios; return the
    ratio of the minimums (least disturbed by other load on a shared machine)."""
    peer_min, peer_median = min(peer_times), statistics.median(peer_times)
    ratio = ours_min / peer_min
    print(f"\n[{title}] bstore min {ours_min:.3f}s median {ours_median:.3f}s | {peer_name} min"
          f" {peer_min:.3f}s median {peer_median:.3f}s |"
          f" ratio (min) {ratio:.2f}, (median) {ours_median / peer_median:.2f}"
          f" (target <= {target})")
    return ratio
