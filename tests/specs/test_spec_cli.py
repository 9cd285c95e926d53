"""``bstore spec check`` and ``bstore spec show``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bstore.cli.main import cli
from bstore.specs import terms
from bstore.specs.terms.model import Atom


def _apps(tmp_path: Path) -> Path:
    apps = tmp_path / "apps"
    (apps / "web").mkdir(parents=True)
    (apps / "web" / "app.yaml").write_text(
        "name: web\nversion: '1.0'\ndepends_on: [db]\nlicense: MIT\nenv:\n  mode: {$atom: prod}\n"
    )
    (apps / "db").mkdir()
    (apps / "db" / "app.config").write_text('#{name => db, version => <<"2.0">>}.\n')
    return apps


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_check_clean_dir_exits_0_with_warnings(tmp_path: Path) -> None:
    apps = _apps(tmp_path)
    code, out = _run("spec", "check", str(apps))
    assert code == 0
    assert out.splitlines() == [
        f"{apps}/web/app.yaml:4:1: warning: unknown key 'license'"
        " (kept, but bstore does not use it)",
        "  hint: known keys: name, version, description, icon, source, env, health, depends_on,"
        " isolation, vm_config",
        "2 valid app(s), 0 error(s), 1 warning(s)",
    ]


def test_check_reports_every_error_with_position_and_exits_1(tmp_path: Path) -> None:
    apps = _apps(tmp_path)
    (apps / "db" / "app.config").write_text('#{name => db,\n  version := "1"}.\n')
    (apps / "api").mkdir()
    (apps / "api" / "app.json").write_text('{"name": "api", "version": "1", "isolation": "pod"}')
    code, out = _run("spec", "check", str(apps))
    assert code == 1
    lines = out.splitlines()
    assert (
        f"{apps}/api/app.json:1:46: error: isolation: expected embedded or vm, found string 'pod'"
        in lines
    )
    assert f"{apps}/db/app.config:2:11: error: expected '=>' or ',' in map, found ':='" in lines
    assert f"{apps}/web/app.yaml:3:14: error: depends on 'db', whose spec has errors" in lines
    assert lines[-1] == "0 valid app(s), 3 error(s), 1 warning(s)"


@pytest.mark.parametrize("flag_first", [True, False])
def test_check_json(tmp_path: Path, flag_first: bool) -> None:
    apps = _apps(tmp_path)
    (apps / "web" / "app.yaml").write_text("name: web\nversion: 1.5\n")
    args = (
        ["--json", "spec", "check", str(apps)]
        if flag_first
        else ["spec", "check", "--json", str(apps)]
    )
    code, out = _run(*args)
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert data["valid_apps"] == ["db"] and data["failed_apps"] == ["web"]
    assert data["problems"] == [
        {
            "severity": "error",
            "file": f"{apps}/web/app.yaml",
            "line": 2,
            "column": 10,
            "message": "version: expected a string, found float 1.5",
            "hint": 'quote it: version: "1.0"',
        }
    ]


def test_check_defaults_to_apps_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _apps(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = _run("spec", "check")
    assert code == 0
    assert out.splitlines()[0].startswith("apps/web/app.yaml:4:1: warning:")


def test_check_single_file(tmp_path: Path) -> None:
    apps = _apps(tmp_path)
    code, out = _run("spec", "check", str(apps / "web" / "app.yaml"))
    assert code == 0
    assert f"{apps}/web/app.yaml:3:14: note: depends on 'db' (not checked here)" in out


def test_show_prints_erlang_terms_with_defaults(tmp_path: Path) -> None:
    apps = _apps(tmp_path)
    result = CliRunner().invoke(cli, ["spec", "show", str(apps / "web" / "app.yaml")])
    assert result.exit_code == 0
    assert "app.yaml:4:1: warning: unknown key 'license'" in result.stderr
    (term,) = terms.parse(result.stdout, "out")
    assert isinstance(term, dict)
    assert term[Atom("name")] == Atom("web")
    assert term[Atom("version")] == b"1.0"
    assert term[Atom("source")] == {Atom("type"): Atom("hex"), Atom("ref"): b"1.0"}
    assert term[Atom("isolation")] == Atom("embedded")
    assert term[Atom("env")] == {Atom("mode"): Atom("prod")}
    assert term[Atom("depends_on")] == [Atom("db")]
    assert term[Atom("license")] == b"MIT"


def test_show_json(tmp_path: Path) -> None:
    apps = _apps(tmp_path)
    result = CliRunner().invoke(cli, ["spec", "show", "--json", str(apps / "db" / "app.config")])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["name"] == "db" and data["version"] == "2.0"
    assert data["source"] == {
        "type": "hex",
        "ref": "2.0",
        "repo": None,
        "url": None,
        "sha256": None,
        "mcid": None,
    }
    assert data["icon"]["type"] == "identicon" and data["health"] is None


def test_show_bad_spec_exits_1_with_positioned_error(tmp_path: Path) -> None:
    apps = _apps(tmp_path)
    (apps / "db" / "app.config").write_text('#{name => web, version => "1"}.')
    code, out = _run("spec", "show", str(apps / "db" / "app.config"))
    assert code == 1
    assert f"{apps}/db/app.config:1:11: error: name 'web' does not match its directory 'db'" in out


@pytest.mark.integration
def test_check_in_a_real_subprocess(tmp_path: Path) -> None:
    apps = _apps(tmp_path)
    (apps / "loop").mkdir()
    (apps / "loop" / "app.yml").write_text("name: loop\nversion: '1'\ndepends_on: [loop]\n")
    bstore = Path(sys.executable).with_name("bstore")
    done = subprocess.run(
        [str(bstore), "spec", "check", str(apps)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert f"{apps}/loop/app.yml:3:14: error: 'loop' depends on itself" in done.stdout
    assert done.stdout.splitlines()[-1] == "2 valid app(s), 1 error(s), 1 warning(s)"
