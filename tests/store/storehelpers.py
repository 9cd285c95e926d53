"""Helpers for store tests: tree builders, snapshots, and running the real ``bstore``
command in a subprocess (for crash, lock and race tests)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from bstore.store.local import LocalStore

#: The installed console script next to this interpreter (the real command users run).
BSTORE = [str(Path(sys.executable).with_name("bstore"))]


def write_tree(base: Path, spec: dict[str, str | bytes | dict[str, object]]) -> Path:
    """Create files (str/bytes values) and directories (dict values) under ``base``.

    A key ending in ``*`` makes an executable file; a str value starting with ``->``
    makes a symlink to the rest.
    """
    base.mkdir(parents=True, exist_ok=True)
    for key, value in spec.items():
        if isinstance(value, dict):
            write_tree(base / key, value)  # type: ignore[arg-type]
        elif isinstance(value, str) and value.startswith("->"):
            os.symlink(value[2:], base / key)
        else:
            executable = key.endswith("*")
            path = base / key.rstrip("*")
            path.write_bytes(value.encode() if isinstance(value, str) else value)
            path.chmod(0o755 if executable else 0o644)
    return base


SAMPLE: dict[str, str | bytes | dict[str, object]] = {
    "README": "hello\n",
    "bin": {"run*": "#!/bin/sh\necho hi\n", "link": "->run"},
    "lib": {"a.beam": b"\x00\x01binary", "empty": "", "sub": {"deep.txt": "deep\n"}},
}


def invoke(root: Path, *args: str) -> Result:
    """Run ``bstore --root ROOT args...`` in-process (click's runner)."""
    # Imported here so store-only tests do not depend on every command group importing.
    from bstore.cli.main import cli

    return CliRunner().invoke(cli, ["--root", str(root), *args], catch_exceptions=False)


def run_bstore(root: Path, *args: str, env: dict[str, str] | None = None,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real ``bstore`` command as a separate process."""
    full_env = {**os.environ, "BSTORE_ROOT": str(root), **(env or {})}
    for key in ("BSTORE_CRASH_AT", "BSTORE_PAUSE_AT", "BSTORE_PAUSE_FILE"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run([*BSTORE, *args], env=full_env, capture_output=True, text=True,
                          check=check, timeout=120)


def popen_bstore(root: Path, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[str]:
    """Start the real ``bstore`` command without waiting."""
    full_env = {**os.environ, "BSTORE_ROOT": str(root), **(env or {})}
    return subprocess.Popen([*BSTORE, *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def db_rows(root: Path) -> list[tuple[object, ...]]:
    """Every row of the ``paths`` table (read straight from SQLite)."""
    conn = sqlite3.connect(root / "db.sqlite")
    try:
        return conn.execute("SELECT path, mcid, nar_size, registration_time FROM paths"
                            " ORDER BY path").fetchall()
    finally:
        conn.close()


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """``{relative path: (inode, mode, mtime_ns, size)}`` of everything under
    ``store/`` and ``tmp/`` — to show an operation wrote nothing."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for sub in ("store", "tmp"):
        for dirpath, dirnames, filenames in os.walk(root / sub):
            for name in [*dirnames, *filenames]:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p.relative_to(root))] = (st.st_ino, st.st_mode, st.st_mtime_ns,
                                                 st.st_size)
    return out


def check_consistent(st: LocalStore) -> None:
    """Every valid path's files match its recorded manifest; nothing partial is valid;
    ``store verify --check-contents`` finds no error."""
    from bstore.store.manifest import scan_tree
    from bstore.store.verify import verify_store

    report = verify_store(st, check_contents=True)
    assert report.ok, [p.message for p in report.problems]

    for sp in st.valid_paths():
        recorded = st.query_manifest(sp)
        scanned = scan_tree(st.real_path(sp), outside_links_ok=True)
        assert scanned.mcid == recorded.mcid == st.query_info(sp).mcid


