"""``bstore generations``, ``generations delete``, ``rollback`` and ``diff``: in-process
(click's runner) and as the real command in a subprocess (crash recovery)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generations"))
from genhelpers import bstore_cmd, build, compile_variants

from bstore.cli.main import cli
from bstore.generations.generation import make_manifest
from bstore.generations.journal import read_journal
from bstore.generations.profiles import Profile
from bstore.generations.switch import commit_generation
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore

Beams = dict[int, dict[str, bytes]]


@pytest.fixture(scope="module")
def beams(tmp_path_factory: pytest.TempPathFactory) -> Beams:
    return compile_variants(tmp_path_factory.mktemp("beams"))


def run(root: Path, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(cli, ["--root", str(root), *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def root(tmp_path: Path, beams: Beams) -> Path:
    """Three generations of profile 'default': web 1.0 (v1), web 1.0 (v2 modules, env
    change), web 1.1 + api; the third is current."""
    root = tmp_path / "root"
    with LocalStore.open(root) as store:
        prof = Profile(store)
        db = build(store, "db", "1.0", {"db": beams[1]["db"]})
        web1 = build(store, "web", "1.0", {"web": beams[1]["web"]}, depends_on=["db"],
                     env={"port": 80})
        web2 = build(store, "web", "1.0", {"web": beams[2]["web"]}, depends_on=["db"],
                     env={"port": 81})
        web3 = build(store, "web", "1.1", {"web": beams[2]["web"]}, depends_on=["db"],
                     env={"port": 81})
        api = build(store, "api", "0.1", {"api": beams[1]["api"]})
        for i, apps in enumerate(([web1, db], [web2, db], [web3, db, api]), 1):
            commit_generation(prof, make_manifest(store, apps, commit=f"{i}" * 40))
    return root


def test_list(root: Path) -> None:
    out = run(root, "generations").output.splitlines()
    assert out[0] == "profile default: 3 generation(s)"
    assert out[1].split()[:1] == ["1"] and "db-1.0, web-1.0" in out[1]
    assert out[3].startswith("*") and out[3].endswith("(current)")
    assert "api-0.1, db-1.0, web-1.1" in out[3] and "333333333333" in out[3]
    doc = json.loads(run(root, "generations", "--json").stdout)
    assert doc["current"] == 3
    assert [g["number"] for g in doc["generations"]] == [1, 2, 3]
    assert doc["generations"][0]["apps"] == [{"name": "db", "version": "1.0"},
                                             {"name": "web", "version": "1.0"}]
    assert doc["generations"][2]["current"] and doc["generations"][2]["commit"] == "3" * 40
    assert json.loads(run(root, "--json", "generations").stdout) == doc


def test_diff(root: Path) -> None:
    text = run(root, "diff").output
    assert "generation 2 -> 3:" in text
    assert "upgraded web 1.0 -> 1.1" in text and "added api 0.1" in text
    assert "restart     web" in text and "start       api" in text
    text = run(root, "diff", "1", "2").output
    assert "rebuilt/reconfigured web 1.0" in text and "modules changed: web" in text
    assert "env set: port" in text
    assert "reload      web" in text and "set port = 81" in text
    doc = json.loads(run(root, "diff", "1", "--json").stdout)
    assert (doc["from"], doc["to"]) == (1, 3)
    assert {a["name"]: a["change"] for a in doc["apps"]} == {
        "api": "added", "db": "unchanged", "web": "upgraded"}
    assert [(p["kind"], p["app"]) for p in doc["plan"]] == [
        ("start", "api"), ("keep", "db"), ("restart", "web")]


def test_rollback_with_dry_run_activator(root: Path) -> None:
    result = run(root, "rollback")
    assert "activation plan (dry-run), generation 3 -> 2:" in result.output
    assert "stop        api" in result.output and "dry-run: stop api" in result.output
    assert "restart     web 1.1 -> 1.0" in result.output
    assert result.output.strip().endswith("profile default: generation 3 -> 2")
    doc = json.loads(run(root, "rollback", "--to", "1", "--json").stdout)
    assert doc == {"profile": "default", "from": 2, "to": 1, "switched": True}
    assert "already at generation 1" in run(root, "rollback", "--to", "1").output
    res = run(root, "rollback", ok=False)
    assert res.exit_code == 1
    assert "generation 1 is the oldest of profile 'default'" in res.output
    res = run(root, "rollback", "--to", "9", "--activator", "none", ok=False)
    assert "has no generation 9 (existing: 1, 2, 3)" in res.output
    res = run(root, "rollback", "--to", "3", "--activator", "warp", ok=False)
    assert "no activator named 'warp'" in res.output
    assert run(root, "rollback", "--to", "3", "--activator", "none").output.strip() == \
        "profile default: generation 1 -> 3"


def test_delete_and_gc(root: Path) -> None:
    res = run(root, "generations", "delete", ok=False)
    assert "give exactly one of --keep N or --older-than D" in res.output
    res = run(root, "generations", "delete", "--older-than", "soon", ok=False)
    assert "duration 'soon' is not understood" in res.output
    assert "deleted generation(s) of profile default: none" in run(
        root, "generations", "delete", "--older-than", "1d").output
    run(root, "rollback", "--to", "2", "--activator", "none")
    doc = json.loads(run(root, "generations", "delete", "--keep", "1", "--json").stdout)
    assert doc == {"profile": "default", "deleted": [1]}  # 3 is newest, 2 is current
    with LocalStore.open(root) as store:
        deleted = sorted(p.name for p in collect_garbage(store).deleted)
        # gen 1's own web build goes; db is shared with the kept generations
        assert deleted == ["generation", "web-1.0"]
        assert Profile(store).numbers() == [2, 3]


def test_hostile_states_are_reported(root: Path, tmp_path: Path) -> None:
    profiles = root / "profiles"
    os.unlink(profiles / "default-2-link")
    os.symlink("/etc/passwd", profiles / "default-2-link")
    res = run(root, "generations", ok=False)
    assert res.exit_code == 1
    assert "default-2-link" in res.output and "points to '/etc/passwd'" in res.output
    assert "hint: remove that link" in res.output
    res = run(root, "--json", "rollback", "--to", "2", ok=False)
    err = json.loads(res.output.strip().splitlines()[-1])
    assert err["error"] == "ProfileError"
    res = run(root, "generations", "--profile", "bad/name", ok=False)
    assert "profile name 'bad/name' is not usable" in res.output


def test_damaged_generation_listed_not_hidden(root: Path) -> None:
    with LocalStore.open(root) as store:
        sp = Profile(store).get(1).store_path
        manifest = store.real_path(sp) / "manifest.json"
    os.chmod(manifest.parent, 0o755)
    os.chmod(manifest, 0o644)
    manifest.write_text("[]")
    out = run(root, "generations").output
    assert "DAMAGED:" in out and "top level: expected an object" in out
    assert "web-1.1" in out
    res = run(root, "rollback", "--to", "1", ok=False)
    assert "manifest.json: top level: expected an object" in res.output


def test_killed_rollback_is_finished_by_next_command(root: Path) -> None:
    env = {**os.environ, "BSTORE_ROOT": str(root), "BSTORE_CRASH_AT": "gen-after-switch"}
    proc = subprocess.run([*bstore_cmd(), "rollback"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with LocalStore.open(root) as store:
        prof = Profile(store)
        assert prof.current_number() == 2 and read_journal(prof) is not None
    # listing cannot activate: it reports the pending activation and keeps the journal
    res = run(root, "generations")
    assert "needs its activation finished" in res.output
    # the next rollback finishes the interrupted activation (3 -> 2), then rolls back
    env.pop("BSTORE_CRASH_AT")
    proc = subprocess.run([*bstore_cmd(), "rollback"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "activation plan (dry-run), generation 3 -> 2" in proc.stdout
    assert "activation plan (dry-run), generation 2 -> 1" in proc.stdout
    assert "interrupted switch 3 -> 2 of profile 'default' finished" in proc.stderr
    with LocalStore.open(root) as store:
        prof = Profile(store)
        assert prof.current_number() == 1 and read_journal(prof) is None
