"""``store verify`` against really damaged stores, and ``--repair --from`` a stream."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bstore.errors import BstoreError
from bstore.store.archive import export_paths
from bstore.store.local import LocalStore
from bstore.store.manifest import scan_tree
from bstore.store.paths import PathKind, StorePath
from bstore.store.verify import (
    ProblemKind,
    diff_tree,
    disk_mcid,
    repair_from_stream,
    verify_store,
)

BSTORE = str(Path(sys.executable).with_name("bstore"))


@dataclass
class Fixture:
    st: LocalStore
    lib: StorePath
    app: StorePath
    stream: Path  # an export of app's closure, taken while the store was good

    def bstore(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BSTORE_ROOT": str(self.st.root)}
        return subprocess.run([BSTORE, *args], env=env, capture_output=True, timeout=120,
                              text=True)

    def file(self, sp: StorePath, rel: str) -> Path:
        return self.st.real_path(sp) / rel


def b3sum(path: Path) -> str:
    """The reference tool's hash (independent of bstore's hashing)."""
    out = subprocess.run(["b3sum", "--no-names", str(path)], capture_output=True, check=True)
    return out.stdout.decode().strip()


def writable(path: Path) -> None:
    """What an intruder does first: store paths are read-only."""
    path.chmod(path.stat().st_mode | 0o200)


@pytest.fixture
def fx(tmp_path: Path) -> Iterator[Fixture]:
    lib_tree = tmp_path / "lib"
    (lib_tree / "sub").mkdir(parents=True)
    (lib_tree / "sub" / "deep.txt").write_text("deep\n")
    (lib_tree / "libfoo.so").write_bytes(os.urandom(2 << 20))
    app_tree = tmp_path / "app"
    (app_tree / "bin").mkdir(parents=True)
    (app_tree / "bin" / "run").write_text("#!/bin/sh\necho run\n")
    (app_tree / "bin" / "run").chmod(0o755)
    (app_tree / "README").write_text("readme\n")
    (app_tree / "link").symlink_to("README")
    st = LocalStore.open(tmp_path / "root")
    lib = st.add_path(lib_tree, "lib")
    with st.staging_dir("t") as stage:
        shutil.copytree(app_tree, stage / "tree", symlinks=True)
        app = st.register_tree(stage / "tree", "app", kind=PathKind.SOURCE, references=(lib,))
    stream = tmp_path / "good.bst"
    with open(stream, "wb") as out:
        export_paths(st, [app], out)
    try:
        yield Fixture(st, lib, app, stream)
    finally:
        with contextlib.suppress(BstoreError):
            st.close()


def test_clean_store_verifies_ok(fx: Fixture) -> None:
    report = verify_store(fx.st, check_contents=True)
    assert report.ok and report.problems == () and report.checked == 2
    res = fx.bstore("store", "verify", "--check-contents")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "checked 2 path(s): ok"


def test_modified_file_names_expected_and_actual_hash(fx: Fixture) -> None:
    target = fx.file(fx.app, "bin/run")
    expected = b3sum(target)
    writable(target)
    target.write_text("#!/bin/sh\necho pwned\n")
    got = b3sum(target)
    res = fx.bstore("store", "verify", "--check-contents")
    assert res.returncode == 1
    assert f"{fx.st.full_path(fx.app)}/bin/run: expected blake3 {expected}, got {got}" \
        in res.stdout.splitlines()
    assert "checked 2 path(s): 1 problem(s)" in res.stdout
    # Without --check-contents only existence is checked (like nix-store --verify).
    assert fx.bstore("store", "verify").returncode == 0


def mutate_added(fx: Fixture) -> None:
    root = fx.st.real_path(fx.app)
    writable(root)
    (root / "extra").write_text("x")


def mutate_added_dir(fx: Fixture) -> None:
    root = fx.st.real_path(fx.app)
    writable(root)
    (root / "newdir" / "inner").mkdir(parents=True)


def mutate_removed(fx: Fixture) -> None:
    writable(fx.st.real_path(fx.app))
    fx.file(fx.app, "README").unlink()


def mutate_removed_dir(fx: Fixture) -> None:
    root = fx.st.real_path(fx.lib)
    writable(root)
    writable(root / "sub")
    shutil.rmtree(root / "sub")


def mutate_mode(fx: Fixture) -> None:
    fx.file(fx.app, "README").chmod(0o555)


def mutate_type(fx: Fixture) -> None:
    writable(fx.st.real_path(fx.app))
    fx.file(fx.app, "README").unlink()
    fx.file(fx.app, "README").mkdir()


def mutate_link(fx: Fixture) -> None:
    writable(fx.st.real_path(fx.app))
    fx.file(fx.app, "link").unlink()
    fx.file(fx.app, "link").symlink_to("bin/run")


def mutate_truncate(fx: Fixture) -> None:
    target = fx.file(fx.lib, "libfoo.so")
    writable(target)
    with open(target, "r+b") as handle:
        handle.truncate(1000)


def mutate_missing(fx: Fixture) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(fx.st.real_path(fx.app))], check=True)
    shutil.rmtree(fx.st.real_path(fx.app))


DAMAGE: dict[str, tuple[Callable[[Fixture], None], str, ProblemKind, str]] = {
    # name: (mutation, which path, kind, message regex after the store path)
    "added file": (mutate_added, "app", ProblemKind.ADDED, r"/extra: unexpected file$"),
    "added dir": (mutate_added_dir, "app", ProblemKind.ADDED, r"/newdir: unexpected directory$"),
    "removed file": (mutate_removed, "app", ProblemKind.REMOVED, r"/README: file is gone$"),
    "removed dir": (mutate_removed_dir, "lib", ProblemKind.REMOVED, r"/sub: directory is gone$"),
    "mode": (mutate_mode, "app", ProblemKind.MODE,
             r"/README: expected a file, got a executable file$"),
    "type": (mutate_type, "app", ProblemKind.TYPE, r"/README: expected a file, got a directory$"),
    "symlink target": (mutate_link, "app", ProblemKind.MODIFIED,
                       r"/link: expected blake3 [0-9a-f]{64}, got [0-9a-f]{64}$"),
    "truncated": (mutate_truncate, "lib", ProblemKind.MODIFIED,
                  r"/libfoo.so: expected blake3 [0-9a-f]{64}, got [0-9a-f]{64}$"),
    "missing": (mutate_missing, "app", ProblemKind.MISSING, r": registered but its directory"
                                                           r" is gone$"),
}


@pytest.mark.parametrize("name", list(DAMAGE), ids=list(DAMAGE))
def test_damage_is_reported_and_repaired(name: str, fx: Fixture) -> None:
    mutate, which, kind, pattern = DAMAGE[name]
    sp = fx.app if which == "app" else fx.lib
    good = fx.st.query_manifest(sp)
    mutate(fx)
    report = verify_store(fx.st, check_contents=True)
    assert not report.ok
    assert [p.kind for p in report.problems] == [kind], report.problems
    problem = report.problems[0]
    assert problem.path == fx.st.full_path(sp)
    assert re.fullmatch(re.escape(fx.st.full_path(sp)) + pattern, problem.message), \
        problem.message
    res = fx.bstore("--json", "store", "verify", "--check-contents")
    assert res.returncode == 1
    data = json.loads(res.stdout)
    assert data["ok"] is False
    assert [(p["kind"], p["severity"]) for p in data["problems"]] == [(kind.value, "error")]
    # Repair from the stream taken while the store was good: atomic swap, then clean.
    fixed = fx.bstore("store", "verify", "--repair", "--from", str(fx.stream))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"info: {fx.st.full_path(sp)}: replaced with the verified copy from" in fixed.stdout
    assert scan_tree(fx.st.real_path(sp)) == good
    assert verify_store(fx.st, check_contents=True).problems == ()
    assert os.listdir(fx.st.root / "tmp") == []


def test_missing_dir_is_seen_without_check_contents(fx: Fixture) -> None:
    mutate_missing(fx)
    res = fx.bstore("store", "verify")
    assert res.returncode == 1
    assert f"{fx.st.full_path(fx.app)}: registered but its directory is gone" in res.stdout


def test_deleted_db_row_gives_dangling_reference_and_unregistered_dir(fx: Fixture) -> None:
    """Delete lib's row with the sqlite3 tool (which does not enforce foreign keys)."""
    subprocess.run(["sqlite3", str(fx.st.layout.db_path),
                    f"DELETE FROM paths WHERE path = '{fx.lib}'"], check=True)
    res = fx.bstore("--json", "store", "verify")
    assert res.returncode == 1
    problems = {(p["kind"], p["path"], p["severity"]) for p in json.loads(res.stdout)["problems"]}
    assert problems == {
        ("dangling-reference", fx.st.full_path(fx.app), "error"),
        ("unregistered", fx.st.full_path(fx.lib), "warning"),
    }
    # The stream has lib: --repair re-registers it (verified), which also heals app.
    fixed = fx.bstore("store", "verify", "--repair", "--from", str(fx.stream))
    assert fixed.returncode == 0, fixed.stdout
    assert f"{fx.st.full_path(fx.lib)}: re-registered from" in fixed.stdout
    assert f"{fx.st.full_path(fx.app)}: references restored from" in fixed.stdout
    assert fx.st.is_valid(fx.lib)
    assert fx.st.query_info(fx.app).references == (fx.lib,)
    assert verify_store(fx.st, check_contents=True).problems == ()


