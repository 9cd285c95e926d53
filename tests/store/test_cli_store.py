"""The ``bstore store`` commands of this layer, in-process and as a real process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from storehelpers import SAMPLE, invoke, run_bstore, write_tree

from bstore.store.local import LocalStore
from bstore.store.manifest import compute_mcid
from bstore.store.paths import PathKind


def test_add_prints_path_and_logs_on_stderr(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = write_tree(tmp_path / "tree", SAMPLE)
    result = run_bstore(root, "store", "add", str(tree), "--name", "my-tree")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert path.startswith(str(root / "store") + "/") and path.endswith("-my-tree")
    assert f"adding {tree}" in result.stderr  # plain log lines when not on a terminal
    assert "\r" not in result.stderr


def test_add_json_and_hash(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = write_tree(tmp_path / "tree", SAMPLE)
    added = invoke(root, "--json", "store", "add", str(tree))
    assert added.exit_code == 0
    data = json.loads(added.stdout)
    assert data["mcid"] == compute_mcid(tree)
    assert data["nar_size"] > 0 and data["path"].endswith("-tree")
    hashed = invoke(root, "store", "hash", str(tree))
    assert hashed.stdout.strip() == compute_mcid(tree)
    hashed_json = json.loads(invoke(root, "--json", "store", "hash", str(tree)).stdout)
    assert hashed_json == {"path": str(tree), "mcid": compute_mcid(tree)}


def test_hash_does_not_add(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = write_tree(tmp_path / "tree", SAMPLE)
    assert invoke(root, "store", "hash", str(tree)).exit_code == 0
    assert not root.exists()


def test_info_closure_referrers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = write_tree(tmp_path / "tree", SAMPLE)
    with LocalStore.open(root) as st:
        dep = st.add_path(tree)
        with st.staging_dir("out") as d:
            out = st.register_tree(write_tree(d / "o", {"x": "y"}), "app", kind=PathKind.OUTPUT,
                                   hash_hex="12" * 32, references=[dep], deriver="app.drv",
                                   signatures=["key1:c2ln"])
        dep_full, out_full = st.full_path(dep), st.full_path(out)
    info = invoke(root, "store", "info", out_full, str(dep))
    assert info.exit_code == 0
    assert f"references:  {dep_full}" in info.stdout
    assert "deriver:     app.drv" in info.stdout and "signatures:  key1:c2ln" in info.stdout
    assert info.stdout.count("mcid:        mcid1-manifest-blake3-") == 2
    data = json.loads(invoke(root, "--json", "store", "info", out_full).stdout)
    assert data[0]["references"] == [dep_full] and data[0]["kind"] == "output"
    assert isinstance(data[0]["registration_time"], int)
    closure = invoke(root, "store", "closure", out_full)
    assert closure.stdout.splitlines() == [dep_full, out_full]
    assert json.loads(invoke(root, "--json", "store", "closure", out_full).stdout) == \
        [dep_full, out_full]
    assert invoke(root, "store", "referrers", dep_full).stdout.splitlines() == [out_full]
    assert json.loads(invoke(root, "--json", "store", "referrers", out_full).stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["store", "info", "0" * 32 + "-ghost"], "is not a valid path in the store"),
        (["store", "closure", "/etc/passwd"], "'/etc/passwd' is not in the store"),
        (["store", "referrers", "nonsense"], "'nonsense' is not a store path base name"),
        (["store", "add", "/nonexistent/x"], "no such file or directory"),
        (["store", "hash", "/nonexistent/x"], "cannot read '/nonexistent/x'"),
        (["store", "add", ".", "--name", "bad/name"], "contains '/'"),
    ],
)
def test_errors(tmp_path: Path, args: list[str], message: str) -> None:
    root = tmp_path / "root"
    LocalStore.open(root).close()
    result = invoke(root, *args)
    assert result.exit_code == 1
    assert any(line.startswith("error: ") and message in line
               for line in result.stderr.splitlines()), result.stderr
    as_json = invoke(root, "--json", *args)
    assert message in json.loads(as_json.stderr)["message"]


def test_info_without_store(tmp_path: Path) -> None:
    result = invoke(tmp_path / "none", "store", "info", "0" * 32 + "-x")
    assert result.exit_code == 1 and "no store at" in result.stderr
    assert not (tmp_path / "none").exists()


def test_add_progress_on_a_terminal(tmp_path: Path) -> None:
    import os
    import pty
    import subprocess

    from storehelpers import BSTORE

    spec = {f"d{i}": {f"f{j}": "x" * j for j in range(300)} for i in range(2)}
    tree = write_tree(tmp_path / "tree", spec)  # type: ignore[arg-type]
    main, side = pty.openpty()
    try:
        proc = subprocess.run([*BSTORE, "--root", str(tmp_path / "root"), "store", "add",
                               str(tree)], stdout=subprocess.PIPE, stderr=side, timeout=120,
                              env={**os.environ, "BSTORE_ROOT": ""})
        os.close(side)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
    assert proc.returncode == 0
    assert proc.stdout.decode().strip().endswith("-tree")
    # one updating line: carriage return + erase, never the plain log line
    assert b"\r\x1b[Kadding " in shown and b"files," in shown
    assert b"adding " + str(tree).encode() + b"\n" not in shown.replace(b"\r\n", b"\n")
