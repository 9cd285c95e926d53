"""Apps directories: spec file precedence, skips, path tricks and cross-app checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bstore.specs.directory import (
    check_paths,
    cross_check,
    display,
    find_spec_file,
    load_apps_dir,
)
from bstore.specs.formats import SPEC_FILE_NAMES
from bstore.specs.model import AppSpec, IconSpec, SourceSpec, SourceType, SpecOrigin
from bstore.specs.problems import Problem, Severity, SpecError


def _app(apps: Path, name: str, deps: tuple[str, ...] = (), file: str = "app.yaml") -> Path:
    (apps / name).mkdir(parents=True, exist_ok=True)
    path = apps / name / file
    dep_list = ", ".join(deps)
    if file.endswith((".yaml", ".yml")):
        path.write_text(f"name: {name}\nversion: '1.0'\ndepends_on: [{dep_list}]\n")
    elif file.endswith(".json"):
        quoted = ", ".join(f'"{d}"' for d in deps)
        path.write_text(f'{{"name": "{name}", "version": "1.0", "depends_on": [{quoted}]}}')
    else:
        path.write_text(f'#{{name => {name}, version => "1.0", depends_on => [{dep_list}]}}.\n')
    return path


def _lines(problems: tuple[Problem, ...], apps: Path) -> list[str]:
    return [str(p).replace(str(apps) + "/", "") for p in problems]


def test_precedence_and_shadowing(tmp_path: Path) -> None:
    app = tmp_path / "web"
    app.mkdir()
    for name in SPEC_FILE_NAMES:
        (app / name).write_text("x")
    for expected in SPEC_FILE_NAMES:
        location = find_spec_file(app)
        assert location.spec_file == app / expected
        rest = SPEC_FILE_NAMES[SPEC_FILE_NAMES.index(expected) + 1 :]
        assert location.shadowed == tuple(app / n for n in rest)
        (app / expected).unlink()
    assert find_spec_file(app).spec_file is None


def test_a_config_directory_is_not_a_spec(tmp_path: Path) -> None:
    app = tmp_path / "web"
    (app / "config").mkdir(parents=True)
    (app / "app.json").write_text("{}")
    assert find_spec_file(app).spec_file == app / "app.json"
    assert find_spec_file(app).shadowed == ()


def test_shadowed_files_are_warnings(tmp_path: Path) -> None:
    _app(tmp_path, "web", file="app.yml")
    _app(tmp_path, "web", file="config")
    (tmp_path / "web" / "config.json").write_text("not even json")
    result = load_apps_dir(tmp_path)
    assert list(result.specs) == ["web"]
    assert _lines(result.problems, tmp_path) == [
        "web/config.json: warning: shadowed by app.yml (ignored)",
        "web/config: warning: shadowed by app.yml (ignored)",
    ]


def test_skips_are_notes(tmp_path: Path) -> None:
    _app(tmp_path, "web")
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "docs").mkdir()
    (tmp_path / ".git").mkdir()
    result = load_apps_dir(tmp_path)
    assert list(result.specs) == ["web"]
    assert _lines(result.problems, tmp_path) == [
        "README.md: note: not a directory (skipped)",
        "docs: note: no spec file (skipped)",
    ]
    assert result.errors == []


def test_one_bad_spec_among_good_ones(tmp_path: Path) -> None:
    _app(tmp_path, "alpha", file="app.config")
    _app(tmp_path, "beta", ("alpha",), file="app.json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "app.yaml").write_text("name: broken\nversion: [\n")
    _app(tmp_path, "gamma", ("beta",))
    result = load_apps_dir(tmp_path)
    assert sorted(result.specs) == ["alpha", "beta", "gamma"]
    assert [p.source for p in result.errors] == [display(tmp_path / "broken" / "app.yaml")]
    assert result.failed == {"broken"}


def test_name_must_match_directory(tmp_path: Path) -> None:
    _app(tmp_path, "web")
    (tmp_path / "web" / "app.yaml").write_text("name: api\nversion: '1'\n")
    result = load_apps_dir(tmp_path)
    assert result.specs == {}
    assert _lines(result.problems, tmp_path) == [
        "web/app.yaml:1:7: error: name 'api' does not match its directory 'web'"
    ]


@pytest.mark.parametrize("dirname", ["My App", "9lives", "web-app", "Web", "caf\u00e9", "a\nb"])
def test_directory_names_that_are_not_app_names(tmp_path: Path, dirname: str) -> None:
    _app(tmp_path, dirname)
    result = load_apps_dir(tmp_path)
    assert result.specs == {}
    (problem,) = result.problems
    assert problem.severity is Severity.ERROR
    assert "is not a valid OTP application name" in problem.message
    assert "\n" not in str(problem)


def test_non_utf8_directory_names_are_displayed_safely(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/bad\xff"
    os.makedirs(raw)
    with open(raw + b"/app.yaml", "w") as handle:
        handle.write("name: bad\nversion: '1'\n")
    result = load_apps_dir(tmp_path)
    (problem,) = result.problems
    assert "bad\\xff" in str(problem)
    str(problem).encode("utf-8")  # printable on any UTF-8 terminal


def test_symlinked_spec_escaping_the_apps_dir_is_rejected(tmp_path: Path) -> None:
    apps = tmp_path / "apps"
    apps.mkdir()
    outside = tmp_path / "secret.yaml"
    outside.write_text("name: web\nversion: '1'\n")
    (apps / "web").mkdir()
    (apps / "web" / "app.yaml").symlink_to(outside)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "app.yaml").write_text("name: api\nversion: '1'\n")
    (apps / "api").symlink_to(tmp_path / "elsewhere")
    _app(apps, "ok")
    (apps / "ok" / "config.yaml").symlink_to(apps / "ok" / "app.yaml")
    (apps / "linked").mkdir()
    (apps / "linked" / "app.yaml").symlink_to(Path("..") / "ok" / "app.yaml")
    result = load_apps_dir(apps)
    lines = _lines(result.problems, apps)
    assert any(
        line.startswith("api/app.yaml: error: resolves to ")
        and "outside the apps directory" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("web/app.yaml: error: resolves to " + str(outside)) for line in lines
    ), lines
    # a link inside the apps dir is fine (but the name must still match its directory)
    assert "linked/app.yaml:1:7: error: name 'ok' does not match its directory 'linked'" in lines
    assert list(result.specs) == ["ok"]


def test_broken_symlink_spec_is_an_error_not_a_fallthrough(tmp_path: Path) -> None:
    _app(tmp_path, "web", file="config.yaml")
    (tmp_path / "web" / "app.yaml").symlink_to(tmp_path / "missing")
    result = load_apps_dir(tmp_path)
    assert result.specs == {}
    lines = _lines(result.problems, tmp_path)
    assert "web/config.yaml: warning: shadowed by app.yaml (ignored)" in lines
    assert any(line.startswith("web/app.yaml: error: ") for line in lines), lines


def test_unreadable_apps_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read apps directory: No such file"):
        load_apps_dir(tmp_path / "nope")


def test_unknown_dependency(tmp_path: Path) -> None:
    _app(tmp_path, "web", ("db",))
    _app(tmp_path, "api")
    result = load_apps_dir(tmp_path)
    assert list(result.specs) == ["api"]
    assert _lines(tuple(result.errors), tmp_path) == [
        "web/app.yaml:3:14: error: depends on 'db', which is not an app in this directory"
    ]


def test_self_dependency(tmp_path: Path) -> None:
    _app(tmp_path, "web", ("api", "web"))
    _app(tmp_path, "api")
    result = load_apps_dir(tmp_path)
    assert list(result.specs) == ["api"]
    assert _lines(tuple(result.errors), tmp_path) == [
        "web/app.yaml:3:19: error: 'web' depends on itself"
    ]


def test_cycles_are_named_and_only_their_apps_excluded(tmp_path: Path) -> None:
    _app(tmp_path, "a", ("b",))
    _app(tmp_path, "b", ("c",), file="app.json")
    _app(tmp_path, "c", ("a",), file="app.config")
    _app(tmp_path, "d")
    _app(tmp_path, "e", ("d",))
    result = load_apps_dir(tmp_path)
    assert sorted(result.specs) == ["d", "e"]
    assert _lines(tuple(result.errors), tmp_path) == [
        "a/app.yaml:3:14: error: dependency cycle: a -> b -> c -> a",
        "b/app.json:1:48: error: dependency cycle: a -> b -> c -> a",
        "c/app.config:1:47: error: dependency cycle: a -> b -> c -> a",
    ]


def test_dependents_of_excluded_apps_are_excluded(tmp_path: Path) -> None:
    _app(tmp_path, "a", ("b",))
    _app(tmp_path, "b", ("a",))
    _app(tmp_path, "c", ("a",))
    _app(tmp_path, "d", ("c",))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "app.yaml").write_text("name: e\n")  # no version: invalid
    _app(tmp_path, "f", ("e",))
    _app(tmp_path, "g")
    result = load_apps_dir(tmp_path)
    assert list(result.specs) == ["g"]
    lines = _lines(tuple(result.errors), tmp_path)
    assert "c/app.yaml:3:14: error: depends on 'a', which is excluded because of errors" in lines
    assert "d/app.yaml:3:14: error: depends on 'c', which is excluded because of errors" in lines
    assert "f/app.yaml:3:14: error: depends on 'e', whose spec has errors" in lines


def _spec(name: str, source: str, deps: tuple[str, ...] = ()) -> AppSpec:
    return AppSpec(
        name=name,
        version="1",
        source=SourceSpec(SourceType.HEX, ref="1"),
        icon=IconSpec.identicon(name),
        depends_on=deps,
        origin=SpecOrigin(source, None, ()),
    )


def test_duplicate_names_are_errors_on_each_app() -> None:
    result = cross_check([_spec("web", "x/web.yaml"), _spec("web", "y/web.yaml"), _spec("db", "d")])
    assert list(result.specs) == ["db"]
    assert [str(p) for p in result.errors] == [
        "x/web.yaml: error: duplicate app name 'web' (also in y/web.yaml)",
        "y/web.yaml: error: duplicate app name 'web' (also in x/web.yaml)",
    ]


def test_duplicate_names_from_two_apps_dirs(tmp_path: Path) -> None:
    _app(tmp_path / "one", "web")
    _app(tmp_path / "two", "web", file="app.json")
    _app(tmp_path / "two", "db")
    result = check_paths([tmp_path / "one", tmp_path / "two"])
    assert list(result.specs) == ["db"]
    assert len(result.errors) == 2
    assert all("duplicate app name 'web'" in p.message for p in result.errors)


def test_long_dependency_chains_are_fine(tmp_path: Path) -> None:
    specs = [_spec(f"a{i}", f"f{i}", (f"a{i + 1}",)) for i in range(3000)] + [_spec("a3000", "z")]
    result = cross_check(specs)
    assert len(result.specs) == 3001 and result.errors == []
    looped = [*specs[:-1], _spec("a3000", "z", ("a0",))]
    result = cross_check(looped)
    assert result.specs == {}
    assert len(result.errors) == 3001
    assert result.errors[0].message.startswith("dependency cycle: a0 -> a1 -> a2")


def test_check_paths_accepts_files_and_app_dirs(tmp_path: Path) -> None:
    web = _app(tmp_path, "web", ("db",))
    _app(tmp_path, "db")
    alone = check_paths([web])
    assert list(alone.specs) == ["web"]
    assert [p.severity for p in alone.problems] == [Severity.NOTE]
    assert "depends on 'db' (not checked here)" in alone.problems[0].message
    both = check_paths([web, tmp_path / "db" / "app.yaml"])
    assert sorted(both.specs) == ["db", "web"] and both.problems == ()
    app_dir = check_paths([tmp_path / "web"])
    assert app_dir.specs == {} and "not an app in this directory" in app_dir.errors[0].message
    whole = check_paths([tmp_path])
    assert sorted(whole.specs) == ["db", "web"]


def test_symlink_loops_and_fifos_do_not_hang_the_scan(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "app.yaml")
    _app(tmp_path, "web")
    result = load_apps_dir(tmp_path)
    assert list(result.specs) == ["web"]
    assert _lines(result.problems, tmp_path) == [
        "fifo/app.yaml: error: not a regular file",
        "loop: note: not a directory (skipped)",
    ]