def test_unregistered_dir_alone_is_only_a_warning(fx: Fixture) -> None:
    leftover = fx.st.store_dir / ("0" * 32 + "-crashed")
    leftover.mkdir()
    res = fx.bstore("store", "verify", "--check-contents")
    assert res.returncode == 0
    assert f"warning: {leftover}: in the store directory but not in the database" in res.stdout


def test_verify_named_paths_only(fx: Fixture) -> None:
    mutate_truncate(fx)
    assert fx.bstore("store", "verify", "--check-contents", fx.st.full_path(fx.app)
                     ).returncode == 0
    res = fx.bstore("store", "verify", "--check-contents", fx.st.full_path(fx.lib))
    assert res.returncode == 1
    assert "checked 1 path(s): 1 problem(s)" in res.stdout


def test_repair_from_a_stream_without_the_path_fails_clearly(fx: Fixture, tmp_path: Path
                                                             ) -> None:
    other = tmp_path / "other.bst"
    with open(other, "wb") as out:
        export_paths(fx.st, [fx.lib], out)
    mutate_removed(fx)
    res = fx.bstore("store", "verify", "--repair", "--from", str(other))
    assert res.returncode == 1
    assert f"{fx.st.full_path(fx.app)}: not in {other}, cannot repair" in res.stdout
    assert f"{fx.st.full_path(fx.app)}/README: file is gone" in res.stdout


def test_repair_refuses_a_corrupt_stream_and_changes_nothing(fx: Fixture, tmp_path: Path
                                                             ) -> None:
    mutate_added(fx)
    data = bytearray(fx.stream.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.bst"
    bad.write_bytes(bytes(data))
    before = sorted(os.listdir(fx.st.real_path(fx.app)))
    res = fx.bstore("store", "verify", "--repair", "--from", str(bad))
    assert res.returncode == 1
    assert f"error: {bad}:" in res.stderr
    assert sorted(os.listdir(fx.st.real_path(fx.app))) == before
    assert os.listdir(fx.st.root / "tmp") == []


def test_repair_needs_from_and_from_needs_repair(fx: Fixture) -> None:
    res = fx.bstore("store", "verify", "--repair")
    assert res.returncode == 1 and "--repair needs a source of good copies" in res.stderr
    res = fx.bstore("store", "verify", "--from", str(fx.stream))
    assert res.returncode == 1 and "--from is only used with --repair" in res.stderr


def test_repair_reads_stdin(fx: Fixture) -> None:
    mutate_missing(fx)
    with open(fx.stream, "rb") as stdin:
        res = subprocess.run([BSTORE, "store", "verify", "--repair", "--from", "-"],
                             env={**os.environ, "BSTORE_ROOT": str(fx.st.root)}, stdin=stdin,
                             capture_output=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert b"replaced with the verified copy from <stdin>" in res.stdout


def test_optimised_store_with_shared_inodes_verifies_clean(fx: Fixture, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(fx.file(fx.lib, "sub/deep.txt"), twin / "deep.txt")
    fx.st.add_path(twin, "twin")
    assert fx.bstore("store", "optimise").returncode == 0
    assert fx.file(fx.lib, "sub/deep.txt").stat().st_nlink > 1
    assert verify_store(fx.st, check_contents=True).problems == ()


def test_repair_from_stream_api_reports_per_path(fx: Fixture) -> None:
    mutate_truncate(fx)
    report = verify_store(fx.st, check_contents=True)
    with open(fx.stream, "rb") as raw:
        after = repair_from_stream(fx.st, report, raw, source="good.bst")
    assert [(p.kind, p.path) for p in after.problems] == [
        (ProblemKind.REPAIRED, fx.st.full_path(fx.lib))]
    assert after.ok


def test_diff_tree_is_pure_over_any_tree(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "f").write_text("1")
    manifest = scan_tree(tree)
    assert diff_tree(tree, manifest, "T") == []
    (tree / "a" / "f").write_text("2")
    (tree / "a" / "g").write_text("3")
    problems = diff_tree(tree, manifest, "T")
    assert [(p.kind, p.entry) for p in problems] == [
        (ProblemKind.MODIFIED, "a/f"), (ProblemKind.ADDED, "a/g")]
    os.mkfifo(tree / "fifo")
    assert "T/fifo: unexpected special file" in diff_tree(tree, manifest, "T")[-1].message


def test_report_json_shape(fx: Fixture) -> None:
    mutate_removed(fx)
    report = verify_store(fx.st, check_contents=True)
    assert report.to_dict() == {
        "ok": False, "checked": 2, "problems": [{
            "kind": "removed", "severity": "error", "path": fx.st.full_path(fx.app),
            "entry": "README",
            "message": f"{fx.st.full_path(fx.app)}/README: file is gone"}]}


def test_bad_stream_input_is_unaffected_by_io_wrappers(fx: Fixture) -> None:
    """repair_from_stream takes any binary file object."""
    mutate_removed(fx)
    report = verify_store(fx.st, check_contents=True)
    after = repair_from_stream(fx.st, report, io.BytesIO(fx.stream.read_bytes()),
                               source="mem")
    assert after.ok


@pytest.mark.parametrize("shape", ["tree", "single file", "empty dir"])
def test_disk_mcid_agrees_with_scan_tree(shape: str, tmp_path: Path) -> None:
    """The fast path of --check-contents computes exactly the manifest's MCID."""
    root = tmp_path / "t"
    if shape == "single file":
        root.write_bytes(os.urandom(3 << 20))
    else:
        root.mkdir()
        if shape == "tree":
            (root / "a" / "b").mkdir(parents=True)
            (root / "a.txt").write_text("")
            (root / "a" / "b" / "big").write_bytes(os.urandom((1 << 20) + 7))
            (root / "run").write_text("#!/bin/sh\n")
            (root / "run").chmod(0o755)
            (root / "z").symlink_to("a/b/big")
    before = scan_tree(root).mcid
    assert disk_mcid(root) == before
    if shape == "tree":
        (root / "a" / "b" / "big").chmod(0o755)
        assert disk_mcid(root) == scan_tree(root).mcid != before
        os.mkfifo(root / "fifo")
        assert disk_mcid(root) is None


@pytest.mark.parametrize(("sql", "damage", "message"), [
    ("UPDATE paths SET mcid = 'mcid1-manifest-blake3-' || printf('%064d', 0) WHERE path = ?",
     False,
     r": the database records MCID mcid1-manifest-blake3-0{64} but its manifest has mcid1-"),
    # The manifest is only read when the tree's MCID differs from the recorded one.
    ("UPDATE paths SET manifest = CAST('garbage' AS BLOB) WHERE path = ?", True,
     r": .*manifest of \S+-app: missing header"),
], ids=["mcid column edited", "manifest blob corrupt"])
def test_inconsistent_database_row_is_a_bad_record(fx: Fixture, sql: str, damage: bool,
                                                   message: str) -> None:
    import sqlite3

    if damage:
        mutate_mode(fx)
    conn = sqlite3.connect(fx.st.layout.db_path)
    with conn:
        conn.execute(sql, (str(fx.app),))
    conn.close()
    res = fx.bstore("--json", "store", "verify", "--check-contents")
    assert res.returncode == 1
    problems = json.loads(res.stdout)["problems"]
    assert [p["kind"] for p in problems] == ["bad-record"]
    assert re.search(re.escape(fx.st.full_path(fx.app)) + message, problems[0]["message"]), \
        problems[0]["message"]
